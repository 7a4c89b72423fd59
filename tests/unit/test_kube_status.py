"""`kubestatus.fold`: what a function's Deployment and Pods say becomes the deployment phase,
Kyma's `Running` reason and LUNA's lambda status. Pure: no cluster."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from lambdabus_deployer.kubestatus import fold, view_pod
from lambdabus_deployer.plan import DesiredRevision, desired_instances, next_deployment_state
from lambdabus_events.models import BuildState, FunctionConfig, FunctionRecord, SourceRef
from lambdabus_platform.status import compute_status

NOW = datetime(2026, 12, 1, tzinfo=UTC)
ENDPOINT = "http://lambda-u.team.svc.cluster.local:80"


def record(**config: Any) -> FunctionRecord:
    return FunctionRecord(
        namespace="team",
        name="hello",
        uid="u",
        generation=1,
        spec=FunctionConfig(**config),
        source=SourceRef(sha256="a" * 64, size=1, kind="inline", entrypoint="x.py", files=1),
        created_at=NOW,
        updated_at=NOW,
    )


def desired(rec: FunctionRecord) -> DesiredRevision:
    build = BuildState(
        namespace="team",
        name="hello",
        uid="u",
        generation=1,
        phase="succeeded",
        artifact="registry/x:1",
        updated_at=NOW,
    )
    found = desired_instances(rec, build)
    assert found is not None
    return found


def pod(name: str = "p1", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": status}


READY: dict[str, Any] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
STARTING: dict[str, Any] = {
    "phase": "Pending",
    "containerStatuses": [
        {"name": "function", "state": {"waiting": {"reason": "ContainerCreating"}}}
    ],
}
UNSCHEDULABLE: dict[str, Any] = {
    "phase": "Pending",
    "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no GPU"}
    ],
}


def crash(reason: str, last: str = "Error", code: int = 1) -> dict[str, Any]:
    return {
        "phase": "Running",
        "containerStatuses": [
            {
                "name": "function",
                "restartCount": 3,
                "state": {"waiting": {"reason": reason}},
                "lastState": {"terminated": {"reason": last, "exitCode": code}},
            }
        ],
    }


def luna(rec: FunctionRecord, pods: list[dict[str, Any]], **kw: Any) -> tuple[str, str, str]:
    observation = fold(desired(rec), kw.pop("deployment", None), pods, endpoint=ENDPOINT, **kw)
    state = next_deployment_state(None, observation, NOW).state
    status = compute_status(rec, None, state)
    running = next(c for c in status.conditions if c.type == "Running")
    return status.status, running.reason, running.message


@pytest.mark.parametrize(
    ("pods", "kw", "expected"),
    [
        ([], {}, ("waiting", "DeploymentCreated")),
        (
            [],
            {"applied": "HorizontalPodAutoscalerCreated"},
            ("waiting", "HorizontalPodAutoscalerCreated"),
        ),
        ([pod(**STARTING)], {}, ("waiting", "DeploymentWaiting")),
        ([pod(**READY)], {}, ("running", "DeploymentReady")),
        (
            [pod(**READY)],
            {"fresh": True, "applied": "DeploymentUpdated"},
            ("running", "DeploymentUpdated"),
        ),
        ([pod(**UNSCHEDULABLE)], {}, ("pending", "PodUnschedulable")),
        ([pod(**crash("CrashLoopBackOff"))], {}, ("terminated", "DeploymentFailed")),
        (
            [pod(**crash("CrashLoopBackOff", "OOMKilled", 137))],
            {},
            ("terminated", "DeploymentFailed"),
        ),
        ([pod(**crash("ImagePullBackOff"))], {}, ("terminated", "DeploymentFailed")),
        ([pod(**READY)], {"unavailable": "connection refused"}, ("pending", "ClusterUnavailable")),
        (
            [],
            {"error": ("KubernetesForbidden", "may not create")},
            ("terminated", "KubernetesForbidden"),
        ),
    ],
)
def test_pods_make_the_luna_status_and_kyma_reason(
    pods: list[dict[str, Any]], kw: dict[str, Any], expected: tuple[str, str]
) -> None:
    status, reason, _ = luna(record(), pods, **kw)
    assert (status, reason) == expected


def test_messages_say_why() -> None:
    _, _, message = luna(record(), [pod(**UNSCHEDULABLE)])
    assert message == "no GPU"
    _, _, message = luna(record(), [pod(**crash("CrashLoopBackOff", "OOMKilled", 137))])
    assert "pod p1: CrashLoopBackOff" in message
    assert "OOMKilled (exit code 137)" in message


def test_one_ready_pod_of_two_runs_but_waits_for_the_rest() -> None:
    status, reason, message = luna(
        record(replicas=2, max_replicas=2), [pod("a", **READY), pod("b", **STARTING)]
    )
    assert (status, reason) == ("running", "DeploymentWaiting")
    assert message.startswith("1/2 pods ready")


def test_a_deployment_past_its_progress_deadline_fails() -> None:
    deployment = {
        "status": {
            "conditions": [
                {
                    "type": "Progressing",
                    "status": "False",
                    "reason": "ProgressDeadlineExceeded",
                    "message": "slow",
                }
            ]
        }
    }
    status, reason, message = luna(record(), [pod(**STARTING)], deployment=deployment)
    assert (status, reason) == ("terminated", "DeploymentFailed")
    assert "ProgressDeadlineExceeded" in message


def test_a_rollout_in_progress_is_not_ready_yet() -> None:
    deployment = {
        "metadata": {"generation": 3},
        "status": {"observedGeneration": 2},
        "spec": {"replicas": 1},
    }
    status, reason, _ = luna(record(), [pod(**READY)], deployment=deployment)
    assert (status, reason) == ("running", "DeploymentWaiting")


def test_endpoint_only_while_a_pod_is_ready() -> None:
    rev = desired(record())
    assert fold(rev, None, [pod(**STARTING)], endpoint=ENDPOINT).endpoints == ()
    assert fold(rev, None, [pod(**READY)], endpoint=ENDPOINT).endpoints == (ENDPOINT,)


def test_pod_statuses_per_pod() -> None:
    view = view_pod(pod(**crash("CrashLoopBackOff")), generation=1)
    assert (view.instance.phase, view.instance.restarts) == ("backoff", 3)
    assert view.instance.last_exit == "Error (exit code 1)"
    assert view_pod(pod(**READY), generation=1).instance.phase == "ready"
    assert view_pod(pod(phase="Failed", reason="Evicted"), generation=1).instance.phase == "crashed"
