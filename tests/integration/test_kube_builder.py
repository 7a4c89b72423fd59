"""The builder's kubernetes backend (`LAMBDABUS_BACKEND=kubernetes`) against kmock's Kubernetes
emulator over real HTTP (the real kubernetes-asyncio client, configured by a kubeconfig file),
moto's S3 server, a real nats-server and the real gateway.

kmock runs no controllers: the test plays the Job controller and the scheduler, creating the
build pod and writing the Job's and pod's status, and serves the pod's log. What it checks: the
Job's spec and the build context in S3; Job and pod states as image statuses and Kyma reasons;
the pod's log lines in the build log; a failed push's Kaniko lines in the failure; an
unschedulable build pod `pending`; the build Job limit; an unchanged source makes no Job.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
from kubernetes_asyncio.client import Configuration

from lambdabus_builder.settings import BuilderSettings
from lambdabus_events.catalog import LifecycleEvent, parse_lifecycle
from lambdabus_events.models import BuildState, LogLine
from lambdabus_gateway.settings import GatewaySettings
from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import NotFound
from lambdabus_platform.kube.client import JOBS, PODS, KubeClient
from lambdabus_platform.kube.settings import KubeApiSettings, KubeSettings
from lambdabus_platform.natsserver import NatsServer, run_nats_server
from lambdabus_platform.s3 import S3Objects
from lambdabus_platform.settings import NatsSettings, S3Settings, StoreSettings
from lambdabus_platform.subjects import BUILDS_BUCKET, function_key, logs_subject
from tests.fakeregistry import FakeRegistry
from tests.integration.conftest import RunningGateway, running_gateway, secrets_settings
from tests.integration.test_builder import running_builder

NS = "kbuilds"
PLATFORM_NS = "lambdabus"
REGISTRY = "registry.test:5000"
WAIT = 30.0
HELLO = "async def main(request):\n    return {'hello': 'world'}\n"
FAST_API = KubeApiSettings(
    retry_for=3.0, backoff_initial=0.02, backoff_max=0.1, request_timeout=5.0, watch_timeout=60
)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    # A server of its own: the builder reconciles every function in the KV.
    async with run_nats_server(tmp_path / "nats", log_path=tmp_path / "nats.log") as server:
        yield server


@pytest.fixture
def kubeconfig(tmp_path: Path, kmock: kmock.KubernetesEmulator) -> Path:
    # kmock answers 404 for a resource it has no object of yet; a cluster lists nothing.
    kmock.resources["batch/v1/jobs"] = kmock.ResourceInfo(namespaced=True, kind="Job")
    kmock.resources["v1/pods"] = kmock.ResourceInfo(namespaced=True, kind="Pod")
    path = tmp_path / "kubeconfig"
    server = str(kmock.url).rstrip("/")
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: kmock\n"
        f"clusters:\n- name: kmock\n  cluster:\n    server: {server}\n"
        "users:\n- name: test\n  user:\n    token: test-token\n"
        "contexts:\n- name: kmock\n  context:\n    cluster: kmock\n    user: test\n"
    )
    return path


@pytest.fixture
async def kube(kmock: kmock.KubernetesEmulator) -> AsyncIterator[KubeClient]:
    """The test's own client: it plays the Job controller and the scheduler."""
    config = Configuration(host=str(kmock.url).rstrip("/"))
    async with KubeClient.connect(FAST_API, configuration=config) as client:
        yield client


def settings_for(
    tmp_path: Path, nats: NatsSettings, s3: S3Settings, kubeconfig: Path, **fields: Any
) -> BuilderSettings:
    return BuilderSettings(
        port=0,
        nats=nats,
        state_dir=tmp_path / "builder",
        shutdown_grace_seconds=2,
        backend="kubernetes",
        kube=KubeSettings(
            registry=REGISTRY,
            build_context_bucket=s3.bucket,
            platform_namespace=PLATFORM_NS,
            insecure_registries=[REGISTRY],
        ),
        kube_api=FAST_API.model_copy(update={"kubeconfig": str(kubeconfig)}),
        store=StoreSettings(backend="nats", s3=s3),
        **fields,
    )


