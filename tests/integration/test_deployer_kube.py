"""The deployer's kubernetes backend against kmock's Kubernetes emulator over real HTTP, with the
real kubernetes-asyncio client: what a function becomes (Namespace, RoleBindings, NetworkPolicy,
env Secret, Deployment, Service, HPA — each valid against the Kubernetes schemas), and what its
status says as the test plays the kubelet and scheduler (pods Running, Unschedulable for a GPU,
in CrashLoopBackOff after an OOM kill), an env-only update, a delete, and faults of the API server
(5xx, unreachable, 403, 410 Gone on a watch).

kmock stores objects and streams watch events; it runs no controllers. So the test writes the
pods a ReplicaSet would create and their statuses, and the backend deletes each owned object
itself (kmock has no garbage collector to cascade from the Deployment); ownerReferences are
checked on the objects instead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import kmock
import kubernetes_validate
import pytest
from kubernetes_asyncio.client import Configuration

from lambdabus_deployer.kube import KubernetesBackend, open_kubernetes_backend
from lambdabus_deployer.plan import (
    DesiredRevision,
    Observation,
    desired_instances,
    next_deployment_state,
)
from lambdabus_events.models import (
    BuildState,
    DeploymentState,
    FunctionConfig,
    FunctionRecord,
    FunctionStatus,
    LogLine,
    SourceRef,
)
from lambdabus_platform.kube import render
from lambdabus_platform.kube.client import (
    DEPLOYMENTS,
    HPAS,
    NETWORK_POLICIES,
    PODS,
    ROLE_BINDINGS,
    SECRETS,
    SERVICES,
    KubeClient,
)
from lambdabus_platform.kube.settings import MIN_KUBERNETES_VERSION, KubeApiSettings, KubeSettings
from lambdabus_platform.status import compute_status

NOW = datetime(2026, 12, 1, tzinfo=UTC)
UID = "0f5c2a8e-3b1d-4e6f-9a7b-2c4d6e8f0a1b"
NS = "team"
OBJ = f"lambda-{UID}"
IMAGE = "registry.example:5000/team-hello:" + "a" * 16
FAST = KubeApiSettings(
    retry_for=0.5, backoff_initial=0.02, backoff_max=0.1, request_timeout=5.0, watch_timeout=60
)
SETTINGS = KubeSettings(registry="registry.example:5000")


def record(generation: int = 1, **config: Any) -> FunctionRecord:
    return FunctionRecord(
        namespace=NS,
        name="hello",
        uid=UID,
        generation=generation,
        spec=FunctionConfig(**config),
        source=SourceRef(
            sha256="a" * 64, size=10, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=NOW,
        updated_at=NOW,
    )


def built(generation: int = 1) -> BuildState:
    return BuildState(
        namespace=NS,
        name="hello",
        uid=UID,
        generation=generation,
        phase="succeeded",
        source_sha256="a" * 64,
        artifact=IMAGE,
        updated_at=NOW,
    )


def desired(rec: FunctionRecord) -> DesiredRevision:
    found = desired_instances(rec, built(rec.generation))
    assert found is not None
    return found


class Deployments:
    """The deployer's side of the reports: folds each into the deployment state (as
    `DeploymentStates.observe` does) and wakes whoever waits for a status."""

    def __init__(self) -> None:
        self.state: DeploymentState | None = None
        self.reasons: list[str] = []
        self.record = record()
        self._changed = asyncio.Condition()

    async def __call__(self, observation: Observation) -> None:
        decision = next_deployment_state(self.state, observation, datetime.now(UTC))
        async with self._changed:
            if decision.write:
                self.state = decision.state
                self.reasons.append(decision.state.reason)
            self._changed.notify_all()

    def status(self) -> FunctionStatus:
        return compute_status(self.record, built(self.record.generation), self.state)

    async def until(self, check: Callable[[FunctionStatus], bool], what: str) -> FunctionStatus:
        async def wait() -> FunctionStatus:
            async with self._changed:
                while not check(self.status()):
                    await self._changed.wait()
                return self.status()

        try:
            return await asyncio.wait_for(wait(), timeout=15)
        except TimeoutError:
            pytest.fail(f"never {what}: {self.status().model_dump_json(indent=1)}")


@pytest.fixture
async def kube(kmock: kmock.KubernetesEmulator) -> AsyncIterator[KubeClient]:
    # A real API server lists an empty resource; kmock knows a resource once declared.
    for resource in (DEPLOYMENTS, PODS, ROLE_BINDINGS, SERVICES, SECRETS, HPAS):
        kmock.resources[f"{resource.api_version}/{resource.plural}"] = kmock.ResourceInfo(
            namespaced=True, kind=resource.kind
        )
    config = Configuration(host=str(kmock.url))
    async with KubeClient.connect(FAST, configuration=config) as client:
        yield client


@pytest.fixture
def deployments() -> Deployments:
    return Deployments()


@pytest.fixture
async def backend(kube: KubeClient, deployments: Deployments) -> AsyncIterator[KubernetesBackend]:
    # kmock cannot parse the cluster-scoped /api/v1/namespaces URLs (its path parser takes
    # `namespaces/<x>` for a namespace prefix): the namespace is taken as created by an operator
    # (`LAMBDABUS_DEPLOYER_KUBE_CREATE_NAMESPACES=false`); its rendering is schema-checked in
    # tests/unit/test_kube_render.py and its creation in the k3s test.
    async with open_kubernetes_backend(
        kube, SETTINGS, deployments, create_namespaces=False
    ) as opened:
        yield opened


def running_condition(status: FunctionStatus) -> Any:
    return next(c for c in status.conditions if c.type == "Running")


def pod(name: str, **status: Any) -> dict[str, Any]:
    """A pod as the Deployment's ReplicaSet would create it (the test plays its controller)."""
    fn = render.KubeFunction(NS, "hello", UID, FunctionConfig())
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": render.function_labels(fn)},
        "status": {"phase": "Pending", **status},
    }


