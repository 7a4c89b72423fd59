"""The local backend: instances are (sandboxed) processes of this deployer.

Per function, one runner task owns every decision (start, scale, roll out, switch, drain,
give up), so they never race; instances only report what happened to them and wake it. An
instance is one supervised slot: its process, its restarts with back-off, its health checks,
its log capture and its scratch dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from lambdabus_deployer.backend import Announcer, LogSink, Reporter
from lambdabus_deployer.detached import LogFollower, Running, open_log_file
from lambdabus_deployer.limits import Limiter, Limits, RunLimits, detect_limiter, oom_message
from lambdabus_deployer.logcapture import InstanceLog
from lambdabus_deployer.metrics import DeployerMetrics
from lambdabus_deployer.plan import (
    UNIX_ENDPOINT,
    DesiredRevision,
    Failure,
    InstanceSpec,
    Observation,
    PoolKey,
    RuntimePaths,
    backoff_delay,
    crash_message,
    env_file,
    is_crashloop,
    manifest_path,
    pool_key,
    pool_message,
    render_sandbox,
    render_unsandboxed,
    secret_files,
    uses_rlimit_as,
)
from lambdabus_deployer.pool import Pool, Slot, pool_dir
from lambdabus_deployer.process_table import (
    ProcessRecord,
    ProcessTable,
    is_running,
    kill_record,
    start_time,
)
from lambdabus_deployer.settings import DeployerSettings
from lambdabus_events.models import (
    ArtifactManifest,
    InstancePhase,
    InstanceStarting,
    InstanceState,
)
from lambdabus_platform.envdigest import EnvironmentVerifier
from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.sandbox import (
    ChildProcess,
    Identity,
    Sandbox,
    SandboxProcess,
    SandboxStartError,
    Spawned,
    launch,
)

log = logging.getLogger("lambdabus.deployer.local")
POOLED_POLL = 0.002  # seconds between looks at a pooled run's output until it listens
LOGS_DIR = "instance-logs"  # in the state dir: each run's stdout, stderr and status files
_ENVIRONMENTS = EnvironmentVerifier()  # each (env dir, digest) hashed once per process


def _signal_group(pgid: int, sig: int) -> None:
    """Signal an instance's process group (unsandboxed: the runtime and what it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "ended"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"was killed by {name}"
    if code > 128:  # how a shell or the sandbox reports a child killed by a signal
        with contextlib.suppress(ValueError):
            return f"exited with code {code} ({signal.Signals(code - 128).name})"
    return f"exited with code {code}"


def interpreter_dirs(manifest: ArtifactManifest, runtime: RuntimePaths) -> list[str]:
    """The installation the instance's interpreter lives in when it is not under /usr (the
    Python a virtualenv's `bin/python` points to, e.g. under /root/.pyenv; node from nvm):
    the sandbox binds it read-only where it is, as nothing else of the host but /usr."""
    if manifest.runtime == "nodejs20":
        program = Path(runtime.node) if runtime.node else None
    else:
        program = Path(manifest.env_dir) / "bin" / "python"
    if program is None:
        return []
    with contextlib.suppress(OSError):
        prefix = program.resolve(strict=True).parent.parent
        # `bin/python` is the build's: bind only an installation this deployer runs on itself,
        # never what a build-made link points to.
        if prefix in (Path("/usr"), Path("/")) or prefix not in trusted_prefixes(runtime):
            return []
        return [str(prefix)]
    return []


def trusted_prefixes(runtime: RuntimePaths) -> set[Path]:
    """Installations an instance's interpreter may come from: this Python's and node's."""
    prefixes = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    if runtime.node:
        with contextlib.suppress(OSError):
            prefixes.add(Path(runtime.node).resolve(strict=True).parent.parent)
    return prefixes


def _private_dir(path: Path, identity: Identity | None) -> None:
    """A dir only its instance (and root) may enter: 0700, owned by the instance's uid."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if identity is not None:
        os.chown(path, identity.uid, identity.gid)
    path.chmod(0o700)


def _owned_private(path: Path, *, parent_too: bool) -> None:
    """Make the sockets dir (and its default parent, in a shared place such as /tmp) ours
    alone: one made in advance by someone else could hand them our instances' sockets."""
    for directory in (path.parent, path) if parent_too else (path,):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = directory.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise LambdabusError(
                f"{directory} is not a directory of this user; set LAMBDABUS_DEPLOYER_SOCKET_DIR",
                code="socket_dir_unsafe",
            )
        directory.chmod(0o700)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


