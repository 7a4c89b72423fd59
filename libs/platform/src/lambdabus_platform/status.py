"""How a function's status follows from the records the services own. Pure: no I/O.

The gateway reads the function record (its own), the build state (the builder's) and the
deployment state (the deployer's) and folds them into the LUNA image/lambda statuses and Kyma's
three conditions. A state for an older generation counts as "not yet" for the current one.
"""

from __future__ import annotations

from typing import Literal

from lambdabus_events.models import (
    BuildState,
    Condition,
    DeploymentState,
    FunctionRecord,
    FunctionStatus,
    ImageStatus,
    InstanceState,
    LambdaStatus,
    PodStatus,
    PresetsApplied,
)


def _build_condition(
    record: FunctionRecord, build: BuildState | None
) -> tuple[ImageStatus, Condition]:
    gen = record.generation
    if build is None or build.uid != record.uid or build.generation < gen:
        return "pending", Condition(
            type="BuildReady",
            status="Unknown",
            reason="BuildPending",
            message=f"generation {gen} is waiting for the builder",
        )
    image, condition = _phase_condition(gen, build)
    # A backend that sees more than the phase (the kubernetes one: a build Job waiting for a
    # slot or a node, or gone) says so; its reason is Kyma's (JobCreated, JobRunning, ...).
    return build.image_status or image, condition


def _phase_condition(gen: int, build: BuildState) -> tuple[ImageStatus, Condition]:
    match build.phase:
        case "queued":
            return "pending", Condition(
                type="BuildReady",
                status="Unknown",
                reason=build.reason or "BuildQueued",
                message=build.message or f"generation {gen} is queued for a build",
                last_transition_time=build.updated_at,
            )
        case "started":
            return "in_progress", Condition(
                type="BuildReady",
                status="Unknown",
                reason=build.reason or "BuildInProgress",
                message=build.message or f"generation {gen} is building",
                last_transition_time=build.updated_at,
            )
        case "failed":
            return "error", Condition(
                type="BuildReady",
                status="False",
                reason=build.reason or "BuildFailed",
                message=build.message,
                last_transition_time=build.updated_at,
            )
        case "succeeded":
            return "completed", Condition(
                type="BuildReady",
                status="True",
                reason=build.reason or "BuildSucceeded",
                message=build.message or f"generation {gen} built",
                last_transition_time=build.updated_at,
            )


# Kyma's `Running` reasons, as the kubernetes backend reports them (issue 10): while these
# hold and no pod runs yet, the function is `waiting` (LUNA: its pods start); a `started`
# deployment with another reason (a pod the scheduler cannot place, an unreachable cluster, a
# secret missing) is `pending`.
KYMA_RUNNING_REASONS = frozenset(
    {
        "DeploymentCreated",
        "DeploymentUpdated",
        "DeploymentWaiting",
        "DeploymentReady",
        "DeploymentFailed",
        "ServiceCreated",
        "HorizontalPodAutoscalerCreated",
    }
)
KYMA_WAITING_REASONS = KYMA_RUNNING_REASONS - {"DeploymentReady", "DeploymentFailed"}


def _running_condition(
    record: FunctionRecord, image: ImageStatus, deployment: DeploymentState | None
) -> tuple[LambdaStatus, Condition]:
    if deployment is None or deployment.uid != record.uid:
        if image == "error":
            return "waiting", Condition(
                type="Running",
                status="False",
                reason="BuildFailed",
                message="nothing to run: the build failed",
            )
        return "waiting", Condition(
            type="Running",
            status="Unknown",
            reason="DeploymentPending",
            message="waiting for a successful build to deploy",
        )
    when = deployment.updated_at
    match deployment.phase:
        case "ready" | "scaled":
            if deployment.ready_replicas > 0 or record.spec.replicas == 0:
                return "running", Condition(
                    type="Running",
                    status="True",
                    reason=deployment.reason
                    if deployment.reason in KYMA_RUNNING_REASONS
                    else "Running",
                    message=deployment.message
                    or f"{deployment.ready_replicas}/{deployment.replicas} instances ready",
                    last_transition_time=when,
                )
            return "pending", Condition(
                type="Running",
                status="Unknown",
                reason="InstancesStarting",
                message=deployment.message,
                last_transition_time=when,
            )
        case "started":
            waiting = deployment.reason in KYMA_WAITING_REASONS
            return "waiting" if waiting else "pending", Condition(
                type="Running",
                status="Unknown",
                reason=deployment.reason or "Deploying",
                message=deployment.message,
                last_transition_time=when,
            )
        case "failed":
            return "terminated", Condition(
                type="Running",
                status="False",
                reason=deployment.reason or "DeploymentFailed",
                message=deployment.message,
                last_transition_time=when,
            )
        case "stopped":
            return "terminated", Condition(
                type="Running",
                status="False",
                reason=deployment.reason or "Stopped",
                message=deployment.message,
                last_transition_time=when,
            )


