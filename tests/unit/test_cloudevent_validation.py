"""The gateway's CloudEvents 1.0 checks, pure: every conformance-style invalid event is named by
the attribute at fault, and valid events (including what the SDK encodes) pass."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings import http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from lambdabus_gateway.cloudevent import (
    NotCloudEvents,
    batch_events,
    binary_event,
    detect_mode,
    encode_event,
    is_rfc3339,
    structured_event,
    validate_cloudevent,
)

VALID: dict[str, Any] = {
    "specversion": "1.0",
    "id": "42",
    "source": "/shop",
    "type": "com.example.order.created",
}


def _without(name: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != name}


def _attributes(event: dict[str, Any]) -> list[str]:
    return [p.attribute for p in validate_cloudevent(event)]


@pytest.mark.parametrize(
    "event",
    [
        VALID,
        {**VALID, "time": "2024-05-01T12:00:00Z"},
        {**VALID, "time": "2024-05-01t12:00:00.123456+02:00"},
        {**VALID, "time": "2016-12-31T23:59:60Z"},  # a leap second
        {**VALID, "subject": "orders/1", "dataschema": "https://example.com/s.json"},
        {**VALID, "datacontenttype": "application/json", "data": {"a": [1, None]}},
        {**VALID, "datacontenttype": "text/plain; charset=utf-8", "data": "hello"},
        {**VALID, "data_base64": base64.b64encode(b"\x00\xff").decode()},
        {**VALID, "data": None, "data_base64": ""},  # a null member is absent
        {**VALID, "myext": "x", "count2": 7, "flag": True, "a" * 20: "twenty"},
        {**VALID, "source": "https://example.com/a?b=c#d", "type": "a.*.>"},
        {**VALID, "subject": None},
    ],
)
def test_valid_events_have_no_problems(event: dict[str, Any]) -> None:
    assert validate_cloudevent(event) == []


@pytest.mark.parametrize("name", ["id", "source", "type", "specversion"])
def test_a_missing_required_attribute_is_named(name: str) -> None:
    [problem] = validate_cloudevent(_without(name))

    assert problem.attribute == name
    assert problem.message == f"attribute '{name}' is required"


@pytest.mark.parametrize("name", ["id", "source", "type", "specversion"])
def test_an_empty_or_null_required_attribute_is_named(name: str) -> None:
    [empty] = validate_cloudevent({**VALID, name: ""})
    [null] = validate_cloudevent({**VALID, name: None})

    assert (empty.attribute, null.attribute) == (name, name)
    assert "must not be empty" in empty.message
    assert "is required" in null.message


@pytest.mark.parametrize("name", ["id", "source", "type", "specversion", "subject", "time"])
def test_a_context_attribute_that_is_not_a_string_is_named(name: str) -> None:
    assert _attributes({**VALID, name: 42}) == [name]


@pytest.mark.parametrize("version", ["0.3", "2.0", "1", "1.0.0", " 1.0"])
def test_only_specversion_1_0_is_accepted(version: str) -> None:
    [problem] = validate_cloudevent({**VALID, "specversion": version})

    assert problem.attribute == "specversion"
    assert "1.0" in problem.message


@pytest.mark.parametrize(
    "time",
    [
        "yesterday",
        "2024-05-01",  # a date alone
        "2024-05-01T12:00:00",  # no offset
        "2024-05-01 12:00:00Z",  # RFC 3339's grammar needs the T
        "2024-13-01T12:00:00Z",
        "2024-02-30T12:00:00Z",
        "2024-05-01T24:00:00Z",
        "2024-05-01T12:00:00+25:00",
        "2024-05-01T12:00:00+02:60",
        "2024-05-01T12:00Z",
        "20240501T120000Z",
        "",
    ],
)
def test_a_bad_time_is_named(time: str) -> None:
    assert _attributes({**VALID, "time": time}) == ["time"]
    assert not is_rfc3339(time)


def test_data_and_data_base64_together_are_refused() -> None:
    event = {**VALID, "data": {"a": 1}, "data_base64": "AA=="}

    [problem] = validate_cloudevent(event)

    assert problem.attribute == "data_base64"
    assert "not both" in problem.message


@pytest.mark.parametrize("value", ["not base64!", "AAA", "A===", 42])
def test_bad_base64_is_refused(value: object) -> None:
    assert _attributes({**VALID, "data_base64": value}) == ["data_base64"]


@pytest.mark.parametrize(
    "name", ["MyExt", "my-ext", "my_ext", "a" * 21, "ünicode", "with space", "data.x"]
)
def test_bad_attribute_names_are_refused(name: str) -> None:
    [problem] = validate_cloudevent({**VALID, name: "x"})

    assert problem.attribute == name
    assert "lowercase letters" in problem.message


@pytest.mark.parametrize("value", [1.5, 2**31, -(2**31) - 1, {"a": 1}, [1]])
def test_extension_values_are_strings_booleans_or_int32(value: object) -> None:
    assert _attributes({**VALID, "ext": value}) == ["ext"]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("datacontenttype", "json"),
        ("datacontenttype", "application/json; charset"),
        ("dataschema", "/relative/only"),
        ("subject", ""),
        ("source", "/shop\nx"),
    ],
)
def test_optional_attributes_are_checked(name: str, value: str) -> None:
    assert _attributes({**VALID, name: value}) == [name]


def test_a_type_too_long_for_a_subject_is_refused() -> None:
    assert _attributes({**VALID, "type": "*" * 400}) == ["type"]


def test_every_problem_is_reported() -> None:
    event = {"specversion": "0.3", "id": "", "time": "noon", "BAD": 1}

    assert _attributes(event) == ["specversion", "id", "source", "type", "time", "BAD"]


# -- the HTTP modes ------------------------------------------------------------------------------


def test_detect_mode_by_content_type_then_ce_headers() -> None:
    assert detect_mode("application/cloudevents+json; charset=utf-8", False) == "structured"
    assert detect_mode("Application/CloudEvents-Batch+JSON", True) == "batch"
    assert detect_mode("application/json", True) == "binary"
    assert detect_mode(None, True) == "binary"
    for content_type in ("application/json", "text/plain", None, "application/cloudevents+xml"):
        with pytest.raises(NotCloudEvents):
            detect_mode(content_type, content_type == "application/cloudevents+xml")


def test_binary_mode_reads_what_the_sdk_writes() -> None:
    moment = datetime(2024, 5, 1, 12, 0, 0, 250000, tzinfo=UTC)
    event = CloudEvent(
        {
            **VALID,
            "time": moment,
            "subject": "a b%c",
            "myext": "ü",
            "datacontenttype": "application/json",
        },
        {"total": 5},
    )
    message = http.to_binary(event, JSONFormat())

    read, problems = binary_event(message.headers.items(), message.body)

    assert problems == []
    assert validate_cloudevent(read) == []
    assert read["time"] == "2024-05-01T12:00:00.250000Z"
    assert read["subject"] == "a b%c"
    assert read["myext"] == "ü"
    assert read["data"] == {"total": 5}
    assert read["datacontenttype"] == "application/json"


def test_binary_mode_keeps_text_as_text_and_bytes_as_base64() -> None:
    headers = [("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-source", "/s"), ("ce-type", "t")]

    text, _ = binary_event([*headers, ("Content-Type", "text/plain")], "héllo".encode())
    form, _ = binary_event(
        [*headers, ("Content-Type", "application/x-www-form-urlencoded")], b'{"a":1}'
    )
    raw, _ = binary_event([*headers, ("Content-Type", "image/png")], b"\x89PNG")
    latin, _ = binary_event([*headers, ("Content-Type", "text/plain; charset=latin-1")], b"\xe9")
    untyped, _ = binary_event(headers, b'{"a": 1}')
    empty, _ = binary_event(headers, b"")

    assert text["data"] == "héllo"
    assert form["data"] == '{"a":1}'
    assert base64.b64decode(raw["data_base64"]) == b"\x89PNG"
    assert base64.b64decode(latin["data_base64"]) == b"\xe9"
    assert untyped["data"] == {"a": 1}
    assert not {"data", "data_base64"} & empty.keys()


def test_binary_mode_problems() -> None:
    base = [("ce-id", "1"), ("ce-source", "/s"), ("ce-type", "t")]

    no_version, found = binary_event(base, b"")
    bad_json, json_problems = binary_event(
        [*base, ("ce-specversion", "1.0"), ("Content-Type", "application/json")], b"{nope"
    )
    _, twice = binary_event([*base, ("ce-id", "2")], b"")
    _, data_header = binary_event([*base, ("ce-data", "x")], b"")

    assert found == []
    assert _attributes(no_version) == ["specversion"]
    assert [p.attribute for p in json_problems] == ["data"]
    assert "data" not in bad_json
    assert [p.attribute for p in twice] == ["id"]
    assert [p.attribute for p in data_header] == ["data"]


def test_structured_and_batch_bodies() -> None:
    event, problems = structured_event(json.dumps(VALID).encode())
    assert (event, problems) == (VALID, [])
    for body in (b"[]", b"not json", b'{"a": NaN}', b"\xff"):
        _, problems = structured_event(body)
        assert len(problems) == 1, body

    events, indexed = batch_events(json.dumps([VALID, 3, VALID]).encode())
    assert events == [VALID, VALID]
    assert [(i, p.attribute) for i, p in indexed] == [(1, "")]
    _, not_array = batch_events(json.dumps(VALID).encode())
    assert len(not_array) == 1


def test_encode_event_is_compact_json_without_nulls() -> None:
    encoded = encode_event({**VALID, "subject": None, "data": "ü"})

    assert json.loads(encoded) == {**VALID, "data": "ü"}
    assert b" " not in encoded


@pytest.mark.parametrize("kind", ["io.lambdabus.schedule.fired", "io.lambdabus.function.deleted"])
def test_the_platforms_own_event_types_are_refused(kind: str) -> None:
    [problem] = validate_cloudevent({**VALID, "type": kind})

    assert problem.attribute == "type"
    assert "reserved" in problem.message
    assert "com.example." in problem.message


def test_a_type_that_only_resembles_the_platforms_is_accepted() -> None:
    assert validate_cloudevent({**VALID, "type": "io.lambdabusiness.order"}) == []
