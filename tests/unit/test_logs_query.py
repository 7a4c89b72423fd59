"""The logs query: validation of the request, the read it plans, the reply it renders."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from lambdabus_events.models import MAX_QUERY_LIMIT, LogLine, LogQuery, LogQueryResult
from lambdabus_logs.queries import plan, render


def query(**fields: Any) -> LogQuery:
    return LogQuery.model_validate({"namespace": "ns", "name": "fn", "kind": "runtime", **fields})


def line(text: str) -> bytes:
    return (
        LogLine(
            ts=datetime(2024, 1, 1, tzinfo=UTC),
            kind="runtime",
            namespace="ns",
            name="fn",
            uid="u",
            generation=1,
            stream="stdout",
            line=text,
        )
        .model_dump_json()
        .encode()
    )


def test_defaults() -> None:
    q = query()
    assert (q.tail, q.since, q.limit) == (None, None, MAX_QUERY_LIMIT)


@pytest.mark.parametrize(
    "fields",
    [
        {"namespace": "Upper"},
        {"name": "with.dot"},
        {"name": ">"},
        {"kind": "stdout"},
        {"tail": -1},
        {"limit": 0},
        {"limit": MAX_QUERY_LIMIT + 1},
        {"since": "2024-01-01T00:00:00"},  # no offset: not RFC 3339
        {"since": "yesterday"},
        {"unknown": True},
    ],
)
def test_invalid_queries(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        query(**fields)


def test_since_is_parsed_as_rfc3339() -> None:
    assert query(since="2024-05-01T10:00:00+02:00").since == datetime(2024, 5, 1, 8, tzinfo=UTC)
    assert query(since="2024-05-01T10:00:00Z").since == datetime(2024, 5, 1, 10, tzinfo=UTC)


def test_plans() -> None:
    runtime = plan(query(tail=5))
    assert (runtime.stream, runtime.filter_subject) == ("LOGS", "lambdabus.logs.runtime.ns.fn")
    assert (runtime.newest, runtime.keep, runtime.read) == (True, 5, 5)
    capped = plan(query(tail=50, limit=10))
    assert (capped.newest, capped.keep, capped.read) == (True, 10, 11)
    oldest = plan(query(kind="build", limit=10))
    assert oldest.filter_subject == "lambdabus.logs.build.ns.fn"
    assert (oldest.newest, oldest.keep, oldest.read) == (False, 10, 11)
    audit = plan(query(kind="lifecycle"))
    assert (audit.stream, audit.filter_subject) == ("LIFECYCLE", "lambdabus.lifecycle.*.*.ns.fn")


def decode(body: bytes) -> LogQueryResult:
    return LogQueryResult.model_validate_json(body)


def test_render_oldest_and_newest() -> None:
    payloads = [line(f"l{i}") for i in range(4)]
    first = decode(render("runtime", payloads, plan(query(limit=3)), budget=1 << 20).body)
    assert [x.line for x in first.lines] == ["l0", "l1", "l2"]
    assert first.truncated
    last = render("runtime", payloads[1:], plan(query(tail=3)), budget=1 << 20)
    assert [x.line for x in decode(last.body).lines] == ["l1", "l2", "l3"]
    assert not decode(last.body).truncated
    assert last.lines == 3


def test_render_leaves_out_malformed_and_fits_the_budget() -> None:
    payloads = [line("a"), b"not json", line("b"), line("c")]
    rendered = render("runtime", payloads, plan(query()), budget=1 << 20)
    assert [x.line for x in decode(rendered.body).lines] == ["a", "b", "c"]
    assert rendered.malformed == 1
    size = len(line("a"))
    small = render("runtime", payloads, plan(query(tail=10)), budget=64 + 2 * (size + 1))
    result = decode(small.body)
    assert [x.line for x in result.lines] == ["b", "c"]  # the newest that fit
    assert result.truncated


def test_render_lifecycle_events() -> None:
    event = json.dumps(
        {
            "specversion": "1.0",
            "id": "1",
            "source": "/lambdabus/gateway",
            "type": "io.lambdabus.function.deleted",
            "subject": "ns/fn",
            "time": "2024-01-01T00:00:00Z",
            "datacontenttype": "application/json",
            "dataschema": "https://lambdabus.io/schemas/events/io.lambdabus.function.deleted.json",
            "data": {"namespace": "ns", "name": "fn", "uid": "u", "generation": 1},
        }
    ).encode()
    rendered = render(
        "lifecycle", [event, line("x")], plan(query(kind="lifecycle")), budget=1 << 20
    )
    result = decode(rendered.body)
    assert [e["type"] for e in result.events] == ["io.lambdabus.function.deleted"]
    assert result.lines == []
    assert rendered.malformed == 1


def test_render_keeps_one_invocations_lines() -> None:
    def tagged(text: str, invocation: str | None) -> bytes:
        record = LogLine.model_validate_json(line(text))
        return record.model_copy(update={"invocation": invocation}).model_dump_json().encode()

    payloads = [tagged(f"l{i}", "a" if i % 2 else "b") for i in range(6)] + [tagged("x", None)]
    read = plan(query(tail=2, invocation="a"))
    assert read.read == MAX_QUERY_LIMIT  # the others are read past
    rendered = render("runtime", payloads, read, budget=1 << 20, invocation="a")
    assert [x.line for x in decode(rendered.body).lines] == ["l3", "l5"]
    assert not decode(rendered.body).truncated  # the last two were asked for
    every = render("runtime", payloads, plan(query(invocation="b")), budget=1 << 20, invocation="b")
    assert [x.line for x in decode(every.body).lines] == ["l0", "l2", "l4"]
    assert not decode(every.body).truncated
    with pytest.raises(ValidationError):
        query(invocation="no spaces please")