async def _probe_unix(path: str, timeout: float) -> bool:
    """GET /healthz over the instance's socket: True for a 200."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                writer.write(
                    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
                )
                status = await reader.readline()
                await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError):
        return False
    parts = status.split()
    return len(parts) >= 2 and parts[1] == b"200"


def load_manifest(revision: DesiredRevision) -> ArtifactManifest:
    path = manifest_path(revision.artifact)
    try:
        manifest = ArtifactManifest.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise LambdabusError(
            f"cannot read the artifact manifest {path}: {exc.strerror or exc}",
            code="artifact_unavailable",
        ) from exc
    except ValueError as exc:
        raise LambdabusError(
            f"the artifact manifest {path} is not valid: {exc}", code="artifact_unavailable"
        ) from exc
    for directory in (manifest.code_dir, manifest.env_dir):
        if Path(directory).is_symlink():
            raise LambdabusError(
                f"the artifact of generation {revision.build_generation} is not run: "
                f"{directory} is a symlink, not the directory its build made; rebuild it",
                code="artifact_unavailable",
            )
        if not Path(directory).is_dir():
            raise LambdabusError(
                f"the artifact of generation {revision.build_generation} is gone: "
                f"{directory} does not exist",
                code="artifact_unavailable",
            )
    if not manifest.env_digest:
        raise LambdabusError(
            f"the artifact of generation {revision.build_generation} records no digest of its "
            "dependency environment, so it cannot be verified: rebuild the function",
            code="artifact_unavailable",
        )
    _ENVIRONMENTS.verify(manifest.env_dir, manifest.env_digest)  # EnvironmentTampered
    return manifest


@dataclass(frozen=True)
class Outcome:
    code: int | None
    was_ready: bool
    ran_for: float
    why: str = ""
    oom: bool = False  # the kernel's OOM killer struck: the whole instance was killed

    def describe(self) -> str:
        text = _describe_exit(self.code)
        if self.why:
            text = f"{self.why}; it {text}"
        elif not self.was_ready:
            text += " before it was ready"
        return text


class Instance:
    """One slot of a revision: a process, restarted with back-off until stopped."""

    def __init__(self, group: RevisionSet, adopted: ProcessRecord | None = None) -> None:
        self.group = group
        backend = group.runner.backend
        rev = group.revision
        self._adopted = adopted
        self._detach = False
        if adopted is not None:  # a run a previous deployer started: it goes on serving
            self.id = adopted.instance
            self.scratch = Path(adopted.scratch)
            self.socket_dir = Path(adopted.socket_dir)
        else:
            self.id = f"{rev.name}-{group.key[:6]}-{secrets.token_hex(3)}"
            self.scratch = backend.settings.instances_dir / self.id
            self.socket_dir = self._new_socket_dir()
        # Who the instance is on the host: one uid per function (when we are root).
        self.identity = backend.sandbox.identity(rev.function) if backend.sandbox.enabled else None
        self.phase: InstancePhase = "starting"
        self.endpoint: str | None = None
        self.restarts = adopted.restarts if adopted is not None else 0
        if adopted is not None and adopted.ready and adopted.endpoint:
            # Ready as it was: its endpoint stays in the state while health checks resume.
            self.phase, self.endpoint = "ready", adopted.endpoint
        self.last_exit = ""
        self.started_at: datetime | None = None
        self.last_oom = False
        self.unready_streak = 0
        self.retired = False
        self.log = InstanceLog(
            instance=self.id,
            revision=rev,
            sink=backend.logs,
            max_bytes=backend.settings.log_line_max_bytes,
            rate=backend.settings.log_rate_lines_per_second,
        )
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._supervise(), name=f"instance {self.id}")

    def state(self) -> InstanceState:
        return InstanceState(
            id=self.id,
            generation=self.group.revision.generation,
            phase=self.phase,
            endpoint=self.endpoint,
            restarts=self.restarts,
            last_exit=self.last_exit,
            started_at=self.started_at,
        )

    @property
    def ready(self) -> bool:
        return self.phase == "ready" and self.endpoint is not None

    def _changed(self) -> None:
        self.group.runner.wake()

    async def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after the grace) and delete the scratch dir."""
        self._stop.set()
        try:
            await asyncio.shield(self._task)
        except Exception:
            log.exception("instance supervisor failed", extra={"instance": self.id})

    async def detach(self) -> None:
        """Stop watching the instance and leave it running (the deployer stops; the next
        leader adopts it from the process table)."""
        self._detach = True
        await self.stop()

    async def _supervise(self) -> None:
        backend = self.group.runner.backend
        s = backend.settings
        backoff = 0
        start_failures = 0
        try:
            while not self._stop.is_set():
                try:
                    outcome = await self._run_once()
                except Exception as exc:  # nothing could be started: no runtime, no interpreter...
                    message = exc.message if isinstance(exc, LambdabusError) else repr(exc)
                    log.warning(
                        "cannot start an instance", extra={"instance": self.id, "error": message}
                    )
                    self.last_exit = f"could not be started: {message}"
                    transient = isinstance(exc, SandboxStartError) or not isinstance(
                        exc, LambdabusError
                    )
                    if transient and start_failures < s.start_attempts - 1:
                        # Often transient (a busy host, a sandbox torn down under us): retried
                        # with the restart back-off before the function is failed.
                        start_failures += 1
                        delay = backoff_delay(backoff, s.restart_base_delay, s.restart_max_delay)
                        backoff += 1
                        self.phase = "backoff"
                        self._changed()
                        await self.log.system(f"{self.last_exit}; retrying in {delay:g} s")
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._stop.wait(), delay)
                        continue
                    self.phase = "crashed"
                    self.group.fail(
                        Failure(
                            reason="StartFailed", message=f"instance {self.id} {self.last_exit}"
                        )
                    )
                    return
                if self._detach:
                    return
                if self._stop.is_set() or self.retired or self.group.retired:
                    await self.log.system(f"instance {self.id} stopped: it {outcome.describe()}")
                    return
                self.endpoint = None
                self.last_exit = outcome.describe()
                self.last_oom = outcome.oom
                if outcome.was_ready:
                    self.unready_streak = 0
                    if outcome.ran_for >= s.crashloop_window:
                        backoff = 0
                else:
                    self.unready_streak += 1
                if self.group.exited(self):
                    self.phase = "crashed"
                    await self.log.system(f"{self.last_exit}; not restarted: crash loop")
                    self._changed()
                    return
                delay = backoff_delay(backoff, s.restart_base_delay, s.restart_max_delay)
                backoff += 1
                self.phase = "backoff"
                self._changed()
                await self.log.system(f"{self.last_exit}; restarting in {delay:g} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if not self._stop.is_set():
                    self.restarts += 1
                    backend.metrics.restarts.inc()
                    self.phase = "starting"
                    self._changed()
        finally:
            self.phase = "stopped"
            self.endpoint = None
            if not self._detach:
                await asyncio.to_thread(shutil.rmtree, self.scratch, True)
                await asyncio.to_thread(shutil.rmtree, self.socket_dir, True)

    def _new_socket_dir(self) -> Path:
        """A new dir for each run of the instance (so a restart is a new endpoint): short (a
        socket path has at most 107 bytes) and unguessable."""
        return self.group.runner.backend.settings.sockets_dir / secrets.token_hex(6)

    def _spec(self) -> InstanceSpec:
        backend = self.group.runner.backend
        return InstanceSpec(
            id=self.id,
            scratch=str(self.scratch),
            revision=self.group.revision,
            runtime=backend.runtime,
            socket_dir=str(self.socket_dir),
            per_process_memory=not backend.limiter.enforces_memory,
        )

    async def _start(
        self,
        spec: InstanceSpec,
        preexec: Callable[[], None] | None,
        out: int,
        err: int,
        status: int,
    ) -> tuple[ChildProcess, SandboxProcess | None]:
        """Start the instance's process, detached (it outlives this deployer), its output to
        the `out` and `err` files: in its sandbox, or (unsandboxed) the runtime alone."""
        backend = self.group.runner.backend
        s = backend.settings
        manifest = self.group.manifest
        _private_dir(self.socket_dir, self.identity)
        if backend.sandbox.enabled:
            sandbox_spec = render_sandbox(
                manifest, spec, s, interpreter_dirs=interpreter_dirs(manifest, backend.runtime)
            )
            network = sandbox_spec.network if backend.sandbox.outbound else "none"
            await self.log.system(
                f"starting instance {self.id} (sandbox: bubblewrap, network: {network})"
            )
            handle = await launch(
                backend.sandbox,
                sandbox_spec,
                key=spec.revision.function,
                preexec=preexec,
                stdout=out,
                stderr=err,
                start_timeout=s.start_timeout,
                detached=True,
                status_fd=status,
            )
            return handle.process, handle
        await self.log.system(f"starting instance {self.id} UNSANDBOXED: {backend.sandbox.reason}")
        argv, env = render_unsandboxed(manifest, spec, s)
        # Unsandboxed, the env file and the secrets are files in the instance's private dir.
        _write_private(self.socket_dir / "env.json", env_file(spec.revision))
        for data in secret_files(spec.revision):
            target = self.socket_dir / data.dest.lstrip("/")
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_private(target, data.content)
        process = await Spawned.start(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=self.scratch,
            start_new_session=True,  # its own process group: signals reach all of it, and only it
            preexec_fn=preexec,
        )
        return process, None

    async def _launch(
        self, spec: InstanceSpec
    ) -> tuple[Running, RunLimits, ProcessRecord, SandboxProcess | None]:
        """A new run: its cgroup (or rlimits), its scratch tmpfs (the child joins and mounts in
        `preexec`, before the sandbox drops privileges), its log files; recorded in the table."""
        backend = self.group.runner.backend
        manifest = self.group.manifest
        identity = self.identity
        _private_dir(self.scratch, identity)
        limits = await backend.limiter.start(
            self.id,
            Limits.of(spec.revision),
            self.scratch,
            python=uses_rlimit_as(manifest),
            owner=(identity.uid, identity.gid) if identity is not None else None,
            own_uid=identity is not None,
        )
        logs = backend.settings.state_dir / LOGS_DIR
        logs.mkdir(mode=0o700, exist_ok=True)
        run_tag = f"{self.id}.{secrets.token_hex(3)}"
        paths = [logs / f"{run_tag}.{name}" for name in ("stdout", "stderr", "status")]
        fds: list[int] = []
        try:
            fds = [open_log_file(path) for path in paths]
            process, sandboxed = await self._start(spec, limits.preexec, *fds)
        except BaseException:
            await limits.close()
            for path in paths:
                path.unlink(missing_ok=True)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        record = ProcessRecord(
            pid=process.pid,
            start_time=start_time(process.pid) or 0,
            instance=self.id,
            function=spec.revision.function,
            revision=self.group.key,
            scratch=str(self.scratch),
            child_pid=sandboxed.child_pid if sandboxed is not None else None,
            socket_dir=str(self.socket_dir),
            endpoint=spec.endpoint,
            stdout=str(paths[0]),
            stderr=str(paths[1]),
            status_file=str(paths[2]) if sandboxed is not None else "",
            oom_baseline=limits.baseline,
            restarts=self.restarts,
        )
        backend.table.add(record)
        running = Running(
            pid=record.pid,
            started=record.start_time,
            child_pid=record.child_pid,
            process=process,
            status_file=record.status_file,
        )
        return running, limits, record, sandboxed

    async def _from_pool(
        self,
    ) -> tuple[InstanceSpec, Running, RunLimits, ProcessRecord, SandboxProcess] | None:
        """A run made of a pre-started runtime of the pool (specialised to this instance, for
        good), or None: no pool for this revision, none idle, or it could not be specialised
        (then the caller starts the run afresh)."""
        backend = self.group.runner.backend
        key = self.group.pool_key
        slot = backend.pool.take(key) if key is not None else None
        if slot is None and key is not None:
            try:  # none idle: one started for this start, at once, still beats a fresh start
                slot = await backend.pool.start_now(key)
            except Exception as exc:  # the pool said why (`Pool._failed`)
                log.info(
                    "cannot pre-start a runtime for this cold start; starting afresh",
                    extra={"instance": self.id, "error": str(exc)},
                )
        if slot is None:
            return None
        previous = (self.scratch, self.socket_dir, self.identity)
        self.scratch, self.socket_dir, self.identity = slot.scratch, slot.socket_dir, slot.identity
        try:
            spec = self._spec()
        except BaseException:
            self.scratch, self.socket_dir, self.identity = previous
            await backend.pool.release(slot)
            raise
        await self._announce(spec)
        manifest = self.group.manifest
        try:
            limits = await backend.pool.specialise(
                slot,
                instance=self.id,
                code=Path(manifest.code_dir),
                message=lambda rlimits: pool_message(manifest, spec, rlimits),
                limits=Limits.of(spec.revision),
                python=uses_rlimit_as(manifest),
            )
        except Exception as exc:
            self.scratch, self.socket_dir, self.identity = previous
            message = exc.message if isinstance(exc, LambdabusError) else repr(exc)
            log.warning(
                "cannot specialise a pre-started runtime; starting afresh",
                extra={"instance": self.id, "error": message},
            )
            return None
        record = self._pooled_record(slot, spec, limits)
        backend.table.add(record)  # the pool no longer has it: recorded before any await
        await self.log.system(
            f"starting instance {self.id} (sandbox: bubblewrap, network: {slot.key.network}, "
            f"pre-started runtime {slot.id})"
        )
        running = Running(
            pid=record.pid,
            started=record.start_time,
            child_pid=record.child_pid,
            process=slot.handle.process,
            status_file=record.status_file,
        )
        return spec, running, limits, record, slot.handle

    async def _announce(self, spec: InstanceSpec) -> None:
        """Say where this run of the function's latest revision is about to listen: a router
        holding requests for it connects there as soon as the runtime accepts, instead of
        after its "listening", our table's flush and the state's write and watch (~7 ms of a
        ~20 ms cold start). Not for a revision run apart (its requests follow its route)."""
        announce = self.group.runner.backend.announce
        rev = spec.revision
        if announce is None or rev.pinned:
            return
        notice = InstanceStarting(
            namespace=rev.namespace,
            name=rev.name,
            uid=rev.uid,
            revision=rev.revision,
            endpoint=spec.endpoint,
        )
        try:
            await announce(notice)
        except Exception as exc:  # the state still says it, a few ms later
            log.debug("could not announce a starting instance", extra={"error": str(exc)})

    def _pooled_record(self, slot: Slot, spec: InstanceSpec, limits: RunLimits) -> ProcessRecord:
        return ProcessRecord(
            pid=slot.handle.pid,
            start_time=start_time(slot.handle.pid) or 0,
            instance=self.id,
            function=spec.revision.function,
            revision=self.group.key,
            scratch=str(slot.scratch),
            child_pid=slot.handle.child_pid,
            socket_dir=str(slot.socket_dir),
            endpoint=spec.endpoint,
            stdout=str(slot.stdout),
            stderr=str(slot.stderr),
            status_file=str(slot.status),
            oom_baseline=limits.baseline,
            restarts=self.restarts,
            code_dir=str(slot.code_dir),
        )

    async def _run_once(self) -> Outcome:
        backend = self.group.runner.backend
        s = backend.settings
        adopted, self._adopted = self._adopted, None
        sandboxed: SandboxProcess | None = None
        if adopted is not None:
            spec = self._spec()
            run = Running(
                pid=adopted.pid,
                started=adopted.start_time,
                child_pid=adopted.child_pid,
                status_file=adopted.status_file,
            )
            limits = await backend.limiter.adopt(self.id, adopted.oom_baseline)
            record = adopted
            await self.log.system(f"instance {self.id} adopted (pid {adopted.pid})")
        else:
            if os.path.lexists(self.socket_dir):  # a former run's (a first run has none)
                await asyncio.to_thread(shutil.rmtree, self.socket_dir, True)
            self.log.tail.clear()
            pooled = await self._from_pool()
            if pooled is not None:
                spec, run, limits, record, sandboxed = pooled
            else:
                self.socket_dir = self._new_socket_dir()
                spec = self._spec()
                run, limits, record, sandboxed = await self._launch(spec)
        started = time.monotonic()
        self.started_at = datetime.now(UTC)  # LUNA's pod_statuses show it
        backend.metrics.instances_running.inc()
        ended = asyncio.Event()
        cap = max(s.log_file_max_bytes * 4, 1 << 20)
        out = LogFollower(
            Path(record.stdout),
            record.stdout_offset,
            ended,
            max_bytes=s.log_file_max_bytes,
            cap_bytes=cap,
        )
        err = LogFollower(
            Path(record.stderr),
            record.stderr_offset,
            ended,
            max_bytes=s.log_file_max_bytes,
            cap_bytes=cap,
        )
        out.eager = adopted is None  # until it says it listens
        if record.code_dir and adopted is None:
            out.fast = POOLED_POLL  # a pooled runtime says it within milliseconds
        listening: asyncio.Future[int | str] = asyncio.get_running_loop().create_future()
        listening.add_done_callback(lambda _: setattr(out, "eager", False))
        pumps = [
            asyncio.create_task(self.log.pump(out, "stdout", listening)),
            asyncio.create_task(self.log.pump(err, "stderr")),
        ]
        drops = asyncio.create_task(self.log.report_drops())
        exited = asyncio.create_task(run.wait())
        exited.add_done_callback(lambda _: ended.set())
        stopping = asyncio.create_task(self._stop.wait())
        tracking = asyncio.create_task(self._track(out, err))
        why, was_ready = "", False
        try:
            if adopted is not None:
                was_ready = await self._adopted_ready(adopted, spec, exited, stopping)
                if was_ready:
                    why = await self._watch(exited, stopping)
                elif not exited.done() and not self._stop.is_set():
                    why = f"did not answer on /healthz within {s.start_timeout:g} s"
            else:
                first: set[asyncio.Future[Any]] = {listening, exited, stopping}
                done, _ = await asyncio.wait(
                    first,
                    timeout=s.start_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if listening in done:
                    was_ready = True
                    # a pooled run's own cpu limit, once the request that woke it is answered
                    limits.settle_after(s.pool_boost_after_listening_seconds)
                    await self._became_ready(spec)
                    why = await self._watch(exited, stopping)
                elif not done:
                    why = f"did not say it listens within {s.start_timeout:g} s"
        finally:
            tracking.cancel()
            if self._detach and run.alive:
                # Leave it running, recorded with how far its logs were shipped.
                for task in (*pumps, drops, stopping, exited):
                    task.cancel()
                await asyncio.gather(*pumps, drops, stopping, exited, return_exceptions=True)
                if not listening.done():
                    listening.cancel()
                backend.table.update(self.id, stdout_offset=out.offset, stderr_offset=err.offset)
                backend.table.flush()
                out.close()
                err.close()
                await limits.detach()
                backend.metrics.instances_running.dec()
                oom = False
            else:
                if run.alive:
                    graceful = self._stop.is_set() and not why
                    await self._terminate(run, exited, graceful=graceful)
                # Whatever the instance left in its group (unsandboxed; a sandbox ends with its pid 1),
                # and in its cgroup (what left the group: setsid, daemons).
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if run.process is not None or start_time(run.pid) is None:
                        os.killpg(run.pid, signal.SIGKILL)
                if sandboxed is not None:
                    await sandboxed.close()
                await limits.kill_all()
                with contextlib.suppress(asyncio.CancelledError):
                    await exited
                ended.set()
                _, late = await asyncio.wait(pumps, timeout=2)
                for task in (*late, drops, stopping):
                    task.cancel()
                await asyncio.gather(*late, drops, stopping, return_exceptions=True)
                if not listening.done():
                    listening.cancel()
                out.close()
                err.close()
                await self.log.flush_dropped()
                backend.table.discard(self.id)
                for path in (record.stdout, record.stderr, record.status_file):
                    if path:
                        Path(path).unlink(missing_ok=True)
                if record.code_dir:  # a pooled run: its slot's dirs go with it
                    await asyncio.to_thread(shutil.rmtree, record.code_dir, True)
                    await asyncio.to_thread(shutil.rmtree, record.scratch, True)
                    self.scratch = backend.settings.instances_dir / self.id
                    self.identity = backend.sandbox.identity(self.group.revision.function)
                backend.metrics.instances_running.dec()
                oom = limits.oom_killed()
                await limits.close()
        if oom:
            why = oom_message(spec.revision.memory)
            backend.metrics.oom_kills.inc()
        return Outcome(run.returncode, was_ready, time.monotonic() - started, why, oom)

    async def _became_ready(self, spec: InstanceSpec) -> None:
        # Where it listens is ours to say (the socket in its dir), not the instance's.
        self.endpoint = spec.endpoint
        self.phase = "ready"
        # Written before the endpoint is: a next leader (this one killed) keeps serving from
        # the runs its table says are ready while it rolls out (no gap).
        self.group.runner.backend.table.update(self.id, ready=True)
        self.group.runner.backend.table.flush()
        self._changed()
        await self.log.system(f"instance {self.id} ready on {self.endpoint}")

    async def _adopted_ready(
        self,
        adopted: ProcessRecord,
        spec: InstanceSpec,
        exited: asyncio.Task[int | None],
        stopping: asyncio.Task[Any],
    ) -> bool:
        """An adopted run that was ready stays so (health checks resume); one that was still
        starting is ready once it answers on /healthz within the start timeout."""
        if exited.done():
            return False
        if adopted.ready:
            return True
        s = self.group.runner.backend.settings
        self.endpoint = spec.endpoint
        deadline = time.monotonic() + s.start_timeout
        while time.monotonic() < deadline:
            if await self._healthy():
                self.endpoint = None
                await self._became_ready(spec)
                return True
            done, _ = await asyncio.wait(
                {exited, stopping}, timeout=s.health_interval, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                break
        self.endpoint = None
        return False

    async def _track(self, out: LogFollower, err: LogFollower) -> None:
        """Keep the record's log offsets current (the table is written once a second)."""
        table = self.group.runner.backend.table
        while True:
            await asyncio.sleep(0.5)
            table.update(self.id, stdout_offset=out.offset, stderr_offset=err.offset)
            if out.skipped or err.skipped:
                skipped = out.skipped + err.skipped
                out.skipped = err.skipped = 0
                await self.log.system(
                    f"dropped {skipped} bytes of output: written faster than they were shipped"
                )

    async def _healthy(self) -> bool:
        backend = self.group.runner.backend
        s = backend.settings
        endpoint = self.endpoint or ""
        if endpoint.startswith(UNIX_ENDPOINT):
            return await _probe_unix(endpoint.removeprefix(UNIX_ENDPOINT), s.health_timeout)
        timeout = aiohttp.ClientTimeout(total=s.health_timeout)
        try:
            async with backend.http.get(f"{endpoint}/healthz", timeout=timeout) as response:
                await response.read()
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _watch(self, exited: asyncio.Task[int | None], stopping: asyncio.Task[Any]) -> str:
        """Poll /healthz until the process exits, is stopped, or fails too many polls in a row."""
        s = self.group.runner.backend.settings
        failures = 0
        while True:
            done, _ = await asyncio.wait(
                {exited, stopping}, timeout=s.health_interval, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                return ""
            if await self._healthy():
                if failures and self.phase == "unhealthy":
                    self.phase = "ready"
                    self._changed()
                failures = 0
                continue
            failures += 1
            if self.phase == "ready":
                self.phase = "unhealthy"  # out of the endpoints until it answers again
                self._changed()
            if failures >= s.health_failures:
                return f"failed {failures} health checks in a row"

    async def _terminate(
        self, run: Running, exited: asyncio.Task[int | None], *, graceful: bool
    ) -> None:
        backend = self.group.runner.backend
        if graceful:
            # in a thread: a sandboxed run's processes are found by reading all of /proc
            await asyncio.to_thread(run.signal_payload, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), backend.settings.stop_grace_seconds)
        if not exited.done():
            run.kill()
        with contextlib.suppress(asyncio.CancelledError):
            await exited


class RevisionSet:
    """The instances of one revision of a function."""

    def __init__(
        self, runner: FunctionRunner, revision: DesiredRevision, manifest: ArtifactManifest
    ) -> None:
        self.runner = runner
        self.revision = revision
        self.key = revision.key
        self.manifest = manifest
        self.instances: list[Instance] = []
        self.failure: Failure | None = None
        self.retired = False
        self._exits: deque[float] = deque(maxlen=256)
        backend = runner.backend
        # Which pre-started runtimes its instances may start from (kept by the runner while
        # it is scaled to zero: the next start is the cold one).
        self.pool_key: PoolKey | None = None
        if backend.sandbox.enabled:
            self.pool_key = pool_key(
                manifest,
                revision,
                outbound=backend.sandbox.outbound,
                interpreter_dirs=interpreter_dirs(manifest, backend.runtime),
                node=bool(backend.runtime.node and backend.runtime.node_server)
                and backend.limiter.enforces_memory,
            )
        runner.pool_key = self.pool_key
        backend.pool.refill()

    def scale(self, replicas: int) -> list[Instance]:
        """Start or drop instances to reach `replicas`; returns the dropped ones (to stop)."""
        while len(self.instances) < replicas:
            adopted = self.runner.backend.claim(self.key)
            self.instances.append(Instance(self, adopted))
        dropped = self.instances[replicas:]
        del self.instances[replicas:]
        return dropped

    def ready_endpoints(self) -> list[str]:
        return [i.endpoint for i in self.instances if i.ready and i.endpoint]

    def all_ready(self) -> bool:
        return bool(self.instances) and all(i.ready for i in self.instances)

    def exited(self, instance: Instance) -> bool:
        """Record an unexpected exit; True when the revision is crash-looping (it is failed)."""
        s = self.runner.backend.settings
        now = time.monotonic()
        self._exits.append(now)
        if not is_crashloop(
            self._exits,
            now,
            window=s.crashloop_window,
            limit=s.crashloop_restarts,
            unready_streak=instance.unready_streak,
        ):
            return False
        self.fail(
            Failure(
                reason="OOMKilled" if instance.last_oom else "CrashLoop",
                message=crash_message(instance.id, instance.last_exit, instance.log.tail_text()),
            )
        )
        return True

    def fail(self, failure: Failure) -> None:
        if self.failure is None:
            self.failure = failure
        self.runner.wake()

    async def stop(self) -> None:
        self.retired = True
        await asyncio.gather(*(i.stop() for i in self.instances))


class FunctionRunner:
    """Everything the local backend runs for one function, and the one task that decides."""

    def __init__(self, backend: LocalBackend, desired: DesiredRevision) -> None:
        self.backend = backend
        self.desired = desired
        self.serving: RevisionSet | None = None
        self.target: RevisionSet | None = None
        self.failure: Failure | None = None
        self.failed_key: str | None = None
        self.scaling = False
        self.removed = False
        self.pool_key: PoolKey | None = None  # of its latest revision set (see RevisionSet)
        self._previous: DesiredRevision | None = None
        self._failed_instances: tuple[InstanceState, ...] = ()  # as they were when it failed
        # Out of the endpoints: drained and stopped once the state saying so is written.
        self._to_drain: list[RevisionSet | Instance] = []
        self._stopping: set[RevisionSet | Instance] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._wake.set()
        self.stepped = asyncio.Event()  # its first step is done (it claimed what it adopts)
        # Runs of an older revision a previous leader left (the function changed while no
        # deployer led): they serve until this revision is ready, then go like a drained one.
        self._legacy: list[ProcessRecord] = []
        self._task = asyncio.create_task(self._loop(), name=f"runner {desired.function}")

    def apply(self, desired: DesiredRevision) -> None:
        self.desired = desired
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._step()
            except Exception:
                log.exception(
                    "deployer runner step failed", extra={"function": self.desired.function}
                )
                await asyncio.sleep(1)
                self.wake()
            finally:
                self.stepped.set()

    async def _step(self) -> None:
        desired = self.desired
        if self.failed_key is not None and desired.key != self.failed_key:
            self.failure, self.failed_key, self._failed_instances = None, None, ()
        previous = self._previous
        if self.failed_key is None and (previous is None or previous.key != desired.key):
            # hash a new environment off the event loop: load_manifest then finds it verified
            # (once per revision: a step that only scales or reports skips the thread hop)
            with contextlib.suppress(LambdabusError):
                await asyncio.to_thread(load_manifest, desired)
        if self.failed_key is None:
            self._converge(desired)
        for group in (self.target, self.serving):
            if group is not None and group.failure is not None:
                self.failure, self.failed_key = group.failure, group.key
                self._failed_instances = tuple(i.state() for i in group.instances)
                if group is self.target:
                    self.target = None
                else:
                    self.serving = None
                self._stop(group)
        if self.target is not None and self.target.all_ready():
            if self.serving is not None:
                self._to_drain.append(self.serving)
            self.serving, self.target = self.target, None
        if self._legacy and self.serving is not None:
            legacy, self._legacy = self._legacy, []
            self._spawn(self._retire_legacy(legacy, drain=True))
        self._previous = desired
        if self._to_drain:
            await self._report()
        else:
            # Not awaited: the next step (an instance that now listens) reports right behind
            # this one instead of after its round trip (the writes reach NATS in order).
            self._spawn(self._report_or_retry())
        # Only now that the state naming the new endpoints is written do the old ones go.
        while self._to_drain:
            self._stop(self._to_drain.pop(), drain=True)

    def _converge(self, desired: DesiredRevision) -> None:
        previous = self._previous
        if previous is None or previous.generation != desired.generation:
            # What this generation changed: only the replica count, or what runs.
            self.scaling = (
                previous is not None
                and previous.key == desired.key
                and previous.replicas != desired.replicas
            )
        if desired.replicas == 0:
            if self.target is not None:
                self._stop(self.target)
            if self.serving is not None:
                self._to_drain.append(self.serving)
            self.target = self.serving = None
            return
        if self.serving is not None and self.serving.key == desired.key:
            if self.target is not None:
                self._stop(self.target)
                self.target = None
            self._to_drain.extend(self.serving.scale(desired.replicas))
            self.serving.revision = desired
            return
        if self.target is not None and self.target.key == desired.key:
            self.target.revision = desired
            for instance in self.target.scale(desired.replicas):
                self._stop(instance)
            return
        if self.target is not None:
            self._stop(self.target)
            self.target = None
        try:
            manifest = load_manifest(desired)
        except LambdabusError as exc:
            reason = str(exc.details.get("reason", "ArtifactUnavailable"))
            self.failure = Failure(reason=reason, message=exc.message)
            self.failed_key = desired.key
            return
        self.target = RevisionSet(self, desired, manifest)
        self.target.scale(desired.replicas)
        if self.serving is None and self._previous is None and not desired.pinned:
            self._legacy = self.backend.claim_legacy(desired.function, desired.key)

    async def _retire_legacy(self, legacy: list[ProcessRecord], *, drain: bool) -> None:
        if drain and self.backend.settings.drain_seconds:
            await asyncio.sleep(self.backend.settings.drain_seconds)
        for record in legacy:
            await _stop_record(record, self.backend.limiter)
            self.backend.table.discard(record.instance)

    def observe(self) -> Observation:
        groups = [g for g in (self.target, self.serving) if g is not None]
        endpoints = self.serving.ready_endpoints() if self.serving is not None else []
        serving = self.serving.revision.revision if self.serving is not None else ""
        if not endpoints and self.target is not None:
            endpoints = self.target.ready_endpoints()
            serving = self.target.revision.revision
        if not endpoints and self._legacy:
            endpoints = [r.endpoint for r in self._legacy if r.ready and is_running(r)]
        sandbox = self.backend.sandbox
        return Observation(
            revision=self.desired,
            instances=(
                *(i.state() for g in groups for i in g.instances),
                *(self._failed_instances if self.failure else ()),
            ),
            endpoints=tuple(endpoints),
            rolling_out=self.target is not None,
            scaling=self.scaling,
            serving_generation=self.serving.revision.generation if self.serving else None,
            failure=self.failure,
            serving_revision=serving,
            sandboxed=sandbox.enabled,
            sandbox_note=sandbox.reason,
            limits=self.backend.limiter.report(
                Limits.of(self.desired), log_rate=self.backend.settings.log_rate_lines_per_second
            ),
        )

    async def _report(self) -> None:
        if not self.removed:
            await self.backend.report(self.observe())

    async def _report_or_retry(self) -> None:
        try:
            await self._report()
        except Exception:
            log.exception(
                "deployer runner report failed; reported again",
                extra={"function": self.desired.function},
            )
            await asyncio.sleep(1)
            self.wake()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _stop(self, what: RevisionSet | Instance, *, drain: bool = False) -> None:
        """Stop a revision's instances or one instance, in the background; after `drain`
        seconds when it took traffic until now (in-flight and routed requests finish)."""
        what.retired = True  # not restarted any more
        self._stopping.add(what)

        async def _go() -> None:
            if drain and self.backend.settings.drain_seconds:
                await asyncio.sleep(self.backend.settings.drain_seconds)
            await what.stop()
            self._stopping.discard(what)

        self._spawn(_go())

    async def detach(self) -> None:
        """End the runner and leave every instance running (for the next leader to adopt)."""
        self.removed = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        instances: set[Instance] = set()
        for what in {*self._to_drain, *self._stopping, self.target, self.serving}:
            if isinstance(what, Instance):
                instances.add(what)
            elif what is not None:
                instances.update(what.instances)
        await asyncio.gather(*(i.detach() for i in instances))

    async def remove(self) -> None:
        """Stop everything at once (no drain) and end the runner."""
        self.removed = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        left: set[RevisionSet | Instance] = {*self._to_drain, *self._stopping}
        left |= {g for g in (self.target, self.serving) if g is not None}
        await asyncio.gather(*(x.stop() for x in left))
        legacy, self._legacy = self._legacy, []
        await self._retire_legacy(legacy, drain=False)


class LocalBackend:
    """Runs every function's instances as processes of this deployer (see `DeployBackend`)."""

    def __init__(
        self,
        settings: DeployerSettings,
        *,
        sandbox: Sandbox,
        limiter: Limiter,
        runtime: RuntimePaths,
        http: aiohttp.ClientSession,
        report: Reporter,
        logs: LogSink,
        metrics: DeployerMetrics,
        announce: Announcer | None = None,
    ) -> None:
        self.settings = settings
        self.announce = announce
        self.sandbox = sandbox
        self.limiter = limiter
        self.runtime = runtime
        self.http = http
        self.report = report
        self.logs = logs
        self.metrics = metrics
        self.table = ProcessTable(settings.process_table)
        self._runners: dict[tuple[str, str], FunctionRunner] = {}
        self._adoptable: dict[str, list[ProcessRecord]] = {}
        self._flushing: asyncio.Task[None] | None = None
        self.pool = Pool(
            settings,
            sandbox=sandbox,
            limiter=limiter,
            runtime=runtime,
            wanted=self._pool_keys,
        )

    def _pool_keys(self) -> dict[PoolKey, FunctionRunner]:
        """The pools in use: one per key some function's latest revision has."""
        return {r.pool_key: r for r in self._runners.values() if r.pool_key is not None}

    def functions(self) -> set[tuple[str, str]]:
        return set(self._runners)

    def current(self, namespace: str, name: str) -> DesiredRevision | None:
        runner = self._runners.get((namespace, name))
        return runner.desired if runner is not None else None

    async def apply(self, desired: DesiredRevision) -> None:
        key = (desired.namespace, desired.runner_name)
        runner = self._runners.get(key)
        if runner is not None and runner.desired.uid != desired.uid:
            await self.remove(*key)
            runner = None
        if runner is None:
            self._runners[key] = FunctionRunner(self, desired)
        else:
            runner.apply(desired)

    async def remove(self, namespace: str, name: str) -> None:
        runner = self._runners.pop((namespace, name), None)
        if runner is not None:
            await runner.remove()
            self.pool.refill()  # drops the pools no function uses any more

    def claim(self, revision_key: str) -> ProcessRecord | None:
        """A running instance of this revision a previous deployer left, to adopt."""
        found = self._adoptable.get(revision_key)
        return found.pop() if found else None

    def claim_legacy(self, function: str, revision_key: str) -> list[ProcessRecord]:
        """Running instances of another revision of this function a previous leader left."""
        found: list[ProcessRecord] = []
        for key, records in self._adoptable.items():
            if key != revision_key:
                found += [r for r in records if r.function == function]
                records[:] = [r for r in records if r.function != function]
        return found

    async def recover(self) -> None:
        """Take over the instances a previous deployer (or leader) left running: each is
        adopted when its revision is applied (`claim`), those nobody claims are stopped by
        `collect_orphans`. What the dead ones left (cgroups, dirs, log files) is removed."""
        self.settings.instances_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pool_dir(self.settings).mkdir(mode=0o700, parents=True, exist_ok=True)
        _owned_private(self.settings.sockets_dir, parent_too=self.settings.socket_dir is None)
        (self.settings.state_dir / LOGS_DIR).mkdir(mode=0o700, exist_ok=True)
        recorded = await asyncio.to_thread(self.table.load)
        await self.pool.clean_leftovers()  # idle pre-started runtimes are nobody's
        alive = [r for r in recorded if is_running(r)]
        await self.limiter.clean_leftovers([r.instance for r in recorded if r not in alive])
        self.table.adopt(alive)
        self._adoptable.clear()
        for record in alive:
            self._adoptable.setdefault(record.revision, []).append(record)
        if alive:
            log.info("adopting running instances", extra={"count": len(alive)})
        keep = {Path(p) for r in alive for p in (r.scratch, r.socket_dir, r.stdout, r.stderr)}
        keep |= {Path(r.code_dir) for r in alive if r.code_dir}
        keep |= {Path(r.status_file) for r in alive if r.status_file}
        logs = self.settings.state_dir / LOGS_DIR
        for directory in (
            self.settings.instances_dir,
            pool_dir(self.settings),
            self.settings.sockets_dir,
            logs,
        ):
            for leftover in directory.iterdir():
                if leftover not in keep:
                    await asyncio.to_thread(_remove, leftover)
        self._flushing = asyncio.create_task(self._flush_table())

    async def collect_orphans(self) -> None:
        """After a first full reconcile: stop the left instances no desired revision took."""
        steps = [asyncio.create_task(r.stepped.wait()) for r in self._runners.values()]
        if steps:
            await asyncio.wait(steps, timeout=60)
            for step in steps:
                step.cancel()
        left = [r for records in self._adoptable.values() for r in records]
        self._adoptable.clear()
        for record in left:
            log.warning(
                "stopping an instance no desired revision adopted",
                extra={"pid": record.pid, "instance": record.instance, "function": record.function},
            )
            await _stop_record(record, self.limiter)
            self.table.discard(record.instance)

    async def _flush_table(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await asyncio.to_thread(self.table.flush)
            except OSError as exc:
                log.warning("cannot write the process table", extra={"error": str(exc)})

    async def aclose(self, *, stop_instances: bool = False) -> None:
        """Leave the instances running for the next leader (a graceful stop, an upgrade), or,
        `stop_instances`, stop them all."""
        await self.pool.aclose()
        runners = list(self._runners.values())
        self._runners.clear()
        if stop_instances:
            await asyncio.gather(*(r.remove() for r in runners))
        else:
            await asyncio.gather(*(r.detach() for r in runners))
        if self._flushing is not None:
            self._flushing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flushing
        self.table.flush()
        if stop_instances:
            await self.collect_orphans()
            with contextlib.suppress(OSError):  # empty once every instance has stopped
                self.settings.sockets_dir.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, True)
    else:
        path.unlink(missing_ok=True)


async def _stop_record(record: ProcessRecord, limiter: Limiter) -> None:
    """Kill a recorded instance and everything in its cgroup; remove its files."""
    if is_running(record):
        kill_record(record)
    await limiter.clean_leftovers([record.instance])
    for path in (record.scratch, record.socket_dir, record.code_dir):
        if path:
            await asyncio.to_thread(shutil.rmtree, path, True)
    for path in (record.stdout, record.stderr, record.status_file):
        if path:
            Path(path).unlink(missing_ok=True)


async def limiter_for(settings: DeployerSettings) -> Limiter:
    """The limits this machine can enforce, as the settings ask (cgroups probed in a thread)."""
    return await asyncio.to_thread(
        detect_limiter,
        settings.limits,
        settings.scratch,
        cgroup_root=settings.cgroup_root,
        state_dir=settings.state_dir,
        oom_poll_interval=settings.oom_poll_interval,
    )


async def stop_all_instances(settings: DeployerSettings) -> int:
    """`--stop-instances` (the launcher's `down`): kill every instance in the process table,
    whatever deployer started it; returns how many ran."""
    table = ProcessTable(settings.process_table)
    records = table.load()
    if not records:
        return 0
    limiter = await limiter_for(settings)
    running = [r for r in records if is_running(r)]
    await asyncio.gather(*(_stop_record(r, limiter) for r in records))
    table.adopt([])
    return len(running)


@contextlib.asynccontextmanager
async def open_local_backend(
    settings: DeployerSettings,
    *,
    sandbox: Sandbox,
    runtime: RuntimePaths,
    http: aiohttp.ClientSession,
    report: Reporter,
    logs: LogSink,
    metrics: DeployerMetrics,
    limiter: Limiter | None = None,
    stop_instances: Callable[[], bool] = lambda: True,
    announce: Announcer | None = None,
) -> AsyncIterator[LocalBackend]:
    """The backend while this deployer leads: running instances adopted on entry; on exit
    they are stopped when `stop_instances()` says so (the default), else left running for the
    next leader (the service's graceful stop, an upgrade)."""
    if limiter is None:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        limiter = await limiter_for(settings)
        if limiter.note:
            log.warning("instance limits are weaker here", extra={"note": limiter.note})
    backend = LocalBackend(
        settings,
        sandbox=sandbox,
        limiter=limiter,
        runtime=runtime,
        http=http,
        report=report,
        logs=logs,
        metrics=metrics,
        announce=announce,
    )
    await backend.recover()
    try:
        yield backend
    finally:
        await backend.aclose(stop_instances=stop_instances())
