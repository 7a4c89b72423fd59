"""The kubernetes deploy backend against a real cluster (k3s in a container, testcontainers):
what kmock cannot do — the namespace is created (kmock cannot parse /api/v1/namespaces), the
API server assigns uids and validates every object, the garbage collector cascades a delete
from the Deployment to what it owns, and the real scheduler leaves a pod that asks for a GPU
Unschedulable with its own message. Runs where a Docker engine answers; skips cleanly where
none does (as on the CI machine of this repository)."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lambdabus_deployer.kube import open_kubernetes_backend
from lambdabus_deployer.plan import Observation, desired_instances, next_deployment_state
from lambdabus_events.models import DeploymentState, FunctionConfig, FunctionRecord, SourceRef
from lambdabus_platform.kube.client import DEPLOYMENTS, NAMESPACES, SERVICES, KubeClient
from lambdabus_platform.kube.settings import KubeApiSettings, KubeSettings
from lambdabus_platform.status import compute_status


def _docker_answers() -> bool:
    """Whether a Docker engine answers `GET /_ping` where testcontainers would look."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = host.removeprefix("unix://")
        elif host.startswith("tcp://"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            name, _, port = host.removeprefix("tcp://").partition(":")
            address = (name, int(port or 2375))
        else:
            return False
        with sock:
            sock.settimeout(3)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.")
    except OSError:
        return False


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not _docker_answers():
        pytest.skip("no Docker engine answers here: the k3s test needs one")
    from testcontainers.community.k3s import K3SContainer

    with K3SContainer() as k3s:
        path = tmp_path_factory.mktemp("k3s") / "kubeconfig"
        path.write_text(k3s.config_yaml())
        yield path


@pytest.fixture
async def kube(kubeconfig: Path) -> AsyncIterator[KubeClient]:
    async with KubeClient.connect(KubeApiSettings(kubeconfig=str(kubeconfig))) as client:
        yield client


@pytest.mark.timeout(600)
async def test_a_function_on_a_real_cluster(kube: KubeClient) -> None:
    ns, uid = f"k3s-{uuid.uuid4().hex[:6]}", str(uuid.uuid4())
    now = datetime.now(UTC)
    record = FunctionRecord(
        namespace=ns,
        name="hello",
        uid=uid,
        generation=1,
        spec=FunctionConfig(image="registry.k8s.io/pause:3.9", gpu=1),
        source=SourceRef(
            sha256="0" * 64, size=1, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=now,
        updated_at=now,
    )
    state: list[DeploymentState | None] = [None]

    async def report(observation: Observation) -> None:
        decision = next_deployment_state(state[0], observation, datetime.now(UTC))
        state[0] = decision.state

    desired = desired_instances(record, None)
    assert desired is not None
    async with open_kubernetes_backend(kube, KubeSettings(), report) as backend:
        await backend.apply(desired)
        assert await kube.get(NAMESPACES, None, ns) is not None
        deployment = await kube.get(DEPLOYMENTS, ns, f"lambda-{uid}")
        assert deployment is not None
        service = await kube.get(SERVICES, ns, f"lambda-{uid}")
        assert service is not None
        assert service["metadata"]["ownerReferences"][0]["uid"] == deployment["metadata"]["uid"]

        async def pending() -> None:
            while True:
                current = state[0]
                if current is not None:
                    status = compute_status(record, None, current)
                    if status.status == "pending":
                        return
                await asyncio.sleep(0.5)

        await asyncio.wait_for(pending(), 240)  # no GPU in k3s: the scheduler says so
        assert state[0] is not None
        assert "nvidia.com/gpu" in state[0].message

        await backend.remove(ns, "hello")

        async def collected() -> None:  # by the garbage collector, from the Deployment
            while True:
                if await kube.get(SERVICES, ns, f"lambda-{uid}") is None:
                    return
                await asyncio.sleep(0.5)

        await asyncio.wait_for(collected(), 120)
