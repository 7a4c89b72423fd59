"""The deployer's decisions, with no I/O: what should run, how an instance is started, when to
restart it, and what the deployment state and its lifecycle event become after an observation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Literal

from lambdabus_deployer.settings import DeployerSettings
from lambdabus_events.catalog import (
    DeploymentData,
    DeploymentFailed,
    DeploymentReady,
    DeploymentScaled,
    DeploymentScaledData,
    DeploymentStarted,
    DeploymentStopped,
    LifecycleEvent,
    lifecycle_event,
)
from lambdabus_events.models import (
    RESERVED_ENV,
    RESERVED_ENV_PREFIXES,
    ArtifactManifest,
    BuildState,
    DeploymentState,
    FunctionConfig,
    FunctionRecord,
    InstanceLimits,
    InstanceState,
    Runtime,
)
from lambdabus_platform.errors import PermanentError
from lambdabus_platform.sandbox import Bind, DataFile, NetworkMode, SandboxSpec

FILE_ARTIFACT = "file://"
IMAGE_ARTIFACT = "image://"  # a prebuilt image (spec `image`); a built one is a bare reference
_KEY_SALT = os.urandom(16)  # replaced by the state dir's (`use_key_salt`) in a deployer
CRASH_TAIL_LINES = 20


def use_key_salt(path: Path) -> None:
    """Salt revision keys with the secret in `path` (0600, made once, shared by every deployer
    of this state dir), so the next deployer recognises what runs."""
    global _KEY_SALT
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        salt = path.read_bytes()
        if len(salt) >= 16:
            _KEY_SALT = salt
            return
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW)
    salt = os.urandom(16)
    with os.fdopen(fd, "wb") as f:
        f.write(salt)
    _KEY_SALT = salt


class RuntimeUnavailable(PermanentError):
    code = "runtime_unavailable"


@dataclass(frozen=True)
class DesiredRevision:
    """What should run for one function: an artifact and the config of the current record."""

    namespace: str
    name: str
    uid: str
    generation: int
    build_generation: int
    artifact: str
    runtime: Runtime
    env: tuple[tuple[str, str], ...]
    replicas: int
    memory: int
    timeout: float
    cpu: int = 1000
    pids: int = 128
    open_files: int = 1024
    tmp_size: int = 64
    network: Literal["outbound", "none"] = "outbound"
    # Resolved from the secrets KV by the deployer (never in a record or an event): each
    # secret named in `spec.secrets` as (name, ((key, value), ...)), mounted read-only at
    # /secrets/<name>/<key>; and the env vars of `spec.env_from`, applied inside the sandbox.
    # Not in the repr: a revision in a log line or an error must not show a value.
    secret_files: tuple[tuple[str, tuple[tuple[str, bytes], ...]], ...] = field(
        default=(), repr=False
    )
    secret_env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    command: tuple[str, ...] = ()  # runtime custom: the program and its arguments
    # `spec.scale` is set: `replicas` is the autoscaler's (its own deployment.scaled events say
    # from, to and why; the state's phase changes to `scaled` announce nothing more).
    autoscaled: bool = False
    # The revision this is (`<name>-00001`; "" before revisions were kept), and whether it runs
    # apart from the function's latest revision because a route names it (not in the key).
    revision: str = ""
    pinned: bool = False
    # The whole spec, for a backend that renders from it (Kubernetes); not part of the key.
    spec: FunctionConfig | None = field(default=None, compare=False, repr=False)

    @property
    def runner_name(self) -> str:
        """The backend's name for the runner: the function, or `<name>@<revision>` pinned."""
        return f"{self.name}@{self.revision}" if self.pinned else self.name

    @property
    def function(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def key(self) -> str:
        """Identifies what an instance runs. The replica count is not part of it: changing it
        scales the running revision instead of rolling out a new one."""
        # Salted: the key shows in instance ids (logs, metrics), and an unsalted hash of a
        # short password could be searched offline. The salt is the state dir's, shared by
        # the deployer replicas and kept across restarts: an adopted instance keeps its key.
        secrets = hashlib.sha256(
            _KEY_SALT + repr((self.secret_files, self.secret_env)).encode()
        ).hexdigest()
        material = json.dumps(
            [
                self.uid,
                self.artifact,
                self.runtime,
                self.env,
                self.memory,
                self.timeout,
                self.cpu,
                self.pids,
                self.open_files,
                self.tmp_size,
                self.network,
                secrets,
                *([list(self.command)] if self.command else []),
            ]
        )
        return hashlib.sha256(material.encode()).hexdigest()[:12]


# -- secrets ---------------------------------------------------------------------------------

# The secrets a function names that exist in its namespace: name → {key: value}.
SecretValues = Mapping[str, Mapping[str, str]]
SECRET_NOT_FOUND = "SecretNotFound"
SECRET_UNREADABLE = "SecretUnreadable"


@dataclass(frozen=True)
class ResolvedSecrets:
    files: tuple[tuple[str, tuple[tuple[str, bytes], ...]], ...] = field(default=(), repr=False)
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)


