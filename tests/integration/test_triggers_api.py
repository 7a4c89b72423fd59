"""Triggers, dead letters and asynchronous invocations through the management API, over real
HTTP and a real nats-server. What the router does with them is tested with the router; here the
dead letters are published by the test itself, as the router would."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from lambdabus_events.catalog import parse_lifecycle
from lambdabus_events.models import (
    DeadLetter,
    DeliveryPolicy,
    InvocationRequest,
    TriggerRecord,
)
from lambdabus_gateway.settings import GatewaySettings
from lambdabus_platform.bus import Bus
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.subjects import (
    TRIGGERS_BUCKET,
    dlq_subject,
    invoke_subject,
    redrive_subject,
    trigger_key,
)
from tests.integration.conftest import RunningGateway, running_gateway, secrets_settings

HELLO = "async def main(request):\n    return {'hello': 'world'}\n"


def _ns() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def _function(gw: RunningGateway, ns: str, name: str, **spec: Any) -> None:
    body = {"name": name, **spec, "source": {"files": {"lambda_main.py": HELLO}}}
    async with gw.http.post(f"/v1/namespaces/{ns}/functions", json=body) as resp:
        assert resp.status == 202, await resp.text()


async def _call(
    gw: RunningGateway, method: str, path: str, **kwargs: Any
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    async with gw.http.request(method, path, **kwargs) as resp:
        return resp.status, await resp.json(), resp


async def _lifecycle(bus: Bus, verb: str, ns: str, name: str = "*") -> list[dict[str, Any]]:
    subject = f"lambdabus.lifecycle.trigger.{verb}.{ns}.{name}"
    return [json.loads(m.data) for m in await bus.read("LIFECYCLE", subject, limit=100)]


# -- triggers ------------------------------------------------------------------------------------


async def test_create_list_get_delete(gateway: RunningGateway) -> None:
    gw, ns = gateway, _ns()
    await _function(gw, ns, "orders")
    spec = {
        "name": "on-order",
        "function": "orders",
        "filter": {"type": "com.example.order.*", "source": "/shop", "region": "eu"},
        "delivery": {"retries": 5, "backoff": "linear", "backoff_delay": 0.5},
    }

    status, created, resp = await _call(gw, "POST", f"/v1/namespaces/{ns}/triggers", json=spec)

    assert status == 201, created
    assert resp.headers["Location"] == f"/v1/namespaces/{ns}/triggers/on-order"
    record = TriggerRecord.model_validate(created)
    assert (record.namespace, record.name, record.function) == (ns, "on-order", "orders")
    assert record.filter == spec["filter"]
    assert (record.delivery.retries, record.delivery.backoff) == (5, "linear")
    assert (record.delivery.timeout, record.delivery.max_in_flight) == (30.0, 64)  # defaults
    uuid.UUID(record.uid)

    status, listing, _ = await _call(gw, "GET", f"/v1/namespaces/{ns}/triggers")
    assert (status, listing) == (200, {"items": [created]})
    status, got, _ = await _call(gw, "GET", f"/v1/namespaces/{ns}/triggers/on-order")
    assert (status, got) == (200, created)

    status, again, _ = await _call(gw, "POST", f"/v1/namespaces/{ns}/triggers", json=spec)
    assert (status, again["error"]["code"]) == (409, "trigger_exists")

    [event] = await _lifecycle(gw.bus, "created", ns)
    parsed = parse_lifecycle(json.dumps(event))
    assert parsed.type == "io.lambdabus.trigger.created"
    assert parsed.subject == f"{ns}/on-order"
    assert event["data"] == {
        "namespace": ns,
        "name": "on-order",
        "function": "orders",
        "filter": spec["filter"],
    }

    status, deleted, _ = await _call(gw, "DELETE", f"/v1/namespaces/{ns}/triggers/on-order")
    assert (status, deleted) == (202, created)
    [gone] = await _lifecycle(gw.bus, "deleted", ns, "on-order")
    assert gone["type"] == "io.lambdabus.trigger.deleted"
    for method in ("GET", "DELETE"):
        status, missing, _ = await _call(gw, method, f"/v1/namespaces/{ns}/triggers/on-order")
        assert (status, missing["error"]["code"]) == (404, "trigger_not_found")
    assert (await _call(gw, "GET", f"/v1/namespaces/{ns}/triggers"))[1] == {"items": []}


async def test_a_trigger_needs_its_function(gateway: RunningGateway) -> None:
    gw, ns = gateway, _ns()

    status, body, _ = await _call(
        gw, "POST", f"/v1/namespaces/{ns}/triggers", json={"name": "t", "function": "nope"}
    )

    assert (status, body["error"]["code"]) == (404, "function_not_found")
    assert (await _call(gw, "GET", f"/v1/namespaces/{ns}/triggers"))[1] == {"items": []}
    assert await _lifecycle(gw.bus, "created", ns) == []


BAD_TRIGGERS: list[tuple[str, Any, str]] = [
    ("bad name", {"name": "Bad_Name", "function": "fn"}, "invalid_name"),
    ("long name", {"name": "a" * 64, "function": "fn"}, "invalid_name"),
    ("bad function name", {"name": "t", "function": "fn.x"}, "invalid_name"),
    ("no name", {"function": "fn"}, "invalid_trigger"),
    ("no function", {"name": "t"}, "invalid_trigger"),
    ("uppercase filter key", {"name": "t", "function": "fn", "filter": {"Type": "x"}}, "invalid_filter"),
    ("long filter key", {"name": "t", "function": "fn", "filter": {"a" * 21: "x"}}, "invalid_filter"),
    ("empty filter value", {"name": "t", "function": "fn", "filter": {"type": ""}}, "invalid_filter"),
    ("number filter value", {"name": "t", "function": "fn", "filter": {"type": 5}}, "invalid_filter"),
    ("star inside", {"name": "t", "function": "fn", "filter": {"type": "a*b"}}, "invalid_filter"),
    ("star first", {"name": "t", "function": "fn", "filter": {"source": "*/x"}}, "invalid_filter"),
    ("filter on data", {"name": "t", "function": "fn", "filter": {"data": "x"}}, "invalid_filter"),
    ("filter a list", {"name": "t", "function": "fn", "filter": ["type"]}, "invalid_filter"),
    ("negative retries", {"name": "t", "function": "fn", "delivery": {"retries": -1}}, "invalid_trigger"),
    ("bad backoff", {"name": "t", "function": "fn", "delivery": {"backoff": "random"}}, "invalid_trigger"),
    ("zero timeout", {"name": "t", "function": "fn", "delivery": {"timeout": 0}}, "invalid_trigger"),
    ("unknown field", {"name": "t", "function": "fn", "color": "red"}, "invalid_trigger"),
    ("not an object", ["t"], "malformed_json"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "code"), BAD_TRIGGERS, ids=[c[0] for c in BAD_TRIGGERS])
async def test_bad_triggers_are_refused_and_nothing_is_stored(
    gateway: RunningGateway, case: str, body: Any, code: str
) -> None:
    gw, ns = gateway, _ns()
    await _function(gw, ns, "fn")

    status, answer, _ = await _call(gw, "POST", f"/v1/namespaces/{ns}/triggers", json=body)

    assert (status, answer["error"]["code"]) == (400, code), answer
    assert answer["error"]["message"]
    assert (await _call(gw, "GET", f"/v1/namespaces/{ns}/triggers"))[1] == {"items": []}
    assert await _lifecycle(gw.bus, "created", ns) == []


async def test_bad_requests_around_triggers(gateway: RunningGateway) -> None:
    gw = gateway
    not_json = await _call(
        gw,
        "POST",
        "/v1/namespaces/ok/triggers",
        data=b"{",
        headers={"Content-Type": "application/json"},
    )
    wrong_type = await _call(
        gw, "POST", "/v1/namespaces/ok/triggers", data=b"x", headers={"Content-Type": "text/plain"}
    )
    bad_ns = await _call(gw, "GET", "/v1/namespaces/Bad/triggers")
    bad_name = await _call(gw, "GET", "/v1/namespaces/ok/triggers/Bad")

    assert (not_json[0], not_json[1]["error"]["code"]) == (400, "malformed_json")
    assert (wrong_type[0], wrong_type[1]["error"]["code"]) == (415, "unsupported_media_type")
    assert (bad_ns[0], bad_ns[1]["error"]["code"]) == (400, "invalid_name")
    assert (bad_name[0], bad_name[1]["error"]["code"]) == (400, "invalid_name")


async def test_deleting_a_function_deletes_its_triggers(gateway: RunningGateway) -> None:
    gw, ns = gateway, _ns()
    await _function(gw, ns, "one")
    await _function(gw, ns, "two")
    for name, function in (("a", "one"), ("b", "one"), ("c", "two")):
        status, body, _ = await _call(
            gw, "POST", f"/v1/namespaces/{ns}/triggers", json={"name": name, "function": function}
        )
        assert status == 201, body

    status, _, _ = await _call(gw, "DELETE", f"/v1/namespaces/{ns}/functions/one")

    assert status == 202
    listing = (await _call(gw, "GET", f"/v1/namespaces/{ns}/triggers"))[1]
    assert [t["name"] for t in listing["items"]] == ["c"]
    deleted = await _lifecycle(gw.bus, "deleted", ns)
    assert sorted(e["subject"] for e in deleted) == [f"{ns}/a", f"{ns}/b"]


async def test_a_restarted_gateway_deletes_triggers_left_without_a_function(
    nats_settings: NatsSettings, bus: Bus
) -> None:
    """The gateway stopped between deleting a function and deleting its triggers: on start it
    deletes the orphans (and says so), and keeps the rest."""
    ns = _ns()
    settings = GatewaySettings(port=0, nats=nats_settings, secrets=secrets_settings())
    async with running_gateway(settings, bus) as gw:
        await _function(gw, ns, "kept")
        status, _, _ = await _call(
            gw, "POST", f"/v1/namespaces/{ns}/triggers", json={"name": "ok", "function": "kept"}
        )
        assert status == 201
    orphan = TriggerRecord(
        namespace=ns,
        name="orphan",
        uid=str(uuid.uuid4()),
        function="gone",
        filter={},
        delivery=DeliveryPolicy(),
        created_at=datetime.now(UTC),
    )
    await bus.kv(TRIGGERS_BUCKET).create(
        trigger_key(ns, "orphan"), orphan.model_dump_json().encode()
    )

    async with running_gateway(settings, bus) as gw:
        listing = (await _call(gw, "GET", f"/v1/namespaces/{ns}/triggers"))[1]

    assert [t["name"] for t in listing["items"]] == ["ok"]
    [deleted] = await _lifecycle(bus, "deleted", ns)
    assert deleted["subject"] == f"{ns}/orphan"


# -- dead letters --------------------------------------------------------------------------------


async def _dead_letter(bus: Bus, ns: str, trigger: str, **event: Any) -> DeadLetter:
    letter = DeadLetter(
        namespace=ns,
        trigger=trigger,
        trigger_uid=str(uuid.uuid4()),
        function="fn",
        event={
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": "/shop",
            "type": "com.example.order.created",
            "data": {"n": 1},
            **event,
        },
        reason="http_status_500",
        message="the function answered 500",
        attempts=4,
        last_status=500,
        deadlettered_at=datetime.now(UTC),
    )
    await bus.publish(dlq_subject(ns, trigger), letter.model_dump_json().encode())
    return letter


async def _trigger(gw: RunningGateway, ns: str, name: str, function: str = "fn") -> None:
    status, body, _ = await _call(
        gw, "POST", f"/v1/namespaces/{ns}/triggers", json={"name": name, "function": function}
    )
    assert status == 201, body


async def test_dead_letters_are_listed_and_redriven(gateway: RunningGateway) -> None:
    gw, ns, elsewhere = gateway, _ns(), _ns()
    await _function(gw, ns, "fn")
    await _trigger(gw, ns, "orders")
    await _trigger(gw, ns, "audit")
    first = await _dead_letter(gw.bus, ns, "orders", id="first")
    second = await _dead_letter(gw.bus, ns, "audit", id="second")
    await _dead_letter(gw.bus, elsewhere, "orders", id="not-mine")

    status, listing, _ = await _call(gw, "GET", f"/v1/namespaces/{ns}/deadletters")

    assert status == 200
    items = listing["items"]
    assert [i["event"]["id"] for i in items] == ["first", "second"]
    assert listing["next"] is None
    assert all(i["id"].isdigit() for i in items)
    assert {k: v for k, v in items[0].items() if k != "id"} == first.model_dump(mode="json")
    only = (await _call(gw, "GET", f"/v1/namespaces/{ns}/deadletters?trigger=audit"))[1]
    assert [i["event"]["id"] for i in only["items"]] == ["second"]
    page = (await _call(gw, "GET", f"/v1/namespaces/{ns}/deadletters?limit=1"))[1]
    assert [i["id"] for i in page["items"]] == [items[0]["id"]]
    rest = (await _call(gw, "GET", f"/v1/namespaces/{ns}/deadletters?after={page['next']}"))[1]
    assert [i["id"] for i in rest["items"]] == [items[1]["id"]]

    dead_id = items[0]["id"]
    status, redriven, _ = await _call(
        gw, "POST", f"/v1/namespaces/{ns}/deadletters/{dead_id}/redrive"
    )

    assert status == 202, redriven
    assert (redriven["id"], redriven["redriven"]) == (dead_id, True)
    [sent] = await gw.bus.read("EVENTS", redrive_subject(ns, "orders"), limit=10)
    assert json.loads(sent.data) == first.event
    after = (await _call(gw, "GET", f"/v1/namespaces/{ns}/deadletters"))[1]
    assert [i["event"]["id"] for i in after["items"]] == [second.event["id"]]
    again = await _call(gw, "POST", f"/v1/namespaces/{ns}/deadletters/{dead_id}/redrive")
    assert (again[0], again[1]["error"]["code"]) == (404, "deadletter_not_found")
    assert await gw.bus.count("EVENTS", redrive_subject(ns, "orders")) == 1


async def test_redrive_refusals(gateway: RunningGateway) -> None:
    gw, ns, elsewhere = gateway, _ns(), _ns()
    await _function(gw, ns, "fn")
    await _trigger(gw, ns, "orders")
    await _dead_letter(gw.bus, elsewhere, "orders")
    await _dead_letter(gw.bus, ns, "removed")
    listed = (await _call(gw, "GET", f"/v1/namespaces/{elsewhere}/deadletters"))[1]["items"]
    other_id = listed[0]["id"]
    [orphan] = (await _call(gw, "GET", f"/v1/namespaces/{ns}/deadletters"))[1]["items"]

    cross = await _call(gw, "POST", f"/v1/namespaces/{ns}/deadletters/{other_id}/redrive")
    unknown = await _call(gw, "POST", f"/v1/namespaces/{ns}/deadletters/999999999/redrive")
    malformed = await _call(gw, "POST", f"/v1/namespaces/{ns}/deadletters/abc/redrive")
    no_trigger = await _call(gw, "POST", f"/v1/namespaces/{ns}/deadletters/{orphan['id']}/redrive")
    bad_query = await _call(gw, "GET", f"/v1/namespaces/{ns}/deadletters?trigger=Bad")
    bad_limit = await _call(gw, "GET", f"/v1/namespaces/{ns}/deadletters?limit=0")

    assert (cross[0], cross[1]["error"]["code"]) == (404, "deadletter_not_found")
    assert (unknown[0], unknown[1]["error"]["code"]) == (404, "deadletter_not_found")
    assert (malformed[0], malformed[1]["error"]["code"]) == (400, "invalid_deadletter_id")
    # the trigger is gone: redriving would lose the event, so the dead letter stays
    assert (no_trigger[0], no_trigger[1]["error"]["code"]) == (404, "trigger_not_found")
    still = (await _call(gw, "GET", f"/v1/namespaces/{ns}/deadletters"))[1]["items"]
    assert [i["id"] for i in still] == [orphan["id"]]
    assert (bad_query[0], bad_query[1]["error"]["code"]) == (400, "invalid_name")
    assert (bad_limit[0], bad_limit[1]["error"]["code"]) == (400, "invalid_limit")
    # the other namespace's dead letter was not touched
    assert (await _call(gw, "GET", f"/v1/namespaces/{elsewhere}/deadletters"))[1]["items"]


# -- asynchronous invocations --------------------------------------------------------------------


async def test_async_invoke_queues_the_request(gateway: RunningGateway) -> None:
    gw, ns = gateway, _ns()
    await _function(gw, ns, "slow", timeout=12)

    status, body, resp = await _call(
        gw,
        "POST",
        f"/v1/namespaces/{ns}/functions/slow/invoke?x=1&y=two",
        data=b'{"job": 7}',
        headers={
            "Content-Type": "application/json",
            "Prefer": "wait=5, Respond-Async",
            "X-Callback-Url": "https://example.com/done?k=1",
            "X-Custom": "yes",
        },
    )

    assert status == 202, body
    invocation_id = body["invocation_id"]
    assert len(invocation_id) == 32
    assert resp.headers["Location"] == f"/v1/namespaces/{ns}/invocations/{invocation_id}"
    assert resp.headers["Preference-Applied"] == "respond-async"

    status, record, _ = await _call(gw, "GET", resp.headers["Location"])
    assert status == 200
    assert {k: record[k] for k in ("id", "namespace", "function", "status", "attempts")} == {
        "id": invocation_id,
        "namespace": ns,
        "function": "slow",
        "status": "queued",
        "attempts": 0,
    }
    assert (record["result"], record["error"]) == (None, None)
    assert record["callback_url"] == "https://example.com/done?k=1"

    [queued] = await gw.bus.read("EVENTS", invoke_subject(ns, "slow"), limit=10)
    request = InvocationRequest.model_validate_json(queued.data)
    assert (request.id, request.namespace, request.function) == (invocation_id, ns, "slow")
    assert (request.method, request.path, request.query) == ("POST", "/", "x=1&y=two")
    assert base64.b64decode(request.body_base64) == b'{"job": 7}'
    assert request.callback_url == "https://example.com/done?k=1"
    assert request.delivery.timeout == 12
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert (headers["x-custom"], headers["content-type"]) == ("yes", "application/json")
    assert not {"prefer", "x-callback-url", "host", "content-length"} & headers.keys()


async def test_async_invoke_refusals(gateway: RunningGateway) -> None:
    gw, ns = gateway, _ns()
    await _function(gw, ns, "fn")
    prefer = {"Prefer": "respond-async"}

    unknown_fn = await _call(
        gw, "POST", f"/v1/namespaces/{ns}/functions/nope/invoke", headers=prefer
    )
    bad_callbacks = [
        await _call(
            gw,
            "POST",
            f"/v1/namespaces/{ns}/functions/fn/invoke",
            headers={**prefer, "X-Callback-Url": url},
        )
        for url in ("ftp://example.com/x", "not a url", "http://", "/relative")
    ]
    unknown = await _call(gw, "GET", f"/v1/namespaces/{ns}/invocations/{uuid.uuid4().hex}")
    malformed = await _call(gw, "GET", f"/v1/namespaces/{ns}/invocations/not-an-id")

    assert (unknown_fn[0], unknown_fn[1]["error"]["code"]) == (404, "function_not_found")
    for status, body, _ in bad_callbacks:
        assert (status, body["error"]["code"]) == (400, "invalid_callback_url")
    assert await gw.bus.count("EVENTS", invoke_subject(ns, "fn")) == 0
    assert (unknown[0], unknown[1]["error"]["code"]) == (404, "invocation_not_found")
    assert (malformed[0], malformed[1]["error"]["code"]) == (404, "invocation_not_found")
