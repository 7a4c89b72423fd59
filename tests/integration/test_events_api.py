"""`POST /v1/events` over real HTTP and a real nats-server: events in every HTTP mode are stored
in the EVENTS stream before the 202, once per (source, id); an invalid event is a 400 naming the
attribute, and nothing of the request is stored."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import Any

import pytest
import yarl
from cloudevents.core.bindings import http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from lambdabus_gateway.settings import GatewaySettings
from lambdabus_platform.bus import Bus
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.subjects import event_subject
from tests.integration.conftest import RunningGateway, running_gateway, secrets_settings

STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
ALL_EVENTS = "lambdabus.events.>"


def _type() -> str:
    return f"com.example.{uuid.uuid4().hex[:8]}.created"


def _event(event_type: str | None = None, **attributes: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "/shop",
        "type": event_type or _type(),
        **attributes,
    }


def _binary_headers(event: dict[str, Any]) -> dict[str, str]:
    return {f"ce-{k}": str(v) for k, v in event.items() if k not in ("data", "data_base64")}


async def _stored(bus: Bus, subject: str) -> list[dict[str, Any]]:
    return [json.loads(m.data) for m in await bus.read("EVENTS", subject, limit=100)]


async def _post(
    gw: RunningGateway, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with gw.http.post("/v1/events", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_binary_mode_is_stored_on_the_type_subject(gateway: RunningGateway) -> None:
    gw = gateway
    event_type, source = _type(), f"/shop/{uuid.uuid4().hex[:8]}"
    headers = {
        "ce-specversion": "1.0",
        "ce-type": event_type,
        "ce-source": source,
        "ce-id": "42",
        "ce-time": "2024-05-01T12:00:00Z",
        "ce-orderid": "o%2F1",  # percent-encoded, as the HTTP binding says
        "Content-Type": "application/json",
    }

    status, body = await _post(gw, b'{"total": 5}', headers)

    assert (status, body) == (202, {"accepted": 1, "ids": ["42"], "duplicates": 0})
    subject = event_subject(event_type)
    assert await gw.bus.count("EVENTS", subject) == 1
    [stored] = await _stored(gw.bus, subject)
    assert stored == {
        "specversion": "1.0",
        "type": event_type,
        "source": source,
        "id": "42",
        "time": "2024-05-01T12:00:00Z",
        "orderid": "o/1",
        "datacontenttype": "application/json",
        "data": {"total": 5},
    }


async def test_what_the_sdk_sends_in_both_modes_is_accepted(gateway: RunningGateway) -> None:
    gw = gateway
    event_type = _type()
    for mode, encode in (("binary", http.to_binary), ("structured", http.to_structured)):
        event = CloudEvent(
            {"type": event_type, "source": f"/sdk/{mode}", "datacontenttype": "application/json"},
            {"mode": mode},
        )
        message = encode(event, JSONFormat())

        status, body = await _post(gw, message.body, message.headers)

        assert (status, body["accepted"]) == (202, 1), body
    stored = await _stored(gw.bus, event_subject(event_type))
    assert [e["data"] for e in stored] == [{"mode": "binary"}, {"mode": "structured"}]
    assert all(e["time"].endswith("Z") for e in stored)


async def test_structured_mode_keeps_data_base64(gateway: RunningGateway) -> None:
    gw = gateway
    event = _event(data_base64=base64.b64encode(b"\x00\xff").decode(), myext=7, flag=True)

    status, body = await _post(
        gw, json.dumps(event).encode(), {"Content-Type": f"{STRUCTURED}; charset=utf-8"}
    )

    assert (status, body["ids"]) == (202, [event["id"]])
    assert await _stored(gw.bus, event_subject(event["type"])) == [event]


async def test_batch_mode_stores_every_event(gateway: RunningGateway) -> None:
    gw = gateway
    events = [_event(), _event(data={"n": 1}), _event(subject="x")]

    status, body = await _post(gw, json.dumps(events).encode(), {"Content-Type": BATCH})

    assert status == 202
    assert body == {"accepted": 3, "ids": [e["id"] for e in events], "duplicates": 0}
    for event in events:
        assert await _stored(gw.bus, event_subject(event["type"])) == [event]


async def test_an_empty_batch_stores_nothing(gateway: RunningGateway) -> None:
    before = await gateway.bus.count("EVENTS", ALL_EVENTS)

    status, body = await _post(gateway, b"[]", {"Content-Type": BATCH})

    assert (status, body) == (202, {"accepted": 0, "ids": [], "duplicates": 0})
    assert await gateway.bus.count("EVENTS", ALL_EVENTS) == before


async def test_the_same_source_and_id_is_stored_once(gateway: RunningGateway) -> None:
    gw = gateway
    event = _event(data={"v": 1})
    subject = event_subject(event["type"])

    first = await _post(gw, json.dumps(event).encode(), {"Content-Type": STRUCTURED})
    # the same identity again, this time in binary mode and with other data
    again = await _post(
        gw, b'{"v": 2}', {**_binary_headers(event), "Content-Type": "application/json"}
    )
    in_batch = await _post(gw, json.dumps([event, event]).encode(), {"Content-Type": BATCH})
    other_source = await _post(
        gw, json.dumps({**event, "source": "/other"}).encode(), {"Content-Type": STRUCTURED}
    )

    assert first == (202, {"accepted": 1, "ids": [event["id"]], "duplicates": 0})
    assert again == (202, {"accepted": 1, "ids": [event["id"]], "duplicates": 1})
    assert in_batch == (202, {"accepted": 2, "ids": [event["id"]] * 2, "duplicates": 2})
    assert other_source[1]["duplicates"] == 0  # the identity is (source, id), not id alone
    stored = await _stored(gw.bus, subject)
    assert [(e["source"], e["data"]) for e in stored] == [("/shop", {"v": 1}), ("/other", {"v": 1})]


def _structured(event: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    return json.dumps(event).encode(), {"Content-Type": STRUCTURED}


def _without(name: str) -> dict[str, Any]:
    return {k: v for k, v in _event().items() if k != name}


def _binary_without(name: str) -> tuple[bytes, dict[str, str]]:
    headers = {k: v for k, v in _binary_headers(_event()).items() if k != f"ce-{name}"}
    return b'{"a": 1}', {**headers, "Content-Type": "application/json"}


INVALID: list[tuple[str, tuple[bytes, dict[str, str]], str]] = [
    *[(f"structured without {n}", _structured(_without(n)), n) for n in ("id", "source", "type")],
    ("structured without specversion", _structured(_without("specversion")), "specversion"),
    *[(f"structured with empty {n}", _structured(_event(**{n: ""})), n) for n in ("id", "source")],
    ("structured with empty type", _structured({**_event(), "type": ""}), "type"),
    ("structured with empty specversion", _structured(_event(specversion="")), "specversion"),
    *[(f"binary without {n}", _binary_without(n), n) for n in ("id", "source", "type")],
    ("binary without specversion", _binary_without("specversion"), "specversion"),
    ("binary with empty id", (b"", {**_binary_headers(_event()), "ce-id": ""}), "id"),
    ("specversion 0.3", _structured(_event(specversion="0.3")), "specversion"),
    ("specversion 2.0", (b"", {**_binary_headers(_event()), "ce-specversion": "2.0"}), "specversion"),
    ("bad time", _structured(_event(time="yesterday")), "time"),
    ("time without offset", (b"", {**_binary_headers(_event()), "ce-time": "2024-05-01T12:00:00"}), "time"),
    ("both data fields", _structured(_event(data={"a": 1}, data_base64="AA==")), "data_base64"),
    ("bad base64", _structured(_event(data_base64="%%%")), "data_base64"),
    ("uppercase attribute", _structured(_event(MyExt="x")), "MyExt"),
    ("long attribute", _structured(_event(**{"a" * 21: "x"})), "a" * 21),
    ("long binary attribute", (b"", {**_binary_headers(_event()), f"ce-{'b' * 21}": "x"}), "b" * 21),
    ("object extension", _structured(_event(ext={"a": 1})), "ext"),
    ("id not a string", _structured(_event(id=42)), "id"),
    ("binary body not JSON", (b"{nope", {**_binary_headers(_event()), "Content-Type": "application/json"}), "data"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "request_", "attribute"), INVALID, ids=[c[0] for c in INVALID])
async def test_an_invalid_event_is_a_400_naming_the_attribute_and_nothing_is_stored(
    gateway: RunningGateway, case: str, request_: tuple[bytes, dict[str, str]], attribute: str
) -> None:
    before = await gateway.bus.count("EVENTS", ALL_EVENTS)
    body, headers = request_

    status, answer = await _post(gateway, body, headers)

    assert status == 400, answer
    error = answer["error"]
    assert error["code"] == "invalid_cloudevent"
    assert error["details"]["attribute"] == attribute
    assert attribute in error["message"]
    assert await gateway.bus.count("EVENTS", ALL_EVENTS) == before


WRONG_CONTENT_TYPE: list[tuple[str, str | None]] = [
    ("a structured event sent as application/json", "application/json"),
    ("a structured event sent as text/plain", "text/plain"),
    ("a structured event with no content type", None),
    ("an unsupported CloudEvents format", "application/cloudevents+xml"),
    ("an unsupported batch format", "application/cloudevents-batch+avro"),
]


@pytest.mark.parametrize(
    ("case", "content_type"), WRONG_CONTENT_TYPE, ids=[c[0] for c in WRONG_CONTENT_TYPE]
)
async def test_a_wrong_content_type_is_a_400_and_nothing_is_stored(
    gateway: RunningGateway, case: str, content_type: str | None
) -> None:
    before = await gateway.bus.count("EVENTS", ALL_EVENTS)
    headers = {"Content-Type": content_type} if content_type else {}
    async with gateway.http.post(
        "/v1/events", data=json.dumps(_event()).encode(), headers=headers
    ) as resp:
        status, answer = resp.status, await resp.json()

    assert status == 400, answer
    assert answer["error"]["code"] == "unsupported_content_type"
    assert "application/cloudevents+json" in answer["error"]["message"]
    assert await gateway.bus.count("EVENTS", ALL_EVENTS) == before


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"not json", "not valid JSON"),
        (b'"a string"', "JSON object"),
        (b"[1]", "JSON object"),
    ],
)
async def test_a_malformed_structured_body_is_a_400(
    gateway: RunningGateway, body: bytes, problem: str
) -> None:
    status, answer = await _post(gateway, body, {"Content-Type": STRUCTURED})

    assert (status, answer["error"]["code"]) == (400, "invalid_cloudevent")
    assert problem in answer["error"]["message"]


async def test_a_batch_with_one_bad_event_is_refused_whole(gateway: RunningGateway) -> None:
    gw = gateway
    good = [_event(), _event()]
    before = await gw.bus.count("EVENTS", ALL_EVENTS)

    status, answer = await _post(
        gw, json.dumps([good[0], _without("source"), good[1]]).encode(), {"Content-Type": BATCH}
    )
    not_objects = await _post(gw, json.dumps([good[0], "x"]).encode(), {"Content-Type": BATCH})
    not_array = await _post(gw, json.dumps(good[0]).encode(), {"Content-Type": BATCH})

    assert status == 400
    assert answer["error"]["code"] == "invalid_cloudevent"
    assert answer["error"]["details"]["index"] == 1
    assert answer["error"]["details"]["attribute"] == "source"
    assert answer["error"]["message"] == "event 1: attribute 'source' is required"
    assert not_objects[0] == 400
    assert not_objects[1]["error"]["details"]["index"] == 1
    assert not_array[0] == 400
    assert await gw.bus.count("EVENTS", ALL_EVENTS) == before
    for event in good:
        assert await gw.bus.count("EVENTS", event_subject(event["type"])) == 0


@pytest.mark.parametrize(
    ("event_type", "subject"),
    [
        ("a.*.>", "lambdabus.events.t.a.%2A.%3E"),
        (">", "lambdabus.events.t.%3E"),
        ("with space.and\ttab", "lambdabus.events.t.with%20space.and%09tab"),
        (".leading", "lambdabus.events.t.%2Eleading"),
        ("trailing.", "lambdabus.events.t.trailing%2E"),
        ("double..dot", "lambdabus.events.t.double%2E%2Edot"),
        ("100%.ünï", "lambdabus.events.t.100%25.%C3%BCn%C3%AF"),
    ],
)
async def test_types_never_reach_nats_as_wildcards_or_extra_tokens(
    gateway: RunningGateway, event_type: str, subject: str
) -> None:
    gw = gateway
    event = _event(event_type)
    # every other event of the test session stays out of this count
    before = await gw.bus.count("EVENTS", subject)

    status, _ = await _post(gw, json.dumps(event).encode(), {"Content-Type": STRUCTURED})

    assert status == 202
    assert event_subject(event_type) == subject
    assert await gw.bus.count("EVENTS", subject) == before + 1
    stored = await _stored(gw.bus, subject)
    assert stored[-1] == event


async def test_size_limits(nats_settings: NatsSettings, bus: Bus) -> None:
    settings = GatewaySettings(
        port=0,
        nats=nats_settings,
        secrets=secrets_settings(),
        max_event_bytes=2048,
        max_batch_events=2,
    )
    async with running_gateway(settings, bus) as gw:
        before = await gw.bus.count("EVENTS", ALL_EVENTS)
        big = _event(data="x" * 3000)
        single = await _post(gw, json.dumps(big).encode(), {"Content-Type": STRUCTURED})
        binary = await _post(
            gw, b"x" * 3000, {**_binary_headers(_event()), "Content-Type": "text/plain"}
        )
        in_batch = await _post(gw, json.dumps([_event(), big]).encode(), {"Content-Type": BATCH})
        too_many = await _post(gw, json.dumps([_event()] * 3).encode(), {"Content-Type": BATCH})

        assert [r[0] for r in (single, binary, in_batch, too_many)] == [413] * 4
        assert {r[1]["error"]["code"] for r in (single, binary, in_batch, too_many)} == {
            "payload_too_large"
        }
        assert in_batch[1]["error"]["details"]["index"] == 1
        assert await gw.bus.count("EVENTS", ALL_EVENTS) == before


async def test_openapi_documents_the_producer_subjects(gateway: RunningGateway) -> None:
    async with gateway.http.get("/v1/openapi.json") as resp:
        spec = await resp.json()
    post = spec["paths"]["/v1/events"]["post"]
    assert "lambdabus.events.t.<encoded type>" in post["description"]
    assert "Nats-Msg-Id" in post["description"]


async def _raw_post(url: str, head: bytes, body: bytes) -> tuple[int, dict[str, Any]]:
    """A request written byte for byte, so a header can carry bytes no client library sends."""
    host, port = yarl.URL(url).host, yarl.URL(url).port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            b"POST /v1/events HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
            + head
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


@pytest.mark.parametrize(
    "value", [b"caf\xe9", b"caf\xc3\xa9"], ids=["latin-1 byte", "raw UTF-8 bytes"]
)
async def test_a_ce_header_that_is_not_ascii_is_a_400_naming_the_header(
    gateway: RunningGateway, value: bytes
) -> None:
    before = await gateway.bus.count("EVENTS", ALL_EVENTS)
    head = (
        b"Authorization: Bearer " + gateway.token.encode() + b"\r\n"
        b"ce-specversion: 1.0\r\nce-id: 1\r\nce-source: /shop\r\nce-type: com.example.t\r\n"
        b"ce-owner: " + value + b"\r\nContent-Type: application/json\r\n"
    )

    status, answer = await _raw_post(gateway.url, head, b'{"total": 5}')

    assert status == 400, answer
    error = answer["error"]
    assert error["code"] == "invalid_cloudevent"
    assert error["details"]["attribute"] == "owner"
    assert "ce-owner" in error["message"]
    assert await gateway.bus.count("EVENTS", ALL_EVENTS) == before