def resolve_secrets(
    namespace: str, spec: FunctionConfig, found: SecretValues
) -> ResolvedSecrets | Failure:
    """What `spec.secrets` mounts and `spec.env_from` sets, from the secrets found; or a
    SecretNotFound failure naming the first missing secret or key (names only). Pure."""
    for name in sorted(spec.secret_names()):
        if name not in found:
            return Failure(
                SECRET_NOT_FOUND,
                f"secret {name} does not exist in namespace {namespace}; create it "
                f"(POST /v1/namespaces/{namespace}/secrets) and the function starts",
            )
    for var, ref in sorted(spec.env_from.items()):
        if ref.key not in found[ref.secret]:
            return Failure(
                SECRET_NOT_FOUND,
                f"secret {ref.secret} has no key {ref.key} (env_from {var}); its keys: "
                f"{', '.join(sorted(found[ref.secret])) or 'none'}",
            )
    files = tuple(
        (name, tuple((k, v.encode()) for k, v in sorted(found[name].items())))
        for name in sorted(set(spec.secrets))
    )
    env = tuple((var, found[ref.secret][ref.key]) for var, ref in sorted(spec.env_from.items()))
    return ResolvedSecrets(files, env)


def _built(
    record: FunctionRecord,
    build: BuildState,
    artifact: str,
    generation: int,
    secrets: ResolvedSecrets,
) -> DesiredRevision:
    spec = record.spec
    return DesiredRevision(
        namespace=record.namespace,
        name=record.name,
        uid=record.uid,
        generation=generation,
        build_generation=build.generation,
        artifact=artifact,
        runtime=spec.runtime,
        env=tuple(sorted(spec.env.items())),
        replicas=spec.replicas,
        memory=spec.memory,
        timeout=spec.timeout,
        cpu=spec.cpu,
        pids=spec.pids,
        open_files=spec.open_files,
        tmp_size=spec.tmp_size,
        network=spec.network,
        secret_files=secrets.files,
        secret_env=secrets.env,
        command=tuple(spec.command),
        spec=spec,
    )


def pinned_desired(
    record: FunctionRecord, artifact: str, build_generation: int, secrets: ResolvedSecrets
) -> DesiredRevision:
    """A revision run apart: its own config (`record` carries the revision's spec) and the
    artifact the deployer ran it with."""
    build = BuildState(
        namespace=record.namespace,
        name=record.name,
        uid=record.uid,
        generation=build_generation,
        phase="succeeded",
        artifact=artifact,
        updated_at=record.updated_at,
    )
    return _built(record, build, artifact, record.generation, secrets)


def desired_instances(
    record: FunctionRecord,
    build_state: BuildState | None,
    running: DesiredRevision | None = None,
    secrets: ResolvedSecrets | None = None,
) -> DesiredRevision | None:
    """The revision to run: the artifact of the newest succeeded build of this function (this
    uid) with the config of the current record, so a config-only update redeploys the same
    artifact. A generation applies whole: while the build of a new source is pending (or
    failed), what runs keeps running unchanged (`running`), and its new config waits for its
    new code. With nothing running, a build of an older source is better than nothing; it runs
    under the generation it was built for. None when nothing was built. `secrets`: what the
    record's secrets resolved to (see `resolve_secrets`)."""
    secrets = secrets or ResolvedSecrets()
    if record.spec.image:  # a prebuilt image (kubernetes): nothing to build, it runs as is
        prebuilt = BuildState(
            namespace=record.namespace,
            name=record.name,
            uid=record.uid,
            generation=record.generation,
            phase="succeeded",
            artifact=f"{IMAGE_ARTIFACT}{record.spec.image}",
            updated_at=record.updated_at,
        )
        return _built(record, prebuilt, prebuilt.artifact or "", record.generation, secrets)
    build = build_state
    if (
        build is not None
        and build.uid == record.uid
        and build.phase == "succeeded"
        and build.artifact
    ):
        same_source = build.source_sha256 in ("", record.source.sha256)
        same_runtime = build.runtime in ("", record.spec.runtime)
        if same_source and same_runtime:
            return _built(record, build, build.artifact, record.generation, secrets)
        if running is None or running.uid != record.uid:
            generation = min(build.generation, record.generation)
            return _built(record, build, build.artifact, generation, secrets)
    if running is not None and running.uid == record.uid:
        return running
    return None


