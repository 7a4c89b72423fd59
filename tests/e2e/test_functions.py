"""From upload to answering requests, with every service as its own process (`lambdabus up`),
a real nats-server, and builds that use only the local wheel directory and npm cache made by
`make fixtures` (no network)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Platform
from tests.e2e.helpers import (
    EXAMPLES,
    cli,
    cmdline,
    http,
    offline_platform,
    runtime_processes,
    status_of,
    wait_for,
    wait_running,
    without_forks,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(tmp_path_factory, "e2e")


def test_examples_deploy_and_answer(platform: Platform) -> None:
    router = platform.urls["router"]
    deployed = cli(platform, "deploy", str(EXAMPLES / "python-luna"), "--name", "luna")
    assert deployed.returncode == 0, deployed.stderr + deployed.stdout
    assert router in deployed.stdout or "/default/luna" in deployed.stdout
    wait_running(platform, "luna")
    assert http("POST", f"{router}/default/luna", {"data": 5}) == (200, {"result": 5, "words": "5"})
    assert http("POST", f"{router}/default/luna", {"data": 1234567})[1]["words"] == "1.2 million"

    kyma = cli(
        platform, "deploy", str(EXAMPLES / "python-kyma"), "--name", "kyma", "--env", "GREETING=Hi"
    )
    assert kyma.returncode == 0, kyma.stderr + kyma.stdout
    wait_running(platform, "kyma")
    status, body = http("POST", f"{router}/default/kyma", {"name": "Ada"})
    assert (status, body["message"]) == (200, "Hi, Ada!")

    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    node = cli(
        platform, "deploy", str(EXAMPLES / "node"), "--name", "node-ms", "--runtime", "nodejs20"
    )
    assert node.returncode == 0, node.stderr + node.stdout
    wait_running(platform, "node-ms")
    assert http("POST", f"{router}/default/node-ms", {"duration": "2h"}) == (
        200,
        {"duration": "2h", "milliseconds": 7_200_000},
    )

    # the gateway relays invocations too, and the CLI uses it
    invoked = cli(platform, "invoke", "luna", "--data", '{"data": 7}')
    assert invoked.returncode == 0, invoked.stderr
    assert json.loads(invoked.stdout)["result"] == 7

    # runtime logs and build logs read back
    def printed() -> bool:
        return "called with 5" in cli(platform, "logs", "luna").stdout

    wait_for(printed, 20, "the function's output in its logs")
    build_log = cli(platform, "logs", "luna", "--build")
    assert build_log.returncode == 0, build_log.stderr
    assert "humanize" in build_log.stdout


def test_update_rolls_out_without_a_failed_request(platform: Platform, tmp_path: Path) -> None:
    router = platform.urls["router"]
    fn = tmp_path / "roll"
    fn.mkdir()
    (fn / "lambda_main.py").write_text("async def main(request):\n    return {'version': 1}\n")
    assert cli(platform, "deploy", str(fn), "--name", "roll", "--replicas", "2").returncode == 0
    wait_running(platform, "roll")

    results: list[tuple[int, Any]] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            results.append(http("GET", f"{router}/default/roll", timeout=10))

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        time.sleep(0.5)
        (fn / "lambda_main.py").write_text("async def main(request):\n    return {'version': 2}\n")
        assert cli(platform, "deploy", str(fn), "--name", "roll", "--replicas", "2").returncode == 0
        wait_for(
            lambda: results and results[-1] == (200, {"version": 2}), 90, "version 2 answering"
        )
        time.sleep(2)  # keep calling while the old instances drain
    finally:
        stop.set()
        thread.join(30)
    failed = [r for r in results if r[0] != 200]
    assert not failed, (
        f"{len(failed)} of {len(results)} requests failed during the rollout: {failed[:3]}"
    )
    versions = [r[1]["version"] for r in results]
    assert versions[0] == 1
    assert versions[-1] == 2
    assert versions == sorted(versions), "traffic went back to the old version"
    wait_for(lambda: len(runtime_processes("roll")) == 2, 30, "the old instances stopped")


def test_delete_stops_everything(platform: Platform, tmp_path: Path) -> None:
    fn = tmp_path / "gone"
    fn.mkdir()
    (fn / "lambda_main.py").write_text("async def main(request):\n    return {}\n")
    assert cli(platform, "deploy", str(fn), "--name", "gone").returncode == 0
    wait_running(platform, "gone")
    assert runtime_processes("gone")
    assert cli(platform, "rm", "gone").returncode == 0
    st = wait_for(
        lambda: (s := status_of(platform, "gone")).get("status") == "not_found" and s,
        20,
        "not_found",
    )
    assert st["image_status"] == "not_found"
    wait_for(
        lambda: http("GET", f"{platform.urls['router']}/default/gone")[0] == 404, 20, "router 404"
    )
    wait_for(lambda: runtime_processes("gone") == [], 20, "no instance left")


def test_syntax_error_is_a_build_error_naming_file_and_line(
    platform: Platform, tmp_path: Path
) -> None:
    fn = tmp_path / "broken"
    fn.mkdir()
    (fn / "lambda_main.py").write_text("async def main(request):\n    return {\n\ndef oops(:\n")
    deployed = cli(platform, "deploy", str(fn), "--name", "broken")
    assert deployed.returncode == 1
    assert "lambda_main.py" in deployed.stdout + deployed.stderr
    st = wait_for(
        lambda: (s := status_of(platform, "broken")).get("image_status") == "error" and s,
        60,
        "error",
    )
    build = next(c for c in st["conditions"] if c["type"] == "BuildReady")
    assert build["status"] == "False"
    assert "lambda_main.py" in build["message"]
    log = cli(platform, "logs", "broken", "--build").stdout
    assert "lambda_main.py" in log
    assert ":4" in log or "line 4" in log


def test_crashing_function_is_terminated_with_its_traceback(
    platform: Platform, tmp_path: Path
) -> None:
    fn = tmp_path / "crash"
    fn.mkdir()
    (fn / "lambda_main.py").write_text(
        "raise RuntimeError('boom at import')\n\nasync def main(request):\n    return {}\n"
    )
    assert cli(platform, "deploy", str(fn), "--name", "crash").returncode in (0, 1)
    st = wait_for(
        lambda: (s := status_of(platform, "crash")).get("status") == "terminated" and s,
        90,
        "terminated",
    )
    assert "boom at import" in st["message"] or any(
        "boom at import" in c["message"] for c in st["conditions"]
    )
    logs = cli(platform, "logs", "crash").stdout
    assert "Traceback" in logs
    assert "RuntimeError: boom at import" in logs


def test_deployer_killed_and_restarted_reconciles(platform: Platform, tmp_path: Path) -> None:
    fn = tmp_path / "steady"
    fn.mkdir()
    (fn / "lambda_main.py").write_text("async def main(request):\n    return {'ok': True}\n")
    assert cli(platform, "deploy", str(fn), "--name", "steady", "--replicas", "2").returncode == 0
    wait_running(platform, "steady")
    wait_for(lambda: len(runtime_processes("steady")) == 2, 30, "two instances")
    deployers = without_forks(
        [p for p in platform.descendants() if b"lambdabus_deployer" in cmdline(p)]
    )
    assert len(deployers) == 1
    os.kill(deployers[0], signal.SIGKILL)
    # `up` restarts it; it must end with exactly `replicas` instances and no orphan
    wait_for(
        lambda: [
            p
            for p in platform.descendants()
            if p not in deployers and b"lambdabus_deployer" in cmdline(p)
        ],
        30,
        "a new deployer",
    )
    time.sleep(3)
    wait_for(
        lambda: len(runtime_processes("steady")) == 2, 60, "exactly two instances after reconcile"
    )
    wait_running(platform, "steady")
    assert http("GET", f"{platform.urls['router']}/default/steady") == (200, {"ok": True})
