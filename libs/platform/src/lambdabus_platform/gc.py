"""Garbage collection's pure core: what the platform's records still reference (artifacts,
source blobs, dependency environments) and which stored things may go, plus the sweep's report
and metrics. The sweepers (the builder's for its disk, the gateway's for the artifact store)
read the records, call these, and delete.

A stored thing goes when nothing references it AND it is older than the grace period: the
grace covers what is being made and not recorded yet (an upload before its function record, a
build before its build state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ValidationError

from lambdabus_events.models import (
    BuildState,
    DeploymentState,
    FunctionRecord,
    FunctionRevisions,
    RevisionDeployment,
)

log = logging.getLogger("lambdabus.gc")
_IN_PROGRESS = ("queued", "started")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Stored:
    """One stored thing a sweep looks at: its name (what references name it by), its size in
    bytes, and when it was last written or used (seconds since the epoch)."""

    name: str
    size: int
    modified: float


def parsed(model: type[M], values: Iterable[bytes]) -> list[M] | None:
    """Every value as `model`; None if one does not parse: then what it references is unknown,
    and a sweep deletes nothing."""
    try:
        return [model.model_validate_json(v) for v in values]
    except ValidationError:
        return None


def unreferenced_since(
    stored: Iterable[Stored], referenced: set[str], before: Mapping[str, float], now: float
) -> dict[str, float]:
    """When each unreferenced thing was first seen unreferenced by this sweeper: as `before`
    says (the previous sweep's answer), else now. What is referenced again is dropped."""
    return {s.name: before.get(s.name, now) for s in stored if s.name not in referenced}


def collectable(
    stored: Iterable[Stored],
    referenced: set[str],
    *,
    now: float,
    grace: float,
    since: Mapping[str, float] | None = None,
) -> list[Stored]:
    """What may be deleted: not referenced, untouched for at least `grace` seconds, and (with
    `since`, see `unreferenced_since`) seen unreferenced for as long: what stopped being
    referenced a moment ago (an instance of the revision before draining) is left alone."""
    return sorted(
        (
            s
            for s in stored
            if s.name not in referenced
            and now - s.modified >= grace
            and (since is None or now - since.get(s.name, now) >= grace)
        ),
        key=lambda s: s.name,
    )


def referenced_blobs(
    functions: Iterable[FunctionRecord],
    revisions: Iterable[FunctionRevisions],
    builds: Iterable[BuildState],
) -> set[str]:
    """Source blobs (sha256) something still needs: every function's current source, every
    kept revision's (a rollback builds or runs it again), every build's (one in progress reads
    it)."""
    found = {record.source.sha256 for record in functions}
    found |= {rev.source.sha256 for doc in revisions for rev in doc.revisions}
    found |= {build.source_sha256 for build in builds if build.source_sha256}
    return found


def referenced_artifacts(
    builds: Iterable[BuildState],
    revisions: Iterable[FunctionRevisions],
    revision_deployments: Iterable[RevisionDeployment],
    deployments: Iterable[DeploymentState] = (),
) -> set[str]:
    """Artifact references (`file://.../manifest.json`) something still needs: each function's
    latest build, and the artifact of every revision that is kept (in its function's revisions
    document, same uid) or that the deployer says serves now. A revision of a function that has
    no revisions document at all is kept too (nothing says it was collected)."""
    found = {build.artifact for build in builds if build.artifact}
    kept: dict[tuple[str, str], tuple[str, set[str]]] = {
        (doc.namespace, doc.name): (doc.uid, {rev.name for rev in doc.revisions})
        for doc in revisions
    }
    serving = {(d.namespace, d.name, d.uid, d.revision) for d in deployments if d.revision}
    for rd in revision_deployments:
        if not rd.artifact:
            continue
        doc = kept.get((rd.namespace, rd.name))
        if (
            doc is None
            or (doc[0] == rd.uid and rd.revision in doc[1])
            or (rd.namespace, rd.name, rd.uid, rd.revision) in serving
        ):
            found.add(rd.artifact)
    return found


def builds_in_progress(builds: Iterable[BuildState]) -> list[str]:
    """`<ns>/<name>` of every queued or started build: a disk sweep waits for them."""
    return sorted(f"{b.namespace}/{b.name}" for b in builds if b.phase in _IN_PROGRESS)


@dataclass
class SweepReport:
    """What one sweep of one kind of thing did."""

    kind: str  # "artifact", "environment", "blob"
    examined: int = 0
    referenced: int = 0
    young: int = 0  # unreferenced, within the grace period
    freed: list[Stored] = field(default_factory=list)
    failed: int = 0

    @property
    def bytes_freed(self) -> int:
        return sum(s.size for s in self.freed)

    def log_fields(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "examined": self.examined,
            "referenced": self.referenced,
            "young": self.young,
            "freed": len(self.freed),
            "bytes_freed": self.bytes_freed,
            "failed": self.failed,
        }


def report(
    kind: str, stored: list[Stored], referenced: set[str], doomed: list[Stored]
) -> SweepReport:
    """The report of a sweep before deleting: the counts; `freed` is filled as deletes land."""
    names = {s.name for s in stored}
    return SweepReport(
        kind=kind,
        examined=len(stored),
        referenced=len(names & referenced),
        young=len(stored) - len(names & referenced) - len(doomed),
    )


@dataclass(frozen=True)
class GcMetrics:
    sweeps: Counter  # by kind
    freed: Counter  # things deleted, by kind
    freed_bytes: Counter  # their bytes, by kind

    @classmethod
    def create(cls, registry: CollectorRegistry, kinds: Iterable[str]) -> GcMetrics:
        metrics = cls(
            sweeps=Counter(
                "lambdabus_gc_sweeps", "garbage collection sweeps", ["kind"], registry=registry
            ),
            freed=Counter(
                "lambdabus_gc_freed", "unreferenced things deleted", ["kind"], registry=registry
            ),
            freed_bytes=Counter(
                "lambdabus_gc_freed_bytes", "bytes of what was deleted", ["kind"], registry=registry
            ),
        )
        for kind in kinds:
            metrics.sweeps.labels(kind)
            metrics.freed.labels(kind)
            metrics.freed_bytes.labels(kind)
        return metrics

    def record(self, done: SweepReport) -> None:
        self.sweeps.labels(done.kind).inc()
        self.freed.labels(done.kind).inc(len(done.freed))
        self.freed_bytes.labels(done.kind).inc(done.bytes_freed)


@contextlib.asynccontextmanager
async def sweeping(
    sweep: Callable[[], Awaitable[object]], *, enabled: bool, interval: float, what: str
) -> AsyncIterator[None]:
    """Run `sweep` every `interval` seconds in the background for the context's lifetime (when
    `enabled`); a failed sweep is logged and the next one tries again."""
    if not enabled:
        yield
        return

    async def forever() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    f"a {what} sweep failed; the next one tries again", extra={"error": str(exc)}
                )

    task = asyncio.create_task(forever(), name=f"{what} gc")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
