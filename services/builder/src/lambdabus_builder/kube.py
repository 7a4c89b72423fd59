"""The kubernetes build backend: a function becomes an image built by a Kaniko Job.

A build unpacks the source (the gateway's archive rules again), adds the runtime's files (LUNA's
`run.py` and `luna_lambda_tools/`) and a generated Dockerfile (`kubeplan`), uploads that build
context to S3 (`s3://<bucket>/<prefix><uid>.tar.gz`), waits for a build slot (at most
`max_build_jobs` unfinished build Jobs in the cluster), and runs the Job `kaniko-lambda-<uid>`
(`render_job`), which pushes `<registry>/<ns>-<name>:<content digest>`. It watches the Job and
its pod (no polling), writes what they say onto the build's state (LUNA's image status, Kyma's
BuildReady reason) and streams the pod's log lines into the build log as they come. A failed Job
fails the build with Kaniko's last log lines (a registry that refuses the push says so there).

The same content gives the same digest: a Job of this function that already built that image
(still there, or running after another replica's claim ran out) is followed, not made again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lambdabus_builder.backend import BuildLog, BuildProgress, BuildRequest, BuildResult
from lambdabus_builder.errors import BuildFailure
from lambdabus_builder.kubeplan import (
    BuildContext,
    JobView,
    PackageIndex,
    code_files,
    dockerfile,
    failure_message,
    job_pods,
    job_view,
    make_context,
    pod_running,
    running_jobs,
    slot_free,
    waiting_message,
)
from lambdabus_builder.luna import install_luna_files, replaced_line
from lambdabus_builder.plan import (
    DEPENDENCY_FILES,
    NODE_LOCKFILE,
    dependency_bytes,
    deps_key,
    handler_of,
)
from lambdabus_builder.settings import BuilderSettings
from lambdabus_events.models import FunctionConfig, FunctionRecord, Runtime, command_path
from lambdabus_platform.archive import ArchiveLimits, extract_archive
from lambdabus_platform.dependencies import (
    DEPENDENCY_FILE_LIMITS,
    DependencyError,
    check_dependency_files,
)
from lambdabus_platform.errors import ArchiveError, PayloadTooLarge
from lambdabus_platform.imageregistry import ImageName, ImageRegistry, RegistryError
from lambdabus_platform.kube.client import (
    JOBS,
    PODS,
    REASON_UNAVAILABLE,
    KubeClient,
    KubeConflict,
    KubeError,
    KubeForbidden,
    KubeInvalid,
    KubeUnavailable,
    WatchEvent,
)
from lambdabus_platform.kube.render import (
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_UID,
    MANAGER,
    KubeFunction,
    image_ref,
    job_name,
    render_job,
    runtime_image,
)
from lambdabus_platform.s3 import S3Objects
from lambdabus_platform.settings import S3Settings

log = logging.getLogger("lambdabus.builder.kube")

Obj = dict[str, Any]

ANNOTATION_IMAGE = "lambdabus.io/image"
CONTAINER = "kaniko"
_LOG_TAIL = 50  # Kaniko lines kept for a failure's message
_LOG_DRAIN = 10.0  # seconds to wait for the rest of the log once the Job finished
_GONE_WAIT = 30.0  # seconds for an old Job of the same name to go


@dataclass(frozen=True, slots=True)
class _Prepared:
    context: BuildContext
    deps_key: str
    notes: tuple[str, ...]  # build log lines about what was added or replaced


class KubeBuildBackend:
    """`BuildBackend` on a Kubernetes cluster (see the module docstring)."""

    def __init__(
        self,
        settings: BuilderSettings,
        client: KubeClient,
        contexts: S3Objects,
        s3: S3Settings | None = None,
        registry: ImageRegistry | None = None,
    ) -> None:
        self._settings = settings
        self._kube = settings.kube
        self._client = client
        self._contexts = contexts
        self._s3 = s3
        self._registry = registry
        self._limits = ArchiveLimits(
            max_entries=settings.max_archive_entries,
            max_uncompressed=settings.max_uncompressed_bytes,
        )
        self._slot_lock = asyncio.Lock()  # this replica's builds take slots one at a time

    @property
    def namespace(self) -> str:
        """Where build Jobs run: the platform's namespace (Kaniko runs as root)."""
        return self._kube.platform_namespace

    # -- BuildBackend -------------------------------------------------------------------------

    async def recover(self) -> None:
        """Nothing to clear: a Job a stopped builder left keeps running, and the next build of
        its function follows it when it builds the same image, or replaces it."""

    async def adopt(
        self, record: FunctionRecord, generation: int, artifact: str
    ) -> BuildResult | None:
        """An image built earlier from the same inputs (by any function: images name no
        function) is this build's: as it is when it is in this function's repository, else
        tagged into it through the registry (no Job). None (build it) when that fails."""
        fn = KubeFunction.from_record(record)
        try:
            source = ImageName.parse(artifact)
            target = ImageName.parse(image_ref(self._kube, fn, source.tag))
        except ValueError:
            return None
        if (source.registry, source.repository) == (target.registry, target.repository):
            return BuildResult(
                artifact, True, "", reason="JobFinished", message=f"image {artifact} built before"
            )
        if self._registry is None or source.registry != target.registry:
            return None
        try:
            if not await self._registry.exists(target):
                await self._registry.tag(source, target)
        except RegistryError as exc:
            log.info("cannot tag an earlier image: building", extra={"error": exc.message})
            return None
        return BuildResult(
            str(target), True, "", message=f"image {source} tagged as {target}: no build Job"
        )

    async def forget(self, namespace: str, name: str, uid: str) -> None:
        fn = KubeFunction(namespace, name, uid, FunctionConfig())
        await self._client.delete(JOBS, self.namespace, job_name(fn))
        with contextlib.suppress(Exception):  # a context left behind is overwritten or harmless
            await self._contexts.delete(self._context_key(uid))

    async def build(self, request: BuildRequest, log_: BuildLog) -> BuildResult:
        record = request.record
        fn = KubeFunction.from_record(record)
        progress = request.progress or _NoProgress()
        if record.spec.image:  # prebuilt (Knative's pre-built container): the deployer runs it
            await log_.write("system", f"prebuilt image {record.spec.image}: no build Job")
            return BuildResult(
                record.spec.image, True, "", message=f"prebuilt image {record.spec.image}"
            )
        await log_.write("system", f"unpacking the source ({len(request.archive)} bytes)")
        prepared = await asyncio.to_thread(self._prepare, record, request.archive)
        for note in prepared.notes:
            await log_.write("system", note)
        context = prepared.context
        image = image_ref(self._kube, fn, context.tag)
        await log_.write(
            "system",
            f"build context: {context.files} files and a Dockerfile "
            f"({len(context.data)} bytes, digest {context.digest[:12]}); image {image}",
        )
        try:
            return await self._run(fn, image, prepared, log_, progress)
        except KubeUnavailable as exc:
            # Left started: the builder tries again (at once, then at each reconciliation).
            await progress.report("pending", REASON_UNAVAILABLE, exc.message)
            await log_.write("system", f"{exc.message}; the build is tried again")
            raise
        except KubeForbidden as exc:
            raise BuildFailure("KubernetesForbidden", exc.message) from exc
        except KubeInvalid as exc:
            raise BuildFailure(
                "InternalError", f"the API server refused the build Job: {exc.message}"
            ) from exc

    async def _run(
        self,
        fn: KubeFunction,
        image: str,
        prepared: _Prepared,
        log_: BuildLog,
        progress: BuildProgress,
    ) -> BuildResult:
        name = job_name(fn)
        context = prepared.context
        existing = await self._client.get(JOBS, self.namespace, name)
        if existing is not None and _image_of(existing) == image:
            view = job_view(existing, [])
            if view.outcome == "succeeded":
                await log_.write("system", f"build Job {name} built {image} already: no new Job")
                return self._result(image, prepared, f"image {image} built by Job {name}")
            if view.outcome == "running":
                await log_.write("system", f"following build Job {name}, which builds {image}")
                return await self._follow(fn.uid, name, image, prepared, log_, progress)
        await self._contexts.put(self._context_key(fn.uid), context.data)
        try:
            async with self._slot_lock:
                await self._wait_for_slot(name, progress, log_)
                await self._replace_job(fn.uid, name, existing)
                job = render_job(fn, self._kube, image, self._s3)
                job["metadata"].setdefault("annotations", {})[ANNOTATION_IMAGE] = image
                try:
                    await self._client.create(job)
                except KubeConflict:
                    # An earlier try whose answer was lost (a 5xx after the write) made it.
                    made = await self._client.get(JOBS, self.namespace, name)
                    if made is None or _image_of(made) != image:
                        raise
            await progress.report("pending", "JobCreated", f"build Job {name} created")
            await log_.write("system", f"build Job {name} created in {self.namespace}")
            return await self._follow(fn.uid, name, image, prepared, log_, progress)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(10):
                    await asyncio.shield(self._client.delete(JOBS, self.namespace, name))
            raise

    # -- preparing ------------------------------------------------------------------------

    def _prepare(self, record: FunctionRecord, archive: bytes) -> _Prepared:
        """The build context of `archive` (in a thread: it unpacks and reads files)."""
        spec = record.spec
        runtime: Runtime = spec.runtime
        custom = runtime == "custom"
        entrypoint = command_path(spec.command) if custom else record.source.entrypoint
        notes: list[str] = []
        work = Path(tempfile.mkdtemp(prefix="lambdabus-kube-build-"))
        try:
            code = work / "code"
            try:
                style = "custom" if custom else handler_of(runtime, entrypoint, spec.handler)[0]
                extract_archive(archive, code, self._limits)
            except (ArchiveError, PayloadTooLarge, ValueError) as exc:
                raise BuildFailure(
                    "InvalidSource", f"the source archive cannot be used: {exc}"
                ) from exc
            entry = code / entrypoint
            if entry.is_symlink() or not entry.is_file():
                raise BuildFailure("InvalidSource", f"the archive has no {entrypoint}")
            if style == "luna":
                replaced = install_luna_files(code)
                if replaced:
                    notes.append(replaced_line(replaced))
            files = {name: _read(code / name) for name in DEPENDENCY_FILE_LIMITS}
            try:
                check_dependency_files(
                    runtime, files, allow_unsafe=self._settings.allow_unsafe_requirements
                )
            except DependencyError as exc:
                raise BuildFailure("InvalidDependencies", exc.message) from exc
            manifest = files.get(DEPENDENCY_FILES[runtime]) if DEPENDENCY_FILES[runtime] else None
            lock = files.get(NODE_LOCKFILE) if runtime == "nodejs20" else None
            key = deps_key(runtime, dependency_bytes(runtime, manifest, lock))
            base = runtime_image(self._kube, "python3.11" if custom else runtime)
            text = dockerfile(
                record,
                base,
                files=code_files(code),
                port=self._kube.function_port,
                uid=self._kube.function_uid,
                index=PackageIndex(
                    index_url=self._settings.index_url,
                    extra_index_url=tuple(self._settings.extra_index_url),
                    npm_registry=self._settings.npm_registry,
                ),
            )
            res = spec.build_resources
            notes.append(
                f"build preset {spec.build_preset}: {res.cpu_request}m/{res.memory_request}Mi "
                f"requested, {res.cpu}m/{res.memory}Mi limit for the Kaniko Job"
            )
            if spec.user_docker_commands:
                notes.append(
                    f"user_docker_commands: {len(spec.user_docker_commands)} instructions run "
                    "after the dependencies"
                )
            return _Prepared(make_context(code, text), key, tuple(notes))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _context_key(self, uid: str) -> str:
        return f"{self._kube.build_context_prefix}{uid}.tar.gz"

    def _result(self, image: str, prepared: _Prepared, message: str) -> BuildResult:
        return BuildResult(image, False, prepared.deps_key, reason="JobFinished", message=message)

    # -- Jobs -----------------------------------------------------------------------------

    async def _wait_for_slot(self, name: str, progress: BuildProgress, log_: BuildLog) -> None:
        """Until fewer than `max_build_jobs` other build Jobs are unfinished (watched)."""
        limit = self._settings.max_build_jobs
        jobs: dict[str, Obj] = {}
        told = False
        selector = {LABEL_MANAGED_BY: MANAGER, LABEL_COMPONENT: "build"}
        async with _closing(self._client.watch(JOBS, self.namespace, selector)) as events:
            async for event in events:
                if event.type == "UNAVAILABLE":
                    await progress.report("pending", REASON_UNAVAILABLE, event.message)
                    continue
                _apply(jobs, event)
                if slot_free(jobs.values(), limit, mine=name):
                    return
                running = running_jobs(jobs.values(), besides=name)
                message = waiting_message(running, limit)
                await progress.report("pending", "BuildQueued", message)
                if not told:
                    await log_.write("system", message)
                    told = True

    async def _replace_job(self, uid: str, name: str, existing: Obj | None) -> None:
        """Delete an earlier build Job of this function (another image) and wait until it is
        gone (watched), so that the new one can take its name."""
        if existing is None:
            return
        await self._client.delete(JOBS, self.namespace, name)
        jobs: dict[str, Obj] = {}
        async with (
            asyncio.timeout(_GONE_WAIT),
            _closing(self._client.watch(JOBS, self.namespace, {LABEL_UID: uid})) as events,
        ):
            async for event in events:
                if event.type == "UNAVAILABLE":
                    continue
                _apply(jobs, event)
                if name not in jobs:
                    return

    async def _follow(
        self,
        uid: str,
        name: str,
        image: str,
        prepared: _Prepared,
        log_: BuildLog,
        progress: BuildProgress,
    ) -> BuildResult:
        """Watch the Job and its pods until it finishes; stream the pod's log meanwhile."""
        queue: asyncio.Queue[tuple[str, WatchEvent]] = asyncio.Queue()
        watches = [
            asyncio.create_task(
                _pump(
                    self._client.watch(
                        JOBS, self.namespace, {LABEL_UID: uid, LABEL_COMPONENT: "build"}
                    ),
                    "job",
                    queue,
                )
            ),
            asyncio.create_task(
                _pump(self._client.watch(PODS, self.namespace, {"job-name": name}), "pod", queue)
            ),
        ]
        lines: deque[str] = deque(maxlen=_LOG_TAIL)
        streaming: asyncio.Task[None] | None = None
        streamed_pod = ""
        job: Obj | None = None
        pods: dict[str, Obj] = {}
        seen_job = False
        view = JobView("pending", "JobCreated", f"build Job {name} created", "running")
        try:
            while True:
                source, event = await queue.get()
                if event.type == "UNAVAILABLE":  # the watch keeps trying; the state says so
                    await progress.report("pending", REASON_UNAVAILABLE, event.message)
                    continue
                if source == "job":
                    found: dict[str, Obj] = {}
                    if job is not None:
                        found[name] = job
                    _apply(found, event)
                    job = found.get(name)
                    # It was created before this watch: the watch's first list has it (or
                    # it is gone already).
                    seen_job = seen_job or job is not None or event.type == "SYNC"
                else:
                    _apply(pods, event)
                if not seen_job:
                    continue  # the Job's watch has not listed it yet
                mine = job_pods(pods.values(), name)
                view = job_view(job, mine)
                await progress.report(view.image_status, view.reason, view.message)
                newest = mine[-1] if mine else None
                if newest is not None and pod_running(newest):
                    pod_name = str(newest["metadata"]["name"])
                    if pod_name != streamed_pod and (streaming is None or streaming.done()):
                        streamed_pod = pod_name
                        streaming = asyncio.create_task(self._stream_log(pod_name, log_, lines))
                if view.outcome != "running":
                    break
        finally:
            for task in watches:
                task.cancel()
            await asyncio.gather(*watches, return_exceptions=True)
        if view.outcome == "gone":
            if streaming is not None:
                streaming.cancel()
            raise BuildFailure(
                "JobNotFound",
                f"the build Job {name} was deleted before it finished",
                image_status="not_found",
            )
        final_pods = job_pods(pods.values(), name)
        pod = final_pods[-1] if final_pods else None
        if pod is None:  # the Job's end came before its pod's events: list them
            with contextlib.suppress(KubeError):
                listed, _ = await self._client.list(PODS, self.namespace, {"job-name": name})
                found_pods = job_pods(listed, name)
                pod = found_pods[-1] if found_pods else None
        if streaming is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(streaming), _LOG_DRAIN)
            streaming.cancel()
        elif pod is not None:  # it ended before its log could be followed: read it now
            await self._read_log(str(pod["metadata"]["name"]), log_, lines)
        try:  # Kaniko has read it: the bucket keeps no finished build's context
            await self._contexts.delete(self._context_key(uid))
        except Exception as exc:  # left behind, it is overwritten or removed with the function
            log.info("cannot remove a build context", extra={"uid": uid, "error": str(exc)})
        if view.outcome == "succeeded":
            return self._result(image, prepared, f"image {image} pushed by build Job {name}")
        raise BuildFailure("JobFailed", failure_message(view, pod, list(lines)))

    async def _stream_log(self, pod: str, log_: BuildLog, lines: deque[str]) -> None:
        try:
            async for line in self._client.logs(
                self.namespace, pod, container=CONTAINER, follow=True
            ):
                lines.append(line)
                await log_.write("stdout", line)
        except KubeError as exc:  # not started yet, or gone: the next pod event tries again
            log.info("cannot follow a build pod's log", extra={"pod": pod, "error": exc.message})

    async def _read_log(self, pod: str, log_: BuildLog, lines: deque[str]) -> None:
        try:
            async for line in self._client.logs(
                self.namespace, pod, container=CONTAINER, tail_lines=_LOG_TAIL
            ):
                lines.append(line)
                await log_.write("stdout", line)
        except KubeError as exc:
            log.info("cannot read a build pod's log", extra={"pod": pod, "error": exc.message})


class _NoProgress:
    async def report(self, image_status: str, reason: str, message: str) -> None:
        return None


def _image_of(job: Obj) -> str:
    return str(((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_IMAGE, ""))


def _apply(objects: dict[str, Obj], event: WatchEvent) -> None:
    """One watch event onto a view of objects by name."""
    if event.type == "SYNC":
        objects.clear()
        objects.update({str(o["metadata"]["name"]): o for o in event.items})
        return
    name = str((event.object.get("metadata") or {}).get("name", ""))
    if event.type == "DELETED":
        objects.pop(name, None)
    elif event.type in ("ADDED", "MODIFIED"):
        objects[name] = event.object


async def _pump(
    events: AsyncIterator[WatchEvent], source: str, queue: asyncio.Queue[tuple[str, WatchEvent]]
) -> None:
    async with _closing(events) as stream:
        async for event in stream:
            await queue.put((source, event))


@contextlib.asynccontextmanager
async def _closing(events: AsyncIterator[WatchEvent]) -> AsyncIterator[AsyncIterator[WatchEvent]]:
    """An async generator closed when the block ends (its watch request with it)."""
    try:
        yield events
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes() if path.is_file() and not path.is_symlink() else None
    except OSError:
        return None
