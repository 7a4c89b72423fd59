"""The router's pure core for asynchronous delivery: the delivery plan (every branch), binary
mode and replies, trigger consumer names, and what an asynchronous result keeps."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from lambdabus_events.models import DeliveryPolicy, InvocationRequest, TriggerRecord
from lambdabus_platform.subjects import trigger_consumer
from lambdabus_router.calls import Answer
from lambdabus_router.delivery import Tries, TriesMemory, consumer_subjects
from lambdabus_router.events import (
    InvalidEvent,
    binary_headers,
    from_structured,
    parse_structured,
    reply_events,
)
from lambdabus_router.invocations import request_headers, request_target, result_of
from lambdabus_router.plan import (
    ACK,
    DeadLetter,
    Retry,
    backoff,
    is_retryable,
    next_action,
    parse_retry_after,
    reason_of,
)
from lambdabus_router.triggers import orphans, parse_consumer

EXPONENTIAL = DeliveryPolicy(retries=3, backoff="exponential", backoff_delay=0.5)
LINEAR = DeliveryPolicy(retries=3, backoff="linear", backoff_delay=0.5)
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


# -- the plan --------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_done(status: int) -> None:
    assert next_action(status, 1, EXPONENTIAL) is ACK
    assert next_action(status, 99, EXPONENTIAL) is ACK  # even past the retries


@pytest.mark.parametrize(
    "outcome", [500, 502, 503, 504, 599, 429, "timeout", "connection_refused", "connection_error"]
)
def test_retryable_outcomes_are_retried_while_retries_remain(outcome: int | str) -> None:
    for attempts in (1, 2, 3):
        action = next_action(outcome, attempts, EXPONENTIAL)  # type: ignore[arg-type]
        assert isinstance(action, Retry)
        assert action.reason == reason_of(outcome)  # type: ignore[arg-type]
    last = next_action(outcome, 4, EXPONENTIAL)  # type: ignore[arg-type]
    assert isinstance(last, DeadLetter)
    assert "gave up after 4 attempts" in last.message


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 410, 413, 422, 301, 302, 100])
def test_other_answers_are_dead_lettered_at_once(status: int) -> None:
    action = next_action(status, 1, EXPONENTIAL)
    assert action == DeadLetter(
        f"http_status_{status}", f"the function answered {status}; not retried"
    )


def test_a_request_that_cannot_be_sent_is_not_retried() -> None:
    action = next_action("invalid_request", 1, EXPONENTIAL)
    assert isinstance(action, DeadLetter)
    assert action.reason == "invalid_request"


def test_zero_retries_means_one_attempt() -> None:
    policy = DeliveryPolicy(retries=0)
    action = next_action(500, 1, policy)
    assert action == DeadLetter(
        "http_status_500", "the function answered 500; gave up after 1 attempt"
    )


def test_exponential_and_linear_backoff() -> None:
    assert [next_action(500, n, EXPONENTIAL) for n in (1, 2, 3)] == [
        Retry(0.5, "http_status_500"),
        Retry(1.0, "http_status_500"),
        Retry(2.0, "http_status_500"),
    ]
    assert [backoff(LINEAR, n) for n in (1, 2, 3)] == [0.5, 1.0, 1.5]
    assert backoff(EXPONENTIAL, 0) == 0.5  # never below the first delay


def test_backoff_is_capped() -> None:
    policy = DeliveryPolicy(retries=100, backoff_delay=3600)
    assert backoff(policy, 100) == 3600.0
    assert backoff(policy, 100, max_delay=60) == 60
    action = next_action(503, 100, policy, max_delay=10)
    assert action == Retry(10, "http_status_503")


def test_retry_after_is_honoured_instead_of_the_backoff() -> None:
    assert next_action(429, 1, EXPONENTIAL, 7.0) == Retry(7.0, "http_status_429")
    assert next_action(503, 1, EXPONENTIAL, 0.0) == Retry(0.0, "http_status_503")
    assert next_action(429, 1, EXPONENTIAL, 10_000.0, max_delay=60) == Retry(60, "http_status_429")
    assert next_action(429, 1, EXPONENTIAL, -5.0) == Retry(0.0, "http_status_429")
    # ... but never past the retries, nor for a 4xx that is not retried
    assert isinstance(next_action(429, 4, EXPONENTIAL, 1.0), DeadLetter)
    assert isinstance(next_action(400, 1, EXPONENTIAL, 1.0), DeadLetter)


def test_retryable() -> None:
    assert is_retryable(500)
    assert is_retryable(429)
    assert not is_retryable(404)
    assert is_retryable("timeout")
    assert not is_retryable("invalid_request")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("1", 1.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("Wed, 01 May 2024 12:00:30 GMT", 30.0),
        ("Wed, 01 May 2024 11:00:00 GMT", 0.0),  # in the past
        ("soon", None),
        ("-1", None),
        ("1.5", None),
        ("", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_uses_the_clock_by_default() -> None:
    later = (datetime.now(UTC) + timedelta(seconds=100)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    seconds = parse_retry_after(later)
    assert seconds is not None
    assert 90 < seconds <= 100


# -- attempts kept in memory -----------------------------------------------------------------------


def test_tries_memory_forgets_the_least_recently_used() -> None:
    memory = TriesMemory(2)
    for seq in (1, 2, 3):
        memory.put(seq, Tries(seq, NOW))
    assert memory.get(1) is None
    assert memory.get(3) == Tries(3, NOW)
    memory.put(2, Tries(5, NOW))
    memory.put(4, Tries(1, NOW))
    assert memory.get(3) is None  # 2 was used after 3
    assert memory.get(2) == Tries(5, NOW)
    memory.drop(2)
    memory.drop(2)
    assert len(memory) == 1


# -- events in binary mode, and replies -------------------------------------------------------------


def structured(**fields: object) -> dict[str, object]:
    return {"specversion": "1.0", "id": "1", "source": "/s", "type": "t.x", **fields}


def test_binary_mode_of_json_data() -> None:
    event = from_structured(
        structured(
            time="2024-05-01T12:00:00Z",
            subject="a b",
            datacontenttype="application/json",
            data={"é": [1]},
            count=3,
            flag=True,
            empty=None,
        )
    )
    headers = dict(binary_headers(event))
    assert headers == {
        "ce-specversion": "1.0",
        "ce-id": "1",
        "ce-source": "/s",
        "ce-type": "t.x",
        "ce-time": "2024-05-01T12:00:00Z",
        "ce-subject": "a%20b",
        "ce-count": "3",
        "ce-flag": "true",
        "Content-Type": "application/json",
    }
    assert json.loads(event.body) == {"é": [1]}
    assert event.attrs["count"] == "3"


def test_binary_mode_of_text_base64_and_no_data() -> None:
    text = from_structured(structured(datacontenttype="text/plain", data="héllo"))
    assert text.body == "héllo".encode()
    assert text.content_type == "text/plain"
    assert dict(binary_headers(text)) == {
        "ce-specversion": "1.0",
        "ce-id": "1",
        "ce-source": "/s",
        "ce-type": "t.x",
        "Content-Type": "text/plain",
    }
    raw = from_structured(structured(data_base64=base64.b64encode(b"\x00\xff").decode()))
    assert raw.body == b"\x00\xff"
    assert raw.content_type == "application/octet-stream"
    nothing = from_structured(structured())
    assert nothing.body == b""
    assert "Content-Type" not in dict(binary_headers(nothing))
    implied = from_structured(structured(data="a string"))  # JSON format: data is JSON
    assert implied.body == b'"a string"'
    assert implied.content_type == "application/json"


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "JSON object"),
        (json.dumps({"specversion": "1.0", "source": "/s", "type": "t"}).encode(), "'id'"),
        (json.dumps(structured(id="")).encode(), "'id'"),
        (json.dumps(structured(specversion="0.3")).encode(), "specversion"),
        (json.dumps(structured(data=1, data_base64="AA==")).encode(), "not both"),
        (json.dumps(structured(data_base64="***")).encode(), "base64"),
        (json.dumps(structured(data_base64=5)).encode(), "base64"),
        (json.dumps(structured(Bad=1)).encode(), "lowercase"),
        (json.dumps(structured(nested={"a": 1})).encode(), "'nested'"),
    ],
)
def test_invalid_stored_events(raw: bytes, problem: str) -> None:
    with pytest.raises(InvalidEvent, match=problem):
        parse_structured(raw)


def test_a_redriven_dead_letter_yields_its_event() -> None:
    letter = {"trigger_uid": "u", "event": structured(data={"a": 1}), "reason": "x"}
    event = parse_structured(json.dumps(letter).encode())
    assert event.id == "1"
    assert event.source == "/s"
    assert event.type == "t.x"


def test_replies_in_binary_mode() -> None:
    headers = [
        ("Ce-Specversion", "1.0"),
        ("ce-id", "r1"),
        ("ce-source", "/fn"),
        ("ce-type", "next.step"),
        ("ce-note", "a%20b"),
        ("Content-Type", "application/json; charset=utf-8"),
    ]
    (reply,) = reply_events(headers, b'{"x": 1}')
    assert reply == {
        "specversion": "1.0",
        "id": "r1",
        "source": "/fn",
        "type": "next.step",
        "note": "a b",
        "datacontenttype": "application/json; charset=utf-8",
        "data": {"x": 1},
    }
    (text,) = reply_events([*headers[:4], ("Content-Type", "text/plain")], b"hi")
    assert text["data"] == "hi"
    (raw,) = reply_events([*headers[:4], ("Content-Type", "image/png")], b"\x89PNG")
    assert raw["data_base64"] == base64.b64encode(b"\x89PNG").decode()
    (bare,) = reply_events(headers[:4], b"")
    assert "data" not in bare


def test_replies_in_structured_and_batch_mode() -> None:
    one = structured(data={"a": 1})
    assert reply_events(
        [("content-type", "application/cloudevents+json")], json.dumps(one).encode()
    ) == [one]
    batch = [structured(id="a"), structured(id="b")]
    assert (
        reply_events(
            [("Content-Type", "application/cloudevents-batch+json")], json.dumps(batch).encode()
        )
        == batch
    )


def test_an_ordinary_answer_is_no_reply() -> None:
    assert reply_events([("Content-Type", "application/json")], b'{"ok": true}') == []
    assert reply_events([], b"") == []


@pytest.mark.parametrize(
    ("headers", "body", "problem"),
    [
        ([("ce-id", "1"), ("ce-source", "/s")], b"", "'specversion'"),
        (
            [("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-source", "/s"), ("ce-type", "")],
            b"",
            "'type'",
        ),
        (
            [
                ("ce-specversion", "1.0"),
                ("ce-id", "1"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
                ("Content-Type", "application/json"),
            ],
            b"{not json",
            "not JSON",
        ),
        (
            [
                ("ce-specversion", "1.0"),
                ("ce-id", "1"),
                ("ce-source", "/s"),
                ("ce-type", "t"),
                ("ce-datacontenttype", "x"),
            ],
            b"",
            "Content-Type",
        ),
        ([("Content-Type", "application/cloudevents+json")], b'{"id": "1"}', "'source'"),
        ([("Content-Type", "application/cloudevents-batch+json")], b"{}", "array"),
    ],
)
def test_invalid_replies(headers: list[tuple[str, str]], body: bytes, problem: str) -> None:
    with pytest.raises(InvalidEvent, match=problem):
        reply_events(headers, body)


# -- trigger consumers -------------------------------------------------------------------------------


def record(name: str, uid: str, type_filter: str | None = None) -> TriggerRecord:
    return TriggerRecord(
        namespace="shop",
        name=name,
        uid=uid,
        function="fn",
        filter={"type": type_filter} if type_filter else {},
        delivery=DeliveryPolicy(),
        created_at=NOW,
    )


def test_consumer_subjects() -> None:
    assert consumer_subjects(record("t", "u", "com.example.order")) == [
        "lambdabus.events.t.com.example.order",
        "lambdabus.events.r.shop.t",
    ]
    assert (
        consumer_subjects(record("t", "u", "com.example.*"))[0]
        == "lambdabus.events.t.com.example.>"
    )
    assert consumer_subjects(record("t", "u"))[0] == "lambdabus.events.t.>"


def test_consumer_names_and_orphans() -> None:
    live = record("orders", "0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f9")
    name = trigger_consumer("shop", "orders", live.uid)
    assert parse_consumer(name) == ("shop", "orders")
    assert parse_consumer("invocations") is None
    assert parse_consumer("trigger_Shop_orders_abc") is None
    assert parse_consumer("trigger_shop_orders_") is None
    older = trigger_consumer("shop", "orders", "11111111-2222")  # a deleted incarnation
    gone = trigger_consumer("shop", "gone", "abc")
    assert orphans([name, older, gone, "invocations", "other_thing"], [live]) == [older, gone]


# -- asynchronous invocations -----------------------------------------------------------------------


def test_request_target_and_headers() -> None:
    request = InvocationRequest(
        namespace="shop",
        function="fn",
        id="0" * 32,
        path="sum",
        query="a=1&b=2",
        headers={
            "Content-Type": "application/json",
            "Connection": "close",
            "Host": "x",
            "X-A": "1",
        },
    )
    assert request_target(request) == "/sum?a=1&b=2"
    assert request_headers(request) == [
        ("Content-Type", "application/json"),
        ("X-A", "1"),
        ("X-Lambdabus-Invocation-Id", "0" * 32),
    ]
    assert request_target(request.model_copy(update={"path": "/", "query": ""})) == "/"


@pytest.mark.parametrize(
    ("content_type", "body", "result"),
    [
        ("application/json", b'{"a": 1}', {"a": 1}),
        ("application/problem+json", b"[1, 2]", [1, 2]),
        (None, b"3", 3),
        (None, b"plain words", "plain words"),
        ("application/json", b"{broken", "{broken"),
        ("text/plain", b'{"a": 1}', '{"a": 1}'),
        ("application/octet-stream", b"\xff\xfe", "\ufffd\ufffd"),
        ("text/plain", b"", None),
    ],
)
def test_result_of(content_type: str | None, body: bytes, result: object) -> None:
    headers = [("Content-Type", content_type)] if content_type else []
    assert result_of(Answer(200, headers, body), 1024) == (result, None)


def test_a_result_too_large_is_not_kept() -> None:
    assert result_of(Answer(200, [], b"x" * 11), 10) == (
        None,
        "the result is larger than 10 bytes; not kept",
    )
    assert result_of(Answer(200, [], b"", complete=False), 10)[0] is None