@pytest.fixture
async def gateway(nats_settings: NatsSettings, bus: Bus) -> AsyncIterator[RunningGateway]:
    async with running_gateway(
        GatewaySettings(port=0, nats=nats_settings, secrets=secrets_settings()), bus
    ) as gw:
        yield gw


# -- helpers ----------------------------------------------------------------------------------


async def create(gw: RunningGateway, name: str, files: dict[str, str], **spec: Any) -> str:
    resp = await gw.http.post(
        f"/v1/namespaces/{NS}/functions", json={"name": name, **spec, "source": {"files": files}}
    )
    assert resp.status == 202, await resp.text()
    uid: str = (await resp.json())["uid"]
    return uid


async def wait_state(
    bus: Bus, name: str, until: Callable[[BuildState], bool], timeout: float = WAIT
) -> BuildState:
    last: list[BuildState] = []

    async def watch() -> BuildState:
        async for entry in bus.kv(BUILDS_BUCKET).watch(function_key(NS, name)):
            if entry.value:
                state = BuildState.model_validate_json(entry.value)
                last[:] = [state]
                if until(state):
                    return state
        raise AssertionError("the watch ended")

    try:
        return await asyncio.wait_for(watch(), timeout)
    except TimeoutError:
        raise AssertionError(f"the build state never got there; the last one: {last}") from None


async def wait_job(kube: KubeClient, name: str, timeout: float = WAIT) -> dict[str, Any]:
    """The build Job `name` once it exists (watched)."""

    async def watch() -> dict[str, Any]:
        events = kube.watch(JOBS, PLATFORM_NS)
        try:
            async for event in events:
                objs = event.items if event.type == "SYNC" else (event.object,)
                for obj in objs:
                    if obj.get("metadata", {}).get("name") == name and event.type != "DELETED":
                        return obj
        finally:
            await events.aclose()  # type: ignore[attr-defined]
        raise AssertionError("the watch ended")

    return await asyncio.wait_for(watch(), timeout)


async def status_of(gw: RunningGateway, name: str) -> dict[str, Any]:
    resp = await gw.http.get(f"/v1/namespaces/{NS}/functions/{name}/status")
    body: dict[str, Any] = await resp.json()
    return body


def build_ready(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "BuildReady")


async def build_log(bus: Bus, name: str) -> list[LogLine]:
    """The build log of `name` up to its closing line."""
    lines: list[LogLine] = []

    async def read() -> None:
        async for msg in bus.replay("LOGS", logs_subject("build", NS, name), deliver_all=True):
            line = LogLine.model_validate_json(msg.data)
            lines.append(line)
            if line.stream == "system" and line.line.startswith(
                ("build succeeded", "build failed")
            ):
                return

    await asyncio.wait_for(read(), WAIT)
    return lines


async def build_succeeded(bus: Bus, name: str) -> LifecycleEvent:
    """The build.succeeded event of `name` (the deployer's cue)."""

    async def read() -> LifecycleEvent:
        async for msg in bus.replay(
            "LIFECYCLE", f"lambdabus.lifecycle.build.*.{NS}.{name}", deliver_all=True
        ):
            event = parse_lifecycle(msg.data)
            if event.type == "io.lambdabus.build.succeeded":
                return event
        raise AssertionError("the replay ended")

    return await asyncio.wait_for(read(), WAIT)


async def wait_log_line(bus: Bus, name: str, text: str) -> LogLine:
    async def read() -> LogLine:
        async for msg in bus.replay("LOGS", logs_subject("build", NS, name), deliver_all=True):
            line = LogLine.model_validate_json(msg.data)
            if line.line == text:
                return line
        raise AssertionError("the replay ended")

    return await asyncio.wait_for(read(), WAIT)


def build_pod(job: str, phase: str, **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job}-abcde",
            "namespace": PLATFORM_NS,
            "labels": {"job-name": job},
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "status": {"phase": phase, **status},
    }


def serve_log(km: kmock.KubernetesEmulator, pod: str, lines: list[str]) -> None:
    km["get", f"/api/v1/namespaces/{PLATFORM_NS}/pods/{pod}/log"] << (
        "".join(f"{line}\n" for line in lines).encode()
    )