def manifest_path(artifact: str) -> Path:
    """The manifest file of a local artifact reference (`file://<abs path>`)."""
    if not artifact.startswith(FILE_ARTIFACT):
        raise PermanentError(
            f"artifact {artifact!r} is not a local file:// reference; "
            "the local deployer runs only artifacts of the local builder",
            code="unsupported_artifact",
        )
    path = Path(artifact.removeprefix(FILE_ARTIFACT))
    if not path.is_absolute():
        raise PermanentError(f"artifact path {path} is not absolute", code="unsupported_artifact")
    return path


# -- starting an instance --------------------------------------------------------------------

# Where things are inside the sandbox.
SANDBOX_TMP = "/tmp"
SANDBOX_RUN = "/run/lambdabus"
SANDBOX_ENV_FILE = f"{SANDBOX_RUN}/env.json"
SANDBOX_SOCKET_DIR = f"{SANDBOX_RUN}/http"
SOCKET_NAME = "sock"
SECRETS_DIR = "/secrets"
# The code, the dependency environment and the runtime SDK, at fixed paths inside the sandbox
# (the host's layout is none of the function's business).
SANDBOX_CODE = "/lambdabus/code"
SANDBOX_DEPS = "/lambdabus/deps"
SANDBOX_RUNTIME = "/lambdabus/runtime"
ENV_FILE_VAR = "LAMBDABUS_ENV_FILE"


@dataclass(frozen=True)
class RuntimePaths:
    """Where the runtime SDK is: put on the instance's PYTHONPATH, never installed into it."""

    pythonpath: str | None = None
    node_server: str | None = None
    node: str | None = None


@dataclass(frozen=True)
class InstanceSpec:
    """One instance's host paths: `scratch` (its /tmp, HOME and TMPDIR) and `socket_dir`
    (where it listens; the deployer owns it, the router connects there); both private."""

    id: str
    scratch: str
    revision: DesiredRevision
    runtime: RuntimePaths
    socket_dir: str = ""
    # False when a cgroup limits the memory of the whole process tree: no per-process limit
    # (Node's heap flag, RLIMIT_AS) then, so going over it is an OOM kill, as for any runtime.
    per_process_memory: bool = True

    @property
    def socket(self) -> str:
        return f"{self.socket_dir}/{SOCKET_NAME}"

    @property
    def endpoint(self) -> str:
        return f"{UNIX_ENDPOINT}{self.socket}"


UNIX_ENDPOINT = "unix:"


def _fmt(value: float) -> str:
    return f"{value:g}"


def runtime_command(
    manifest: ArtifactManifest, instance: InstanceSpec, *, socket: str | None = None
) -> list[str]:
    """The runtime's own argv: listening on `socket`, or on a free loopback port."""
    rev = instance.revision
    where = ["--socket", socket] if socket else ["--port", "0", "--host", "127.0.0.1"]
    flags = [
        "--code",
        manifest.code_dir,
        "--entrypoint",
        manifest.entrypoint,
        *where,
        "--function",
        rev.function,
        "--timeout",
        _fmt(rev.timeout),
        "--memory",
        str(rev.memory),
        "--runtime",
        manifest.runtime,
    ]
    if manifest.function != "main":  # Kubeless's handler: `helloget.foo` calls foo
        flags += ["--handler", manifest.function]
    if manifest.runtime == "custom":
        # The Python runtime relays the socket to the program's $PORT (lambdabus_runtime.relay).
        flags += ["--command", json.dumps(list(rev.command))]
    if manifest.runtime == "nodejs20":
        rt = instance.runtime
        if not rt.node or not rt.node_server:
            raise RuntimeUnavailable(
                "node functions need `node` on PATH and the runtime's server.js "
                "(LAMBDABUS_DEPLOYER_NODE_SERVER)"
            )
        # V8 reserves far more address space than it uses, so RLIMIT_AS would kill it at start;
        # without a memory cgroup, the heap cap is the limit for node.
        heap = [f"--max-old-space-size={rev.memory}"] if instance.per_process_memory else []
        return [rt.node, *heap, rt.node_server, *flags]
    if not instance.runtime.pythonpath:
        raise RuntimeUnavailable(
            "the runtime SDK (lambdabus_runtime) is not installed; "
            "set LAMBDABUS_DEPLOYER_RUNTIME_PYTHONPATH to the directory that holds it"
        )
    return [f"{manifest.env_dir}/bin/python", "-m", "lambdabus_runtime", *flags]


