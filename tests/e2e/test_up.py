"""`lambdabus up` runs nats-server and the five services as processes, and stops them all."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.conftest import SERVICES, platform_up, stop

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _cli(gateway: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lambdabus_client", "--url", gateway, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_up_serves_every_service_and_stops_cleanly(data_dir: Path, tmp_path: Path) -> None:
    fn = tmp_path / "hello"
    fn.mkdir()
    (fn / "lambda_main.py").write_text("async def main(request):\n    return {'hello': 1}\n")

    with platform_up(data_dir) as platform:
        assert set(platform.urls) == {*SERVICES, "nats"}
        for service in SERVICES:
            status, body = _get(platform.urls[service] + "/healthz")
            assert (status, body["service"], body["nats"]) == (200, service, "connected")
            with urllib.request.urlopen(platform.urls[service] + "/metrics", timeout=10) as resp:
                assert b"lambdabus_nats_connected" in resp.read()
        gateway = platform.urls["gateway"]

        deployed = _cli(gateway, "deploy", str(fn), "--name", "hello", "--env", "A=1", "--no-wait")
        assert deployed.returncode == 0, deployed.stderr
        listed = _cli(gateway, "ls")
        assert listed.returncode == 0, listed.stderr
        assert "hello" in listed.stdout
        status_out = _cli(gateway, "status", "hello")
        assert status_out.returncode == 0, status_out.stderr
        for word in ("ConfigurationReady", "BuildReady", "Running"):
            assert word in status_out.stdout
        bad = _cli(gateway, "deploy", str(fn), "--name", "Not_A_Label", "--no-wait")
        assert bad.returncode == 1
        assert bad.stderr.startswith("error: invalid_name:")
        assert len(bad.stderr.strip().splitlines()) == 1

        # an open lifecycle stream must not hold up the shutdown
        stream = urllib.request.urlopen(
            gateway + "/v1/lifecycle?since=2000-01-01T00:00:00Z", timeout=30
        )
        assert stream.readline().startswith(b":")
        code, left = stop(platform, signal.SIGTERM)
        stream.close()
        assert code == 0, "".join(platform.output)
        assert left == set(), f"processes left behind: {left}"

    # a second run on the same state finds the function it had
    with platform_up(data_dir) as platform:
        status, record = _get(platform.urls["gateway"] + "/v1/namespaces/default/functions/hello")
        assert status == 200
        assert record["spec"]["env"] == {"A": "1"}  # type: ignore[index]
        code, left = stop(platform, signal.SIGINT)
        assert code == 0
        assert left == set()


def test_up_restarts_a_killed_service(data_dir: Path) -> None:
    with platform_up(data_dir) as platform:
        pids = platform.descendants()
        # find the router by its /healthz answering; kill -9 every python child and see them come back
        children = [
            p for p in pids if b"lambdabus_router" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        assert len(children) == 1
        import os

        os.kill(children[0], signal.SIGKILL)
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            again = [
                p
                for p in platform.descendants()
                if p != children[0]
                and b"lambdabus_router" in Path(f"/proc/{p}/cmdline").read_bytes()
            ]
            if again:
                break
            time.sleep(0.2)
        assert again, "the router was not restarted"
        code, left = stop(platform)
        assert code == 0
        assert left == set()