async def finish_job(kube: KubeClient, job: str, outcome: str) -> None:
    """What the Job controller writes when the pod succeeded or failed."""
    if outcome == "succeeded":
        status = {
            "succeeded": 1,
            "active": 0,
            "conditions": [{"type": "Complete", "status": "True"}],
        }
    else:
        status = {
            "failed": 1,
            "active": 0,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                }
            ],
        }
    await kube.patch(JOBS, PLATFORM_NS, job, {"status": status})


# -- tests ------------------------------------------------------------------------------------


async def test_job_context_states_log_and_no_job_for_an_unchanged_source(
    tmp_path: Path,
    gateway: RunningGateway,
    bus: Bus,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubeconfig: Path,
    kube: KubeClient,
    kmock: kmock.KubernetesEmulator,
) -> None:
    settings = settings_for(tmp_path, nats_settings, s3_settings, kubeconfig)
    files = {"lambda_main.py": HELLO, "requirements.txt": "requests==2.32.3\n"}
    async with running_builder(settings):
        uid = await create(gateway, "hello", files, user_docker_commands=["RUN echo hi"])
        name = f"kaniko-lambda-{uid}"
        job = await wait_job(kube, name)

        # -- the Job: Kaniko reads the context from S3 and pushes <registry>/<ns>-<name>:<digest>
        container = job["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        key = f"build-contexts/{uid}.tar.gz"
        assert f"--context=s3://{s3_settings.bucket}/{key}" in args
        destination = next(a for a in args if a.startswith("--destination="))
        image = destination.removeprefix("--destination=")
        assert image.startswith(f"{REGISTRY}/{NS}-hello:")
        assert "--cache=true" in args
        assert f"--insecure-registry={REGISTRY}" in args
        assert container["resources"]["limits"] == {"cpu": "1100m", "memory": "1100Mi"}
        assert job["metadata"]["labels"]["lambdabus.io/uid"] == uid
        assert job["metadata"]["annotations"]["lambdabus.io/image"] == image

        # -- the context in S3: the Dockerfile and the code with LUNA's runtime files; its
        # digest is the image's tag
        async with S3Objects.open(s3_settings, s3_settings.bucket) as objects:
            data = await objects.get(key)
        raw = gzip.decompress(data)
        assert image.endswith(":" + hashlib.sha256(raw).hexdigest())
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            names = tar.getnames()
            dockerfile_text = tar.extractfile("Dockerfile").read().decode()  # type: ignore[union-attr]
        assert {"code/lambda_main.py", "code/requirements.txt", "code/run.py"} <= set(names)
        assert "code/luna_lambda_tools/__init__.py" in names
        assert f"FROM {REGISTRY}/lambdabus-runtime-python3.11" in dockerfile_text
        assert dockerfile_text.index("requirements.txt") < dockerfile_text.index("RUN echo hi")

        state = await wait_state(bus, "hello", lambda s: s.reason == "JobCreated")
        assert state.image_status == "pending"

        # -- its pod runs: in_progress / JobRunning, and its log lines stream into the build log
        pod = build_pod(name, "Running")
        gate = asyncio.Event()

        async def kaniko_at_work() -> None:  # renders nothing; the rest of the log comes later
            await gate.wait()

        kmock["get", f"/api/v1/namespaces/{PLATFORM_NS}/pods/{pod['metadata']['name']}/log"] << (
            b"INFO Building\n",
            kaniko_at_work,
            f"INFO Pushed {image}\n".encode(),
        )
        await kube.create(pod)
        state = await wait_state(bus, "hello", lambda s: s.reason == "JobRunning")
        assert state.image_status == "in_progress"
        status = await status_of(gateway, "hello")
        assert status["image_status"] == "in_progress"
        assert build_ready(status)["reason"] == "JobRunning"
        # the first line is in the build log while the build runs: streamed as it comes
        first = await wait_log_line(bus, "hello", "INFO Building")
        assert first.stream == "stdout"
        state = await wait_state(bus, "hello", lambda s: True)
        assert state.phase == "started"
        gate.set()

        await finish_job(kube, name, "succeeded")
        state = await wait_state(bus, "hello", lambda s: s.phase == "succeeded")
        assert state.artifact == image
        assert state.reason == "JobFinished"
        status = await status_of(gateway, "hello")
        assert status["image_status"] == "completed"
        assert (build_ready(status)["reason"], build_ready(status)["status"]) == (
            "JobFinished",
            "True",
        )
        event = await build_succeeded(bus, "hello")
        assert event.data.artifact == image  # type: ignore[attr-defined]
        async with S3Objects.open(s3_settings, s3_settings.bucket) as objects:
            with pytest.raises(NotFound):  # Kaniko has read it: removed
                await objects.get(key)
        log = await build_log(bus, "hello")
        assert [line.line for line in log if line.stream == "stdout"] == [
            "INFO Building",
            "INFO Pushed " + image,
        ]

        # -- an env-only change: the same image, no new Job
        resp = await gateway.http.patch(
            f"/v1/namespaces/{NS}/functions/hello", json={"env": {"A": "1"}}
        )
        assert resp.status in (200, 202), await resp.text()
        state = await wait_state(bus, "hello", lambda s: s.generation == 2)
        assert (state.phase, state.artifact) == ("succeeded", image)
        assert len(kmock["post", kmock.resource("batch/v1/jobs")]) == 1

        # -- other user_docker_commands: another image, the old Job replaced by a new one
        resp = await gateway.http.patch(
            f"/v1/namespaces/{NS}/functions/hello", json={"user_docker_commands": ["RUN echo bye"]}
        )
        assert resp.status in (200, 202), await resp.text()
        await wait_state(bus, "hello", lambda s: s.generation == 3 and s.reason == "JobCreated")
        job = await wait_job(kube, name)
        args = job["spec"]["template"]["spec"]["containers"][0]["args"]
        new_image = next(a for a in args if a.startswith("--destination=")).split("=", 1)[1]
        assert new_image != image
        assert new_image.startswith(f"{REGISTRY}/{NS}-hello:")
        assert len(kmock["post", kmock.resource("batch/v1/jobs")]) == 2
        assert len(kmock["delete", kmock.resource("batch/v1/jobs")]) == 1


async def test_failed_push_is_an_error_with_kanikos_lines(
    tmp_path: Path,
    gateway: RunningGateway,
    bus: Bus,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubeconfig: Path,
    kube: KubeClient,
    kmock: kmock.KubernetesEmulator,
) -> None:
    settings = settings_for(tmp_path, nats_settings, s3_settings, kubeconfig)
    async with running_builder(settings):
        uid = await create(gateway, "broken", {"lambda_main.py": HELLO})
        name = f"kaniko-lambda-{uid}"
        await wait_job(kube, name)
        refused = (
            f"error pushing image: failed to push to destination {REGISTRY}/{NS}-broken: "
            "UNAUTHORIZED: authentication required"
        )
        pod = build_pod(
            name,
            "Failed",
            containerStatuses=[
                {"name": "kaniko", "state": {"terminated": {"reason": "Error", "exitCode": 1}}}
            ],
        )
        serve_log(kmock, pod["metadata"]["name"], ["INFO Pushing image", refused])
        await kube.create(pod)
        await finish_job(kube, name, "failed")
        state = await wait_state(bus, "broken", lambda s: s.phase == "failed")
        assert state.reason == "JobFailed"
        assert refused in state.message
        assert "Error, exit code 1" in state.message
        status = await status_of(gateway, "broken")
        assert status["image_status"] == "error"
        assert build_ready(status)["reason"] == "JobFailed"
        log = await build_log(bus, "broken")
        assert refused in [line.line for line in log if line.stream == "stdout"]


async def test_unschedulable_pod_is_pending_and_jobs_wait_for_a_slot(
    tmp_path: Path,
    gateway: RunningGateway,
    bus: Bus,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubeconfig: Path,
    kube: KubeClient,
    kmock: kmock.KubernetesEmulator,
) -> None:
    settings = settings_for(tmp_path, nats_settings, s3_settings, kubeconfig, max_build_jobs=1)
    async with running_builder(settings):
        first = await create(gateway, "first", {"lambda_main.py": HELLO})
        first_job = f"kaniko-lambda-{first}"
        await wait_job(kube, first_job)

        # -- the scheduler cannot place the build pod: pending, with its message
        scheduler = "0/3 nodes are available: 3 Insufficient memory."
        pod = build_pod(
            first_job,
            "Pending",
            conditions=[
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": scheduler,
                }
            ],
        )
        await kube.create(pod)
        await wait_state(bus, "first", lambda s: scheduler in s.message)
        status = await status_of(gateway, "first")
        assert status["image_status"] == "pending"
        assert scheduler in build_ready(status)["message"]

        # -- the limit is one Job: the second build waits, pending, without a Job
        second = await create(gateway, "second", {"lambda_main.py": HELLO + "# 2\n"})
        state = await wait_state(bus, "second", lambda s: "waiting for a build slot" in s.message)
        assert state.image_status == "pending"
        assert await kube.get(JOBS, PLATFORM_NS, f"kaniko-lambda-{second}") is None
        status = await status_of(gateway, "second")
        assert status["image_status"] == "pending"

        # -- the first finishes: the second gets its Job
        await kube.patch(
            PODS,
            PLATFORM_NS,
            pod["metadata"]["name"],
            {"status": {"phase": "Succeeded", "conditions": []}},
        )
        serve_log(kmock, pod["metadata"]["name"], ["INFO done"])
        await finish_job(kube, first_job, "succeeded")
        await wait_state(bus, "first", lambda s: s.phase == "succeeded")
        await wait_job(kube, f"kaniko-lambda-{second}")