def uses_rlimit_as(manifest: ArtifactManifest) -> bool:
    return manifest.runtime != "nodejs20"


def is_reserved(name: str) -> bool:
    return name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES)


def function_env(revision: DesiredRevision) -> dict[str, str]:
    """The function's own env: `env` and then `env_from` (secrets). Names the runtime and the
    sandbox depend on are dropped even if they got this far (the API rejects them): these
    values are only ever applied inside the sandbox, by the runtime."""
    env = {k: v for k, v in revision.env if not is_reserved(k)}
    env.update((k, v) for k, v in revision.secret_env if not is_reserved(k))
    return env


def env_file(revision: DesiredRevision) -> bytes:
    """The content of the file the runtime reads its function's env from (LAMBDABUS_ENV_FILE)."""
    return json.dumps(function_env(revision), separators=(",", ":")).encode()


def _safe_part(part: str) -> bool:
    return bool(part) and "/" not in part and part not in (".", "..") and "\0" not in part


def secret_files(revision: DesiredRevision) -> tuple[DataFile, ...]:
    """`/secrets/<name>/<key>` for every key of every secret the function names."""
    return tuple(
        DataFile(f"{SECRETS_DIR}/{name}/{key}", value, mode=0o400)
        for name, items in revision.secret_files
        if _safe_part(name)
        for key, value in items
        if _safe_part(key)
    )


def runtime_env(
    manifest: ArtifactManifest,
    instance: InstanceSpec,
    settings: DeployerSettings,
    *,
    tmp: str,
    env_file_path: str,
) -> dict[str, str]:
    """The environment the runtime starts with: PATH, where its scratch dir, the runtime and
    the function's env file are. Nothing of the platform's environment (no LAMBDABUS_*
    settings, no credentials) and nothing of the function's (the runtime adds that itself)."""
    env = {"PATH": settings.path, "LANG": "C.UTF-8"}
    if manifest.runtime != "nodejs20":
        env["MALLOC_ARENA_MAX"] = "2"  # glibc arenas reserve 64 MiB each against RLIMIT_AS
    env.update(HOME=tmp, TMPDIR=tmp)
    if manifest.runtime == "nodejs20":
        env["NODE_PATH"] = f"{manifest.env_dir}/node_modules"
    else:
        env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        env["PYTHONPATH"] = instance.runtime.pythonpath or ""
    env[ENV_FILE_VAR] = env_file_path
    return env


def _inside(
    manifest: ArtifactManifest, runtime: RuntimePaths
) -> tuple[ArtifactManifest, RuntimePaths, list[Bind]]:
    """The manifest and runtime paths as the sandbox sees them, and the binds that make it so."""
    binds = [Bind(manifest.code_dir, SANDBOX_CODE), Bind(manifest.env_dir, SANDBOX_DEPS)]
    inside = manifest.model_copy(update={"code_dir": SANDBOX_CODE, "env_dir": SANDBOX_DEPS})
    if manifest.runtime == "nodejs20":
        if not runtime.node_server:
            return inside, runtime, binds
        server = Path(runtime.node_server)
        binds.append(Bind(str(server.parent), f"{SANDBOX_RUNTIME}/node"))
        return inside, replace(runtime, node_server=f"{SANDBOX_RUNTIME}/node/{server.name}"), binds
    entries = [p for p in (runtime.pythonpath or "").split(":") if p]
    paths = [f"{SANDBOX_RUNTIME}/python{i}" for i in range(len(entries))]
    binds += [Bind(entry, path) for entry, path in zip(entries, paths, strict=True)]
    return inside, replace(runtime, pythonpath=":".join(paths) or None), binds


