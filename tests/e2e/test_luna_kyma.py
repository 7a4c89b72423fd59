"""LUNA extras and Kyma presets through `lambdabus up`: a LUNA lambda that bundles its own
`run.py` and `luna_lambda_tools/` (ours replace them, the build log says so) and documentation
(served under a CSP that runs no script), its presets in the status and `describe`, and LUNA's
`pod_statuses`: one entry per instance, restarts counting up after each crash."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Platform
from tests.e2e.helpers import cli, http, offline_platform, status_of, wait_for, wait_running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FN = "/v1/namespaces/default/functions"
HTML = "<!doctype html><h1>Echo</h1><script>alert(1)</script>\n"
YAML = "openapi: 3.0.0\ninfo: {title: echo, version: '1'}\n"
MAIN = """import os

from luna_lambda_tools import StandaloneLambdaRequest


async def main(request: StandaloneLambdaRequest) -> dict:
    body = request.json or {}
    if body.get("crash"):
        os._exit(3)
    return {"result": body.get("data"), "request": StandaloneLambdaRequest.__name__}
"""
# What the archive bundles under LUNA's reserved names: would break the function if kept.
BOGUS_TOOLS = 'raise ImportError("the bundled luna_lambda_tools must not be used")\n'
BOGUS_RUN = 'raise SystemExit("the bundled run.py must not be used")\n'


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    running = offline_platform(tmp_path_factory, "luna-kyma")
    yield from running


def _lambda(root: Path, *, docs: bool) -> Path:
    root.mkdir(parents=True)
    (root / "lambda_main.py").write_text(MAIN)
    (root / "run.py").write_text(BOGUS_RUN)
    (root / "luna_lambda_tools").mkdir()
    (root / "luna_lambda_tools" / "__init__.py").write_text(BOGUS_TOOLS)
    if docs:
        (root / "docs").mkdir()
        (root / "docs" / "lambda.html").write_text(HTML)
        (root / "docs" / "lambda.yml").write_text(YAML)
    return root


def _get(platform: Platform, path: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(platform.urls["gateway"] + path, headers=platform.auth)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _pods(platform: Platform, name: str) -> dict[str, Any]:
    pods: dict[str, Any] = status_of(platform, name).get("pod_statuses") or {}
    return pods


@pytest.fixture(scope="module")
def documented(platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> str:
    source = _lambda(tmp_path_factory.mktemp("documented") / "fn", docs=True)
    deployed = cli(
        platform,
        "deploy",
        str(source),
        "--name",
        "documented",
        "--resources-preset",
        "L",
        "--memory",
        "200Mi",
        "--replicas",
        "2",
    )
    assert deployed.returncode == 0, deployed.stderr + deployed.stdout
    wait_running(platform, "documented")
    return "documented"


def test_reserved_files_are_replaced_and_the_build_log_says_so(
    platform: Platform, documented: str
) -> None:
    invoked = http("POST", f"{platform.urls['router']}/default/{documented}", {"data": 7})
    assert invoked == (200, {"result": 7, "request": "Request"})
    _, log = http("GET", f"{platform.urls['gateway']}{FN}/{documented}/build/logs")
    text = log if isinstance(log, str) else str(log)
    assert "the archive's run.py and luna_lambda_tools/ replaced by Lambdabus's own" in text
    assert "build preset normal: 700m/700Mi requested, 1100m/1100Mi limit" in text


def test_docs_are_served_under_a_csp_that_runs_no_script(
    platform: Platform, documented: str
) -> None:
    status, headers, body = _get(platform, f"{FN}/{documented}/docs")
    assert (status, body.decode()) == (200, HTML)
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    assert "script-src" not in csp  # falls back to default-src 'none': no script at all
    assert "sandbox" in csp
    assert headers["X-Content-Type-Options"] == "nosniff"

    status, headers, body = _get(platform, f"{FN}/{documented}/docs.yml")
    assert (status, body.decode()) == (200, YAML)
    assert headers["Content-Type"] == "application/yaml; charset=utf-8"
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_a_function_without_docs_is_a_404_no_docs(
    platform: Platform, tmp_path_factory: pytest.TempPathFactory
) -> None:
    source = _lambda(tmp_path_factory.mktemp("plain") / "fn", docs=False)
    deployed = cli(platform, "deploy", str(source), "--name", "plain", "--no-wait")
    assert deployed.returncode == 0, deployed.stderr + deployed.stdout
    for path in ("docs", "docs.yml"):
        status, body = http("GET", f"{platform.urls['gateway']}{FN}/plain/{path}")
        assert (status, body["error"]["code"]) == (404, "no_docs")
    status, body = http("GET", f"{platform.urls['gateway']}{FN}/absent/docs")
    assert (status, body["error"]["code"]) == (404, "function_not_found")


def test_the_status_and_describe_show_the_presets_and_the_overrides(
    platform: Platform, documented: str
) -> None:
    status = status_of(platform, documented)
    assert status["presets"] == {
        "resources": "L",
        "replicas": "S",
        "build": "normal",
        "overridden": ["memory", "replicas"],
        "min_replicas": 2,
        "max_replicas": 2,
    }
    assert status["limits"]["memory"] == 200  # the override
    _, record = http("GET", f"{platform.urls['gateway']}{FN}/{documented}")
    assert (record["spec"]["cpu"], record["spec"]["memory_request"]) == (200, 128)  # L's
    described = cli(platform, "describe", documented)
    assert described.returncode == 0, described.stderr
    assert "Presets:     resources L, replicas S (2-2), build normal\n" in described.stdout
    assert "Overridden:  memory, replicas (set in the spec)\n" in described.stdout


def test_an_unknown_preset_is_a_400_naming_the_allowed_values(platform: Platform) -> None:
    status, body = http(
        "POST",
        f"{platform.urls['gateway']}{FN}",
        {
            "name": "sized",
            "resources_preset": "XXL",
            "source": {"files": {"lambda_main.py": "async def main(r): return {}\n"}},
        },
    )
    assert (status, body["error"]["code"]) == (400, "unknown_preset")
    assert body["error"]["details"]["allowed"] == ["XS", "S", "M", "L", "XL"]
    assert http("GET", f"{platform.urls['gateway']}{FN}/sized")[0] == 404  # nothing stored


def test_pod_statuses_have_one_entry_per_instance_and_count_restarts(
    platform: Platform, documented: str
) -> None:
    pods = wait_for(
        lambda: (p := _pods(platform, documented)) and len(p) == 2 and p, 60, "two pod statuses"
    )
    assert {p["status"] for p in pods.values()} == {"running"}
    assert {p["restarts"] for p in pods.values()} == {0}
    assert all(p["started_at"] for p in pods.values())
    router = f"{platform.urls['router']}/default/{documented}"
    seen = 0
    for _ in range(2):
        http("POST", router, {"crash": True})  # an instance exits; the deployer restarts it

        def restarted(before: int = seen) -> dict[str, Any] | None:
            found = _pods(platform, documented)
            counts = sum(p["restarts"] for p in found.values())
            running = all(p["status"] == "running" for p in found.values())
            return found if len(found) == 2 and counts > before and running else None

        after = wait_for(restarted, 60, f"more than {seen} restart(s) in the pod statuses")
        assert set(after) == set(pods)  # the same slots, restarted in place
        seen = sum(p["restarts"] for p in after.values())
        assert all(
            after[i]["started_at"] > pods[i]["started_at"] for i in after if after[i]["restarts"]
        )
    assert seen >= 2
    crashed = max(after.values(), key=lambda p: p["restarts"])
    assert crashed["last_exit"] == "exited with code 3"
