"""The Kubernetes adapter (`lambdabus_platform.kube.client`) against kmock's Kubernetes emulator
over real HTTP with the real kubernetes-asyncio client: apply (create, then re-read and patch on
409), get, delete, list and watch by label (re-listing on 410 Gone), retries on 5xx, and a 403
that names the verb and resource."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest
from kubernetes_asyncio.client import Configuration

from lambdabus_platform.kube.client import (
    DEPLOYMENTS,
    PODS,
    SECRETS,
    KubeClient,
    KubeForbidden,
    KubeUnavailable,
    WatchEvent,
)
from lambdabus_platform.kube.settings import KubeApiSettings

FAST = KubeApiSettings(
    retry_for=3.0, backoff_initial=0.02, backoff_max=0.1, request_timeout=5.0, watch_timeout=30
)


@pytest.fixture
async def kube(kmock: kmock.KubernetesEmulator) -> AsyncIterator[KubeClient]:
    config = Configuration(host=str(kmock.url).rstrip("/"))
    async with KubeClient.connect(FAST, configuration=config) as client:
        yield client


def secret(name: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "team", "labels": {"app": name}},
        "stringData": data,
    }


async def test_apply_creates_then_patches_on_conflict(
    kube: KubeClient, kmock: kmock.KubernetesEmulator
) -> None:
    await kube.apply(secret("one", A="1"))
    await kube.apply(secret("one", A="2"))
    got = await kube.get(SECRETS, "team", "one")
    assert got is not None
    assert got["stringData"] == {"A": "2"}
    assert len(kmock[kmock.resource("v1/secrets")]["post"]) == 2  # the second answered 409
    assert len(kmock[kmock.resource("v1/secrets")]["patch"]) == 1
    assert await kube.delete(SECRETS, "team", "one", propagation="Foreground") is True
    assert await kube.get(SECRETS, "team", "one") is None
    assert await kube.delete(SECRETS, "team", "one") is False


async def test_5xx_is_retried_with_back_off(
    kube: KubeClient, kmock: kmock.KubernetesEmulator
) -> None:
    kmock["get", kmock.resource("v1/secrets")][:2] << 503
    await kube.apply(secret("two", A="1"))
    got = await kube.get(SECRETS, "team", "two")
    assert got is not None
    assert len(kmock["get", kmock.resource("v1/secrets")]) == 3


async def test_403_names_verb_and_resource(
    kube: KubeClient, kmock: kmock.KubernetesEmulator
) -> None:
    await kube.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "x", "namespace": "team"},
        }
    )
    forbidden = {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "nope"}
    kmock["delete", kmock.resource("apps/v1/deployments")] << 403 << forbidden
    with pytest.raises(KubeForbidden) as caught:
        await kube.delete(DEPLOYMENTS, "team", "x")
    assert caught.value.verb == "delete"
    assert caught.value.resource == "deployments.apps"
    assert "delete" in caught.value.message
    assert "deployments.apps" in caught.value.message


def pod(name: str, app: str, phase: str = "Pending") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "team", "labels": {"app": app}},
        "status": {"phase": phase},
    }


async def next_event(events: AsyncIterator[WatchEvent]) -> WatchEvent:
    return await asyncio.wait_for(anext(events), timeout=10)


async def test_watch_relists_on_410_and_filters_by_label(
    kube: KubeClient, kmock: kmock.KubernetesEmulator
) -> None:
    await kube.create(pod("p1", "a"))
    await kube.create(pod("p2", "b"))
    gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
    kmock["get", kmock.resource("v1/pods"), {"watch": "true"}][:1] << {
        "type": "ERROR",
        "object": gone,
    }
    events = kube.watch(PODS, "team", {"app": "a"})
    try:
        first = await next_event(events)
        assert first.type == "SYNC"
        assert [p["metadata"]["name"] for p in first.items] == ["p1"]
        again = await next_event(events)  # the watch expired: listed again
        assert again.type == "SYNC"
        assert [p["metadata"]["name"] for p in again.items] == ["p1"]
        # kmock ignores resourceVersion and replays what exists: the watch is open after it.
        replayed = await next_event(events)
        assert (replayed.type, replayed.object["metadata"]["name"]) == ("ADDED", "p1")
        await kube.create(pod("p3", "a"))
        await kube.create(pod("p4", "b"))  # another label: never seen
        await kube.patch(PODS, "team", "p3", {"status": {"phase": "Running"}})
        seen: list[tuple[str, str]] = []
        while ("MODIFIED", "p3") not in seen:
            event = await next_event(events)
            seen.append((event.type, event.object["metadata"]["name"]))
        assert ("ADDED", "p3") in seen
        assert all(name != "p4" for _, name in seen)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
    assert len(kmock["get", kmock.resource("v1/pods"), {"watch": "true"}]) == 2


async def test_watch_reports_an_unavailable_server_and_recovers(
    kube: KubeClient, kmock: kmock.KubernetesEmulator
) -> None:
    await kube.create(pod("p1", "a", "Running"))
    kmock["get", kmock.resource("v1/pods")][:2] << 503 << {"kind": "Status", "code": 503}
    events = kube.watch(PODS, "team", {"app": "a"})
    try:
        assert (await next_event(events)).type == "UNAVAILABLE"
        assert (await next_event(events)).type == "UNAVAILABLE"
        synced = await next_event(events)
        assert synced.type == "SYNC"
        assert [p["metadata"]["name"] for p in synced.items] == ["p1"]
    finally:
        await events.aclose()  # type: ignore[attr-defined]


async def test_unreachable_server_is_unavailable_after_retries() -> None:
    config = Configuration(host="http://127.0.0.1:9")  # discard port: connection refused
    settings = KubeApiSettings(retry_for=0.3, backoff_initial=0.05, backoff_max=0.1)
    async with KubeClient.connect(settings, configuration=config) as client:
        with pytest.raises(KubeUnavailable) as caught:
            await client.get(SECRETS, "team", "x")
    assert caught.value.reason == "ClusterUnavailable"
    assert "cannot reach the API server" in caught.value.message