RUNNING = {
    "phase": "Running",
    "startTime": "2026-12-01T08:00:00Z",
    "conditions": [
        {"type": "PodScheduled", "status": "True"},
        {"type": "Ready", "status": "True"},
    ],
    "containerStatuses": [
        {
            "name": "function",
            "restartCount": 0,
            "state": {"running": {"startedAt": "2026-12-01T08:00:01Z"}},
        }
    ],
}


def validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, MIN_KUBERNETES_VERSION, strict=True)


async def test_a_function_becomes_valid_objects_and_its_status_follows_its_pods(
    backend: KubernetesBackend,
    kube: KubeClient,
    deployments: Deployments,
    kmock: kmock.KubernetesEmulator,
) -> None:
    first = desired(record())
    await backend.apply(first)
    objects = {
        "Deployment": await kube.get(DEPLOYMENTS, NS, OBJ),
        "Service": await kube.get(SERVICES, NS, OBJ),
        "HorizontalPodAutoscaler": await kube.get(HPAS, NS, OBJ),
        "Secret": await kube.get(SECRETS, NS, f"{OBJ}-env"),
        "NetworkPolicy": await kube.get(NETWORK_POLICIES, NS, render.NETWORK_POLICY_NAME),
    }
    bindings, _ = await kube.list(ROLE_BINDINGS, NS)
    assert sorted(b["metadata"]["name"] for b in bindings) == sorted(render.FUNCTION_ROLES)
    for kind, obj in objects.items():
        assert obj is not None, kind
        assert obj["kind"] == kind
        validate(obj)
    deployment = objects["Deployment"]
    assert deployment is not None
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == IMAGE
    assert len(kmock[kmock.resource("batch/v1/jobs")]) == 0  # the deployer never builds
    status = await deployments.until(lambda s: s.status == "waiting", "waiting")
    assert deployments.reasons[:3] == [
        "DeploymentCreated",
        "ServiceCreated",
        "HorizontalPodAutoscalerCreated",
    ]

    await kube.create(pod("hello-1", conditions=[{"type": "PodScheduled", "status": "True"}]))
    status = await deployments.until(
        lambda s: running_condition(s).reason == "DeploymentWaiting", "DeploymentWaiting"
    )
    assert status.status == "waiting"
    assert status.pod_statuses["hello-1"].status == "waiting"

    await kube.patch(PODS, NS, "hello-1", {"status": RUNNING})
    status = await deployments.until(lambda s: s.status == "running", "running")
    assert running_condition(status).reason == "DeploymentReady"
    assert status.pod_statuses["hello-1"].status == "running"
    assert status.pod_statuses["hello-1"].phase == "ready"
    assert deployments.state is not None
    assert deployments.state.endpoints == [f"http://{OBJ}.{NS}.svc.cluster.local:80"]

    # An update of env only: the same image, the Deployment's pods roll (env digest), no Job.
    deployments.record = record(generation=2, env={"GREETING": "hi"})
    before = container["env"]
    await backend.apply(desired(deployments.record))
    updated = await kube.get(DEPLOYMENTS, NS, OBJ)
    assert updated is not None
    template = updated["spec"]["template"]
    assert template["metadata"]["annotations"][render.ANNOTATION_ENV_DIGEST] == render.env_digest(
        {"GREETING": "hi"}
    )
    assert template["spec"]["containers"][0]["image"] == IMAGE
    assert template["spec"]["containers"][0]["env"] == before  # values only in the Secret
    secret = await kube.get(SECRETS, NS, f"{OBJ}-env")
    assert secret is not None
    assert secret["stringData"] == {"GREETING": "hi"}
    assert len(kmock["patch", kmock.resource("apps/v1/deployments")]) == 1
    assert len(kmock[kmock.resource("batch/v1/jobs")]) == 0
    assert "DeploymentUpdated" in deployments.reasons

    await backend.remove(NS, "hello")
    for resource, name in (
        (DEPLOYMENTS, OBJ),
        (SERVICES, OBJ),
        (HPAS, OBJ),
        (SECRETS, f"{OBJ}-env"),
    ):
        assert await kube.get(resource, NS, name) is None, resource.kind
    assert backend.functions() == set()
    (deleted,) = kmock["delete", kmock.resource("apps/v1/deployments")]
    propagation = deleted.data
    assert propagation["propagationPolicy"] == "Foreground"


