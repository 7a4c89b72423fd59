"""Revisions and traffic, the pure part shared by the gateway, the deployer and the router:
which change of a function makes a revision, whether a route is valid, and how a route's
percents fall on the revisions that are ready now (Knative's semantics). No I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from lambdabus_events.models import FunctionRecord, FunctionRevisions, Revision, TrafficTarget

# Settings whose change alone makes no revision: how many run, who may call, how many at once.
SCALE_FIELDS = frozenset(
    {
        "replicas",
        "replicas_preset",
        "min_replicas",
        "max_replicas",
        "max_concurrency",
        "preset_overrides",
        "invoke_auth",
        "description",
        "labels",
        "annotations",
    }
)


def revision_name(function: str, number: int) -> str:
    """Knative's naming: `hello-00001`."""
    return f"{function}-{number:05d}"


def what_runs(record: FunctionRecord) -> tuple[object, ...]:
    """What a revision captures of a record; two records with the same run the same thing."""
    spec = record.spec.model_dump(mode="json", exclude=set(SCALE_FIELDS))
    return (record.uid, record.source.sha256, repr(sorted(spec.items())))


def _revision_runs(doc: FunctionRevisions, revision: Revision) -> tuple[object, ...]:
    spec = revision.spec.model_dump(mode="json", exclude=set(SCALE_FIELDS))
    return (doc.uid, revision.source.sha256, repr(sorted(spec.items())))


def with_record(
    doc: FunctionRevisions | None, record: FunctionRecord, now: datetime, keep: int = 20
) -> FunctionRevisions:
    """The revisions after the function's record became `record`: a new revision when what
    runs changed (or there is none yet), `doc` itself when not; then the oldest are collected
    beyond `keep`, except the latest and those the route names. Another uid (the function was
    deleted and created anew) starts over."""
    if doc is None or doc.uid != record.uid:
        doc = FunctionRevisions(namespace=record.namespace, name=record.name, uid=record.uid)
    if doc.revisions:
        latest = doc.revisions[-1]
        if latest.generation >= record.generation or _revision_runs(doc, latest) == what_runs(
            record
        ):
            return doc
    revision = Revision(
        name=revision_name(record.name, doc.next_number),
        generation=record.generation,
        created=now,
        spec=record.spec,
        source=record.source,
    )
    grown = doc.model_copy(
        update={"revisions": [*doc.revisions, revision], "next_number": doc.next_number + 1}
    )
    return collected(grown, keep)


def collected(doc: FunctionRevisions, keep: int) -> FunctionRevisions:
    """`doc` without its oldest revisions beyond `keep`; the latest revision and those the
    route names (a percent or a tag) are never collected."""
    excess = len(doc.revisions) - keep
    if excess <= 0:
        return doc
    named = referenced(doc)
    latest = doc.revisions[-1].name
    dropped: set[str] = set()
    for revision in doc.revisions:
        if len(dropped) == excess:
            break
        if revision.name != latest and revision.name not in named:
            dropped.add(revision.name)
    if not dropped:
        return doc
    return doc.model_copy(update={"revisions": [r for r in doc.revisions if r.name not in dropped]})


def revision_of(doc: FunctionRevisions, generation: int) -> Revision | None:
    """The revision that runs at function generation `generation`: the newest one created at
    or before it (scale-only generations make none). None when that is not known: a collected
    revision (a gap in the numbers after the newest one) may be the one created for it."""
    found: Revision | None = None
    after: Revision | None = None
    for index, revision in enumerate(doc.revisions):
        if revision.generation <= generation:
            found = revision
            after = doc.revisions[index + 1] if index + 1 < len(doc.revisions) else None
    if (
        found is not None
        and after is not None
        and found.generation != generation
        and _number(after.name) > _number(found.name) + 1
    ):
        return None
    return found


def _number(revision: str) -> int:
    """`hello-00003` → 3."""
    digits = revision.rsplit("-", 1)[-1]
    return int(digits) if digits.isdigit() else 0