def _configuration_condition(record: FunctionRecord) -> Condition:
    git = record.source.git
    if git is not None and git.reason:
        # Kyma's reasons for a git-sourced function: the last poll of its reference.
        return Condition(
            type="ConfigurationReady",
            status="True" if git.reason == "SourceUpdated" else "False",
            reason=git.reason,
            message=git.message,
            last_transition_time=git.checked_at,
        )
    return Condition(
        type="ConfigurationReady",
        status="True",
        reason="ConfigurationStored",
        message=f"spec and source of generation {record.generation} stored",
        last_transition_time=record.updated_at,
    )


def compute_status(
    record: FunctionRecord, build: BuildState | None, deployment: DeploymentState | None
) -> FunctionStatus:
    config = _configuration_condition(record)
    image, build_cond = _build_condition(record, build)
    status, running_cond = _running_condition(record, image, deployment)
    current = deployment if deployment is not None and deployment.uid == record.uid else None
    replicas = current.replicas if current else 0
    ready = current.ready_replicas if current else 0
    message = next(
        (c.message for c in (build_cond, running_cond) if c.status == "False" and c.message), ""
    )
    summary = f"{status} ({ready}/{replicas} replicas ready)"
    if image == "error" and status == "running":  # the previous generation still serves
        summary += f"; generation {record.generation} failed: {_why(build_cond)}"
    elif image == "error":
        summary = f"failed: {_why(build_cond)}"
    elif current is not None and current.phase == "failed":
        summary = f"failed: {_why(running_cond)}"
    return FunctionStatus(
        summary=summary,
        namespace=record.namespace,
        name=record.name,
        generation=record.generation,
        image_status=image,
        status=status,
        conditions=[config, build_cond, running_cond],
        replicas=replicas,
        ready_replicas=ready,
        message=message,
        limits=current.limits if current else None,
        presets=presets_applied(record),
        pod_statuses=pod_statuses(current.instances if current else []),
    )


# -- Kyma presets and LUNA pod statuses


def presets_applied(record: FunctionRecord) -> PresetsApplied:
    spec = record.spec
    return PresetsApplied(
        resources=spec.resources_preset,
        replicas=spec.replicas_preset,
        build=spec.build_preset,
        overridden=list(spec.preset_overrides),
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
    )


_POD_STATUS: dict[str, Literal["running", "waiting", "terminated"]] = {
    "ready": "running",
    "starting": "waiting",
    "unhealthy": "waiting",
    "backoff": "waiting",
    "stopped": "terminated",
    "crashed": "terminated",
}


def pod_statuses(instances: list[InstanceState]) -> dict[str, PodStatus]:
    """LUNA's `pod_statuses`: one entry per instance the deployer reports, keyed by its id."""
    return {
        i.id: PodStatus(
            status=_POD_STATUS[i.phase],
            phase=i.phase,
            generation=i.generation,
            restarts=i.restarts,
            started_at=i.started_at,
            last_exit=i.last_exit,
        )
        for i in instances
    }


def _why(condition: Condition) -> str:
    """A failed condition's reason for a person: its message's first line, else its reason."""
    first = next((line.strip() for line in condition.message.splitlines() if line.strip()), "")
    if first and condition.reason and condition.reason not in first:
        return f"{condition.reason}: {first}"
    return first or condition.reason


def not_found_status(namespace: str, name: str) -> dict[str, object]:
    """The status body for a function that does not exist (LUNA's not_found statuses)."""
    return {
        "namespace": namespace,
        "name": name,
        "image_status": "not_found",
        "status": "not_found",
        "conditions": [],
    }