async def test_owned_objects_name_the_deployment(
    backend: KubernetesBackend, kube: KubeClient, kmock: kmock.KubernetesEmulator
) -> None:
    """A real API server gives the Deployment a uid; the Service, HPA and env Secret are then
    owned by it (a delete cascades). kmock assigns none: the test gives it one."""
    kmock["post", kmock.resource("apps/v1/deployments")] << (
        lambda request: {**request.data, "metadata": {**request.data["metadata"], "uid": "d-1"}}
    )
    await backend.apply(desired(record()))
    for resource, name in ((SERVICES, OBJ), (HPAS, OBJ), (SECRETS, f"{OBJ}-env")):
        obj = await kube.get(resource, NS, name)
        assert obj is not None
        (owner,) = obj["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("Deployment", OBJ, "d-1")


async def test_a_pod_the_scheduler_cannot_place_for_a_gpu_is_pending_with_its_message(
    backend: KubernetesBackend, kube: KubeClient, deployments: Deployments
) -> None:
    deployments.record = record(gpu=1)
    await backend.apply(desired(deployments.record))
    deployment = await kube.get(DEPLOYMENTS, NS, OBJ)
    assert deployment is not None
    limits = deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    unschedulable = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": message,
    }
    await kube.create(pod("hello-gpu", conditions=[unschedulable]))
    status = await deployments.until(lambda s: s.status == "pending", "pending")
    condition = running_condition(status)
    assert condition.reason == "PodUnschedulable"
    assert condition.message == message


@pytest.mark.parametrize(
    ("waiting", "last", "expected"),
    [
        ("CrashLoopBackOff", {"terminated": {"reason": "OOMKilled", "exitCode": 137}}, "OOMKilled"),
        (
            "CrashLoopBackOff",
            {"terminated": {"reason": "Error", "exitCode": 1}},
            "CrashLoopBackOff",
        ),
        ("ImagePullBackOff", {}, "ImagePullBackOff"),
    ],
)
async def test_a_pod_that_cannot_run_terminates_the_function_with_the_reason(
    backend: KubernetesBackend,
    kube: KubeClient,
    deployments: Deployments,
    waiting: str,
    last: dict[str, Any],
    expected: str,
) -> None:
    await backend.apply(desired(record()))
    container = {
        "name": "function",
        "restartCount": 4,
        "state": {"waiting": {"reason": waiting, "message": "back-off 1m20s"}},
        "lastState": last,
    }
    await kube.create(pod("hello-bad", phase="Running", containerStatuses=[container]))
    status = await deployments.until(lambda s: s.status == "terminated", "terminated")
    condition = running_condition(status)
    assert condition.reason == "DeploymentFailed"
    assert expected in condition.message
    assert waiting in condition.message
    assert status.pod_statuses["hello-bad"].restarts == 4


async def test_a_prebuilt_image_runs_without_a_build(
    backend: KubernetesBackend, kube: KubeClient, deployments: Deployments
) -> None:
    rec = record(image="ghcr.io/example/app:v1")
    revision = desired_instances(rec, None)  # no build at all
    assert revision is not None
    await backend.apply(revision)
    deployment = await kube.get(DEPLOYMENTS, NS, OBJ)
    assert deployment is not None
    assert (
        deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/example/app:v1"
    )


