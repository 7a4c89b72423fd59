"""The deployer's decisions, with no I/O: what should run, how an instance is started, when to
restart it, and what the deployment state and its lifecycle event become after an observation.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from lambdabus_deployer.sandbox import Sandbox, bwrap_args
from lambdabus_deployer.settings import DeployerSettings
from lambdabus_events.catalog import (
    DeploymentData,
    DeploymentFailed,
    DeploymentReady,
    DeploymentScaled,
    DeploymentStarted,
    DeploymentStopped,
    LifecycleEvent,
    lifecycle_event,
)
from lambdabus_events.models import (
    ArtifactManifest,
    BuildState,
    DeploymentState,
    FunctionRecord,
    InstanceLimits,
    InstanceState,
    Runtime,
)
from lambdabus_platform.errors import PermanentError

FILE_ARTIFACT = "file://"
CRASH_TAIL_LINES = 20


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
    secret_files: tuple[tuple[str, tuple[tuple[str, bytes], ...]], ...] = ()
    secret_env: tuple[tuple[str, str], ...] = ()

    @property
    def function(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def key(self) -> str:
        """Identifies what an instance runs. The replica count is not part of it: changing it
        scales the running revision instead of rolling out a new one."""
        secrets = hashlib.sha256(repr((self.secret_files, self.secret_env)).encode()).hexdigest()
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
            ]
        )
        return hashlib.sha256(material.encode()).hexdigest()[:12]


def _built(
    record: FunctionRecord, build: BuildState, artifact: str, generation: int
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
    )


def desired_instances(
    record: FunctionRecord, build_state: BuildState | None, running: DesiredRevision | None = None
) -> DesiredRevision | None:
    """The revision to run: the artifact of the newest succeeded build of this function (this
    uid) with the config of the current record, so a config-only update redeploys the same
    artifact. A generation applies whole: while the build of a new source is pending (or
    failed), what runs keeps running unchanged (`running`), and its new config waits for its
    new code. With nothing running, a build of an older source is better than nothing; it runs
    under the generation it was built for. None when nothing was built."""
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
            return _built(record, build, build.artifact, record.generation)
        if running is None or running.uid != record.uid:
            return _built(record, build, build.artifact, min(build.generation, record.generation))
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


@dataclass(frozen=True)
class RuntimePaths:
    """Where the runtime SDK is: put on the instance's PYTHONPATH, never installed into it."""

    pythonpath: str | None = None
    node_server: str | None = None
    node: str | None = None


@dataclass(frozen=True)
class InstanceSpec:
    id: str
    scratch: str
    revision: DesiredRevision
    runtime: RuntimePaths
    # False when a cgroup limits the memory of the whole process tree: no per-process limit
    # (Node's heap flag, RLIMIT_AS) then, so going over it is an OOM kill, as for any runtime.
    per_process_memory: bool = True


def _fmt(value: float) -> str:
    return f"{value:g}"


def runtime_command(manifest: ArtifactManifest, instance: InstanceSpec) -> list[str]:
    """The runtime's own argv (outside any sandbox)."""
    rev = instance.revision
    flags = [
        "--code",
        manifest.code_dir,
        "--entrypoint",
        manifest.entrypoint,
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--function",
        rev.function,
        "--timeout",
        _fmt(rev.timeout),
        "--memory",
        str(rev.memory),
        "--runtime",
        manifest.runtime,
    ]
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


def instance_env(
    manifest: ArtifactManifest, instance: InstanceSpec, settings: DeployerSettings
) -> dict[str, str]:
    """The whole environment of an instance: PATH, the function's own env, and where its
    scratch dir and the runtime are. Nothing else of the platform's environment (no
    LAMBDABUS_* settings, no credentials)."""
    env = {"PATH": settings.path, "LANG": "C.UTF-8"}
    if manifest.runtime != "nodejs20":
        env["MALLOC_ARENA_MAX"] = "2"  # glibc arenas reserve 64 MiB each against RLIMIT_AS
    env.update(instance.revision.env)
    env.update(HOME=instance.scratch, TMPDIR=instance.scratch)
    if manifest.runtime == "nodejs20":
        env["NODE_PATH"] = f"{manifest.env_dir}/node_modules"
    else:
        env.update(PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        env["PYTHONPATH"] = instance.runtime.pythonpath or ""
    return env


def _runtime_dirs(manifest: ArtifactManifest, runtime: RuntimePaths) -> list[str]:
    if manifest.runtime == "nodejs20":
        return [str(Path(runtime.node_server).parent)] if runtime.node_server else []
    return [p for p in (runtime.pythonpath or "").split(":") if p]


def render_sandbox_command(
    manifest: ArtifactManifest,
    instance: InstanceSpec,
    settings: DeployerSettings,
    *,
    sandbox: Sandbox,
) -> list[str]:
    """The argv that starts one instance: the runtime, inside bubblewrap when it is enabled."""
    command = runtime_command(manifest, instance)
    if not sandbox.enabled or sandbox.bwrap is None:
        return command
    hidden = str(settings.hidden_dir)
    read_only = _dedupe(
        [manifest.code_dir, manifest.env_dir, *_runtime_dirs(manifest, instance.runtime)]
    )
    options = bwrap_args(
        hidden=[hidden] if hidden != "/" else [],
        read_only=read_only,
        writable=[instance.scratch],
        chdir=instance.scratch,
    )
    return [sandbox.bwrap, *options, "--", *command]


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


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
    if obs.failure is not None:
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
    if obs.failure is None:
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
    )
    if previous is not None and _same(previous, state):
        return Decision(previous, write=False, event=None)
    event = deployment_event(state) if _transition(previous, state) else None
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
    data = DeploymentData(
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