def render_sandbox(
    manifest: ArtifactManifest,
    instance: InstanceSpec,
    settings: DeployerSettings,
    *,
    interpreter_dirs: Sequence[str] = (),
) -> SandboxSpec:
    """What one instance runs and sees in its sandbox: the runtime listening on a socket in
    its own dir; its code, dependency environment and the runtime SDK read-only at fixed
    paths, and the interpreter (`interpreter_dirs`, e.g. the Python a virtualenv points to)
    read-only where it is; its scratch dir as /tmp; its env and secrets as files made from
    data (never in an argv or an environment outside the sandbox)."""
    rev = instance.revision
    inside, runtime, binds = _inside(manifest, instance.runtime)
    view = replace(instance, runtime=runtime)
    binds += [Bind(path, path) for path in _dedupe(interpreter_dirs)]
    binds += [
        Bind(instance.scratch, SANDBOX_TMP, writable=True),
        Bind(instance.socket_dir, SANDBOX_SOCKET_DIR, writable=True),
    ]
    command = runtime_command(inside, view, socket=f"{SANDBOX_SOCKET_DIR}/{SOCKET_NAME}")
    env = runtime_env(inside, view, settings, tmp=SANDBOX_TMP, env_file_path=SANDBOX_ENV_FILE)
    return SandboxSpec(
        command=tuple(command),
        env=tuple(env.items()),
        binds=tuple(binds),
        files=(DataFile(SANDBOX_ENV_FILE, env_file(rev), mode=0o400), *secret_files(rev)),
        chdir=SANDBOX_TMP,
        network=rev.network,
        hostname=rev.name,
    )


def render_unsandboxed(
    manifest: ArtifactManifest, instance: InstanceSpec, settings: DeployerSettings
) -> tuple[list[str], dict[str, str]]:
    """The argv and env of an instance run without a sandbox (bubblewrap unavailable or turned
    off): the same runtime on its socket, its env file in its private socket dir."""
    command = runtime_command(manifest, instance, socket=instance.socket)
    env = runtime_env(
        manifest,
        instance,
        settings,
        tmp=instance.scratch,
        env_file_path=f"{instance.socket_dir}/env.json",
    )
    return command, env


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


# -- the pool of pre-started runtimes ----------------------------------------------------------

POOL_FLAG = "--pool"  # `python -m lambdabus_runtime --pool`: waits for its function on stdin
# After `--pool`: room the runtime overwrites with its function's flags once specialised, so
# that `ps` (/proc/<pid>/cmdline) shows which function a process serves.
POOL_TITLE_ROOM = " " * 512
POOL_HOSTNAME = "lambdabus"  # a pooled sandbox is made before its function's name is known


@dataclass(frozen=True)
class PoolKey:
    """What a pre-started runtime is made for: everything its sandbox is built with before a
    function is known. Any revision with the same key can take it."""

    runtime: str
    env_dir: str  # the (shared, content-addressed) dependency environment, bound read-only
    network: NetworkMode
    tmp_size: int  # MiB: the scratch tmpfs is mounted at start
    interpreter_dirs: tuple[str, ...] = ()
    # Node cannot lower its own rlimits: its slots start with the function's open files (0:
    # a Python slot, which lowers them itself once specialised).
    open_files: int = 0


def pool_key(
    manifest: ArtifactManifest,
    revision: DesiredRevision,
    *,
    outbound: bool,
    interpreter_dirs: Sequence[str] = (),
    node: bool = False,
) -> PoolKey | None:
    """The pool a revision's instances may start from, or None: Python runtimes, and Node's
    when `node` (the runtime is there and a cgroup, not a heap flag given at start, limits
    its memory); custom programs start fresh; and only without secret files (those are made
    from data when the sandbox is built, never sent over the control channel)."""
    if manifest.runtime == "custom" or secret_files(revision):
        return None
    if manifest.runtime == "nodejs20" and not node:
        return None
    network: NetworkMode = revision.network if outbound else "none"
    return PoolKey(
        runtime=manifest.runtime,
        env_dir=manifest.env_dir,
        network=network,
        tmp_size=revision.tmp_size,
        interpreter_dirs=tuple(_dedupe(interpreter_dirs)),
        open_files=revision.open_files if manifest.runtime == "nodejs20" else 0,
    )


