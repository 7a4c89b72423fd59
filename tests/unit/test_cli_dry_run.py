"""`lambdabus deploy DIR --name N --dry-run -o yaml --backend kubernetes`: the Kubernetes
objects the function would become, printed without a request to the gateway, each valid
against the Kubernetes JSON schemas."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from lambdabus_platform.kube.settings import MIN_KUBERNETES_VERSION
from tests.unit.test_cli import FakeGateway, function_dir, gateway, run_cli

__all__ = ["function_dir", "gateway"]  # fixtures


async def test_dry_run_prints_valid_kubernetes_objects_and_sends_nothing(
    gateway: FakeGateway,
    function_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAMBDABUS_REGISTRY", "registry.example:5000")
    code = await run_cli(
        "--url", gateway.url, "-n", "team-a", "deploy", str(function_dir), "--name", "hello",
        "--env", "GREETING=hi", "--label", "team=payments", "--resources-preset", "L",
        "--replicas-preset", "M", "--build-preset", "fast",
        "--dry-run", "-o", "yaml", "--backend", "kubernetes",
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert gateway.requests == []  # nothing asked, uploaded or applied
    objects = [doc for doc in yaml.safe_load_all(out) if doc]
    kinds = {obj["kind"] for obj in objects}
    assert {"Job", "Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds
    for obj in objects:
        kubernetes_validate.validate(obj, MIN_KUBERNETES_VERSION, strict=True)
    by_kind = {obj["kind"]: obj for obj in objects}
    deployment = by_kind["Deployment"]
    assert deployment["metadata"]["namespace"] == "team-a"
    assert deployment["metadata"]["labels"]["team"] == "payments"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"].startswith("registry.example:5000/team-a-hello:")
    assert container["resources"]["limits"] == {"cpu": "200m", "memory": "256Mi"}  # preset L
    assert "hi" not in json.dumps(container)  # the env is in the Secret only
    assert by_kind["Secret"]["stringData"] == {"GREETING": "hi"}
    hpa = by_kind["HorizontalPodAutoscaler"]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 2)  # replicas preset M
    job = by_kind["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert job["resources"]["limits"] == {"cpu": "1700m", "memory": "1700Mi"}  # build preset fast


async def test_dry_run_as_json_is_a_list(
    gateway: FakeGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_cli(
        "--url", gateway.url, "deploy", str(function_dir), "--name", "hello",
        "--dry-run", "-o", "json", "--backend", "kubernetes",
    )  # fmt: skip
    out, _ = capsys.readouterr()
    assert code == 0
    listed = json.loads(out)
    assert listed["kind"] == "List"
    assert [
        item["metadata"]["namespace"] for item in listed["items"] if item["kind"] == "Service"
    ] == ["default"]
    assert gateway.requests == []


async def test_dry_run_with_a_bad_spec_fails_without_a_traceback(
    gateway: FakeGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_cli(
        "--url", gateway.url, "deploy", str(function_dir), "--name", "hello",
        "--memory", "lots", "--dry-run", "--backend", "kubernetes",
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2
    assert "memory" in err
    assert "Traceback" not in err
    assert out == ""
    assert gateway.requests == []


async def test_dry_run_for_the_local_backend_prints_the_spec(
    gateway: FakeGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_cli(
        "--url", gateway.url, "deploy", str(function_dir), "--name", "hello", "--dry-run"
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert "--backend kubernetes" in err
    spec = yaml.safe_load(out)
    assert (spec["name"], spec["memory"], spec["runtime"]) == ("hello", 128, "python3.11")
    assert gateway.requests == []
