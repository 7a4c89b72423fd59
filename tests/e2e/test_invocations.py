"""Per-invocation records through the whole platform (`lambdabus up`): 20 concurrent calls of
a function that prints 100 lines each give 2,000 intact log lines, each with the invocation id
the caller read on its answer; `lambdabus logs --invocation` shows one call's lines; the
function's metrics and `lambdabus top` count the calls; a schedule made with the CLI calls it."""

from __future__ import annotations

import json
import textwrap
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Platform
from tests.e2e.helpers import cli, http, offline_platform, wait_for, wait_running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HANDLER = """
def main(event, context):
    if event.get("ce-type") == "io.lambdabus.schedule.fired":
        print("tick", event["ce-time"], event["data"]["job"])
        return None
    k = event["data"]["k"]
    for i in range(100):
        print("call", k, "line", i, "x" * 40)
    return {"k": k}
"""


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(
        tmp_path_factory,
        "invocations",
        LAMBDABUS_DEPLOYER_LOG_RATE_LINES_PER_SECOND="100000",
        LAMBDABUS_ROUTER_STATS_PUBLISH_SECONDS="1",
    )


def _call(router: str, k: int) -> str:
    request = urllib.request.Request(
        f"{router}/default/printer",
        data=json.dumps({"k": k}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read()) == {"k": k}
        return str(response.headers["X-Lambdabus-Invocation-Id"])


def _log_lines(platform: Platform, *args: str) -> list[dict[str, Any]]:
    done = cli(platform, "-o", "json", "logs", "printer", "--tail", "10000", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_2000_lines_of_20_concurrent_calls_each_with_its_invocation_id(
    platform: Platform, tmp_path: Path
) -> None:
    code = tmp_path / "printer"
    code.mkdir()
    (code / "handler.py").write_text(textwrap.dedent(HANDLER))
    deployed = cli(platform, "deploy", str(code), "--name", "printer")
    assert deployed.returncode == 0, deployed.stderr + deployed.stdout
    wait_running(platform, "printer")
    router = platform.urls["router"]

    with ThreadPoolExecutor(20) as pool:
        ids = dict(enumerate(pool.map(lambda k: _call(router, k), range(20))))
    assert len(set(ids.values())) == 20

    def all_lines() -> list[dict[str, Any]] | None:
        lines = [x for x in _log_lines(platform) if x["line"].startswith("call ")]
        return lines if len(lines) >= 2000 else None

    lines = wait_for(all_lines, 60, "2,000 log lines")
    assert len(lines) == 2000
    numbers: dict[int, set[int]] = {k: set() for k in ids}
    for entry in lines:
        words = entry["line"].split(" ")
        k = int(words[1])
        assert words[2] == "line", entry  # intact: one call's text only
        assert words[4:] == ["x" * 40], entry
        assert entry["invocation"] == ids[k], entry
        numbers[k].add(int(words[3]))
    assert all(found == set(range(100)) for found in numbers.values())

    # one invocation's lines, through the CLI (table form: no tags in the text)
    one = cli(platform, "logs", "printer", "--invocation", ids[7])
    assert one.returncode == 0, one.stderr
    shown = [line for line in one.stdout.splitlines() if line.strip()]
    assert len(shown) == 100
    assert all(" call 7 line " in line for line in shown)
    assert "\x1e" not in one.stdout
    bad = cli(platform, "logs", "printer", "--invocation", "not an id")
    assert bad.returncode != 0
    assert "invalid_invocation" in bad.stderr

    # the metrics count the 20 calls (every router's share, added up), and `top` shows them
    gateway = platform.urls["gateway"]

    def counted() -> dict[str, Any] | None:
        status, body = http("GET", f"{gateway}/v1/namespaces/default/functions/printer/metrics")
        assert status == 200, body
        return body if body["windows"]["1m"]["calls"] >= 20 else None

    metrics = wait_for(counted, 30, "the calls in the function's metrics")
    minute = metrics["windows"]["1m"]
    assert (minute["calls"], minute["errors"], minute["throttles"]) == (20, 0, 0)
    assert minute["cold_starts"] == 1  # the instance's first call
    assert 0 < minute["p50_ms"] <= minute["p95_ms"] <= minute["p99_ms"]
    assert metrics["windows"]["1h"]["calls"] == 20
    top = cli(platform, "top", "--once")
    assert top.returncode == 0, top.stderr
    [row] = [line for line in top.stdout.splitlines() if line.startswith("printer")]
    assert row.split()[1:5] == ["20", "0", "0", "1"]


def test_a_schedule_made_with_the_cli_calls_the_function(platform: Platform) -> None:
    wait_running(platform, "printer")
    broken = cli(
        platform, "schedules", "create", "bad", "--function", "printer", "--cron", "* * * * * *"
    )
    assert broken.returncode != 0
    assert "invalid_cron" in broken.stderr
    made = cli(
        platform,
        "schedules", "create", "ticker", "--function", "printer",
        "--cron", "@every 2s", "--data", '{"job": "cleanup"}',
    )  # fmt: skip
    assert made.returncode == 0, made.stderr

    def ticks() -> list[dict[str, Any]] | None:
        found = [x for x in _log_lines(platform) if x["line"].startswith("tick ")]
        return found if len(found) >= 2 else None

    found = wait_for(ticks, 60, "two ticks in the function's log")
    for entry in found:
        _, time, job = entry["line"].split(" ")
        assert time.endswith("Z")
        assert job == "cleanup"
        assert entry["invocation"]  # the tick's event id
    assert cli(platform, "schedules", "rm", "ticker").returncode == 0
