"""The kubernetes build backend's pure core: Dockerfile, build context and digest, Job limit,
Job/pod states as LUNA image statuses and Kyma BuildReady reasons, user_docker_commands."""

from __future__ import annotations

import gzip
import io
import json
import shlex
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from lambdabus_builder.kubeplan import (
    JobView,
    PackageIndex,
    dockerfile,
    failure_message,
    job_pods,
    job_view,
    make_context,
    running_jobs,
    slot_free,
)
from lambdabus_events.models import (
    BuildState,
    FunctionConfig,
    FunctionRecord,
    SourceRef,
    docker_command_problem,
)
from lambdabus_platform.status import compute_status

T0 = datetime(2026, 1, 1, tzinfo=UTC)
BASE = "registry.test:5000/lambdabus-runtime-python3.11"


def record(**spec: Any) -> FunctionRecord:
    return FunctionRecord(
        namespace="default",
        name="hello",
        uid="u1",
        generation=1,
        spec=FunctionConfig(**spec),
        source=SourceRef(
            sha256="a" * 64, size=10, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=T0,
        updated_at=T0,
    )


# -- user_docker_commands --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("RUN apt-get update", None),
        ("env A=1", None),
        ("USER 1000", None),
        ("WORKDIR /x", None),
        ("COPY . /", "COPY is not allowed: only RUN, ENV, USER, WORKDIR are"),
        ("FROM alpine", "FROM is not allowed: only RUN, ENV, USER, WORKDIR are"),
        ("RUN", "RUN needs arguments"),
        ("RUN a\nFROM b", "must be one line (one Dockerfile instruction)"),
        ("   ", "is empty"),
    ],
)
def test_docker_command_problem(line: str, problem: str | None) -> None:
    assert docker_command_problem(line) == problem


def test_a_refused_command_names_its_line() -> None:
    with pytest.raises(ValidationError) as caught:
        FunctionConfig(user_docker_commands=["RUN echo ok", "ADD http://x /y"])
    text = str(caught.value)
    assert "user_docker_commands[1] 'ADD http://x /y': ADD is not allowed" in text


# -- Dockerfile and context --------------------------------------------------------------------


def test_dockerfile_installs_dependencies_then_user_commands_then_code() -> None:
    text = dockerfile(
        record(user_docker_commands=["RUN apt-get install -y curl", "ENV A=1"], handler="m.fn"),
        BASE,
        files=["lambda_main.py", "requirements.txt"],
        port=8080,
        uid=1000,
        index=PackageIndex(index_url="https://pypi.test/simple"),
    )
    lines = text.splitlines()
    assert f"FROM {BASE}" in lines
    pip = next(i for i, line in enumerate(lines) if line.startswith('RUN ["pip"'))
    assert "--index-url" in lines[pip]
    assert "https://pypi.test/simple" in lines[pip]
    user = lines.index("RUN apt-get install -y curl")
    assert lines[user + 1] == "ENV A=1"
    code = lines.index("COPY code/ /function/")
    assert pip < user < code
    assert "USER 1000:1000" in lines
    cmd = json.loads(lines[-1].removeprefix("CMD "))
    assert cmd[:2] == ["/bin/sh", "-c"]
    assert shlex.split(cmd[2]) == [
        "exec",
        "python3",
        "-m",
        "lambdabus_runtime",
        "--code",
        "/function",
        "--entrypoint",
        "lambda_main.py",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--runtime",
        "python3.11",
        "--handler",
        "fn",
        "--function",
        "$LAMBDABUS_FUNCTION",
    ]
    # nothing names the function: the same content, the same image
    assert "default" not in text
    assert "hello" not in text


def test_dockerfile_without_dependencies_installs_nothing_and_node_uses_the_lockfile() -> None:
    plain = dockerfile(record(), BASE, files=["lambda_main.py"], port=8080, uid=1000)
    assert "pip" not in plain
    node = dockerfile(
        record(runtime="nodejs20"),
        BASE,
        files=["handler.js", "package.json", "package-lock.json"],
        port=8080,
        uid=1000,
    )
    assert "COPY code/package.json code/package-lock.json /function/" in node
    assert 'RUN ["npm", "ci", "--omit=dev"' in node


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_context_is_deterministic_and_its_digest_follows_the_content(tmp_path: Path) -> None:
    files = {"lambda_main.py": "def main(r): ...\n", "pkg/sub/mod.py": "X = 1\n"}
    a = make_context(_tree(tmp_path / "a", files), "FROM x\n")
    b = make_context(_tree(tmp_path / "b", dict(reversed(files.items()))), "FROM x\n")
    assert a.data == b.data
    assert a.digest == b.digest
    assert a.files == 2
    assert len(a.tag) == 64
    other_code = make_context(_tree(tmp_path / "c", {**files, "pkg/sub/mod.py": "X=2"}), "FROM x\n")
    other_dockerfile = make_context(tmp_path / "a", "FROM y\n")
    assert len({a.digest, other_code.digest, other_dockerfile.digest}) == 3
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(a.data))) as tar:
        names = tar.getnames()
        assert names[0] == "Dockerfile"
        assert "code/lambda_main.py" in names
        assert "code/pkg/sub/mod.py" in names
        assert {m.mtime for m in tar.getmembers()} == {0}


# -- Job limit ------------------------------------------------------------------------------------


