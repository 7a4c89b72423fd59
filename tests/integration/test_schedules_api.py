"""Schedules through the management API, over real HTTP and a real nats-server: stored,
listed, deleted with their lifecycle events; a cron or time zone that does not parse is a 400
naming the field, and nothing is stored. Firing and delivery are tested with the router.
Last, a function's metrics: what two routers wrote, added up by the gateway."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import pytest

from lambdabus_events.catalog import parse_lifecycle
from lambdabus_events.models import ScheduleRecord
from lambdabus_platform.bus import Bus
from lambdabus_platform.subjects import FUNCTION_METRICS_BUCKET
from lambdabus_router.stats import CallStats
from tests.integration.conftest import RunningGateway

HELLO = "async def main(request):\n    return {'hello': 'world'}\n"


def _ns() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


async def _function(gw: RunningGateway, ns: str, name: str) -> None:
    body = {"name": name, "source": {"files": {"lambda_main.py": HELLO}}}
    async with gw.http.post(f"/v1/namespaces/{ns}/functions", json=body) as resp:
        assert resp.status == 202, await resp.text()


async def _call(
    gw: RunningGateway, method: str, path: str, **kwargs: Any
) -> tuple[int, dict[str, Any], aiohttp.ClientResponse]:
    async with gw.http.request(method, path, **kwargs) as resp:
        return resp.status, await resp.json(), resp


async def _lifecycle(bus: Bus, verb: str, ns: str, name: str = "*") -> list[dict[str, Any]]:
    subject = f"lambdabus.lifecycle.schedule.{verb}.{ns}.{name}"
    return [json.loads(m.data) for m in await bus.read("LIFECYCLE", subject, limit=100)]


async def test_create_list_get_delete(gateway: RunningGateway) -> None:
    gw, ns = gateway, _ns()
    await _function(gw, ns, "report")
    spec = {
        "name": "nightly",
        "function": "report",
        "cron": "30 2 * * mon-fri",
        "timezone": "Europe/Berlin",
        "data": {"kind": "nightly"},
    }

    status, created, resp = await _call(gw, "POST", f"/v1/namespaces/{ns}/schedules", json=spec)

    assert status == 201, created
    assert resp.headers["Location"] == f"/v1/namespaces/{ns}/schedules/nightly"
    record = ScheduleRecord.model_validate(created)
    assert (record.function, record.cron, record.timezone) == (
        "report",
        "30 2 * * mon-fri",
        "Europe/Berlin",
    )
    assert record.data == {"kind": "nightly"}
    assert record.delivery.retries == 3  # a trigger's default policy

    status, listing, _ = await _call(gw, "GET", f"/v1/namespaces/{ns}/schedules")
    assert (status, listing) == (200, {"items": [created]})
    status, got, _ = await _call(gw, "GET", f"/v1/namespaces/{ns}/schedules/nightly")
    assert (status, got) == (200, created)
    status, again, _ = await _call(gw, "POST", f"/v1/namespaces/{ns}/schedules", json=spec)
    assert (status, again["error"]["code"]) == (409, "schedule_exists")

    [event] = await _lifecycle(gw.bus, "created", ns)
    parsed = parse_lifecycle(json.dumps(event))
    assert (parsed.type, parsed.subject) == ("io.lambdabus.schedule.created", f"{ns}/nightly")
    assert event["data"]["cron"] == "30 2 * * mon-fri"

    status, deleted, _ = await _call(gw, "DELETE", f"/v1/namespaces/{ns}/schedules/nightly")
    assert (status, deleted) == (202, created)
    [gone] = await _lifecycle(gw.bus, "deleted", ns, "nightly")
    assert gone["type"] == "io.lambdabus.schedule.deleted"
    for method in ("GET", "DELETE"):
        status, missing, _ = await _call(gw, method, f"/v1/namespaces/{ns}/schedules/nightly")
        assert (status, missing["error"]["code"]) == (404, "schedule_not_found")


async def test_a_schedule_needs_its_function_and_goes_with_it(gateway: RunningGateway) -> None:
    gw, ns = gateway, _ns()
    body = {"name": "s", "function": "nope", "cron": "@every 30s"}
    status, answer, _ = await _call(gw, "POST", f"/v1/namespaces/{ns}/schedules", json=body)
    assert (status, answer["error"]["code"]) == (404, "function_not_found")

    await _function(gw, ns, "fn")
    body["function"] = "fn"
    status, answer, _ = await _call(gw, "POST", f"/v1/namespaces/{ns}/schedules", json=body)
    assert status == 201, answer
    status, _, _ = await _call(gw, "DELETE", f"/v1/namespaces/{ns}/functions/fn")
    assert status == 202
    assert (await _call(gw, "GET", f"/v1/namespaces/{ns}/schedules"))[1] == {"items": []}
    assert [e["subject"] for e in await _lifecycle(gw.bus, "deleted", ns)] == [f"{ns}/s"]


BAD_SCHEDULES: list[tuple[str, dict[str, Any], str, str]] = [
    ("minute out of range", {"cron": "61 * * * *"}, "invalid_cron", "field 1 (minute)"),
    ("bad weekday", {"cron": "0 9 * * mon-xyz"}, "invalid_cron", "field 5 (day of week)"),
    ("four fields", {"cron": "* * * *"}, "invalid_cron", "has 4 fields"),
    ("not cron at all", {"cron": "every day"}, "invalid_cron", "2 fields"),
    ("zero interval", {"cron": "@every 0s"}, "invalid_cron", "between 1 s"),
    ("interval without unit", {"cron": "@every 30"}, "invalid_cron", "@every 30s"),
    ("unknown shorthand", {"cron": "@fortnightly"}, "invalid_cron", "shorthand"),
    ("no cron", {"cron": None}, "invalid_cron", "cron is required"),
    ("unknown zone", {"cron": "@hourly", "timezone": "Mars/Olympus"}, "invalid_timezone", "time zone"),
    ("data not an object", {"cron": "@hourly", "data": [1]}, "invalid_schedule", "data"),
    ("unknown field", {"cron": "@hourly", "color": "red"}, "invalid_schedule", "color"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "fields", "code", "says"), BAD_SCHEDULES, ids=[c[0] for c in BAD_SCHEDULES]
)
async def test_a_bad_cron_is_a_400_naming_the_field_and_nothing_is_stored(
    gateway: RunningGateway, case: str, fields: dict[str, Any], code: str, says: str
) -> None:
    gw, ns = gateway, _ns()
    await _function(gw, ns, "fn")
    body = {"name": "s", "function": "fn", **fields}
    if body["cron"] is None:
        del body["cron"]

    status, answer, _ = await _call(gw, "POST", f"/v1/namespaces/{ns}/schedules", json=body)

    assert (status, answer["error"]["code"]) == (400, code), answer
    assert says in answer["error"]["message"]
    if code in ("invalid_cron", "invalid_timezone"):
        assert answer["error"]["details"]["field"] == (
            "cron" if code == "invalid_cron" else "timezone"
        )
    assert (await _call(gw, "GET", f"/v1/namespaces/{ns}/schedules"))[1] == {"items": []}
    assert await _lifecycle(gw.bus, "created", ns) == []


async def test_metrics_add_up_every_routers_share(gateway: RunningGateway) -> None:
    """Two routers' statistics of one function, as they write them, summed by the gateway."""
    gw, ns = gateway, _ns()
    await _function(gw, ns, "fn")
    kv = gw.bus.kv(FUNCTION_METRICS_BUCKET)
    one, two = CallStats(kv, interval=60), CallStats(kv, interval=60)
    for status in (200, 200, 500):
        one.observe((ns, "fn"), status, 0.010, cold=status == 500)
    for status in (200, 429):
        two.observe((ns, "fn"), status, 0.100, cold=False)
    two.observe((ns, "other"), 200, 0.1, cold=False)  # another function's
    assert (await one.publish(), await two.publish()) == (1, 2)

    status, body, _ = await _call(gw, "GET", f"/v1/namespaces/{ns}/functions/fn/metrics")

    assert status == 200, body
    minute = body["windows"]["1m"]
    assert (minute["calls"], minute["errors"], minute["throttles"], minute["cold_starts"]) == (
        5,
        1,
        1,
        1,
    )
    assert minute["p50_ms"] == pytest.approx(10, rel=0.1)
    assert minute["p99_ms"] == pytest.approx(100, rel=0.1)
    assert body["windows"]["1h"]["calls"] == 5
    await _function(gw, ns, "idle")
    status, idle, _ = await _call(gw, "GET", f"/v1/namespaces/{ns}/functions/idle/metrics")
    assert status == 200, idle
    assert idle["windows"]["5m"] == {
        "calls": 0,
        "errors": 0,
        "throttles": 0,
        "cold_starts": 0,
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
    }
    status, missing, _ = await _call(gw, "GET", f"/v1/namespaces/{ns}/functions/nope/metrics")
    assert (status, missing["error"]["code"]) == (404, "function_not_found")