async def test_a_refused_user_docker_command_is_400_naming_the_line(
    gateway: RunningGateway,
) -> None:
    body = {
        "name": "sneaky",
        "user_docker_commands": ["RUN pip install numpy", "COPY /etc/passwd /x"],
        "source": {"files": {"lambda_main.py": HELLO}},
    }
    resp = await gateway.http.post(f"/v1/namespaces/{NS}/functions", json=body)
    assert resp.status == 400, await resp.text()
    text = await resp.text()
    assert "user_docker_commands[1]" in text
    assert "COPY /etc/passwd /x" in text
    assert "only RUN, ENV, USER, WORKDIR" in text
    resp = await gateway.http.post(
        f"/v1/namespaces/{NS}/functions",
        json={**body, "user_docker_commands": ["RUN pip install numpy", "ENV A=1"]},
    )
    assert resp.status == 202, await resp.text()
    patched = await gateway.http.patch(
        f"/v1/namespaces/{NS}/functions/sneaky", json={"user_docker_commands": ["ADD x y"]}
    )
    assert patched.status == 400, await patched.text()
    assert "user_docker_commands[0]" in await patched.text()


async def test_api_server_5xx_is_pending_cluster_unavailable_then_retried(
    tmp_path: Path,
    gateway: RunningGateway,
    bus: Bus,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubeconfig: Path,
    kube: KubeClient,
    kmock: kmock.KubernetesEmulator,
) -> None:
    settings = settings_for(tmp_path, nats_settings, s3_settings, kubeconfig)
    settings.kube_api.retry_for = 0.3  # each call gives up after a few 503s
    unavailable = {"kind": "Status", "code": 503, "message": "etcdserver: leader changed"}
    kmock["get", kmock.resource("batch/v1/jobs")][:12] << 503 << unavailable
    async with running_builder(settings):
        uid = await create(gateway, "flaky", {"lambda_main.py": HELLO})
        state = await wait_state(bus, "flaky", lambda s: s.reason == "ClusterUnavailable")
        assert state.image_status == "pending"
        assert "503" in state.message or "leader changed" in state.message
        status = await status_of(gateway, "flaky")
        assert status["image_status"] in ("pending", "completed")
        # tried again until the API server answers: the Job is made, the build goes on
        await wait_job(kube, f"kaniko-lambda-{uid}")
        await wait_state(bus, "flaky", lambda s: s.reason == "JobCreated")
        assert len(kmock["get", kmock.resource("batch/v1/jobs")]) > 12
        assert len(kmock["post", kmock.resource("batch/v1/jobs")]) == 1


