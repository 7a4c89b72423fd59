"""What a function's Deployment and Pods say, folded into what the deployer reports (LUNA's
lambda statuses through the deployment phase, Kyma's `Running` reasons). Pure: no I/O.

- a pod Running and Ready → an instance `ready`; one ready pod makes the function `ready`
  (LUNA `running`), reason `DeploymentReady` once all are, else `DeploymentWaiting`;
- pods that start → `started` with `DeploymentWaiting` (or the step just applied:
  `DeploymentCreated`, `DeploymentUpdated`, `ServiceCreated`, `HorizontalPodAutoscalerCreated`)
  → LUNA `waiting`;
- a pod the scheduler cannot place (a GPU the cluster lacks) → `started` with
  `PodUnschedulable` and the scheduler's message → LUNA `pending`;
- CrashLoopBackOff, ImagePullBackOff/ErrImagePull, an OOM kill, a Deployment past its progress
  deadline → `failed` with `DeploymentFailed` and the reason → LUNA `terminated`;
- an API server out of reach → `started` with `ClusterUnavailable` → LUNA `pending`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lambdabus_deployer.plan import DesiredRevision, Observation, Reported
from lambdabus_events.models import InstancePhase, InstanceState

Obj = Mapping[str, Any]

REASON_CREATED = "DeploymentCreated"
REASON_UPDATED = "DeploymentUpdated"
REASON_WAITING = "DeploymentWaiting"
REASON_READY = "DeploymentReady"
REASON_FAILED = "DeploymentFailed"
REASON_SERVICE = "ServiceCreated"
REASON_HPA = "HorizontalPodAutoscalerCreated"
REASON_UNSCHEDULABLE = "PodUnschedulable"
REASON_UNAVAILABLE = "ClusterUnavailable"
REASON_FORBIDDEN = "KubernetesForbidden"
REASON_UNSUPPORTED = "ArtifactUnsupported"

# A container waiting for one of these will not start by waiting longer.
FATAL_WAITING = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerError",
        "RunContainerError",
    }
)


@dataclass(frozen=True)
class PodView:
    """One pod as the deployer reads it."""

    name: str
    instance: InstanceState
    ready: bool
    fatal: str = ""  # why it cannot run: "CrashLoopBackOff: ..." ("" when none)
    unschedulable: str = ""  # the scheduler's message ("" when placed)


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _terminated(state: Obj) -> str:
    done = state.get("terminated") or {}
    if not done:
        return ""
    reason = done.get("reason") or "Error"
    code = done.get("exitCode")
    return f"{reason} (exit code {code})" if code is not None else str(reason)


def view_pod(pod: Obj, generation: int) -> PodView:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    name = str(meta.get("name", ""))
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = (conditions.get("Ready") or {}).get("status") == "True" and not meta.get(
        "deletionTimestamp"
    )
    scheduled = conditions.get("PodScheduled") or {}
    unschedulable = ""
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        unschedulable = str(scheduled.get("message") or "the scheduler cannot place the pod")
    containers = status.get("containerStatuses") or []
    restarts = sum(int(c.get("restartCount") or 0) for c in containers)
    fatal, last_exit, waiting_reason = "", "", ""
    started_at = _time(status.get("startTime"))
    running = False
    for container in containers:
        state = container.get("state") or {}
        last = _terminated(container.get("lastState") or {}) or _terminated(state)
        last_exit = last_exit or last
        if state.get("running"):
            running = True
            started_at = _time(state["running"].get("startedAt")) or started_at
        waiting = state.get("waiting") or {}
        reason = str(waiting.get("reason") or "")
        waiting_reason = waiting_reason or reason
        if reason in FATAL_WAITING and not fatal:
            detail = str(waiting.get("message") or "")
            fatal = reason + (f": {detail}" if detail else "")
            if last:
                fatal += f" (last exit: {last})"
        if "OOMKilled" in last and not fatal and not state.get("running"):
            fatal = f"OOMKilled: the container used more than its memory limit ({last})"
    phase_of_pod = status.get("phase")
    phase: InstancePhase
    if ready:
        phase = "ready"
    elif phase_of_pod == "Failed":
        phase = "crashed"
    elif phase_of_pod == "Succeeded" or meta.get("deletionTimestamp"):
        phase = "stopped"
    elif fatal or waiting_reason in FATAL_WAITING:
        phase = "backoff"
    elif running:
        phase = "unhealthy" if restarts else "starting"
    else:
        phase = "starting"
    if phase_of_pod == "Failed" and not fatal:
        fatal = f"pod failed: {status.get('reason') or last_exit or 'Error'}"
    instance = InstanceState(
        id=name,
        generation=generation,
        phase=phase,
        restarts=restarts,
        last_exit=last_exit,
        started_at=started_at,
    )
    return PodView(name, instance, ready, fatal, unschedulable)


def _deployment_failure(deployment: Obj | None) -> str:
    for condition in (deployment or {}).get("status", {}).get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("status") == "False":
            return f"{condition.get('reason') or 'ProgressFailed'}: {condition.get('message', '')}"
    return ""


def fold(
    desired: DesiredRevision,
    deployment: Obj | None,
    pods: Iterable[Obj],
    *,
    endpoint: str,
    applied: str = REASON_CREATED,
    unavailable: str = "",
    error: tuple[str, str] | None = None,
    fresh: bool = False,
) -> Observation:
    """The observation of one function from its Deployment and Pods. `applied`: the reason of
    the last step the backend took (while no pod runs yet); `unavailable`: why the API server
    cannot be reached now ("" when it can); `error`: a (reason, message) that fails it (403);
    `fresh`: the step was just taken and the cluster has not answered since (its reason shows
    even while older pods run)."""
    views = sorted((view_pod(p, desired.generation) for p in pods), key=lambda v: v.name)
    ready = sum(1 for v in views if v.ready)
    instances = tuple(v.instance for v in views)
    endpoints = (endpoint,) if ready else ()
    replicas = desired.replicas
    fatal = [f"pod {v.name}: {v.fatal}" for v in views if v.fatal]
    deadline = _deployment_failure(deployment)
    reported: Reported
    if error is not None:
        reported = Reported("failed", error[0], error[1], ready)
    elif unavailable:
        reported = Reported(
            "started",
            REASON_UNAVAILABLE,
            f"the Kubernetes API server cannot be reached; retrying: {unavailable}",
            ready,
        )
    elif replicas == 0:
        reported = Reported("scaled", "ScaledToZero", "scaled to 0 instances", 0)
    elif fatal or deadline:
        reported = Reported(
            "failed", REASON_FAILED, "; ".join([*fatal, *filter(None, [deadline])]), ready
        )
    elif ready:
        complete = ready >= replicas and _rolled_out(deployment)
        message = f"{ready}/{replicas} pods ready"
        unplaced = [v.unschedulable for v in views if v.unschedulable]
        if unplaced:
            message += f"; a pod cannot be scheduled: {unplaced[0]}"
        reason = REASON_READY if complete else REASON_WAITING
        if fresh and applied == REASON_UPDATED:
            reason = REASON_UPDATED  # the new template rolls out over the running pods
        reported = Reported("ready", reason, message, ready)
    elif any(v.unschedulable for v in views):
        message = next(v.unschedulable for v in views if v.unschedulable)
        reported = Reported("started", REASON_UNSCHEDULABLE, message, 0)
    elif views and not fresh:
        reported = Reported("started", REASON_WAITING, f"0/{replicas} pods ready", 0)
    else:
        reported = Reported("started", applied, _applied_message(applied, replicas), 0)
    return Observation(
        revision=desired,
        instances=instances,
        endpoints=endpoints,
        rolling_out=False,
        failure=None,
        sandboxed=True,
        serving_revision=desired.revision,
        reported=reported,
    )


def _rolled_out(deployment: Obj | None) -> bool:
    if deployment is None:
        return True
    meta = deployment.get("metadata") or {}
    status = deployment.get("status") or {}
    spec = deployment.get("spec") or {}
    observed = status.get("observedGeneration")
    generation = meta.get("generation")
    if observed is not None and generation is not None and int(observed) < int(generation):
        return False
    updated = status.get("updatedReplicas")
    return updated is None or int(updated) >= int(spec.get("replicas") or 0)


def _applied_message(reason: str, replicas: int) -> str:
    return {
        REASON_CREATED: f"Deployment created; waiting for {replicas} pod(s)",
        REASON_UPDATED: f"Deployment updated; waiting for {replicas} pod(s)",
        REASON_SERVICE: "Service created; waiting for the pods",
        REASON_HPA: "HorizontalPodAutoscaler created; waiting for the pods",
    }.get(reason, "waiting for the pods")
