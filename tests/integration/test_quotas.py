"""Quotas and reserved concurrency over real HTTP with the session's nats-server: the gateway
refuses functions and replicas over a namespace's quota (429 `quota_exceeded`, saying what to
do), an operator's override changes it, and the router answers invocations beyond a function's
`max_concurrency` or the namespace's concurrent quota with 429 and Retry-After."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aiohttp

from lambdabus_events.models import FunctionConfig, FunctionRecord, SourceRef
from lambdabus_platform.registry import Registry
from lambdabus_platform.subjects import FUNCTIONS_BUCKET
from tests.integration.conftest import RunningGateway
from tests.integration.test_router import RunningRouter, backend, router  # noqa: F401

HELLO = "async def main(request):\n    return {}\n"


async def _create(gw: RunningGateway, ns: str, name: str, **spec: Any) -> aiohttp.ClientResponse:
    body = {"name": name, **spec, "source": {"files": {"lambda_main.py": HELLO}}}
    return await gw.http.post(f"/v1/namespaces/{ns}/functions", json=body)


async def _patch(gw: RunningGateway, ns: str, name: str, patch: dict[str, Any]) -> Any:
    return await gw.http.patch(
        f"/v1/namespaces/{ns}/functions/{name}",
        json=patch,
        headers={"Content-Type": "application/merge-patch+json"},
    )


async def test_functions_and_instances_over_quota_are_429(gateway: RunningGateway) -> None:
    gw, ns = gateway, "quota-fn"
    fresh = await (await gw.http.get(f"/v1/namespaces/{ns}/quota")).json()
    assert fresh == {
        "namespace": ns,
        "max_functions": 100,
        "max_instances": 50,
        "max_concurrent_invocations": 1000,
        "overrides": {},
    }
    put = await gw.http.put(
        f"/v1/namespaces/{ns}/quota", json={"max_functions": 2, "max_instances": 3}
    )
    assert put.status == 200, await put.text()
    quota = await put.json()
    assert (quota["max_functions"], quota["max_instances"]) == (2, 3)
    assert quota["max_concurrent_invocations"] == 1000
    assert quota["overrides"] == {"max_functions": 2, "max_instances": 3}

    assert (await _create(gw, ns, "one")).status == 202
    assert (await _create(gw, ns, "two")).status == 202
    third = await _create(gw, ns, "three")
    assert third.status == 429
    error = (await third.json())["error"]
    assert error["code"] == "quota_exceeded"
    assert "2 of at most 2 functions" in error["message"]
    assert "delete functions" in error["message"]
    assert "raise the quota" in error["message"]
    assert (await gw.http.get(f"/v1/namespaces/{ns}/functions/three")).status == 404

    # Replicas count against max_instances: 1 + 3 > 3.
    grown = await _patch(gw, ns, "two", {"replicas": 3})
    assert grown.status == 429
    assert "lower replicas" in (await grown.json())["error"]["message"]
    assert (await _patch(gw, ns, "two", {"replicas": 2})).status == 202
    # A change that does not grow is never refused, even at the limit.
    assert (await _patch(gw, ns, "two", {"description": "at the limit"})).status == 202

    # Raising the quota lets it through.
    raised = await gw.http.put(f"/v1/namespaces/{ns}/quota", json={"max_functions": 3})
    assert (await raised.json())["max_instances"] == 50  # back to the default
    assert (await _create(gw, ns, "three")).status == 202


async def test_a_bad_quota_is_400(gateway: RunningGateway) -> None:
    for body in ({"max_functions": -1}, {"max_pods": 3}, {"max_instances": "many"}):
        resp = await gateway.http.put("/v1/namespaces/quota-bad/quota", json=body)
        assert resp.status == 400, body
    resp = await gateway.http.put("/v1/namespaces/Bad_NS/quota", json={})
    assert resp.status == 400


async def _record(r: RunningRouter, name: str, **spec: Any) -> None:
    now = datetime.now(UTC)
    record = FunctionRecord(
        namespace=r.namespace,
        name=name,
        uid=f"uid-{name}",
        generation=1,
        spec=FunctionConfig(**spec),
        source=SourceRef(
            sha256="0" * 64, size=1, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=now,
        updated_at=now,
    )
    await Registry(r.bus.kv(FUNCTIONS_BUCKET), FunctionRecord).put(r.namespace, name, record)


async def _slow_calls(
    r: RunningRouter, name: str, count: int, expect_active: int
) -> tuple[list[aiohttp.ClientResponse], list[asyncio.Task[aiohttp.ClientResponse]]]:
    """Start `count` slow calls; return the refused ones once `expect_active` are in flight."""
    calls = [
        asyncio.create_task(r.http.post(f"/{r.namespace}/{name}/sleep", data=b"x"))
        for _ in range(count)
    ]
    fid = (r.namespace, name)
    refused = count - expect_active
    deadline = asyncio.get_running_loop().time() + 10
    while not (r.router.active[fid] == expect_active and sum(c.done() for c in calls) == refused):
        assert asyncio.get_running_loop().time() < deadline, "calls did not settle"
        await asyncio.sleep(0.02)
    done = [c.result() for c in calls if c.done()]
    return done, [c for c in calls if not c.done()]


async def test_calls_beyond_max_concurrency_get_429_with_retry_after(
    router: RunningRouter,  # noqa: F811
) -> None:
    r = router
    async with backend("slow") as instance:
        await _record(r, "reserved", max_concurrency=3)
        await r.deploy("reserved", [instance.url])
        fid = (r.namespace, "reserved")
        await asyncio.wait_for(r.router.until(lambda x: x.max_concurrency.get(fid) == 3), 5)

        refused, open_calls = await _slow_calls(r, "reserved", 5, expect_active=3)
        assert len(refused) == 2
        for resp in refused:
            assert resp.status == 429
            assert resp.headers["X-Lambdabus-Error"] == "max_concurrency"
            assert int(resp.headers["Retry-After"]) >= 1
            assert "max_concurrency of 3" in (await resp.json())["error"]["message"]
        instance.release.set()
        answered = await asyncio.gather(*open_calls)
        assert [a.status for a in answered] == [201, 201, 201]
        assert r.router.active[fid] == 0
        # Below the limit again, calls go through.
        again = await r.http.post(f"/{r.namespace}/reserved", data=b"y")
        assert again.status == 201


async def test_the_namespace_quota_caps_concurrent_invocations(
    router: RunningRouter,  # noqa: F811
    gateway: RunningGateway,
) -> None:
    r = router
    async with backend("slow") as instance:
        await _record(r, "busy")
        await r.deploy("busy", [instance.url])
        put = await gateway.http.put(
            f"/v1/namespaces/{r.namespace}/quota", json={"max_concurrent_invocations": 2}
        )
        assert put.status == 200
        ns = r.namespace
        await asyncio.wait_for(r.router.until(lambda x: x.namespace_limits.get(ns) == 2), 5)

        refused, open_calls = await _slow_calls(r, "busy", 3, expect_active=2)
        [resp] = refused
        assert resp.status == 429
        assert resp.headers["X-Lambdabus-Error"] == "quota_exceeded"
        assert "Retry-After" in resp.headers
        assert "ask an operator to raise the quota" in (await resp.json())["error"]["message"]
        instance.release.set()
        assert [a.status for a in await asyncio.gather(*open_calls)] == [201, 201]
