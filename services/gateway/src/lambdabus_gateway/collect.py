"""The gateway's garbage collector of source blobs: every `LAMBDABUS_GC_INTERVAL_SECONDS` it
deletes from the artifact store the blobs no function, kept revision or build names any more
and that are older than the grace period (`lambdabus_platform.gc` decides).

Gateway replicas each sweep; that is safe: deleting an absent blob is no error, and a blob
about to be referenced again is written again by `put` first (`blobstore.REFRESH_SECONDS`), so
it is young for every sweeper.
"""

from __future__ import annotations

import contextlib
import logging
import time

from lambdabus_events.models import BuildState, FunctionRecord, FunctionRevisions
from lambdabus_platform.blobstore import BlobStore
from lambdabus_platform.bus import Bus
from lambdabus_platform.gc import (
    GcMetrics,
    Stored,
    SweepReport,
    collectable,
    parsed,
    referenced_blobs,
    report,
    sweeping,
    unreferenced_since,
)
from lambdabus_platform.settings import GcSettings
from lambdabus_platform.subjects import BUILDS_BUCKET, FUNCTIONS_BUCKET, REVISIONS_BUCKET

log = logging.getLogger("lambdabus.gateway.gc")
KIND = "blob"


class BlobCollector:
    def __init__(self, bus: Bus, blobs: BlobStore, settings: GcSettings, metrics: GcMetrics):
        self._bus = bus
        self._blobs = blobs
        self._settings = settings
        self._metrics = metrics
        self._since: dict[str, float] = {}  # blob → when this sweeper first saw it unreferenced

    async def sweep(self) -> SweepReport | None:
        """One sweep; None when a record could not be read whole (nothing deleted then)."""
        # The blobs are listed before the records are read: a blob stored after the listing
        # is not a candidate, one stored before it is either young or already referenced.
        stored = [Stored(b.sha256, b.size, b.modified) for b in await self._blobs.list()]
        functions = parsed(FunctionRecord, await self._values(FUNCTIONS_BUCKET))
        revisions = parsed(FunctionRevisions, await self._values(REVISIONS_BUCKET))
        builds = parsed(BuildState, await self._values(BUILDS_BUCKET))
        if functions is None or revisions is None or builds is None:
            log.warning("a record does not parse: no blob is collected this time")
            return None
        referenced = referenced_blobs(functions, revisions, builds)
        now = time.time()
        self._since = unreferenced_since(stored, referenced, self._since, now)
        doomed = collectable(
            stored, referenced, now=now, grace=self._settings.grace_seconds, since=self._since
        )
        done = report(KIND, stored, referenced, doomed)
        for blob in doomed:
            try:
                await self._blobs.delete(blob.name)
            except Exception as exc:
                done.failed += 1
                log.warning("cannot delete a blob", extra={"sha256": blob.name, "error": str(exc)})
                continue
            done.freed.append(blob)
        self._metrics.record(done)
        log.info("garbage collected", extra=done.log_fields())
        return done

    async def _values(self, bucket: str) -> list[bytes]:
        return [e.value for e in await self._bus.kv(bucket).values(">")]

    def running(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Sweep in the background for the context's lifetime (when enabled)."""
        return sweeping(
            self.sweep,
            enabled=self._settings.enabled,
            interval=self._settings.interval_seconds,
            what="blob",
        )
