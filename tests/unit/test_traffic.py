"""The pure rules of revisions and traffic (`lambdabus_events.traffic`)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from lambdabus_events.models import (
    FunctionConfig,
    FunctionRecord,
    SourceRef,
    TrafficTarget,
)
from lambdabus_events.traffic import (
    TrafficError,
    check_traffic,
    choose,
    effective,
    referenced,
    revision_of,
    with_record,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def record(generation: int = 1, sha: str = "a" * 64, **spec: object) -> FunctionRecord:
    return FunctionRecord(
        namespace="default",
        name="hello",
        uid="u1",
        generation=generation,
        spec=FunctionConfig.model_validate(spec),
        source=SourceRef.model_validate(
            {
                "kind": "inline",
                "sha256": sha,
                "size": 10,
                "entrypoint": "lambda_main.py",
                "files": 1,
            }
        ),
        created_at=NOW,
        updated_at=NOW,
    )


def test_what_runs_makes_revisions_and_scale_does_not() -> None:
    doc = with_record(None, record(), NOW)
    assert [r.name for r in doc.revisions] == ["hello-00001"]
    assert with_record(doc, record(2, replicas=3), NOW) == doc
    doc = with_record(doc, record(3, env={"A": "1"}), NOW)
    doc = with_record(doc, record(4, sha="b" * 64, env={"A": "1"}), NOW)
    doc = with_record(doc, record(5, sha="b" * 64, env={"A": "1"}, memory=256), NOW)
    assert [(r.name, r.generation) for r in doc.revisions] == [
        ("hello-00001", 1),
        ("hello-00002", 3),
        ("hello-00003", 4),
        ("hello-00004", 5),
    ]
    assert with_record(doc, record(5, sha="b" * 64, env={"A": "1"}, memory=256), NOW) == doc
    found = revision_of(doc, 2)
    assert found is not None
    assert found.name == "hello-00001"


def test_another_uid_starts_over() -> None:
    doc = with_record(with_record(None, record(), NOW), record(2, sha="b" * 64), NOW)
    anew = with_record(doc, record().model_copy(update={"uid": "u2"}), NOW)
    assert [r.name for r in anew.revisions] == ["hello-00001"]


def test_percents_must_sum_to_100_and_name_known_revisions() -> None:
    names = {"hello-00001", "hello-00002"}
    with pytest.raises(TrafficError, match="sum to 95"):
        check_traffic(
            [
                TrafficTarget(revision="hello-00001", percent=90),
                TrafficTarget(latest=True, percent=5),
            ],
            names,
        )
    with pytest.raises(TrafficError) as exc:
        check_traffic([TrafficTarget(revision="hello-00009", percent=100)], names)
    assert exc.value.code == "revision_not_found"
    with pytest.raises(ValueError, match="one of them"):
        TrafficTarget(revision="hello-00001", latest=True, percent=100)
    check_traffic(
        [
            TrafficTarget(revision="hello-00001", percent=90),
            TrafficTarget(latest=True, percent=10, tag="candidate"),
        ],
        names,
    )


def test_effective_route() -> None:
    split = [
        TrafficTarget(revision="hello-00001", percent=90),
        TrafficTarget(latest=True, percent=10, tag="candidate"),
    ]
    route = effective(split, "hello-00002", {"hello-00001", "hello-00002"})
    assert route.weights == {"hello-00001": 90, "hello-00002": 10}
    assert route.tags == {"candidate": "hello-00002"}
    assert route.all_assigned
    # hello-00001 not ready (yet): its percent goes to the ready ones meanwhile
    waiting = effective(split, "hello-00002", {"hello-00002"})
    assert waiting.weights == {"hello-00002": 100}
    assert not waiting.all_assigned
    assert waiting.unassigned == ("hello-00001",)
    assert effective(None, "hello-00002", {"hello-00002"}).weights == {"hello-00002": 100}
    assert not effective(None, None, set()).all_assigned


def test_choose_splits_every_hundred_exactly() -> None:
    weights = {"hello-00001": 90, "hello-00002": 10}
    counted = Counter(choose(weights, n) for n in range(1000))
    assert counted == Counter({"hello-00001": 900, "hello-00002": 100})
    # interleaved: no run of the minority longer than a few
    first = [choose(weights, n) for n in range(100)]
    assert "hello-00002" in first[:20]


def test_referenced_revisions_cannot_go() -> None:
    doc = with_record(None, record(), NOW).model_copy(
        update={
            "traffic": [
                TrafficTarget(revision="hello-00001", percent=100),
                TrafficTarget(revision="hello-00002", percent=0, tag="old"),
                TrafficTarget(latest=True, percent=0, tag="next"),
            ]
        }
    )
    assert referenced(doc) == {"hello-00001": ["traffic"], "hello-00002": ["tag old"]}


def test_the_newest_are_kept_and_routed_ones_never_collected() -> None:
    doc = with_record(None, record(), NOW, keep=3)
    doc = doc.model_copy(update={"traffic": [TrafficTarget(revision="hello-00001", percent=100)]})
    for generation in range(2, 7):
        doc = with_record(doc, record(generation, sha=f"{generation:064x}"), NOW, keep=3)
    # hello-00001 has the traffic: kept; of the rest, the newest two (the latest among them)
    assert [r.name for r in doc.revisions] == ["hello-00001", "hello-00005", "hello-00006"]
    assert doc.next_number == 7  # numbers are never reused
