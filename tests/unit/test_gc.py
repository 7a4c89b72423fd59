"""Garbage collection's pure core (`lambdabus_platform.gc`): what the records reference, and
what may be deleted once the grace period is over."""

from __future__ import annotations

from datetime import UTC, datetime

from lambdabus_events.models import (
    BuildState,
    DeploymentState,
    FunctionConfig,
    FunctionRecord,
    RevisionDeployment,
    SourceRef,
    TrafficTarget,
)
from lambdabus_events.traffic import revision_of, with_record
from lambdabus_platform.gc import (
    Stored,
    builds_in_progress,
    collectable,
    parsed,
    referenced_artifacts,
    referenced_blobs,
    report,
    unreferenced_since,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def sha(c: str) -> str:
    return c * 64


def record(generation: int, source: str, name: str = "hello", uid: str = "u1") -> FunctionRecord:
    return FunctionRecord(
        namespace="default",
        name=name,
        uid=uid,
        generation=generation,
        spec=FunctionConfig(),
        source=SourceRef(
            sha256=sha(source), size=1, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=NOW,
        updated_at=NOW,
    )


def build(
    generation: int, source: str, phase: str = "succeeded", name: str = "hello"
) -> BuildState:
    return BuildState.model_validate(
        {
            "namespace": "default",
            "name": name,
            "uid": "u1",
            "generation": generation,
            "phase": phase,
            "source_sha256": sha(source),
            "artifact": f"file:///a/{name}/u1-{generation}/manifest.json"
            if phase == "succeeded"
            else None,
            "updated_at": NOW,
        }
    )


def deployed(revision: str, generation: int, uid: str = "u1") -> RevisionDeployment:
    return RevisionDeployment(
        namespace="default",
        name="hello",
        uid=uid,
        revision=revision,
        generation=generation,
        build_generation=generation,
        artifact=f"file:///a/hello/{uid}-{generation}/manifest.json",
        updated_at=NOW,
    )


def art(generation: int, uid: str = "u1") -> str:
    return f"file:///a/hello/{uid}-{generation}/manifest.json"


def test_collected_revisions_free_their_artifacts_and_blobs_and_kept_ones_do_not() -> None:
    doc = None
    for generation, source in ((1, "a"), (2, "b"), (3, "c")):
        doc = with_record(doc, record(generation, source), NOW, keep=2)
    assert doc is not None
    assert [r.name for r in doc.revisions] == ["hello-00002", "hello-00003"]
    records = [deployed("hello-00001", 1), deployed("hello-00002", 2), deployed("hello-00003", 3)]
    artifacts = referenced_artifacts([build(3, "c")], [doc], records)
    assert artifacts == {art(2), art(3)}
    blobs = referenced_blobs([record(3, "c")], [doc], [build(3, "c")])
    assert blobs == {sha("b"), sha("c")}


def test_a_deleted_function_references_nothing_and_others_keep_theirs() -> None:
    other = with_record(None, record(1, "d", name="other", uid="u9"), NOW)
    # `hello` was deleted: no record, no build state, no revisions document; the deployer's
    # records of its revisions linger until it forgets them.
    lingering = [deployed("hello-00001", 1)]
    hello_gone_doc_other = [other]
    assert referenced_blobs([record(1, "d", name="other", uid="u9")], [other], []) == {sha("d")}
    # A lingering record of a function with no document is kept (nothing says it was
    # collected); with the document of a new function of the same name (another uid), not.
    assert referenced_artifacts([], hello_gone_doc_other, lingering) == {art(1)}
    anew = with_record(None, record(1, "e", uid="u2"), NOW)
    assert referenced_artifacts([], [anew], lingering) == set()


def test_what_serves_now_and_builds_in_progress_are_referenced() -> None:
    doc = None
    for generation, source in ((1, "a"), (2, "b"), (3, "c")):
        doc = with_record(doc, record(generation, source), NOW, keep=2)
    assert doc is not None
    serving = DeploymentState(
        namespace="default",
        name="hello",
        uid="u1",
        generation=1,
        phase="ready",
        updated_at=NOW,
        revision="hello-00001",
    )
    records = [deployed("hello-00001", 1)]
    assert referenced_artifacts([], [doc], records, [serving]) == {art(1)}
    # A build in progress has no artifact yet; its source is referenced.
    queued = build(4, "f", phase="queued")
    assert referenced_artifacts([queued], [doc], []) == set()
    assert sha("f") in referenced_blobs([], [], [queued])
    assert builds_in_progress([queued, build(3, "c", name="x")]) == ["default/hello"]


def test_only_unreferenced_things_older_than_the_grace_period_are_collectable() -> None:
    stored = [
        Stored("old-free", 10, 0.0),
        Stored("young-free", 20, 95.0),
        Stored("old-used", 30, 0.0),
        Stored("at-grace", 40, 90.0),
    ]
    doomed = collectable(stored, {"old-used"}, now=100.0, grace=10.0)
    assert [s.name for s in doomed] == ["at-grace", "old-free"]
    done = report("blob", stored, {"old-used", "absent"}, doomed)
    assert (done.examined, done.referenced, done.young) == (4, 1, 1)
    done.freed.extend(doomed)
    assert done.log_fields()["bytes_freed"] == 50
    assert collectable(stored, set(), now=100.0, grace=1000.0) == []


def test_a_thing_must_stay_unreferenced_for_the_grace_period_too() -> None:
    stored = [Stored("old", 10, 0.0), Stored("older", 10, 0.0), Stored("used", 10, 0.0)]
    since = unreferenced_since(stored, {"used"}, {}, now=100.0)
    assert since == {"old": 100.0, "older": 100.0}
    # Old, but it stopped being referenced just now (a draining instance may still run it).
    assert collectable(stored, {"used"}, now=100.0, grace=10.0, since=since) == []
    # Referenced again meanwhile ("older"): its clock starts over.
    since = unreferenced_since(stored, {"used", "older"}, since, now=105.0)
    since = unreferenced_since(stored, {"used"}, since, now=108.0)
    assert since == {"old": 100.0, "older": 108.0}
    doomed = collectable(stored, {"used"}, now=110.0, grace=10.0, since=since)
    assert [s.name for s in doomed] == ["old"]


def test_a_record_that_does_not_parse_stops_the_sweep() -> None:
    good = build(1, "a").model_dump_json().encode()
    assert parsed(BuildState, [good]) == [build(1, "a")]
    assert parsed(BuildState, [good, b"{not json"]) is None


def test_a_generation_whose_revision_was_collected_names_no_older_revision() -> None:
    """The deployer records which artifact a revision runs by `revision_of`: the artifact of a
    generation whose revision was collected must not be recorded as an older kept revision's
    (it would keep the wrong artifact alive, and serve the wrong code under that one's tag)."""
    doc = with_record(None, record(1, "a"), NOW, keep=2)
    route = [
        TrafficTarget(latest=True, percent=100),
        TrafficTarget(revision="hello-00001", tag="old"),
    ]
    doc = doc.model_copy(update={"traffic": route})
    doc = with_record(doc, record(2, "b"), NOW, keep=2)
    assert [r.name for r in doc.revisions] == ["hello-00001", "hello-00002"]
    assert (revision_of(doc, 2) or doc.revisions[0]).name == "hello-00002"
    doc = with_record(doc, record(3, "c"), NOW, keep=2)
    assert [r.name for r in doc.revisions] == ["hello-00001", "hello-00003"]
    assert (revision_of(doc, 1) or doc.revisions[1]).name == "hello-00001"
    assert revision_of(doc, 2) is None  # hello-00002, made at generation 2, was collected
    assert (revision_of(doc, 4) or doc.revisions[0]).name == "hello-00003"
