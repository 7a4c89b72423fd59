"""`lambdabus up` runs nats-server and the five services as processes, and stops them all."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lambdabus_platform import launcher
from tests.e2e.conftest import SERVICES, Platform, platform_up, stop

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def _get(url: str, token: str | None = None) -> tuple[int, dict[str, object]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=10
        ) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _cli(platform: Platform, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lambdabus_client", "--url", platform.urls["gateway"], *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=platform.cli_env,
    )


def test_up_serves_every_service_and_stops_cleanly(data_dir: Path, tmp_path: Path) -> None:
    fn = tmp_path / "hello"
    fn.mkdir()
    (fn / "lambda_main.py").write_text("async def main(request):\n    return {'hello': 1}\n")

    with platform_up(data_dir) as platform:
        assert set(platform.urls) == {*SERVICES, "nats"}
        # the first start minted an admin token, readable by its owner only, and said where
        token_file = data_dir / "admin.token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        assert any(str(token_file) in line for line in platform.output), platform.output
        # and the console's address, with a sign-in link holding the token minted now
        console = f"{platform.urls['gateway']}/ui/"
        assert f"console  {console}\n" in platform.output, platform.output
        links = [line for line in platform.output if "#token=" in line]
        assert len(links) == 1, platform.output
        assert links[0].rstrip().endswith(f"{console}#token={platform.token}")
        with urllib.request.urlopen(console, timeout=10) as resp:
            assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        for service in SERVICES:
            status, body = _get(platform.urls[service] + "/healthz")
            assert (status, body["service"], body["nats"]) == (200, service, "connected")
            request = urllib.request.Request(
                platform.urls[service] + "/metrics",
                headers=platform.auth if service == "gateway" else {},
            )
            with urllib.request.urlopen(request, timeout=10) as resp:
                assert b"lambdabus_nats_connected" in resp.read()
        gateway = platform.urls["gateway"]
        assert _get(gateway + "/v1/namespaces/default/functions")[0] == 401

        deployed = _cli(platform, "deploy", str(fn), "--name", "hello", "--env", "A=1", "--no-wait")
        assert deployed.returncode == 0, deployed.stderr
        listed = _cli(platform, "ls")
        assert listed.returncode == 0, listed.stderr
        assert "hello" in listed.stdout
        status_out = _cli(platform, "status", "hello")
        assert status_out.returncode == 0, status_out.stderr
        for word in ("ConfigurationReady", "BuildReady", "Running"):
            assert word in status_out.stdout
        history = _cli(platform, "history", "hello")
        assert history.returncode == 0, history.stderr
        assert "bootstrap-admin" in history.stdout  # the actor of function.created
        bad = _cli(platform, "deploy", str(fn), "--name", "Not_A_Label", "--no-wait")
        assert bad.returncode == 2  # checked before any request: a usage error
        assert bad.stderr.startswith("error: usage: argument --name: 'Not_A_Label' is not a valid")
        assert len(bad.stderr.strip().splitlines()) == 1

        # an open lifecycle stream must not hold up the shutdown
        stream = urllib.request.urlopen(
            urllib.request.Request(
                gateway + "/v1/lifecycle?since=2000-01-01T00:00:00Z", headers=platform.auth
            ),
            timeout=30,
        )
        assert stream.readline().startswith(b":")
        code, left = stop(platform, signal.SIGTERM)
        stream.close()
        assert code == 0, "".join(platform.output)
        assert left == set(), f"processes left behind: {left}"

    # a second run on the same state finds the function it had, and keeps its admin token
    first_token = platform.token
    with platform_up(data_dir) as platform:
        assert platform.token == first_token
        # the token it had is not shown again
        assert f"console  {platform.urls['gateway']}/ui/\n" in platform.output
        assert not [line for line in platform.output if "#token=" in line], platform.output
        status, record = _get(
            platform.urls["gateway"] + "/v1/namespaces/default/functions/hello", platform.token
        )
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


def test_a_port_in_use_stops_up_with_one_line_naming_the_setting(data_dir: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {
            **os.environ,
            "LAMBDABUS_UP_NATS_PORT": "-1",
            **{f"LAMBDABUS_UP_{s.upper()}_PORT": "0" for s in SERVICES},
            "LAMBDABUS_UP_GATEWAY_PORT": str(port),
        }
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "lambdabus_client", "up", "--data-dir", str(data_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        took = time.monotonic() - started

    assert done.returncode == 1, done
    assert took < 10
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert str(port) in lines[0]
    assert "LAMBDABUS_UP_GATEWAY_PORT" in lines[0]
    assert done.stdout == ""


def test_a_service_that_finds_its_port_taken_stops_up_without_restarts(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port is taken after the launcher's check (a race): the service exits with
    EX_CONFIG and the launcher stops with its one line, instead of restarting it."""
    monkeypatch.setattr(launcher, "busy_ports", lambda settings: [])
    out, err = io.StringIO(), io.StringIO()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monkeypatch.setenv("LAMBDABUS_UP_NATS_PORT", "-1")
        for service in SERVICES:
            monkeypatch.setenv(f"LAMBDABUS_UP_{service.upper()}_PORT", "0")
        monkeypatch.setenv("LAMBDABUS_UP_GATEWAY_PORT", str(port))
        started = time.monotonic()
        code = launcher.main(["--data-dir", str(data_dir)], out=out, err=err)
        took = time.monotonic() - started

    assert code == 1
    assert took < 30
    errors = [line for line in err.getvalue().splitlines() if "error" in line]
    assert len(errors) == 1, err.getvalue()
    assert str(port) in errors[0]
    assert "LAMBDABUS_GATEWAY_PORT" in errors[0]
    assert "restarting" not in err.getvalue()