class TrafficError(ValueError):
    """A route that cannot be set; `code` is machine-readable."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def check_traffic(targets: Sequence[TrafficTarget], revisions: Collection[str]) -> None:
    """Raise TrafficError unless the percents are integers summing to 100, every named
    revision exists, and no tag is used twice."""
    if not targets:
        raise TrafficError("traffic names no target", "traffic_empty")
    total = sum(t.percent for t in targets)
    if total != 100:
        raise TrafficError(f"traffic percents sum to {total}, not 100", "traffic_sum")
    for target in targets:
        if target.revision is not None and target.revision not in revisions:
            raise TrafficError(f"revision {target.revision} does not exist", "revision_not_found")
    tags = [t.tag for t in targets if t.tag is not None]
    if len(tags) != len(set(tags)):
        raise TrafficError("a tag names two traffic entries", "traffic_tag_twice")


def referenced(doc: FunctionRevisions) -> dict[str, list[str]]:
    """Revision name → the reasons nothing may delete it (`traffic`, `tag <t>`), for revisions a
    route names explicitly (a `latest: true` entry names none)."""
    found: dict[str, list[str]] = {}
    for target in doc.traffic or ():
        if target.revision is None:
            continue
        reasons = found.setdefault(target.revision, [])
        if target.percent:
            reasons.append("traffic")
        if target.tag:
            reasons.append(f"tag {target.tag}")
        if not reasons:
            reasons.append("route")
    return found


@dataclass(frozen=True)
class Route:
    """A route as it applies now: percent per ready revision, tag → revision, and whether every
    entry found a ready revision (Knative's `AllTrafficAssigned`)."""

    weights: Mapping[str, int] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    all_assigned: bool = True
    unassigned: tuple[str, ...] = ()


def effective(
    traffic: Sequence[TrafficTarget] | None, latest_ready: str | None, ready: Collection[str]
) -> Route:
    """How `traffic` falls on the revisions ready now. `latest: true` means `latest_ready`. The
    percent of an entry whose revision is not ready goes to the ready ones in proportion
    (to the latest ready one when no entry is ready), so it takes its traffic once it is."""
    if traffic is None:
        if latest_ready is None:
            return Route(all_assigned=False, unassigned=("@latest",))
        return Route(weights={latest_ready: 100})
    wanted: dict[str, int] = {}
    tags: dict[str, str] = {}
    unassigned: list[str] = []
    for target in traffic:
        name = latest_ready if target.latest else target.revision
        if name is None or name not in ready:
            unassigned.append(target.revision or "@latest")
            continue
        wanted[name] = wanted.get(name, 0) + target.percent
        if target.tag is not None:
            tags[target.tag] = name
    total = sum(wanted.values())
    if total == 100:
        return Route(weights=wanted, tags=tags)
    if total == 0:
        weights = {latest_ready: 100} if latest_ready is not None else {}
        if not weights and wanted:
            weights = {next(iter(wanted)): 100}
        return Route(weights, tags, False, tuple(unassigned))
    # Spread the missing percent in proportion, the remainder to the largest.
    scaled = {name: percent * 100 // total for name, percent in wanted.items()}
    biggest = max(scaled, key=lambda n: (scaled[n], n))
    scaled[biggest] += 100 - sum(scaled.values())
    return Route(scaled, tags, False, tuple(unassigned))


def choose(weights: Mapping[str, int], counter: int) -> str | None:
    """The revision for request number `counter`: every 100 consecutive requests split exactly
    by `weights` (percents summing to 100), interleaved rather than in runs."""
    if not weights:
        return None
    # Spread: slot s of 100 is visited in a bit-reversal-like order (37 is coprime with 100).
    slot = (counter * 37) % 100
    for name in sorted(weights):
        slot -= weights[name]
        if slot < 0:
            return name
    return sorted(weights)[-1]