def job(name: str, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"lambdabus.io/managed-by": "lambdabus", "lambdabus.io/component": "build"},
        },
        "status": status,
    }


def test_slots_count_unfinished_build_jobs_only() -> None:
    jobs = [
        job("a", active=1),
        job("b"),
        job("c", conditions=[{"type": "Complete", "status": "True"}]),
        job("d", conditions=[{"type": "Failed", "status": "True"}]),
        {"metadata": {"name": "other"}, "status": {"active": 1}},
    ]
    assert running_jobs(jobs) == ["a", "b"]
    assert slot_free(jobs, 3, mine="x")
    assert not slot_free(jobs, 2, mine="x")
    assert slot_free(jobs, 2, mine="a")  # its own Job does not count against it


# -- Job and pod states ---------------------------------------------------------------------------


def pod(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "p", "labels": {"job-name": "kaniko-lambda-u1"}}, "status": status}


@pytest.mark.parametrize(
    ("job_obj", "pods", "expected"),
    [
        (None, [], ("not_found", "", "gone")),
        (job("kaniko-lambda-u1"), [], ("pending", "JobCreated", "running")),
        (
            job("kaniko-lambda-u1", active=1),
            [
                pod(
                    phase="Pending",
                    conditions=[
                        {
                            "type": "PodScheduled",
                            "status": "False",
                            "reason": "Unschedulable",
                            "message": "0/3 nodes are available: 3 Insufficient memory.",
                        }
                    ],
                )
            ],
            ("pending", "JobCreated", "running"),
        ),
        (
            job("kaniko-lambda-u1", active=1),
            [pod(phase="Running")],
            ("in_progress", "JobRunning", "running"),
        ),
        (
            job(
                "kaniko-lambda-u1", succeeded=1, conditions=[{"type": "Complete", "status": "True"}]
            ),
            [pod(phase="Succeeded")],
            ("completed", "JobFinished", "succeeded"),
        ),
        (
            job(
                "kaniko-lambda-u1",
                failed=1,
                conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
            ),
            [pod(phase="Failed")],
            ("error", "JobFailed", "failed"),
        ),
    ],
)
def test_job_view(
    job_obj: dict[str, Any] | None, pods: list[dict[str, Any]], expected: tuple[str, str, str]
) -> None:
    view = job_view(job_obj, pods)
    assert (view.image_status, view.reason, view.outcome) == expected


def test_unschedulable_pod_carries_the_schedulers_message() -> None:
    view = job_view(
        job("kaniko-lambda-u1", active=1),
        [
            pod(
                phase="Pending",
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient cpu.",
                    }
                ],
            )
        ],
    )
    assert "cannot be scheduled: 0/3 nodes are available: 3 Insufficient cpu." in view.message


def test_job_pods_by_label_oldest_first() -> None:
    older = {"metadata": {"labels": {"job-name": "j"}, "creationTimestamp": "2026-01-01T00:00:00Z"}}
    newer = {"metadata": {"labels": {"job-name": "j"}, "creationTimestamp": "2026-01-01T00:01:00Z"}}
    other = {"metadata": {"labels": {"job-name": "k"}}}
    assert job_pods([newer, other, older], "j") == [older, newer]


def test_failure_message_has_kanikos_last_lines_and_the_exit() -> None:
    view = JobView("error", "JobFailed", "build Job j failed: BackoffLimitExceeded", "failed")
    failed_pod = pod(
        phase="Failed",
        containerStatuses=[{"state": {"terminated": {"reason": "Error", "exitCode": 1}}}],
    )
    lines = ["INFO[0001] Pushing image", "error pushing image: failed to push to destination"]
    text = failure_message(view, failed_pod, lines)
    assert "(Error, exit code 1)" in text
    assert text.endswith(
        "Kaniko: INFO[0001] Pushing image | error pushing image: failed to push to destination"
    )


# -- status: the backend's image status and reasons -------------------------------------------


def test_status_takes_the_backends_image_status_and_reason() -> None:
    rec = record()
    state = BuildState(
        namespace="default",
        name="hello",
        uid="u1",
        generation=1,
        phase="started",
        source_sha256="a" * 64,
        runtime="python3.11",
        reason="JobCreated",
        message="build Job x: its pod cannot be scheduled: no",
        image_status="pending",
        updated_at=T0,
    )
    status = compute_status(rec, state, None)
    assert status.image_status == "pending"
    build = next(c for c in status.conditions if c.type == "BuildReady")
    assert (build.reason, build.status) == ("JobCreated", "Unknown")
    done = state.model_copy(
        update={
            "phase": "succeeded",
            "image_status": None,
            "reason": "JobFinished",
            "artifact": "x",
        }
    )
    status = compute_status(rec, done, None)
    build = next(c for c in status.conditions if c.type == "BuildReady")
    assert (status.image_status, build.reason, build.status) == ("completed", "JobFinished", "True")


def test_kubernetes_builds_take_the_job_limit_and_the_job_deadline() -> None:
    from lambdabus_builder.service import _slots_for
    from lambdabus_builder.settings import BuilderSettings

    local = BuilderSettings(backend="local", max_concurrent_builds=2, build_timeout=600)
    assert _slots_for(local) is local
    kube = _slots_for(BuilderSettings(backend="kubernetes", max_concurrent_builds=2))
    assert kube.max_concurrent_builds == kube.max_build_jobs == 5
    assert kube.build_timeout >= kube.kube.build_deadline