def render_pooled(
    key: PoolKey,
    *,
    code_dir: str,
    scratch: str,
    socket_dir: str,
    runtime: RuntimePaths,
    path: str,
) -> SandboxSpec:
    """A pre-started runtime's sandbox: as `render_sandbox` makes an instance's, but with an
    empty code dir of its own (filled when it is specialised), no env file and no secrets (its
    function's env comes over the control channel), and the pool's hostname."""
    binds = [Bind(code_dir, SANDBOX_CODE), Bind(key.env_dir, SANDBOX_DEPS)]
    tail = [
        Bind(scratch, SANDBOX_TMP, writable=True),
        Bind(socket_dir, SANDBOX_SOCKET_DIR, writable=True),
    ]
    if key.runtime == "nodejs20":
        if not runtime.node or not runtime.node_server:
            raise RuntimeUnavailable("node functions need `node` and the runtime's server.js")
        server = Path(runtime.node_server)
        binds.append(Bind(str(server.parent), f"{SANDBOX_RUNTIME}/node"))
        binds += [Bind(d, d) for d in key.interpreter_dirs]
        node_env = {
            "PATH": path,
            "LANG": "C.UTF-8",
            "HOME": SANDBOX_TMP,
            "TMPDIR": SANDBOX_TMP,
            "NODE_PATH": f"{SANDBOX_DEPS}/node_modules",
        }
        inside_server = f"{SANDBOX_RUNTIME}/node/{server.name}"
        return SandboxSpec(
            command=(runtime.node, inside_server, POOL_FLAG, POOL_TITLE_ROOM),
            env=tuple(node_env.items()),
            binds=(*binds, *tail),
            chdir=SANDBOX_TMP,
            network=key.network,
            hostname=POOL_HOSTNAME,
        )
    entries = [p for p in (runtime.pythonpath or "").split(":") if p]
    inside = [f"{SANDBOX_RUNTIME}/python{i}" for i in range(len(entries))]
    binds += [Bind(entry, where) for entry, where in zip(entries, inside, strict=True)]
    binds += [Bind(d, d) for d in key.interpreter_dirs]
    binds += tail
    env = {
        "PATH": path,
        "LANG": "C.UTF-8",
        "MALLOC_ARENA_MAX": "2",
        "HOME": SANDBOX_TMP,
        "TMPDIR": SANDBOX_TMP,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": ":".join(inside),
    }
    return SandboxSpec(
        command=(
            f"{SANDBOX_DEPS}/bin/python",
            "-m",
            "lambdabus_runtime",
            POOL_FLAG,
            POOL_TITLE_ROOM,
        ),
        env=tuple(env.items()),
        binds=tuple(binds),
        chdir=SANDBOX_TMP,
        network=key.network,
        hostname=POOL_HOSTNAME,
    )


def pool_message(
    manifest: ArtifactManifest, instance: InstanceSpec, rlimits: Sequence[tuple[int, int]]
) -> bytes:
    """The one line that specialises a pre-started runtime: the flags `render_sandbox` would
    give it, its function's env (what the env file holds), and the rlimits (resource, value)
    it sets on itself before it loads the function."""
    inside, runtime, _ = _inside(manifest, instance.runtime)
    view = replace(instance, runtime=runtime)
    command = runtime_command(inside, view, socket=f"{SANDBOX_SOCKET_DIR}/{SOCKET_NAME}")
    if manifest.runtime == "nodejs20":  # without `node [flags] <server.js>`
        argv = command[command.index(str(runtime.node_server)) + 1 :]
    else:
        argv = command[3:]  # without `<python> -m lambdabus_runtime`
    env = function_env(instance.revision)
    message = {"argv": argv, "env": env, "rlimits": [list(r) for r in rlimits]}
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


# -- restarts --------------------------------------------------------------------------------


def backoff_delay(restarts: int, base: float, cap: float) -> float:
    """Seconds before restart number `restarts + 1`: base, 2*base, 4*base, ... at most cap."""
    return float(min(cap, base * 2 ** min(max(restarts, 0), 62)))


def is_crashloop(
    exits: Sequence[float], now: float, *, window: float, limit: int, unready_streak: int
) -> bool:
    """Too many exits of a revision's instances within the window, or one instance that exited
    `limit` times in a row without ever becoming ready."""
    recent = sum(1 for t in exits if t >= now - window)
    return recent >= limit or unready_streak >= limit


def crash_message(instance: str, exit: str, tail: Sequence[str]) -> str:
    """What a failed deployment says: how the instance ended and its last log lines."""
    lines = [line if len(line) <= 512 else line[:512] + " …" for line in tail[-CRASH_TAIL_LINES:]]
    head = f"instance {instance} {exit}"
    if not lines:
        return f"{head}; it wrote no log lines"
    body = "\n".join(lines)
    if len(body) > 8000:
        body = "…" + body[-8000:]
    return f"{head}; last log lines:\n{body}"


