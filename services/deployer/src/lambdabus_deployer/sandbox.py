"""The instance sandbox: bubblewrap's argv (pure) and whether bubblewrap works here (I/O, once).

What the sandbox gives: a read-only view of the host, a private /tmp, the platform's state dir
hidden, only the instance's own scratch dir writable, uid/gid 65534 in a user namespace, private
pid/ipc/uts namespaces, death with the deployer. What it does not: the network is shared (the
router reaches instances on loopback), and when the deployer runs as root the mapped uid is still
root outside the namespace, so files readable by root's owner bits stay readable (read-only).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lambdabus_platform.errors import PermanentError

NOBODY = 65534


@dataclass(frozen=True)
class Sandbox:
    kind: Literal["bubblewrap", "none"]
    bwrap: str | None = None
    reason: str = ""

    @property
    def enabled(self) -> bool:
        return self.kind == "bubblewrap"


class SandboxUnavailable(PermanentError):
    code = "sandbox_unavailable"


def bwrap_args(
    *,
    hidden: Sequence[str],
    read_only: Sequence[str],
    writable: Sequence[str],
    chdir: str,
) -> list[str]:
    """bubblewrap options (without the program and `--`). Mounts apply in order, so the tmpfs
    over the platform state dir comes before the binds of code and env that may live inside it."""
    args = ["--ro-bind", "/", "/", "--tmpfs", "/tmp", "--dev", "/dev", "--proc", "/proc"]
    for path in hidden:
        args += ["--tmpfs", path]
    for path in read_only:
        args += ["--ro-bind", path, path]
    for path in writable:
        args += ["--bind", path, path]
    args += [
        "--unshare-user",
        "--uid",
        str(NOBODY),
        "--gid",
        str(NOBODY),
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--die-with-parent",
        "--chdir",
        chdir,
    ]
    return args


async def detect_sandbox(mode: Literal["auto", "bubblewrap", "none"]) -> Sandbox:
    """Find bubblewrap and check that it can make the namespaces we ask for (it cannot in
    many containers). `bubblewrap` mode turns any failure into an error; `auto` falls back."""
    if mode == "none":
        return Sandbox(
            "none", reason="sandbox disabled by settings (LAMBDABUS_DEPLOYER_SANDBOX=none)"
        )
    bwrap = shutil.which("bwrap")
    problem = "bubblewrap (bwrap) is not installed" if bwrap is None else await _probe(bwrap)
    if problem:
        if mode == "bubblewrap":
            raise SandboxUnavailable(
                f"{problem}; install bubblewrap or set LAMBDABUS_DEPLOYER_SANDBOX=auto"
            )
        return Sandbox("none", reason=problem)
    return Sandbox("bubblewrap", bwrap=bwrap)


async def _probe(bwrap: str) -> str:
    true = shutil.which("true") or "/bin/true"
    argv = [bwrap, *bwrap_args(hidden=(), read_only=(), writable=(), chdir="/"), "--", true]
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        return f"bubblewrap cannot run: {exc}"
    try:
        _, err = await asyncio.wait_for(process.communicate(), 10)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return "bubblewrap did not finish a trial run in 10 s"
    if process.returncode != 0:
        detail = err.decode(errors="replace").strip() or f"exit code {process.returncode}"
        return f"bubblewrap cannot create a sandbox here ({detail})"
    return ""