async def test_rbac_refusal_fails_the_build_naming_verb_and_resource(
    tmp_path: Path,
    gateway: RunningGateway,
    bus: Bus,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubeconfig: Path,
    kmock: kmock.KubernetesEmulator,
) -> None:
    settings = settings_for(tmp_path, nats_settings, s3_settings, kubeconfig)
    forbidden = {"kind": "Status", "code": 403, "reason": "Forbidden", "message": "no"}
    kmock["post", kmock.resource("batch/v1/jobs")] << 403 << forbidden
    async with running_builder(settings):
        await create(gateway, "denied", {"lambda_main.py": HELLO})
        state = await wait_state(bus, "denied", lambda s: s.phase == "failed")
        assert state.reason == "KubernetesForbidden"
        assert "may not create jobs.batch in namespace 'lambdabus'" in state.message
        status = await status_of(gateway, "denied")
        assert status["image_status"] == "error"


async def test_a_create_whose_answer_was_lost_is_followed_not_failed(
    tmp_path: Path,
    gateway: RunningGateway,
    bus: Bus,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubeconfig: Path,
    kube: KubeClient,
    kmock: kmock.KubernetesEmulator,
) -> None:
    # kmock stores a created object even when the reaction answers 503: as an API server whose
    # answer is lost after the write; the client's retry then meets 409.
    settings = settings_for(tmp_path, nats_settings, s3_settings, kubeconfig)
    unavailable = {"kind": "Status", "code": 503, "message": "timeout"}
    kmock["post", kmock.resource("batch/v1/jobs")][:1] << 503 << unavailable
    async with running_builder(settings):
        uid = await create(gateway, "lost", {"lambda_main.py": HELLO})
        await wait_state(bus, "lost", lambda s: s.reason == "JobCreated")
        assert len(kmock["post", kmock.resource("batch/v1/jobs")]) == 2  # 503, then 409
        await finish_job(kube, f"kaniko-lambda-{uid}", "succeeded")
        state = await wait_state(bus, "lost", lambda s: s.phase == "succeeded")
        assert state.reason == "JobFinished"


