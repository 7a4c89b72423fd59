"""The management API over real HTTP and a real nats-server: the function lifecycle."""

from __future__ import annotations

import asyncio
import json
import socket
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from lambdabus_events.catalog import parse_lifecycle
from lambdabus_events.models import BuildState
from lambdabus_gateway.__main__ import make_setup
from lambdabus_gateway.settings import GatewaySettings
from lambdabus_platform.bus import Bus
from lambdabus_platform.registry import Registry
from lambdabus_platform.service import PortInUse, serve
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.subjects import BUILDS_BUCKET
from tests.integration.conftest import RunningGateway, secrets_settings
from tests.zips import make_zip

HELLO = "async def main(request):\n    return {'hello': 'world'}\n"


async def _create(gw: RunningGateway, ns: str, name: str, **spec: Any) -> aiohttp.ClientResponse:
    body = {"name": name, **spec, "source": {"files": {"lambda_main.py": HELLO}}}
    return await gw.http.post(f"/v1/namespaces/{ns}/functions", json=body)


async def _read_sse(resp: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    data: list[str] = []
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            events.append(json.loads("\n".join(data)))
            data = []
            if len(events) == count:
                break
    return events


async def test_create_watch_update_delete(gateway: RunningGateway) -> None:
    gw = gateway
    ns = "lifecycle-test"
    async with gw.http.get(
        f"/v1/lifecycle?namespace={ns}", timeout=aiohttp.ClientTimeout(total=20)
    ) as live:
        assert live.status == 200
        assert live.headers["Content-Type"].startswith("text/event-stream")
        # the stream is open before the create, so the created event arrives live
        await live.content.readline()
        created = await _create(gw, ns, "hello", env={"GREETING": "hi"})
        assert created.status == 202, await created.text()
        record = await created.json()
        etag = created.headers["ETag"]
        assert record["generation"] == 1
        assert record["spec"]["env"] == {"GREETING": "hi"}
        assert record["source"]["entrypoint"] == "lambda_main.py"
        [event] = await asyncio.wait_for(_read_sse(live, 1), 10)
    assert event["type"] == "io.lambdabus.function.created"
    assert event["subject"] == f"{ns}/hello"
    assert event["source"] == "/lambdabus/gateway"
    assert event["data"]["uid"] == record["uid"]
    assert event["dataschema"].endswith("io.lambdabus.function.created.json")
    parse_lifecycle(json.dumps(event))  # a valid catalog event

    # the same event is in the LIFECYCLE stream, once
    assert await gw.bus.count("LIFECYCLE", f"lambdabus.lifecycle.function.created.{ns}.hello") == 1

    # a second create of the same name conflicts
    again = await _create(gw, ns, "hello")
    assert again.status == 409
    assert (await again.json())["error"]["code"] == "function_exists"

    # status: honestly pending/waiting, with the three conditions
    status = await (await gw.http.get(f"/v1/namespaces/{ns}/functions/hello/status")).json()
    assert (status["image_status"], status["status"]) == ("pending", "waiting")
    assert [c["type"] for c in status["conditions"]] == [
        "ConfigurationReady",
        "BuildReady",
        "Running",
    ]
    assert [c["status"] for c in status["conditions"]] == ["True", "Unknown", "Unknown"]

    # a PATCH with the right If-Match moves the generation and the ETag
    patched = await gw.http.patch(
        f"/v1/namespaces/{ns}/functions/hello", json={"replicas": 2}, headers={"If-Match": etag}
    )
    assert patched.status == 202, await patched.text()
    assert (await patched.json())["generation"] == 2
    new_etag = patched.headers["ETag"]
    assert new_etag != etag

    # the stale ETag is refused, and nothing changes
    stale = await gw.http.patch(
        f"/v1/namespaces/{ns}/functions/hello", json={"replicas": 3}, headers={"If-Match": etag}
    )
    assert stale.status == 412
    assert (await stale.json())["error"]["code"] == "precondition_failed"
    stale_put = await gw.http.put(
        f"/v1/namespaces/{ns}/functions/hello",
        json={"name": "hello", "replicas": 5},
        headers={"If-Match": etag},
    )
    assert stale_put.status == 412
    current = await gw.http.get(f"/v1/namespaces/{ns}/functions/hello")
    assert (await current.json())["spec"]["replicas"] == 2
    assert current.headers["ETag"] == new_etag
    assert await gw.bus.count("LIFECYCLE", f"lambdabus.lifecycle.function.updated.{ns}.hello") == 1

    # listing
    listing = await (await gw.http.get(f"/v1/namespaces/{ns}/functions")).json()
    assert [f["name"] for f in listing["items"]] == ["hello"]

    # delete → function.deleted, then 404 everywhere
    deleted = await gw.http.delete(f"/v1/namespaces/{ns}/functions/hello")
    assert deleted.status == 202
    assert await gw.bus.count("LIFECYCLE", f"lambdabus.lifecycle.function.deleted.{ns}.hello") == 1
    gone = await gw.http.get(f"/v1/namespaces/{ns}/functions/hello")
    assert gone.status == 404
    assert (await gone.json())["error"]["code"] == "function_not_found"
    gone_status = await gw.http.get(f"/v1/namespaces/{ns}/functions/hello/status")
    assert gone_status.status == 404
    body = await gone_status.json()
    assert (body["image_status"], body["status"]) == ("not_found", "not_found")
    assert (await gw.http.delete(f"/v1/namespaces/{ns}/functions/hello")).status == 404


async def test_lifecycle_replays_since_and_filters(gateway: RunningGateway) -> None:
    gw = gateway
    ns = "replay-test"
    for name in ("one", "two"):
        assert (await _create(gw, ns, name)).status == 202
    await gw.http.delete(f"/v1/namespaces/{ns}/functions/one")
    timeout = aiohttp.ClientTimeout(total=20)
    async with gw.http.get(
        f"/v1/lifecycle?namespace={ns}&since=2000-01-01T00:00:00Z", timeout=timeout
    ) as resp:
        events = await asyncio.wait_for(_read_sse(resp, 3), 10)
    assert [(e["type"], e["subject"]) for e in events] == [
        ("io.lambdabus.function.created", f"{ns}/one"),
        ("io.lambdabus.function.created", f"{ns}/two"),
        ("io.lambdabus.function.deleted", f"{ns}/one"),
    ]
    async with gw.http.get(
        f"/v1/lifecycle?namespace={ns}&function=one&type=io.lambdabus.function.deleted&since=2000-01-01T00:00:00Z",
        timeout=timeout,
    ) as resp:
        [only] = await asyncio.wait_for(_read_sse(resp, 1), 10)
    assert (only["type"], only["subject"]) == ("io.lambdabus.function.deleted", f"{ns}/one")
    for bad, code in (
        ("namespace=Bad", "invalid_name"),
        ("type=io.lambdabus.*.created", "invalid_type"),
        ("type=com.example.x", "invalid_type"),
        ("since=yesterday", "invalid_since"),
        ("since=2026-01-01T00:00:00", "invalid_since"),
    ):
        resp = await gw.http.get(f"/v1/lifecycle?{bad}")
        assert resp.status == 400, bad
        assert (await resp.json())["error"]["code"] == code


async def test_multipart_upload_and_replace(gateway: RunningGateway) -> None:
    gw = gateway
    ns = "multipart-test"
    archive = make_zip(
        {"handler.py": "def main(event, context):\n    return 'ok'\n", "requirements.txt": ""}
    )
    form = aiohttp.FormData()
    form.add_field(
        "spec",
        json.dumps({"name": "kyma", "env": {"A": "1"}, "memory": "128Mi"}),
        content_type="application/json",
    )
    form.add_field("archive", archive, filename="fn.zip", content_type="application/zip")
    resp = await gw.http.post(f"/v1/namespaces/{ns}/functions", data=form)
    assert resp.status == 202, await resp.text()
    record = await resp.json()
    assert record["source"]["kind"] == "archive"
    assert record["source"]["entrypoint"] == "handler.py"
    assert record["spec"]["memory"] == 128
    import hashlib

    assert record["source"]["sha256"] == hashlib.sha256(archive).hexdigest()

    # replacing with the same source and spec changes nothing: 200, same generation, no event
    form = aiohttp.FormData()
    form.add_field("spec", json.dumps({"name": "kyma", "env": {"A": "1"}, "memory": 128}))
    form.add_field("archive", archive, filename="fn.zip")
    same = await gw.http.put(f"/v1/namespaces/{ns}/functions/kyma", data=form)
    assert same.status == 200
    assert (await same.json())["generation"] == 1
    # new source → new generation, changes = ["source"]
    newer = make_zip({"handler.py": "def main(event, context):\n    return 'v2'\n"})
    form = aiohttp.FormData()
    form.add_field("spec", json.dumps({"env": {"A": "1"}, "memory": 128}))
    form.add_field("archive", newer, filename="fn.zip")
    changed = await gw.http.put(f"/v1/namespaces/{ns}/functions/kyma", data=form)
    assert changed.status == 202
    assert (await changed.json())["generation"] == 2
    async with gw.http.get(
        f"/v1/lifecycle?namespace={ns}&type=io.lambdabus.function.updated&since=2000-01-01T00:00:00Z",
        timeout=aiohttp.ClientTimeout(total=20),
    ) as live:
        [event] = await asyncio.wait_for(_read_sse(live, 1), 10)
    assert event["data"]["changes"] == ["source"]


async def test_health_metrics_openapi(gateway: RunningGateway) -> None:
    gw = gateway
    health = await gw.http.get("/healthz")
    assert health.status == 200
    assert (await health.json()) == {"status": "ok", "service": "gateway", "nats": "connected"}
    await gw.http.get("/v1/namespaces/default/functions")
    metrics = await (await gw.http.get("/metrics")).text()
    assert "lambdabus_http_requests_total" in metrics
    assert 'route="/v1/namespaces/{ns}/functions"' in metrics
    spec = await (await gw.http.get("/v1/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert "/v1/namespaces/{ns}/functions/{name}/status" in spec["paths"]
    unknown = await gw.http.get("/v2/nothing")
    assert unknown.status == 404
    assert (await unknown.json())["error"]["code"] == "not_found"


async def test_invoke_relays_to_the_router(nats_settings: NatsSettings, bus: Bus) -> None:
    """The gateway's invoke endpoint relays method, query, headers and body to the router's
    data-plane URL and relays the answer back (a real HTTP server stands in for the router)."""
    from aiohttp import web

    from lambdabus_gateway.settings import GatewaySettings
    from tests.integration.conftest import running_gateway

    seen: list[dict[str, Any]] = []

    async def router(request: web.Request) -> web.Response:
        seen.append(
            {
                "path": request.path,
                "query": dict(request.query),
                "ce-type": request.headers.get("ce-type"),
                "body": await request.read(),
            }
        )
        return web.json_response({"result": 5}, status=201, headers={"X-Fn": "yes"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", router)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        settings = GatewaySettings(
            port=0,
            nats=nats_settings,
            router_url=f"http://127.0.0.1:{port}",
            secrets=secrets_settings(),
        )
        async with running_gateway(settings, bus) as gw:
            assert (await _create(gw, "invoke-test", "echo")).status == 202
            resp = await gw.http.post(
                "/v1/namespaces/invoke-test/functions/echo/invoke?x=1",
                json={"data": 5},
                headers={"ce-type": "com.example"},
            )
            assert resp.status == 201
            assert await resp.json() == {"result": 5}
            assert resp.headers["X-Fn"] == "yes"
            assert seen == [
                {
                    "path": "/invoke-test/echo/",
                    "query": {"x": "1"},
                    "ce-type": "com.example",
                    "body": b'{"data": 5}',
                }
            ]
            missing = await gw.http.post(
                "/v1/namespaces/invoke-test/functions/nope/invoke", data=b""
            )
            assert missing.status == 404
        # the router gone: a clear 503
        await runner.cleanup()
        async with running_gateway(settings, bus) as gw:
            down = await gw.http.post(
                "/v1/namespaces/invoke-test/functions/echo/invoke", data=b"{}"
            )
            assert down.status == 503
            assert (await down.json())["error"]["code"] == "router_unavailable"
    finally:
        await runner.cleanup()


async def test_a_port_in_use_stops_the_service_with_port_in_use(
    nats_settings: NatsSettings, bus: Bus
) -> None:
    """Not a bare OSError traceback: an error that names the port and the setting, which
    `run` turns into one log line and the exit code the launcher does not restart on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        settings = GatewaySettings(port=port, nats=nats_settings, secrets=secrets_settings())
        with pytest.raises(PortInUse) as caught:
            await asyncio.wait_for(serve("gateway", settings, make_setup(settings)), 30)
    assert caught.value.code == "port_in_use"
    assert str(port) in caught.value.message
    assert "LAMBDABUS_GATEWAY_PORT" in caught.value.message


async def test_the_same_source_after_a_failed_build_is_a_new_generation(
    gateway: RunningGateway,
) -> None:
    """A build that failed for a passing reason (the network) is retried by deploying again:
    the same source is then a change (202, a new generation), not 'nothing changed'."""
    gw, ns = gateway, "retry-test"
    created = await _create(gw, ns, "flaky")
    assert created.status == 202, await created.text()
    record = await created.json()
    again = {"source": {"files": {"lambda_main.py": HELLO}}}
    same = await gw.http.put(f"/v1/namespaces/{ns}/functions/flaky", json=again)
    assert (same.status, (await same.json())["generation"]) == (200, 1)

    failed = BuildState(
        namespace=ns,
        name="flaky",
        uid=record["uid"],
        generation=1,
        phase="failed",
        source_sha256=record["source"]["sha256"],
        runtime=record["spec"]["runtime"],
        reason="DependencyInstallFailed",
        message="network unreachable",
        updated_at=datetime.now(UTC),
    )
    await Registry(gw.bus.kv(BUILDS_BUCKET), BuildState).put(ns, "flaky", failed)
    retried = await gw.http.put(f"/v1/namespaces/{ns}/functions/flaky", json=again)
    assert retried.status == 202, await retried.text()
    assert (await retried.json())["generation"] == 2
