"""What one sandboxed build step sees (pure): the build sandbox of `lambdabus_platform.sandbox`
with this build's staging dir (writable, at its host path), a private scratch dir as `/tmp`
(HOME and the tools' per-build caches), read-only package sources and tool installations, and
nothing else of the host beyond the system paths: not the platform's state dir, other builds,
other environments, the repo checkout, or `/root`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

from lambdabus_platform.sandbox import SYSTEM_PATHS, Bind, NetworkMode, SandboxSpec

TOOLS_DIR = "/lambdabus/bin"  # single files bound into the sandbox (uv, the compile check)
SCRATCH = "/tmp"
BUILD_DIR = "/build"  # where a dependency build sees its staging dir: no host path shows
PATH = f"{TOOLS_DIR}:/usr/local/bin:/usr/bin:/bin"


# The operator's TLS trust and proxy settings: what a build step that uses the network needs
# to reach the package index from this machine (a TLS-intercepting proxy's CA, an egress proxy).
TRUST_VARIABLES = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "no_proxy",
)
_TRUST_PATHS = ("SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS")


def network_env(trust: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The env a networked build step gets from the operator's trust settings (only the
    variables of `TRUST_VARIABLES`), and the host paths it names, to bind read-only."""
    env = {k: v for k, v in trust.items() if k in TRUST_VARIABLES and v}
    paths = [env[k] for k in _TRUST_PATHS if k in env and os.path.isabs(env[k])]
    return env, [p for p in paths if os.path.exists(p)]


def visible_anyway(path: str) -> bool:
    """Whether every sandbox sees `path` already (read-only, under the system paths)."""
    return any(path == root or path.startswith(root + "/") for root in SYSTEM_PATHS)


def install_prefix(executable: str) -> str | None:
    """The directory to bind for an executable (its resolved path) outside the system paths:
    the parent of its `bin/` (a pyenv or nvm installation), else its own directory."""
    if visible_anyway(executable):
        return None
    directory = os.path.dirname(executable)
    if os.path.basename(directory) == "bin":
        return os.path.dirname(directory)
    return directory


def build_step(
    command: Sequence[str],
    *,
    stage: str,
    scratch: str,
    stage_inside: str | None = None,
    chdir: str,
    network: NetworkMode,
    read_only: Iterable[str] = (),
    files: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    hostname: str = "build",
) -> SandboxSpec:
    """The sandbox of one build step. `stage` is bound writable at `stage_inside` (default: its
    own path); `files` binds single host files read-only at the given sandbox paths (under
    `TOOLS_DIR`); `read_only` are host dirs bound at their own paths. The scratch dir comes
    first, so binds below /tmp (a state dir in a temp dir) stay visible."""
    binds = [Bind(scratch, SCRATCH, writable=True)]
    for path in sorted(set(read_only)):
        if not visible_anyway(path):
            binds.append(Bind(path, path))
    for dest, source in sorted((files or {}).items()):
        binds.append(Bind(source, dest))
    binds.append(Bind(stage, stage_inside or stage, writable=True))
    environment = {
        "HOME": SCRATCH,
        "TMPDIR": SCRATCH,
        "PATH": PATH,
        "LANG": "C.UTF-8",
        **(env or {}),
    }
    return SandboxSpec(
        command=tuple(command),
        env=tuple(sorted(environment.items())),
        binds=tuple(binds),
        chdir=chdir,
        network=network,
        hostname=hostname,
    )
