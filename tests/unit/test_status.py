"""The status line a person reads: a failed build or deployment says `failed: <reason>`, not
`waiting (0/0 replicas ready)`."""

from __future__ import annotations

from datetime import UTC, datetime

from lambdabus_events.models import (
    BuildState,
    DeploymentState,
    FunctionConfig,
    FunctionRecord,
    GitSourceState,
    SourceRef,
)
from lambdabus_platform.status import compute_status

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _record(generation: int = 2) -> FunctionRecord:
    return FunctionRecord(
        namespace="default",
        name="hello",
        uid="u1",
        generation=generation,
        spec=FunctionConfig(),
        source=SourceRef(
            sha256="a" * 64, size=10, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=NOW,
        updated_at=NOW,
    )


def _build(phase: str, generation: int = 2, **fields: str) -> BuildState:
    return BuildState.model_validate(
        {"namespace": "default", "name": "hello", "uid": "u1", "generation": generation,
         "phase": phase, "updated_at": NOW, **fields}
    )  # fmt: skip


def _deployment(phase: str, generation: int = 2, ready: int = 1, **fields: str) -> DeploymentState:
    return DeploymentState.model_validate(
        {"namespace": "default", "name": "hello", "uid": "u1", "generation": generation,
         "phase": phase, "replicas": 1, "ready_replicas": ready, "updated_at": NOW, **fields}
    )  # fmt: skip


def test_a_failed_build_reads_failed_with_its_reason() -> None:
    build = _build(
        "failed",
        reason="DependencyInstallFailed",
        message="pip could not resolve nosuchpkg\n  more detail",
    )
    status = compute_status(_record(), build, None)
    assert status.summary == "failed: DependencyInstallFailed: pip could not resolve nosuchpkg"
    bare = compute_status(_record(), _build("failed", reason="BuildTimeout"), None)
    assert bare.summary == "failed: BuildTimeout"


def test_a_failed_build_over_a_running_generation_says_both() -> None:
    build = _build("failed", reason="SyntaxError", message="SyntaxError in lambda_main.py")
    status = compute_status(_record(), build, _deployment("ready", generation=1))
    assert status.summary == (
        "running (1/1 replicas ready); generation 2 failed: SyntaxError in lambda_main.py"
    )


def test_a_failed_deployment_reads_failed_with_its_reason() -> None:
    deployment = _deployment("failed", ready=0, reason="CrashLoop", message="exited with code 3")
    status = compute_status(_record(), _build("succeeded"), deployment)
    assert status.summary == "failed: CrashLoop: exited with code 3"


def test_a_healthy_function_reads_its_replicas() -> None:
    status = compute_status(_record(), _build("succeeded"), _deployment("ready"))
    assert status.summary == "running (1/1 replicas ready)"
    stopped = compute_status(_record(), _build("succeeded"), _deployment("stopped", ready=0))
    assert stopped.summary == "terminated (0/1 replicas ready)"


def _git_record(reason: str, message: str) -> FunctionRecord:
    record = _record()
    git = GitSourceState(
        url="https://git.example.com/r.git",
        reference="main",
        commit="c" * 40,
        reason=reason,  # type: ignore[arg-type]
        message=message,
        checked_at=NOW,
    )
    source = record.source.model_copy(update={"kind": "git", "git": git})
    return record.model_copy(update={"source": source})


def test_configuration_ready_of_a_git_source_is_its_last_poll() -> None:
    ok = compute_status(_git_record("SourceUpdated", "main is at commit cccccccccccc"), None, None)
    config = ok.conditions[0]
    assert (config.type, config.status, config.reason) == (
        "ConfigurationReady",
        "True",
        "SourceUpdated",
    )
    assert config.message == "main is at commit cccccccccccc"
    failed = compute_status(
        _git_record("SourceUpdateFailed", "cannot update from main: no branch"), None, None
    )
    config = failed.conditions[0]
    assert (config.status, config.reason) == ("False", "SourceUpdateFailed")
    assert "no branch" in config.message
    assert compute_status(_record(), None, None).conditions[0].reason == "ConfigurationStored"


# -- Kyma presets and LUNA pod statuses


def test_pod_statuses_have_one_entry_per_instance_in_lunas_terms() -> None:
    started = datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)
    instances = [
        {"id": "hello-a", "generation": 2, "phase": "ready", "restarts": 2,
         "last_exit": "exited with code 3", "started_at": started},
        {"id": "hello-b", "generation": 2, "phase": "backoff", "restarts": 0},
        {"id": "hello-c", "generation": 2, "phase": "crashed", "restarts": 5},
    ]  # fmt: skip
    deployment = DeploymentState.model_validate(
        {**_deployment("ready").model_dump(), "instances": instances}
    )
    pods = compute_status(_record(), _build("succeeded"), deployment).pod_statuses
    assert {k: (p.status, p.phase, p.restarts) for k, p in pods.items()} == {
        "hello-a": ("running", "ready", 2),
        "hello-b": ("waiting", "backoff", 0),
        "hello-c": ("terminated", "crashed", 5),
    }
    assert pods["hello-a"].started_at == started
    assert pods["hello-a"].last_exit == "exited with code 3"
    assert compute_status(_record(), _build("succeeded"), None).pod_statuses == {}


def test_the_status_names_the_presets_and_the_overrides() -> None:
    record = _record().model_copy(
        update={"spec": FunctionConfig.model_validate({"replicas_preset": "L", "cpu": 300})}
    )
    presets = compute_status(record, None, None).presets
    assert presets is not None
    assert (presets.resources, presets.replicas, presets.build) == ("M", "L", "normal")
    assert (presets.min_replicas, presets.max_replicas, presets.overridden) == (1, 5, ["cpu"])