# -- deployment state ------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str


@dataclass(frozen=True)
class Reported:
    """A backend's own verdict on a function (Kubernetes: folded from its Deployment and Pods),
    taken as is: phase, Kyma's reason, a message, and how many instances are ready."""

    phase: Literal["started", "ready", "failed", "scaled"]
    reason: str
    message: str
    ready_replicas: int


@dataclass(frozen=True)
class Observation:
    """What a backend sees of one function, reported after every change."""

    revision: DesiredRevision
    instances: tuple[InstanceState, ...]
    endpoints: tuple[str, ...]
    rolling_out: bool = False
    scaling: bool = False
    serving_generation: int | None = None
    failure: Failure | None = None
    sandboxed: bool = True
    sandbox_note: str = ""
    limits: InstanceLimits | None = None
    serving_revision: str = ""  # the revision whose instances the endpoints are
    reported: Reported | None = None


Phase = Literal["started", "ready", "failed", "scaled", "stopped"]


@dataclass(frozen=True)
class Decision:
    state: DeploymentState
    write: bool
    event: LifecycleEvent | None


def _same(a: DeploymentState, b: DeploymentState) -> bool:
    return a.model_dump(exclude={"updated_at"}) == b.model_dump(exclude={"updated_at"})


def _transition(previous: DeploymentState | None, state: DeploymentState) -> bool:
    if previous is None:
        return True
    before = (previous.uid, previous.generation, previous.phase, previous.replicas)
    return before != (state.uid, state.generation, state.phase, state.replicas)


def instances_note(instances: Sequence[InstanceState]) -> str:
    """What went wrong with running instances, for the status message: one that does not answer
    its health checks, and why instances were restarted, so that a function that runs again
    after a crash (out of memory, killed, stuck) still says what happened to it."""
    notes = [
        f"instance {i.id} does not answer its health checks"
        for i in instances
        if i.phase == "unhealthy"
    ]
    exited = [i for i in instances if i.last_exit]
    if exited:
        most = max(exited, key=lambda i: i.restarts)
        restarts = sum(i.restarts for i in instances)
        so_far = (
            f"{restarts} restart{'' if restarts == 1 else 's'} so far" if restarts else "restarting"
        )
        notes.append(f"instance {most.id} {most.last_exit}, {so_far}")
    return "".join(f"; {note}" for note in notes)


def next_deployment_state(
    previous: DeploymentState | None, obs: Observation, now: datetime
) -> Decision:
    """The deployment state after an observation, whether it must be written, and the event to
    publish after writing it (only when the phase, generation or replica count changed)."""
    rev = obs.revision
    ready = len(obs.endpoints)
    phase: Phase
    if obs.reported is not None:
        phase, reason, message = obs.reported.phase, obs.reported.reason, obs.reported.message
        ready = obs.reported.ready_replicas
    elif obs.failure is not None:
        phase, reason, message = "failed", obs.failure.reason, obs.failure.message
        if ready and obs.serving_generation is not None:
            message += f"\n(generation {obs.serving_generation} keeps serving)"
    elif rev.replicas == 0:
        phase, reason, message = "scaled", "ScaledToZero", "scaled to 0 instances"
    elif obs.rolling_out:
        phase, reason = "started", "Deploying"
        message = f"starting {rev.replicas} instance(s) of generation {rev.generation}"
        if obs.serving_generation is not None and ready:
            message += f"; generation {obs.serving_generation} serves meanwhile"
    elif ready >= rev.replicas:
        phase = "scaled" if obs.scaling else "ready"
        reason, message = "Running", f"{ready}/{rev.replicas} instances ready"
    else:
        phase = "started"
        if previous is not None and previous.uid == rev.uid and previous.phase == "scaled":
            phase = "scaled"
        elif previous is not None and previous.uid == rev.uid and previous.phase == "ready":
            phase = "ready"
        reason, message = "InstancesRestarting", f"{ready}/{rev.replicas} instances ready"
    if obs.failure is None and obs.reported is None:
        message += instances_note(obs.instances)
    if not obs.sandboxed:
        message += f" (unsandboxed: {obs.sandbox_note or 'bubblewrap is not available'})"
    state = DeploymentState(
        namespace=rev.namespace,
        name=rev.name,
        uid=rev.uid,
        generation=rev.generation,
        phase=phase,
        replicas=rev.replicas,
        ready_replicas=ready,
        reason=reason,
        message=message,
        endpoints=list(obs.endpoints),
        timeout=rev.timeout,
        instances=list(obs.instances),
        sandboxed=obs.sandboxed,
        limits=obs.limits,
        updated_at=now,
        revision=obs.serving_revision if obs.endpoints else rev.revision,
    )
    if previous is not None and _same(previous, state):
        return Decision(previous, write=False, event=None)
    event = deployment_event(state) if _transition(previous, state) else None
    if rev.autoscaled and phase == "scaled":
        event = None  # the autoscaler announced it, with from, to and why
    return Decision(state, write=True, event=event)