async def test_the_same_content_for_another_function_is_tagged_not_built(
    tmp_path: Path,
    gateway: RunningGateway,
    bus: Bus,
    nats_settings: NatsSettings,
    s3_settings: S3Settings,
    kubeconfig: Path,
    kube: KubeClient,
    kmock: kmock.KubernetesEmulator,
) -> None:
    async with FakeRegistry().serve() as registry:
        auth = tmp_path / "config.json"
        login = base64.b64encode(f"{registry.user}:{registry.password}".encode()).decode()
        auth.write_text(json.dumps({"auths": {registry.host: {"auth": login}}}))
        settings = settings_for(tmp_path, nats_settings, s3_settings, kubeconfig)
        settings.kube.registry = registry.host
        settings.kube.insecure_registries = [registry.host]
        settings.registry_auth_file = auth
        files = {"lambda_main.py": HELLO, "requirements.txt": "requests==2.32.3\n"}
        async with running_builder(settings):
            uid = await create(gateway, "one", files)
            job = await wait_job(kube, f"kaniko-lambda-{uid}")
            image = job["metadata"]["annotations"]["lambdabus.io/image"]
            tag = image.rpartition(":")[2]
            registry.push(f"{NS}-one", tag, [b"base layers", b"the function"])  # as Kaniko
            await finish_job(kube, f"kaniko-lambda-{uid}", "succeeded")
            await wait_state(bus, "one", lambda s: s.phase == "succeeded")

            # the same source and dependencies for another function: tagged, no Job
            await create(gateway, "two", files)
            state = await wait_state(bus, "two", lambda s: s.phase == "succeeded")
            assert state.artifact == f"{registry.host}/{NS}-two:{tag}"
            assert len(kmock["post", kmock.resource("batch/v1/jobs")]) == 1
            assert registry.manifests[(f"{NS}-two", tag)] == registry.manifests[(f"{NS}-one", tag)]
            status = await status_of(gateway, "two")
            assert status["image_status"] == "completed"
            assert "tagged as" in build_ready(status)["message"]