async def test_an_api_server_answering_5xx_is_retried(
    backend: KubernetesBackend, kube: KubeClient, kmock: kmock.KubernetesEmulator
) -> None:
    unavailable = {"kind": "Status", "code": 503}
    kmock["get", kmock.resource("v1/secrets")][:2] << 503 << unavailable
    kmock["post", kmock.resource("v1/services")][:1] << 500 << unavailable
    await backend.apply(desired(record()))
    assert await kube.get(DEPLOYMENTS, NS, OBJ) is not None
    assert await kube.get(SERVICES, NS, OBJ) is not None
    # (kmock stores what a POST carried even when a reaction answers 5xx: the retry is a 409,
    # then a re-read and a patch, as after a real server's lost answer)
    assert len(kmock["post", kmock.resource("v1/services")]) >= 2
    assert len(kmock["get", kmock.resource("v1/secrets")]) >= 3


async def test_an_api_server_out_of_reach_leaves_the_function_pending_then_it_deploys(
    backend: KubernetesBackend,
    kube: KubeClient,
    deployments: Deployments,
    kmock: kmock.KubernetesEmulator,
) -> None:
    broken = [True]
    kmock[lambda request: broken[0]] << 503 << {"kind": "Status", "code": 503}
    await backend.apply(desired(record()))  # gives up after retry_for
    status = await deployments.until(lambda s: s.status == "pending", "pending")
    assert running_condition(status).reason == "ClusterUnavailable"
    broken[0] = False
    await backend.apply(desired(record()))  # the next reconcile
    assert await kube.get(DEPLOYMENTS, NS, OBJ) is not None
    await deployments.until(lambda s: s.status == "waiting", "waiting after the outage")


async def test_rbac_refusal_fails_naming_verb_and_resource(
    backend: KubernetesBackend, deployments: Deployments, kmock: kmock.KubernetesEmulator
) -> None:
    forbidden = {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "no"}
    kmock["post", kmock.resource("apps/v1/deployments")] << 403 << forbidden
    await backend.apply(desired(record()))
    status = await deployments.until(lambda s: s.status == "terminated", "terminated")
    condition = running_condition(status)
    assert condition.reason == "KubernetesForbidden"
    assert "create deployments.apps" in condition.message
    assert f"namespace '{NS}'" in condition.message


async def test_an_expired_watch_lists_again_and_misses_no_transition(
    backend: KubernetesBackend,
    kube: KubeClient,
    deployments: Deployments,
    kmock: kmock.KubernetesEmulator,
) -> None:
    gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
    kmock["get", kmock.resource("v1/pods"), {"watch": "true"}][:1] << {
        "type": "ERROR",
        "object": gone,
    }
    await backend.apply(desired(record()))
    await kube.create(pod("hello-1", **RUNNING))
    status = await deployments.until(lambda s: s.status == "running", "running")
    assert status.pod_statuses["hello-1"].status == "running"
    assert len(kmock["get", kmock.resource("v1/pods"), {"watch": "true"}]) >= 2


async def test_runtime_logs_come_from_the_pods_logs(
    kube: KubeClient, deployments: Deployments, kmock: kmock.KubernetesEmulator
) -> None:
    lines: list[LogLine] = []
    got = asyncio.Event()

    async def sink(line: LogLine) -> bool:
        lines.append(line)
        if len(lines) == 2:
            got.set()
        return True

    kmock["get", kmock.resource("v1/pods"), kmock.subresource("log")] << b"hello\nworld\n"
    async with open_kubernetes_backend(
        kube, SETTINGS, deployments, create_namespaces=False, logs=sink
    ) as backend:
        await backend.apply(desired(record()))
        await kube.create(pod("hello-1", **RUNNING))
        await asyncio.wait_for(got.wait(), 15)
    assert [(line.instance, line.line, line.kind) for line in lines] == [
        ("hello-1", "hello", "runtime"),
        ("hello-1", "world", "runtime"),
    ]
    (request,) = kmock["get", kmock.resource("v1/pods"), kmock.subresource("log")]
    assert request.params["follow"] == "true"
    assert request.params["container"] == "function"


async def test_a_function_deleted_while_another_deployer_ran_it_is_found_by_its_labels(
    kube: KubeClient, deployments: Deployments
) -> None:
    async with open_kubernetes_backend(kube, SETTINGS, deployments, create_namespaces=False) as one:
        await one.apply(desired(record()))
    assert await kube.get(DEPLOYMENTS, NS, OBJ) is not None
    async with open_kubernetes_backend(kube, SETTINGS, deployments, create_namespaces=False) as two:
        assert two.functions() == set()  # a new leader, that never applied it
        await two.remove(NS, "hello")
    for resource, name in (
        (DEPLOYMENTS, OBJ),
        (SERVICES, OBJ),
        (HPAS, OBJ),
        (SECRETS, f"{OBJ}-env"),
    ):
        assert await kube.get(resource, NS, name) is None, resource.kind