def stopped_state(previous: DeploymentState, now: datetime) -> DeploymentState:
    """The last state of a removed function, written (and announced) before its key goes."""
    return previous.model_copy(
        update={
            "phase": "stopped",
            "reason": "Deleted",
            "message": "the function was deleted; its instances are stopped",
            "replicas": 0,
            "ready_replicas": 0,
            "endpoints": [],
            "instances": [],
            "updated_at": now,
        }
    )


def idle_state(previous: DeploymentState, generation: int, now: datetime) -> DeploymentState:
    """A function with nothing running and nothing it can run yet (a build is on its way):
    no endpoints may remain in its state (they would name dead instances)."""
    waiting = previous.phase in ("started", "ready", "scaled")
    return previous.model_copy(
        update={
            "phase": "started" if waiting else previous.phase,
            "reason": "WaitingForBuild" if waiting else previous.reason,
            "message": f"generation {generation} waits for a successful build"
            if waiting
            else previous.message,
            "ready_replicas": 0,
            "endpoints": [],
            "instances": [],
            "updated_at": now,
        }
    )


def blocked_state(
    previous: DeploymentState | None,
    record: FunctionRecord,
    failure: Failure,
    now: datetime,
    *,
    serving: bool = False,
) -> DeploymentState:
    """A function that cannot start until something it names exists (a secret): pending, with
    the reason and what to do, and no endpoints (nothing of it runs). With `serving`, what runs
    keeps running and keeps its endpoints; the state says why the new revision does not start."""
    if serving and previous is not None and previous.uid == record.uid:
        return previous.model_copy(
            update={
                "phase": "started",
                "reason": failure.reason,
                "message": f"{failure.message}; generation {previous.generation} keeps serving",
                "updated_at": now,
            }
        )
    return DeploymentState(
        namespace=record.namespace,
        name=record.name,
        uid=record.uid,
        generation=record.generation,
        phase="started",
        replicas=record.spec.replicas,
        ready_replicas=0,
        reason=failure.reason,
        message=failure.message,
        timeout=record.spec.timeout,
        sandboxed=previous.sandboxed if previous is not None else False,
        updated_at=now,
    )


def withdrawn_state(previous: DeploymentState, now: datetime) -> DeploymentState:
    """The state left when the deployer stops: its instances stop with it."""
    return previous.model_copy(
        update={
            "ready_replicas": 0,
            "endpoints": [],
            "instances": [],
            "message": previous.message
            if previous.phase == "failed"
            else "the deployer stopped, and its instances with it; they start again with it",
            "updated_at": now,
        }
    )


_EVENTS: dict[str, type[LifecycleEvent]] = {
    "started": DeploymentStarted,
    "ready": DeploymentReady,
    "failed": DeploymentFailed,
    "scaled": DeploymentScaled,
    "stopped": DeploymentStopped,
}


def event_key(state: DeploymentState) -> str:
    """The transition key of the deterministic event id: a retried publish is stored once."""
    match state.phase:
        case "ready" | "scaled":
            return f"{state.uid}:{state.generation}:{state.phase}:{state.replicas}"
        case "stopped":
            return f"{state.uid}:stopped"
        case _:
            return f"{state.uid}:{state.generation}:{state.phase}"


def deployment_event(state: DeploymentState) -> LifecycleEvent:
    data_class = DeploymentScaledData if state.phase == "scaled" else DeploymentData
    data = data_class(
        namespace=state.namespace,
        name=state.name,
        uid=state.uid,
        generation=state.generation,
        replicas=state.replicas,
        ready_replicas=state.ready_replicas,
        reason=state.reason,
        message=state.message,
    )
    return lifecycle_event(
        _EVENTS[state.phase],
        data,
        service="deployer",
        subject=f"{state.namespace}/{state.name}",
        key=event_key(state),
        time=state.updated_at,
    )
