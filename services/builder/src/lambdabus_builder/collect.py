"""The builder's garbage collector of its disk: every `LAMBDABUS_GC_INTERVAL_SECONDS` it deletes
the artifact directories no build state or kept revision references (collected revisions,
deleted functions), then the dependency environments no remaining artifact uses, each once it
is older than the grace period (`lambdabus_platform.gc` decides; `diskgc` reads and removes),
and the `build-inputs` entries of the artifacts it removed.

A sweep waits while any build is queued or started (its artifact and environment are not
referenced yet). Replicas sharing the state dir may sweep at once: removal renames first, so
each thing is removed by one of them (see `diskgc`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from lambdabus_builder import diskgc
from lambdabus_builder.local import LocalBackend
from lambdabus_builder.records import BuiltInputs
from lambdabus_events.models import (
    BuildState,
    DeploymentState,
    FunctionRevisions,
    RevisionDeployment,
)
from lambdabus_platform.bus import Bus
from lambdabus_platform.gc import (
    GcMetrics,
    SweepReport,
    builds_in_progress,
    collectable,
    parsed,
    referenced_artifacts,
    report,
    sweeping,
    unreferenced_since,
)
from lambdabus_platform.settings import GcSettings
from lambdabus_platform.subjects import (
    BUILD_INPUTS_BUCKET,
    BUILDS_BUCKET,
    DEPLOYMENTS_BUCKET,
    REVISION_DEPLOYMENTS_BUCKET,
    REVISIONS_BUCKET,
)

log = logging.getLogger("lambdabus.builder.gc")
KINDS = ("artifact", "environment")


class DiskCollector:
    def __init__(
        self, bus: Bus, backend: LocalBackend, settings: GcSettings, metrics: GcMetrics
    ) -> None:
        self._bus = bus
        self._backend = backend
        self._settings = settings
        self._metrics = metrics
        # by kind: thing → when this sweeper first saw it unreferenced
        self._since: dict[str, dict[str, float]] = {}

    async def _values(self, bucket: str) -> list[bytes]:
        return [e.value for e in await self._bus.kv(bucket).values(">")]

    async def sweep(self) -> list[SweepReport]:
        """One sweep: the artifact report, then the environment report; none when it waits."""
        root = self._backend.root
        # The disk is listed before the records are read: what a build finishes after the
        # listing is not a candidate; what it finished before is referenced by then.
        stored = await asyncio.to_thread(diskgc.stored_artifacts, root)
        builds = parsed(BuildState, await self._values(BUILDS_BUCKET))
        revisions = parsed(FunctionRevisions, await self._values(REVISIONS_BUCKET))
        kept = parsed(RevisionDeployment, await self._values(REVISION_DEPLOYMENTS_BUCKET))
        serving = parsed(DeploymentState, await self._values(DEPLOYMENTS_BUCKET))
        if builds is None or revisions is None or kept is None or serving is None:
            log.warning("a record does not parse: nothing is collected this time")
            return []
        waiting = builds_in_progress(builds)
        if waiting:
            log.info("garbage collection waits for builds", extra={"builds": waiting[:10]})
            return []
        now, grace = time.time(), self._settings.grace_seconds
        referenced = referenced_artifacts(builds, revisions, kept, serving)
        things = [s for s, _ in stored.values()]
        self._since["artifact"] = unreferenced_since(
            things, referenced, self._since.get("artifact", {}), now
        )
        doomed = collectable(
            things, referenced, now=now, grace=grace, since=self._since["artifact"]
        )
        artifacts = report("artifact", things, referenced, doomed)
        for thing in doomed:
            if await asyncio.to_thread(diskgc.remove_artifact, stored[thing.name][1]):
                artifacts.freed.append(thing)
        await self._forget_inputs({s.name for s in artifacts.freed})

        # Environments: those no artifact left on disk runs with (nor a build uses: touched).
        envs = await asyncio.to_thread(diskgc.stored_envs, root)
        in_use = await asyncio.to_thread(diskgc.envs_in_use, diskgc.artifact_dirs(root))
        now = time.time()
        self._since["environment"] = unreferenced_since(
            envs, in_use, self._since.get("environment", {}), now
        )
        doomed_envs = collectable(
            envs, in_use, now=now, grace=grace, since=self._since["environment"]
        )
        environments = report("environment", envs, in_use, doomed_envs)
        for env in doomed_envs:
            async with self._backend.env_lock(env.name):
                removed = await asyncio.to_thread(diskgc.remove_env, root, env.name, grace=grace)
            if removed:
                environments.freed.append(env)
            else:
                environments.young += 1
        for done in (artifacts, environments):
            self._metrics.record(done)
            log.info("garbage collected", extra=done.log_fields())
        return [artifacts, environments]

    async def _forget_inputs(self, freed: set[str]) -> None:
        """`build-inputs` entries naming an artifact removed now, or gone from the disk before
        (its function deleted): a build of those inputs builds instead of adopting nothing."""
        kv = self._bus.kv(BUILD_INPUTS_BUCKET)
        for entry in await kv.values(">"):
            try:
                artifact = BuiltInputs.model_validate_json(entry.value).artifact
            except ValueError:
                continue
            if artifact in freed or (
                artifact.startswith("file://")
                and not await asyncio.to_thread(Path(artifact.removeprefix("file://")).exists)
            ):
                with contextlib.suppress(Exception):
                    await kv.delete(entry.key, entry.revision)

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Sweep in the background for the context's lifetime (when enabled)."""
        return sweeping(
            self.sweep,
            enabled=self._settings.enabled,
            interval=self._settings.interval_seconds,
            what="disk",
        )
