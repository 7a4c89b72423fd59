"""The deployer service with `LAMBDABUS_BACKEND=kubernetes`, in-process against a real
nats-server and kmock's Kubernetes emulator reached through a kubeconfig file: a function record
with a succeeded build (an image) becomes a Deployment; a pod the test marks Running makes the
deployment state `ready` with the Service's cluster DNS name as endpoint (what the router reads);
deleting the record removes the objects."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import kmock
import pytest
import yaml

from lambdabus_deployer.__main__ import make_setup
from lambdabus_deployer.settings import DeployerSettings
from lambdabus_events.models import (
    BuildState,
    DeploymentState,
    FunctionConfig,
    FunctionRecord,
    SourceRef,
)
from lambdabus_platform.bus import Bus
from lambdabus_platform.kube import render
from lambdabus_platform.kube.client import DEPLOYMENTS, HPAS, PODS, ROLE_BINDINGS, SECRETS, SERVICES
from lambdabus_platform.kube.settings import KubeApiSettings
from lambdabus_platform.registry import Registry
from lambdabus_platform.service import serve
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.subjects import BUILDS_BUCKET, DEPLOYMENTS_BUCKET, FUNCTIONS_BUCKET

T = TypeVar("T")
IMAGE = "registry.example:5000/svc-hello:" + "b" * 16


async def eventually(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float = 20) -> T:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await probe()
        if found:
            return found
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"never {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(settings: DeployerSettings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve("deployer", settings, make_setup(settings), stop=stop, on_ready=ready.set_result)
    )
    waiters: set[asyncio.Future[Any]] = {task, ready}
    done, _ = await asyncio.wait(waiters, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_the_deployer_runs_functions_on_kubernetes(
    kmock: kmock.KubernetesEmulator, nats_settings: NatsSettings, bus: Bus, tmp_path: Path
) -> None:
    for resource in (DEPLOYMENTS, PODS, ROLE_BINDINGS, SERVICES, SECRETS, HPAS):
        kmock.resources[f"{resource.api_version}/{resource.plural}"] = kmock.ResourceInfo(
            namespaced=True, kind=resource.kind
        )
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url)}}],
                "users": [{"name": "deployer", "user": {"token": "t"}}],
                "contexts": [
                    {"name": "kmock", "context": {"cluster": "kmock", "user": "deployer"}}
                ],
                "current-context": "kmock",
            }
        )
    )
    ns, name, uid = f"k{uuid.uuid4().hex[:6]}", "hello", str(uuid.uuid4())
    obj = f"lambda-{uid}"
    settings = DeployerSettings(
        port=0,
        nats=nats_settings,
        state_dir=tmp_path / ".lambdabus" / "deployer",
        reconcile_interval=0.5,
        shutdown_grace_seconds=2.0,
        backend="kubernetes",
        kube_api=KubeApiSettings(kubeconfig=str(kubeconfig), retry_for=1.0, watch_timeout=60),
        kube_create_namespaces=False,  # kmock cannot parse /api/v1/namespaces
    )
    now = datetime.now(UTC)
    record = FunctionRecord(
        namespace=ns,
        name=name,
        uid=uid,
        generation=1,
        spec=FunctionConfig(env={"GREETING": "hi"}),
        source=SourceRef(
            sha256="0" * 64, size=1, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=now,
        updated_at=now,
    )
    functions = Registry(bus.kv(FUNCTIONS_BUCKET), FunctionRecord)
    builds = Registry(bus.kv(BUILDS_BUCKET), BuildState)
    states = Registry(bus.kv(DEPLOYMENTS_BUCKET), DeploymentState)
    await functions.put(ns, name, record)
    await builds.put(
        ns,
        name,
        BuildState(
            namespace=ns,
            name=name,
            uid=uid,
            generation=1,
            phase="succeeded",
            artifact=IMAGE,
            updated_at=now,
        ),
    )

    async def state() -> DeploymentState | None:
        found = await states.get(ns, name)
        return found.value if found is not None else None

    def stored(resource: Any, name_: str) -> Callable[[], Awaitable[bool]]:
        async def probe() -> bool:
            return (resource_key(resource), ns, name_) in kmock.objects

        return probe

    async with running(settings):
        await eventually(stored(DEPLOYMENTS, obj), "a Deployment")
        first = await eventually(state, "a deployment state")
        assert first.phase == "started"
        assert first.reason in (
            "DeploymentCreated",
            "ServiceCreated",
            "HorizontalPodAutoscalerCreated",
        )
        fn = render.KubeFunction(ns, name, uid, record.spec)
        # the test plays the ReplicaSet and the kubelet: a pod of the function, running
        await post_pod(kmock, ns, render.function_labels(fn))

        async def ready() -> DeploymentState | None:
            current = await state()
            ready = current is not None and current.reason == "DeploymentReady"
            return current if ready else None

        done = await eventually(ready, "ready")
        assert done.endpoints == [f"http://{obj}.{ns}.svc.cluster.local:80"]
        assert done.reason == "DeploymentReady"

        await functions.delete(ns, name)

        async def gone() -> bool:
            return (resource_key(DEPLOYMENTS), ns, obj) not in kmock.objects or bool(
                kmock.objects[resource_key(DEPLOYMENTS), ns, obj].deleted
            )

        await eventually(gone, "the Deployment deleted")
        assert await eventually(lambda: _none(state), "the state forgotten")


async def _none(state: Callable[[], Awaitable[DeploymentState | None]]) -> bool:
    return await state() is None


def resource_key(resource: Any) -> kmock.resource:
    return kmock.resource(f"{resource.api_version}/{resource.plural}")


async def post_pod(emulator: kmock.KubernetesEmulator, ns: str, labels: dict[str, str]) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "hello-1", "namespace": ns, "labels": labels},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }
    url = f"{emulator.url}/api/v1/namespaces/{ns}/pods"
    async with aiohttp.ClientSession() as http, http.post(url, json=pod) as resp:
        assert resp.status == 200, await resp.text()
