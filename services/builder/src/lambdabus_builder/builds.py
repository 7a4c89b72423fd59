"""The builder's shell around `plan.decide`: it reads a function's record and build state, acts
on the decision (queue a build, re-stamp, forget), runs build jobs in a bounded number of slots
and records each transition in the `builds` KV before publishing it.

Function events, the periodic reconciliation and the watch of other replicas' claims all call
`reconcile_one`, under a lock per function, so this process never acts twice on the same state.
Across replicas, a build is claimed with compare-and-set on its KV record and held under a
lease this process renews (`claims`, `records`); losing the claim stops the build. A build's
result is dropped unpublished when its function was deleted or got another source meanwhile, or
when its claim was lost. A source built before (by any replica) is reused, not built again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from pydantic import ValidationError

from lambdabus_builder.backend import BuildBackend, BuildRequest, BuildResult, LogStream
from lambdabus_builder.claims import LostClaim, Target, in_progress, must_stop
from lambdabus_builder.errors import BuildFailure
from lambdabus_builder.metrics import BuildMetrics
from lambdabus_builder.plan import (
    Action,
    Build,
    Forget,
    Restamp,
    Skip,
    build_event,
    decide,
    inputs_key,
    is_stale,
    next_build_state,
)
from lambdabus_builder.records import BuiltInputs, ClaimedStates, InputsIndex
from lambdabus_builder.settings import BuilderSettings
from lambdabus_events.catalog import LifecycleEvent
from lambdabus_events.models import BuildState, FunctionRecord, ImageStatus, LogLine, build_recipe
from lambdabus_platform.blobstore import BlobStore, CorruptBlob
from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import AlreadyExists, Conflict, NotFound, TemporaryError
from lambdabus_platform.registry import Registry, Versioned
from lambdabus_platform.subjects import (
    BUILD_INPUTS_BUCKET,
    BUILDS_BUCKET,
    FUNCTIONS_BUCKET,
    function_key,
    logs_subject,
)

log = logging.getLogger("lambdabus.builder")

_CANCEL_WAIT = 30.0  # seconds to wait for a cancelled build to clean up
_CAS_ATTEMPTS = 8  # decisions in a row undone by another replica's write, before giving up
_RECHECK_SLACK = 0.05  # seconds after a claim's end before looking at it again


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
    takeover_from: str | None = None  # the replica whose claim on this build ran out
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    renewer: asyncio.Task[None] | None = field(default=None, repr=False)
    writing: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    finished: bool = False  # its result is written: the claim is no longer renewed


class Builder:
    def __init__(
        self,
        *,
        bus: Bus,
        settings: BuilderSettings,
        backend: BuildBackend,
        blobs: BlobStore,
        metrics: BuildMetrics,
        replica: str,
    ) -> None:
        self._bus = bus
        self._settings = settings
        self._backend = backend
        self._blobs = blobs
        self._metrics = metrics
        self.replica = replica
        self._records = Registry(bus.kv(FUNCTIONS_BUCKET), FunctionRecord)
        self._states = ClaimedStates(bus.kv(BUILDS_BUCKET), replica, settings.lease_seconds)
        self._inputs = InputsIndex(bus.kv(BUILD_INPUTS_BUCKET))
        self._slots = asyncio.Semaphore(settings.max_concurrent_builds)
        self._jobs: dict[str, _Job] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: list[asyncio.Task[None]] = []
        self._rechecks: dict[str, asyncio.TimerHandle] = {}
        self._spawned: set[asyncio.Task[Action]] = set()
        self._closing = False

    # -- lifetime ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Clear what an earlier run left half-made, then reconcile now and periodically, and
        watch the other replicas' claims to take a build over when its claim runs out."""
        await self._backend.recover()
        self._background = [
            asyncio.create_task(self._reconcile_forever(), name="reconciler"),
            asyncio.create_task(self._watch_claims(), name="claim watch"),
        ]
        log.info("builder replica", extra={"replica": self.replica})

    async def close(self) -> None:
        """Stop reconciling and cancel running builds, then give their claims up: their states
        stay queued or started, unclaimed, so another replica (or the next start) builds them
        again at once."""
        self._closing = True
        for handle in self._rechecks.values():
            handle.cancel()
        jobs = list(self._jobs.items())
        tasks = [
            t
            for t in (
                *self._background,
                *self._spawned,
                *(j.task for _, j in jobs),
                *(j.renewer for _, j in jobs),
            )
            if t
        ]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CANCEL_WAIT)
        for key, job in jobs:
            if job.finished:
                continue
            try:
                async with asyncio.timeout(2):
                    await self._states.release(job.state.namespace, job.state.name, job.target)
            except (LostClaim, TimeoutError):
                pass
            except Exception as exc:
                log.warning("cannot release a claim", extra={"key": key, "error": str(exc)})
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
        """Read, decide, act; when another replica wrote the build record meanwhile (a
        compare-and-set conflict), read and decide again."""
        key = function_key(namespace, name)
        async with self._lock(key):
            for _ in range(_CAS_ATTEMPTS):
                record = await self._records.get(namespace, name)
                state = await self._states.get(namespace, name)
                job = self._jobs.get(key)
                action = decide(
                    record.value if record else None,
                    state.value if state else None,
                    job.target if job else None,
                    me=self.replica,
                    now=_now(),
                )
                try:
                    match action:
                        case Build():
                            await self._queue(key, action, state)
                        case Restamp(new):
                            assert state is not None
                            await self._states.update(namespace, name, new, state.revision)
                        case Forget(ns, fn, uid):
                            await self._forget(key, ns, fn, uid, state.revision if state else None)
                        case Skip(recheck_at=at) if at is not None:
                            self._recheck(key, at)
                        case Skip():
                            pass
                except (Conflict, AlreadyExists):
                    continue
                return action
            return Skip("the build record kept changing; the next reconciliation looks again")

    def _recheck(self, key: str, at: datetime) -> None:
        """Reconcile `key` again at `at` (+ a little): when another replica's claim runs out."""
        if self._closing:
            return
        old = self._rechecks.pop(key, None)
        if old is not None:
            old.cancel()
        delay = max(0.0, (at - _now()).total_seconds()) + _RECHECK_SLACK
        namespace, _, name = key.partition(".")

        def fire() -> None:
            self._rechecks.pop(key, None)
            if self._closing:
                return
            task = asyncio.create_task(self.reconcile_one(namespace, name), name=f"recheck {key}")
            self._spawned.add(task)
            task.add_done_callback(self._recheck_done)

        self._rechecks[key] = asyncio.get_running_loop().call_later(delay, fire)

    def _recheck_done(self, task: asyncio.Task[Action]) -> None:
        self._spawned.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("a re-check failed", extra={"error": str(task.exception())})

    async def _watch_claims(self) -> None:
        """Every change of a build record: another replica's claim is looked at again when it
        would run out (a renewal moves that on), a claim given up at once."""
        while True:
            try:
                async for entry in self._bus.kv(BUILDS_BUCKET).watch(">"):
                    if not entry.value:
                        continue
                    try:
                        state = BuildState.model_validate_json(entry.value)
                    except ValidationError:
                        continue
                    if not in_progress(state):
                        continue
                    if state.claim is None:
                        self._recheck(entry.key, _now())
                    elif state.claim.holder != self.replica:
                        self._recheck(entry.key, state.claim.expires_at)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "the watch of build claims ended; watching again", extra={"error": str(exc)}
                )
            await asyncio.sleep(1.0)

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

    async def _queue(self, key: str, action: Build, seen: Versioned[BuildState] | None) -> None:
        """Claim the build (compare-and-set over `seen`: Conflict / AlreadyExists when another
        replica wrote first), then queue it and renew its claim until it is done."""
        record = action.record
        claimed = await self._states.claim(record, seen)
        old = self._jobs.pop(key, None)
        if old is not None:  # building a source that is no longer the function's
            await self._cancel(old)
        if action.replaces_uid is not None:
            await self._backend.forget(record.namespace, record.name, action.replaces_uid)
        state = claimed.value
        await self._bus.publish_lifecycle(build_event(state, record.spec.runtime))
        job = _Job(Target.of(record), record.generation, state, action.takeover_from)
        self._jobs[key] = job
        job.task = asyncio.create_task(self._run(key, job), name=f"build {key}")
        job.renewer = asyncio.create_task(self._renew(key, job), name=f"lease {key}")
        if action.takeover_from is not None:
            self._metrics.takeovers.inc()
        log.info(
            "build queued",
            extra={
                "namespace": record.namespace,
                "function": record.name,
                "generation": record.generation,
                "why": action.why,
                "replica": self.replica,
            },
        )

    async def _cancel(self, job: _Job) -> None:
        tasks = {t for t in (job.task, job.renewer) if t is not None and not t.done()}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CANCEL_WAIT)

    async def _renew(self, key: str, job: _Job) -> None:
        """Renew the job's claim every third of the lease; when the claim is lost (another
        replica took the build over, or the function moved on), or cannot be renewed before a
        margin short of its end (NATS unreachable), cancel the build: it writes nothing more."""
        lease = self._settings.lease_seconds
        assert job.state.claim is not None
        expiry = job.state.claim.expires_at
        delay = lease / 3
        why = ""
        while not why:
            await asyncio.sleep(delay)
            async with job.writing:
                if job.finished:
                    return
                now = _now()
                if must_stop(expiry, now, lease):
                    why = "its claim could not be renewed before its lease ran out"
                    break
                deadline = (expiry - now).total_seconds() - lease / 6
                try:
                    async with asyncio.timeout(deadline):
                        renewed = await self._states.renew(
                            job.state.namespace, job.state.name, job.target
                        )
                except LostClaim as exc:
                    why = f"its claim was lost ({exc})"
                    break
                except Exception as exc:
                    log.warning(
                        "cannot renew a build's claim; trying again",
                        extra={"key": key, "error": str(exc) or type(exc).__name__},
                    )
                    delay = max(0.0, min(lease / 6, (expiry - _now()).total_seconds() - lease / 6))
                    continue
                job.state = renewed.value
                assert renewed.value.claim is not None
                expiry = renewed.value.claim.expires_at
                delay = lease / 3
        log.warning("stopping a build", extra={"key": key, "why": why, "replica": self.replica})
        if job.task is not None and not job.task.done():
            job.task.cancel()

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
        except LostClaim as exc:
            log.info("build given up: its claim was lost", extra={"key": key, "why": str(exc)})
        except Exception:
            log.exception("build crashed", extra={"key": key})
        finally:
            if waiting:
                self._metrics.queued.dec()
            if job.renewer is not None and not job.finished:
                job.renewer.cancel()
            if self._jobs.get(key) is job:
                del self._jobs[key]
                if not job.finished:  # stopped, lost or interrupted: look at the record again
                    self._recheck(key, _now())

    async def _write(self, job: _Job, change: Callable[[BuildState], BuildState]) -> BuildState:
        """Write the job's record under its claim (`LostClaim` if it is gone), never at once
        with its renewal."""
        async with job.writing:
            written = await self._states.write(
                job.state.namespace, job.state.name, job.target, change
            )
            job.state = written.value
            return written.value

    async def _build(self, key: str, job: _Job) -> None:
        record = await self._records.get(job.state.namespace, job.state.name)
        if is_stale(job.target, record.value if record else None):
            return  # deleted or re-sourced while queued (its reconciliation cancels us too)
        assert record is not None
        current = record.value
        await self._write(
            job,
            lambda state: next_build_state(state, current, "started", _now()).model_copy(
                update={"claim": state.claim}
            ),
        )
        await self._bus.publish_lifecycle(build_event(job.state, current.spec.runtime))
        build_log = BuildLogPublisher(self._bus, current, job.generation)
        if job.takeover_from is not None:
            await build_log.write(
                "system",
                f"build of generation {job.generation} taken over from replica "
                f"{job.takeover_from}, whose claim ran out, by replica {self.replica}",
            )
        await build_log.write(
            "system",
            f"build of generation {job.generation} started "
            f"({current.spec.runtime}, source {current.source.sha256[:12]})",
        )
        started = time.monotonic()
        result: BuildResult | BuildFailure
        inputs = inputs_key(
            current.spec.runtime,
            current.source.entrypoint,
            current.source.sha256,
            current.spec.handler,
            current.spec.command,
            build_recipe(current.spec.user_docker_commands),
        )
        try:
            async with asyncio.timeout(self._settings.build_timeout):
                reused = await self._reuse(current, job, inputs, build_log)
                if reused is not None:
                    result = reused
                else:
                    archive = await self._fetch(current)
                    result = await self._backend.build(
                        BuildRequest(current, job.generation, archive, _Progress(self, job)),
                        build_log,
                    )
                    await self._remember(inputs, result)
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

    async def _reuse(
        self, record: FunctionRecord, job: _Job, inputs: str, build_log: BuildLogPublisher
    ) -> BuildResult | None:
        """The result of an earlier build of the same inputs, by any replica, if its artifact
        is still there."""
        try:
            built = await self._inputs.get(inputs)
        except Exception as exc:  # a lookup that fails is a miss: the build is made
            log.warning("cannot look a build's inputs up", extra={"error": str(exc)})
            return None
        if built is None:
            return None
        result = await self._backend.adopt(record, job.generation, built.artifact)
        if result is None:
            await build_log.write(
                "system", f"the earlier build of these inputs is gone ({built.artifact}): building"
            )
            return None
        self._metrics.reused.inc()
        await build_log.write(
            "system",
            f"reusing the build of the same inputs ({inputs[:12]}) made by replica "
            f"{built.built_by}: {built.artifact}",
        )
        return result

    async def _remember(self, inputs: str, result: BuildResult) -> None:
        built = BuiltInputs(
            artifact=result.artifact,
            deps_key=result.deps_key,
            built_by=self.replica,
            built_at=_now(),
        )
        try:
            await self._inputs.remember(inputs, built)
        except Exception as exc:  # the build stands; only a later reuse is lost
            log.warning("cannot record a build's inputs", extra={"error": str(exc)})

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
                ).model_copy(update={"image_status": result.image_status})
                closing = f"build failed: {result.reason}: {result.message}"
            else:
                state = next_build_state(
                    job.state,
                    current,
                    "succeeded",
                    now,
                    artifact=result.artifact,
                    dependencies_cached=result.dependencies_cached,
                    duration_seconds=round(duration, 3),
                    reason=result.reason,
                    message=result.message,
                )
                closing = f"build succeeded in {duration:.2f} s"
            try:
                async with job.writing:
                    written = await self._states.write(
                        namespace, name, job.target, _replacing(state)
                    )
                    job.state = written.value
                    job.finished = True
            except LostClaim as exc:
                self._metrics.builds.labels("stale").inc()
                self._metrics.duration.labels("stale").observe(duration)
                log.warning(
                    "dropping the result of a build whose claim was lost",
                    extra={"key": key, "why": str(exc), "replica": self.replica},
                )
                return
            await build_log.write("system", closing)
            if isinstance(result, BuildFailure):
                self._metrics.failures.labels(result.reason).inc()
            else:
                self._metrics.dependency_cache.labels(
                    "hit" if result.dependencies_cached else "miss"
                ).inc()
            await self._bus.publish_lifecycle(build_event(state, current.spec.runtime))
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
                    "replica": self.replica,
                },
            )


class _Progress:
    """`BuildProgress` onto a running build's state: its image status, reason and message
    change; its phase (started) and claim stay."""

    def __init__(self, builder: Builder, job: _Job) -> None:
        self._builder = builder
        self._job = job

    async def report(self, image_status: ImageStatus, reason: str, message: str) -> None:
        if (self._job.state.image_status, self._job.state.reason, self._job.state.message) == (
            image_status,
            reason,
            message,
        ):
            return
        await self._builder._write(
            self._job,
            lambda state: state.model_copy(
                update={
                    "image_status": image_status,
                    "reason": reason,
                    "message": message,
                    "updated_at": _now(),
                }
            ),
        )


def _replacing(state: BuildState) -> Callable[[BuildState], BuildState]:
    """A change that writes `state` (a finished build: no claim) whatever the record held."""
    return lambda _: state


def _describe(action: Action) -> str:
    match action:
        case Build(record, why, _, _):
            return f"build generation {record.generation}: {why}"
        case Restamp(state):
            return f"re-stamp the build as generation {state.generation}"
        case Forget(_, _, uid):
            return f"forget the builds of {uid}"
        case Skip(why):
            return f"nothing: {why}"
