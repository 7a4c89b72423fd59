"""The builder's shell around `plan.decide`: it reads a function's record and build state, acts
on the decision (queue a build, re-stamp, forget), runs build jobs in a bounded number of slots
and records each transition in the `builds` KV before publishing it.

Function events and the periodic reconciliation both call `reconcile_one`, under a lock per
function, so they never act twice on the same state. A build's result is dropped unpublished
when its function was deleted or got another source meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from lambdabus_builder.backend import BuildBackend, BuildRequest, BuildResult, LogStream
from lambdabus_builder.errors import BuildFailure
from lambdabus_builder.metrics import BuildMetrics
from lambdabus_builder.plan import (
    Action,
    Build,
    Forget,
    Restamp,
    Skip,
    Target,
    build_event,
    decide,
    is_stale,
    next_build_state,
)
from lambdabus_builder.settings import BuilderSettings
from lambdabus_events.catalog import LifecycleEvent
from lambdabus_events.models import BuildState, FunctionRecord, LogLine
from lambdabus_platform.blobstore import BlobStore, CorruptBlob
from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import Conflict, NotFound, TemporaryError
from lambdabus_platform.registry import Registry
from lambdabus_platform.subjects import (
    BUILDS_BUCKET,
    FUNCTIONS_BUCKET,
    function_key,
    logs_subject,
)

log = logging.getLogger("lambdabus.builder")

_CANCEL_WAIT = 30.0  # seconds to wait for a cancelled build to clean up


def _now() -> datetime:
    return datetime.now(UTC)


class BuildLogPublisher:
    """`BuildLog` onto the LOGS stream: one `LogLine` per message, fire-and-forget."""

    def __init__(self, bus: Bus, record: FunctionRecord, generation: int) -> None:
        self._bus = bus
        self._record = record
        self._generation = generation
        self._subject = logs_subject("build", record.namespace, record.name)

    async def write(self, stream: LogStream, line: str) -> None:
        entry = LogLine(
            ts=_now(),
            kind="build",
            namespace=self._record.namespace,
            name=self._record.name,
            uid=self._record.uid,
            generation=self._generation,
            stream=stream,
            line=line,
        )
        try:
            await self._bus.publish_nowait(self._subject, entry.model_dump_json().encode())
        except Exception as exc:  # a lost log line must not fail the build
            log.warning("cannot publish a build log line", extra={"error": str(exc)})


@dataclass
class _Job:
    target: Target
    generation: int
    state: BuildState  # the last state written
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Builder:
    def __init__(
        self,
        *,
        bus: Bus,
        settings: BuilderSettings,
        backend: BuildBackend,
        blobs: BlobStore,
        metrics: BuildMetrics,
    ) -> None:
        self._bus = bus
        self._settings = settings
        self._backend = backend
        self._blobs = blobs
        self._metrics = metrics
        self._records = Registry(bus.kv(FUNCTIONS_BUCKET), FunctionRecord)
        self._states = Registry(bus.kv(BUILDS_BUCKET), BuildState)
        self._slots = asyncio.Semaphore(settings.max_concurrent_builds)
        self._jobs: dict[str, _Job] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reconciler: asyncio.Task[None] | None = None

    # -- lifetime ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Clear what an earlier run left half-made, then reconcile now and periodically."""
        await self._backend.recover()
        self._reconciler = asyncio.create_task(self._reconcile_forever(), name="reconciler")

    async def close(self) -> None:
        """Stop reconciling and cancel running builds: their states stay queued or started, so
        the next start builds them again."""
        tasks = [t for t in (self._reconciler, *(j.task for j in self._jobs.values())) if t]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CANCEL_WAIT)
        self._jobs.clear()

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await self.reconcile_all()
            except Exception:
                log.exception("reconciliation failed; trying again at the next interval")
            await asyncio.sleep(self._settings.reconcile_interval)

    # -- deciding -----------------------------------------------------------------------------

    async def handle(self, event: LifecycleEvent) -> None:
        """function.created / updated / deleted: bring that function's build up to date. The
        event only says which function to look at; its current record decides what to do."""
        action = await self.reconcile_one(event.namespace, event.name)
        log.info(
            "function event",
            extra={"type": event.type, "subject": event.subject, "action": _describe(action)},
        )

    async def reconcile_all(self) -> None:
        """Every function record and every build state, each brought up to date."""
        functions = await self._bus.kv(FUNCTIONS_BUCKET).values(">")
        states = await self._bus.kv(BUILDS_BUCKET).values(">")
        for key in sorted({e.key for e in functions} | {e.key for e in states}):
            namespace, _, name = key.partition(".")
            try:
                action = await self.reconcile_one(namespace, name)
            except Exception:
                log.exception("cannot reconcile a function", extra={"key": key})
                continue
            if not isinstance(action, Skip):
                log.info("reconciled", extra={"key": key, "action": _describe(action)})

    async def reconcile_one(self, namespace: str, name: str) -> Action:
        key = function_key(namespace, name)
        async with self._lock(key):
            record = await self._records.get(namespace, name)
            state = await self._states.get(namespace, name)
            job = self._jobs.get(key)
            action = decide(
                record.value if record else None,
                state.value if state else None,
                job.target if job else None,
            )
            match action:
                case Build():
                    await self._queue(key, action)
                case Restamp(new):
                    assert state is not None
                    with contextlib.suppress(Conflict):  # moved meanwhile: the next pass sees it
                        await self._states.update(namespace, name, new, state.revision)
                case Forget(ns, fn, uid):
                    await self._forget(key, ns, fn, uid, state.revision if state else None)
                case Skip():
                    pass
            return action

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def _forget(
        self, key: str, namespace: str, name: str, uid: str, revision: int | None
    ) -> None:
        job = self._jobs.pop(key, None)
        if job is not None:
            await self._cancel(job)
        await self._backend.forget(namespace, name, uid)
        with contextlib.suppress(Conflict):
            await self._states.delete(namespace, name, revision)
        log.info("build forgotten", extra={"namespace": namespace, "function": name, "uid": uid})

    async def _queue(self, key: str, action: Build) -> None:
        record = action.record
        old = self._jobs.pop(key, None)
        if old is not None:  # building a source that is no longer the function's
            await self._cancel(old)
        if action.replaces_uid is not None:
            await self._backend.forget(record.namespace, record.name, action.replaces_uid)
        state = next_build_state(None, record, "queued", _now())
        await self._states.put(record.namespace, record.name, state)
        await self._bus.publish_lifecycle(build_event(state, record.spec.runtime))
        job = _Job(Target.of(record), record.generation, state)
        self._jobs[key] = job
        job.task = asyncio.create_task(self._run(key, job), name=f"build {key}")
        log.info(
            "build queued",
            extra={
                "namespace": record.namespace,
                "function": record.name,
                "generation": record.generation,
                "why": action.why,
            },
        )

    async def _cancel(self, job: _Job) -> None:
        if job.task is not None and not job.task.done():
            job.task.cancel()
            await asyncio.wait({job.task}, timeout=_CANCEL_WAIT)

    # -- building -----------------------------------------------------------------------------

    async def _run(self, key: str, job: _Job) -> None:
        self._metrics.queued.inc()
        waiting = True
        try:
            async with self._slots:
                self._metrics.queued.dec()
                waiting = False
                with self._metrics.running.track_inprogress():
                    await self._build(key, job)
        except asyncio.CancelledError:
            raise
        except TemporaryError as exc:
            # Left queued or started: the next reconciliation builds it again.
            log.warning("build interrupted; retrying later", extra={"key": key, "error": str(exc)})
        except Exception:
            log.exception("build crashed", extra={"key": key})
        finally:
            if waiting:
                self._metrics.queued.dec()
            if self._jobs.get(key) is job:
                del self._jobs[key]

    async def _build(self, key: str, job: _Job) -> None:
        record = await self._records.get(job.state.namespace, job.state.name)
        if is_stale(job.target, record.value if record else None):
            return  # deleted or re-sourced while queued (its reconciliation cancels us too)
        assert record is not None
        current = record.value
        job.state = next_build_state(job.state, current, "started", _now())
        await self._states.put(current.namespace, current.name, job.state)
        await self._bus.publish_lifecycle(build_event(job.state, current.spec.runtime))
        build_log = BuildLogPublisher(self._bus, current, job.generation)
        await build_log.write(
            "system",
            f"build of generation {job.generation} started "
            f"({current.spec.runtime}, source {current.source.sha256[:12]})",
        )
        started = time.monotonic()
        result: BuildResult | BuildFailure
        try:
            async with asyncio.timeout(self._settings.build_timeout):
                archive = await self._fetch(current)
                result = await self._backend.build(
                    BuildRequest(current, job.generation, archive), build_log
                )
        except TimeoutError:
            result = BuildFailure(
                "BuildTimeout",
                f"the build took longer than {self._settings.build_timeout:g} s and was stopped",
            )
        except BuildFailure as failure:
            result = failure
        except (asyncio.CancelledError, TemporaryError):
            raise
        except Exception as exc:
            log.exception("build crashed", extra={"key": key})
            result = BuildFailure("InternalError", f"the builder failed: {exc!r}; see its log")
        await self._finish(key, job, result, time.monotonic() - started, build_log)

    async def _fetch(self, record: FunctionRecord) -> bytes:
        try:
            return await self._blobs.get(record.source.sha256)
        except NotFound as exc:
            raise BuildFailure(
                "InvalidSource",
                f"the source archive {record.source.sha256} is not in the artifact store; "
                "upload the function's source again",
            ) from exc
        except CorruptBlob as exc:
            raise BuildFailure("InvalidSource", exc.message) from exc

    async def _finish(
        self,
        key: str,
        job: _Job,
        result: BuildResult | BuildFailure,
        duration: float,
        build_log: BuildLogPublisher,
    ) -> None:
        namespace, name = job.state.namespace, job.state.name
        async with self._lock(key):
            record = await self._records.get(namespace, name)
            current = record.value if record else None
            if self._jobs.get(key) is not job or is_stale(job.target, current):
                self._metrics.builds.labels("stale").inc()
                self._metrics.duration.labels("stale").observe(duration)
                log.info("dropping the result of a stale build", extra={"key": key})
                return
            assert current is not None
            now = _now()
            if isinstance(result, BuildFailure):
                state = next_build_state(
                    job.state,
                    current,
                    "failed",
                    now,
                    reason=result.reason,
                    message=result.message,
                    duration_seconds=round(duration, 3),
                )
                await build_log.write("system", f"build failed: {result.reason}: {result.message}")
                self._metrics.failures.labels(result.reason).inc()
            else:
                state = next_build_state(
                    job.state,
                    current,
                    "succeeded",
                    now,
                    artifact=result.artifact,
                    dependencies_cached=result.dependencies_cached,
                    duration_seconds=round(duration, 3),
                )
                self._metrics.dependency_cache.labels(
                    "hit" if result.dependencies_cached else "miss"
                ).inc()
                await build_log.write("system", f"build succeeded in {duration:.2f} s")
            await self._states.put(namespace, name, state)
            await self._bus.publish_lifecycle(build_event(state, current.spec.runtime))
            job.state = state
            self._metrics.builds.labels(state.phase).inc()
            self._metrics.duration.labels(state.phase).observe(duration)
            log.info(
                f"build {state.phase}",
                extra={
                    "namespace": namespace,
                    "function": name,
                    "generation": state.generation,
                    "seconds": round(duration, 3),
                    "reason": state.reason,
                    "dependencies_cached": state.dependencies_cached,
                },
            )


def _describe(action: Action) -> str:
    match action:
        case Build(record, why, _):
            return f"build generation {record.generation}: {why}"
        case Restamp(state):
            return f"re-stamp the build as generation {state.generation}"
        case Forget(_, _, uid):
            return f"forget the builds of {uid}"
        case Skip(why):
            return f"nothing: {why}"
