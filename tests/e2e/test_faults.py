"""Faults end in a clear status and disturb nothing else, with every service as its own process
(`lambdabus up`), a real nats-server and offline builds from the local wheel directory.

A healthy "canary" function is deployed first and called throughout by a background prober.
A missing dependency, an import-time crash, hanging calls, a function that exhausts its memory
and one that prints megabytes a second must each end in a status with a reason and in log lines
that explain it, while the canary and the gateway keep answering promptly. Last, each service
in turn is killed with SIGKILL: the launcher restarts it, and nothing is lost or left stuck.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lambdabus_deployer.cgroups import detect_cgroups
from lambdabus_platform.bus import Bus
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.subjects import logs_subject
from tests.e2e.conftest import SERVICES, Platform
from tests.e2e.helpers import (
    cli,
    http,
    offline_platform,
    runtime_processes,
    status_of,
    wait_for,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

NS = "default"
LOG_RATE = 2000  # the deployer's default: runtime log lines a second per instance
SYNC_WORKERS = 32  # the runtime's worker threads for sync functions

CANARY = {"lambda_main.py": "async def main(request):\n    return {'canary': True}\n"}

MISSING_DEPENDENCY = {
    "lambda_main.py": "async def main(request):\n    return {}\n",
    "requirements.txt": "nonexistent-pkg-xyz\n",
}

IMPORT_CRASH = {
    "handler.py": (
        "import json\n"
        "\n"
        "def load_config():\n"
        "    return json.loads('{not json')\n"
        "\n"
        "CONFIG = load_config()\n"
        "\n"
        "def main(event, context):\n"
        "    return CONFIG\n"
    )
}

# Kyma style, sync: a hang holds a worker thread, which the runtime cannot stop.
HANG_SYNC = {
    "handler.py": (
        "import time\n"
        "\n"
        "def main(event, context):\n"
        "    if (event.get('data') or {}).get('hang'):\n"
        "        time.sleep(3600)\n"
        "    return {'fast': True}\n"
    )
}

# LUNA style, async: a hang is an await, which the runtime cancels.
HANG_ASYNC = {
    "lambda_main.py": (
        "import asyncio\n"
        "\n"
        "async def main(request):\n"
        "    if (request.json or {}).get('hang'):\n"
        "        await asyncio.sleep(3600)\n"
        "    return {'fast': True}\n"
    )
}

# The classic mistake: a blocking call in an async function stops the instance's event loop.
HANG_BLOCKING = {
    "lambda_main.py": (
        "import time\n"
        "\n"
        "async def main(request):\n"
        "    if (request.json or {}).get('hang'):\n"
        "        time.sleep(3600)\n"
        "    return {'fast': True}\n"
    )
}

MEMORY_HOG = {
    "lambda_main.py": (
        "async def main(request):\n"
        "    if (request.json or {}).get('eat'):\n"
        "        hoard = []\n"
        "        while True:\n"
        "            hoard.append(bytearray(1024 * 1024))\n"
        "    return {'fine': True}\n"
    )
}

# V8 does not raise on a full heap: the process aborts.
NODE_MEMORY_HOG = {
    "handler.js": (
        "module.exports = {\n"
        "  main: async function (event, context) {\n"
        "    if (event.data && event.data.eat) {\n"
        "      const hoard = [];\n"
        "      while (true) hoard.push(new Array(1024 * 1024).fill(1));\n"
        "    }\n"
        "    return { fine: true };\n"
        "  },\n"
        "};\n"
    )
}

CHATTY = {
    "lambda_main.py": (
        "import threading\n"
        "\n"
        "def chatter():\n"
        "    n = 0\n"
        "    while True:\n"
        "        n += 1\n"
        "        print(f'chatter {n} ' + 'x' * 40)\n"
        "\n"
        "threading.Thread(target=chatter, daemon=True).start()\n"
        "\n"
        "async def main(request):\n"
        "    return {'chatty': True}\n"
    )
}


# -- helpers -----------------------------------------------------------------------------------


def fn_url(platform: Platform, name: str, suffix: str = "") -> str:
    return f"{platform.urls['gateway']}/v1/namespaces/{NS}/functions/{name}{suffix}"


def invoke_url(platform: Platform, name: str) -> str:
    return f"{platform.urls['router']}/{NS}/{name}"


def deploy(platform: Platform, name: str, files: dict[str, str], **config: Any) -> None:
    """Upload inline source through the management API; returns once accepted (202)."""
    status, body = http(
        "POST",
        f"{platform.urls['gateway']}/v1/namespaces/{NS}/functions",
        {"name": name, "source": {"files": files}, **config},
    )
    assert status == 202, body


def condition(st: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in st["conditions"] if c["type"] == kind)


def wait_status(platform: Platform, name: str, timeout: float, **expected: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = status_of(platform, name)
        return st if all(st.get(k) == v for k, v in expected.items()) else None

    return wait_for(check, timeout, f"{name} with {expected}")  # type: ignore[no-any-return]


def reach(method: str, url: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    """`http`, with a server that does not answer (refused, reset, timed out) as status 0."""
    try:
        return http(method, url, body, timeout=timeout)
    except OSError as exc:
        return 0, repr(exc)


def timed(method: str, url: str, body: Any = None, timeout: float = 30) -> tuple[int, Any, float]:
    started = time.monotonic()
    status, answer = http(method, url, body, timeout=timeout)
    return status, answer, time.monotonic() - started


def ndjson(platform: Platform, name: str, suffix: str, **query: Any) -> list[dict[str, Any]]:
    """Log lines from the gateway's NDJSON endpoints (`/logs`, `/build/logs`)."""
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    status, body = http("GET", fn_url(platform, name, suffix) + (f"?{qs}" if qs else ""))
    assert status == 200, body
    if isinstance(body, dict):  # one line parses as one JSON object
        return [body]
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def log_text(platform: Platform, name: str, *, build: bool = False) -> str:
    """What `lambdabus logs NAME [--build]` prints."""
    out = cli(platform, "logs", name, *(["--build"] if build else []))
    assert out.returncode == 0, out.stderr
    return out.stdout


def logs_saying(
    platform: Platform, name: str, text: str, *, build: bool = False, timeout: float = 20
) -> str:
    """The function's logs, once they hold `text` (lines are stored asynchronously)."""

    def check() -> str | None:
        logs = log_text(platform, name, build=build)
        return logs if text in logs else None

    return wait_for(check, timeout, f"{text!r} in the logs of {name}")  # type: ignore[no-any-return]


def count_logs(platform: Platform, name: str) -> int:
    """Runtime log lines of a function stored in the LOGS stream now."""

    async def count() -> int:
        settings = NatsSettings(
            url=platform.urls["nats"], nkey_seed_file=platform.nats_seed(), connect_wait_seconds=5
        )
        async with Bus.connect(settings, name="e2e-faults") as bus:
            return await bus.count("LOGS", logs_subject("runtime", NS, name))

    return asyncio.run(count())


def assert_platform_answers(platform: Platform) -> tuple[float, float]:
    """The gateway's /healthz and the canary answer, promptly; their latencies."""
    status, body, gateway = timed("GET", f"{platform.urls['gateway']}/healthz", timeout=5)
    assert (status, body["status"]) == (200, "ok")
    status, body, canary = timed("GET", invoke_url(platform, "canary"), timeout=5)
    assert (status, body) == (200, {"canary": True})
    assert gateway < 2.0, f"gateway /healthz took {gateway:.2f} s"
    assert canary < 2.0, f"the canary took {canary:.2f} s"
    return gateway, canary


@dataclass
class Prober:
    """Calls the canary every 0.2 s from a thread and records every answer."""

    url: str
    calls: list[tuple[float, int, float]] = field(default_factory=list)  # (when, status, took)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.monotonic()
            status, _ = reach("GET", self.url, timeout=10)
            self.calls.append((started, status, time.monotonic() - started))
            self.stopping.wait(0.2)

    def assert_undisturbed(self, start: float, what: str) -> None:
        calls = [c for c in self.calls if c[0] >= start]
        assert calls, f"the canary was not called during {what}"
        failed = [c for c in calls if c[1] != 200]
        assert not failed, f"the canary failed {len(failed)}/{len(calls)} calls during {what}"
        slowest = max(c[2] for c in calls)
        assert slowest < 2.0, f"the canary took {slowest:.2f} s during {what}"


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(tmp_path_factory, "faults", LAMBDABUS_DEPLOYER_HEALTH_TIMEOUT="0.5")


@pytest.fixture(scope="module")
def canary(platform: Platform) -> Iterator[Prober]:
    deploy(platform, "canary", CANARY)
    wait_status(platform, "canary", 60, status="running")
    prober = Prober(invoke_url(platform, "canary"))
    thread = threading.Thread(target=prober.run, daemon=True)
    thread.start()
    yield prober
    prober.stopping.set()
    thread.join(15)


# -- bad input ---------------------------------------------------------------------------------


def test_a_missing_dependency_is_a_build_error_with_the_resolver_message(
    platform: Platform, canary: Prober
) -> None:
    start = time.monotonic()
    deploy(platform, "nodep", MISSING_DEPENDENCY)
    st = wait_status(platform, "nodep", 60, image_status="error")
    took = time.monotonic() - start
    build = condition(st, "BuildReady")
    assert (build["status"], build["reason"]) == ("False", "DependencyInstallFailed")
    assert "nonexistent-pkg-xyz" in build["message"]
    assert "nonexistent-pkg-xyz" in st["message"]
    assert st["status"] == "waiting"
    assert condition(st, "Running")["reason"] == "BuildFailed"
    log = logs_saying(platform, "nodep", "nonexistent-pkg-xyz was not found", build=True)
    assert "installing requirements.txt" in log
    # uv's resolver, offline: the package is in no index it may use
    assert "nonexistent-pkg-xyz was not found in the provided package locations" in log, log
    print(f"\nmissing dependency: image_status=error in {took:.2f} s: {build['message']!r}")
    canary.assert_undisturbed(start, "a failed build")
    assert_platform_answers(platform)


def test_an_import_time_crash_terminates_with_its_traceback(
    platform: Platform, canary: Prober
) -> None:
    start = time.monotonic()
    deploy(platform, "crashy", IMPORT_CRASH)
    st = wait_status(platform, "crashy", 60, status="terminated")
    took = time.monotonic() - start
    running = condition(st, "Running")
    assert (running["status"], running["reason"]) == ("False", "CrashLoop")
    assert st["message"] == running["message"]
    assert "exited with code 3 before it was ready" in st["message"]  # the import error code
    assert "Traceback (most recent call last)" in st["message"]
    assert "json.decoder.JSONDecodeError: Expecting property name" in st["message"]
    logs = logs_saying(platform, "crashy", "not restarted: crash loop")
    assert 'handler.py", line 6, in <module>' in logs
    assert "json.decoder.JSONDecodeError" in logs
    assert "not restarted: crash loop" in logs
    assert runtime_processes("crashy") == []
    print(f"\nimport crash: terminated (CrashLoop) in {took:.2f} s: {st['message'][:90]!r}…")
    canary.assert_undisturbed(start, "a crash loop")
    assert_platform_answers(platform)


# -- hangs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "files"), [("hang-sync", HANG_SYNC), ("hang-async", HANG_ASYNC)])
def test_a_hanging_call_times_out_and_the_instance_serves_on(
    platform: Platform, canary: Prober, name: str, files: dict[str, str]
) -> None:
    start = time.monotonic()
    deploy(platform, name, files, timeout=1)
    wait_status(platform, name, 60, status="running")
    (pid,) = runtime_processes(name)
    status, body, took = timed("POST", invoke_url(platform, name), {"hang": True})
    assert (status, body["error"]["code"]) == (504, "function_timeout"), body
    assert 0.9 <= took < 2.0, f"the timeout answer took {took:.2f} s"
    status, body, fast = timed("POST", invoke_url(platform, name), {"hang": False})
    assert (status, body) == (200, {"fast": True})
    assert fast < 1.0
    time.sleep(1.5)  # a few health checks: the same instance, healthy
    assert runtime_processes(name) == [pid]
    st = status_of(platform, name)
    # The same pid proves no restart since the hang; the message may still tell of a restart
    # at start on a loaded host ("...; instance X exited ... before it was ready").
    assert st["status"] == "running"
    assert condition(st, "Running")["message"].startswith("1/1 instances ready"), st
    logs = logs_saying(platform, name, "function_timeout")
    assert "function_timeout: POST /: the function did not finish within 1 s" in logs
    print(f"\n{name}: 504 function_timeout in {took:.2f} s; the fast path then in {fast:.3f} s")
    canary.assert_undisturbed(start, f"{name} hanging")
    assert_platform_answers(platform)


def test_hung_calls_holding_every_worker_thread_get_the_instance_restarted(
    platform: Platform, canary: Prober
) -> None:
    """A sync call cannot be stopped: its thread stays held. When hung calls hold all of them,
    nothing can run any more; the instance says so on /healthz, and the deployer restarts it."""
    start = time.monotonic()
    (pid,) = runtime_processes("hang-sync")
    url = invoke_url(platform, "hang-sync")
    with ThreadPoolExecutor(SYNC_WORKERS) as pool:
        answers = list(pool.map(lambda _: http("POST", url, {"hang": True}), range(SYNC_WORKERS)))
    assert {a[0] for a in answers} == {504}
    held = time.monotonic()
    wait_for(lambda: runtime_processes("hang-sync") not in ([], [pid]), 30, "a new instance")
    wait_for(lambda: http("POST", url, {"hang": False}) == (200, {"fast": True}), 30, "answers")
    back = time.monotonic() - held
    st = status_of(platform, "hang-sync")
    message = condition(st, "Running")["message"]
    assert st["status"] == "running"
    assert "failed 3 health checks in a row; it was killed by SIGKILL, 1 restart so far" in message
    logs = logs_saying(platform, "hang-sync", "restarting in")
    assert f"all {SYNC_WORKERS} worker threads are held by calls that timed out" in logs
    assert "failed 3 health checks in a row; it was killed by SIGKILL; restarting in" in logs
    print(f"\nhang-sync, every thread held: answering again {back:.2f} s later: {message!r}")
    canary.assert_undisturbed(start, "an instance with every thread held")
    assert_platform_answers(platform)


def test_a_blocked_event_loop_times_out_and_gets_the_instance_restarted(
    platform: Platform, canary: Prober
) -> None:
    start = time.monotonic()
    deploy(platform, "hang-loop", HANG_BLOCKING, timeout=1)
    wait_status(platform, "hang-loop", 60, status="running")
    (pid,) = runtime_processes("hang-loop")
    url = invoke_url(platform, "hang-loop")
    # the instance cannot answer: the router does, past the timeout and its margin (1 s)
    status, body, took = timed("POST", url, {"hang": True})
    assert (status, body["error"]["code"]) == (504, "function_timeout"), body
    assert 0.9 <= took < 3.0, f"the timeout answer took {took:.2f} s"
    wait_for(lambda: runtime_processes("hang-loop") not in ([], [pid]), 30, "a new instance")
    wait_for(lambda: http("POST", url, {"hang": False}) == (200, {"fast": True}), 30, "answers")
    back = time.monotonic() - start
    st = status_of(platform, "hang-loop")
    message = condition(st, "Running")["message"]
    assert st["status"] == "running"
    assert "failed 3 health checks in a row; it was killed by SIGKILL" in message
    print(f"\nhang-loop: 504 in {took:.2f} s, restarted and answering after {back:.2f} s")
    canary.assert_undisturbed(start, "a blocked event loop")
    assert_platform_answers(platform)


# -- memory ------------------------------------------------------------------------------------
# Where the deployer can make cgroups, the memory limit holds for an instance's whole process
# tree and going over it is an OOM kill of the instance (restarted with back-off); elsewhere it
# is an address-space limit per Python process (MemoryError) and Node's heap cap (abort).

CGROUPS = detect_cgroups("lambdabus")[0] is not None
needs_cgroups = pytest.mark.skipif(not CGROUPS, reason="no writable cgroup: rlimits apply")
needs_rlimits = pytest.mark.skipif(CGROUPS, reason="cgroups apply here, not rlimits")


def assert_oom_killed_and_restarted(
    platform: Platform, canary: Prober, name: str, files: dict[str, str], **config: Any
) -> None:
    start = time.monotonic()
    deploy(platform, name, files, memory=64, **config)
    wait_status(platform, name, 60, status="running")
    url = invoke_url(platform, name)
    status, body, took = timed("POST", url, {"eat": True})
    assert (status, body["error"]["code"]) == (502, "instance_disconnected"), body
    wait_for(lambda: http("POST", url, {"eat": False}) == (200, {"fine": True}), 30, "answers")
    back = time.monotonic() - start
    st = status_of(platform, name)
    message = condition(st, "Running")["message"]
    assert st["status"] == "running"
    assert st["limits"]["enforced_by"] == "cgroup"
    assert st["limits"]["memory"] == 64
    assert "OOMKilled: it used more than its 64 MiB of memory" in message
    assert "1 restart so far" in message
    logs = logs_saying(platform, name, "restarting in")
    assert "OOMKilled" in logs
    print(f"\nmemory ({name}, 64 MiB): 502 in {took:.2f} s, back after {back:.2f} s: {message!r}")
    canary.assert_undisturbed(start, f"{name} out of memory")
    assert_platform_answers(platform)


@needs_cgroups
def test_memory_exhaustion_in_python_is_oomkilled_and_restarted(
    platform: Platform, canary: Prober
) -> None:
    assert_oom_killed_and_restarted(platform, canary, "hog", MEMORY_HOG)


@needs_cgroups
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_memory_exhaustion_in_node_is_oomkilled_and_restarted(
    platform: Platform, canary: Prober
) -> None:
    assert_oom_killed_and_restarted(
        platform, canary, "node-hog", NODE_MEMORY_HOG, runtime="nodejs20"
    )


@needs_rlimits
def test_memory_exhaustion_in_python_is_a_500_and_the_instance_lives_on(
    platform: Platform, canary: Prober
) -> None:
    start = time.monotonic()
    deploy(platform, "hog", MEMORY_HOG, memory=64)
    wait_status(platform, "hog", 60, status="running")
    (pid,) = runtime_processes("hog")
    url = invoke_url(platform, "hog")
    status, body, took = timed("POST", url, {"eat": True})
    assert status == 500, body
    assert body["error"] == {"code": "function_error", "message": "MemoryError"}
    assert http("POST", url, {"eat": False}) == (200, {"fine": True})
    assert runtime_processes("hog") == [pid]
    logs = logs_saying(platform, "hog", "MemoryError")
    assert "hoard.append(bytearray(1024 * 1024))" in logs
    assert status_of(platform, "hog")["status"] == "running"
    print(f"\nmemory (python, 64 MiB): 500 MemoryError in {took:.2f} s; the instance lives on")
    canary.assert_undisturbed(start, "a function out of memory")
    assert_platform_answers(platform)


@needs_rlimits
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_memory_exhaustion_in_node_kills_the_instance_which_is_restarted(
    platform: Platform, canary: Prober
) -> None:
    start = time.monotonic()
    deploy(platform, "node-hog", NODE_MEMORY_HOG, memory=64, runtime="nodejs20")
    wait_status(platform, "node-hog", 60, status="running")
    url = invoke_url(platform, "node-hog")
    status, body, took = timed("POST", url, {"eat": True})
    assert (status, body["error"]["code"]) == (502, "instance_disconnected"), body
    wait_for(lambda: http("POST", url, {"eat": False}) == (200, {"fine": True}), 30, "answers")
    back = time.monotonic() - start
    st = status_of(platform, "node-hog")
    message = condition(st, "Running")["message"]
    assert st["status"] == "running"
    assert "exited with code 134 (SIGABRT), 1 restart so far" in message
    logs = logs_saying(platform, "node-hog", "restarting in")
    assert "JavaScript heap out of memory" in logs
    assert "exited with code 134 (SIGABRT); restarting in" in logs
    print(f"\nmemory (node, 64 MiB): 502 in {took:.2f} s, back after {back:.2f} s: {message!r}")
    canary.assert_undisturbed(start, "a node function out of memory")
    assert_platform_answers(platform)


# -- a flood of output -------------------------------------------------------------------------


def test_a_flood_of_output_is_rate_limited_and_disturbs_nothing(
    platform: Platform, canary: Prober
) -> None:
    replicas = 3  # together past what the log store takes: flow control must hold
    start = time.monotonic()
    # a flood needs the cpu to be one: more than the default preset's 100m (M)
    deploy(platform, "chatty", CHATTY, replicas=replicas, cpu=1000)
    wait_status(platform, "chatty", 60, status="running")
    counted_at, counted = time.monotonic(), count_logs(platform, "chatty")
    latencies: list[tuple[float, float]] = []
    while time.monotonic() < counted_at + 4:
        latencies.append(assert_platform_answers(platform))
        status, body, took = timed("GET", invoke_url(platform, "chatty"), timeout=5)
        assert (status, body, took < 2.0) == (200, {"chatty": True}, True)
        status, _, took = timed("GET", fn_url(platform, "canary", "/status"), timeout=5)
        assert (status, took < 2.0) == (200, True)
        time.sleep(0.2)
    stored = count_logs(platform, "chatty") - counted
    elapsed = time.monotonic() - counted_at
    # at most the rate of each instance, plus its "dropped" lines, plus a second of slack
    assert stored <= replicas * (LOG_RATE + 2) * (elapsed + 1), (stored, elapsed)
    assert stored >= 100 * elapsed, (stored, elapsed)  # capped, not silenced

    # the logs stay readable, promptly
    queried = time.monotonic()
    lines = ndjson(platform, "chatty", "/logs", tail=3000)
    queried = time.monotonic() - queried
    assert queried < 5.0
    assert any(line["line"].startswith("chatter ") for line in lines)
    dropped = [line for line in lines if line["stream"] == "system" and "dropped" in line["line"]]
    assert dropped, [line["line"] for line in lines[-5:]]
    assert any(f"more than {LOG_RATE} lines a second" in line["line"] for line in dropped)

    # gone, it leaves no backlog behind (in the deployer or in NATS): the stream stops growing
    assert http("DELETE", fn_url(platform, "chatty"))[0] == 202
    wait_for(lambda: runtime_processes("chatty") == [], 30, "no chatty instance left")
    gone = time.monotonic()
    counts = [count_logs(platform, "chatty")]

    def still() -> bool:
        time.sleep(0.5)
        counts.append(count_logs(platform, "chatty"))
        return counts[-1] == counts[-2]

    wait_for(still, 5, "the LOGS stream to stop growing")
    assert counts[-1] - counts[0] <= 3000, counts  # at most what the deployer still held
    stopped = time.monotonic() - gone

    gw, cn = [g for g, _ in latencies], [c for _, c in latencies]
    print(
        f"\nflood ({replicas} instances): {stored} lines stored in {elapsed:.1f} s "
        f"({stored / elapsed:.0f}/s); {dropped[-1]['line']!r}; logs query {queried:.2f} s; "
        f"{counts[-1] - counts[0]} lines stored after its instances stopped, "
        f"none more {stopped:.1f} s later; "
        f"gateway p50 {statistics.median(gw) * 1000:.1f} ms max {max(gw) * 1000:.1f} ms; "
        f"canary p50 {statistics.median(cn) * 1000:.1f} ms max {max(cn) * 1000:.1f} ms"
    )
    canary.assert_undisturbed(start, "a flood of output")


# -- services killed ---------------------------------------------------------------------------


def statuses(platform: Platform) -> dict[str, tuple[str, str]]:
    """(image_status, status) of every function."""
    status, body = http("GET", f"{platform.urls['gateway']}/v1/namespaces/{NS}/functions")
    assert status == 200, body
    out = {}
    for item in body["items"]:
        st = status_of(platform, item["name"])
        out[item["name"]] = (st["image_status"], st["status"])
    return out


def still(platform: Platform, expected: dict[str, tuple[str, str]]) -> bool:
    """Every function of `expected` is there, with the statuses it had (others may be added)."""
    now = statuses(platform)
    return {name: now.get(name) for name in expected} == expected


def service_pids(platform: Platform, service: str) -> list[int]:
    """The processes of `python -m lambdabus_<service>` below `lambdabus up` (not a child the
    service is starting: between fork and exec it shows its parent's command line; the
    deployer starts sandboxes at any time, for its pool of pre-started runtimes too)."""
    found = []
    for pid in platform.descendants():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if argv[1:3] == [b"-m", f"lambdabus_{service}".encode()]:
            found.append((pid, int(stat.rsplit(")", 1)[1].split()[1])))
    pids = {pid for pid, _ in found}
    return [pid for pid, parent in found if parent not in pids]


def kill_and_wait(platform: Platform, service: str) -> float:
    """SIGKILL the service; seconds until the launcher has it answering /healthz again (on the
    same port: the launcher keeps it)."""
    (old,) = service_pids(platform, service)
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: set(service_pids(platform, service)) - {old}, 30, f"a new {service}")
    health = f"{platform.urls[service]}/healthz"
    wait_for(lambda: reach("GET", health, timeout=2)[0] == 200, 30, f"{service} healthy")
    return time.monotonic() - killed


def in_flight(service: str) -> dict[str, str]:
    """A function whose build takes a moment, long enough to kill a service in the middle of
    it: a dependency set of its own (a new environment) and a big module to compile."""
    return {
        "tables.py": "".join(f"value_{i} = {i} * 2 + 1\n" for i in range(100_000)),
        "lambda_main.py": (
            "import humanize\n"
            "\n"
            "async def main(request):\n"
            "    return {'words': humanize.intword(1234567)}\n"
        ),
        "requirements.txt": f"humanize  # {service}\n",
    }


def survive_kill(
    platform: Platform, canary: Prober, service: str, before: dict[str, tuple[str, str]]
) -> None:
    """Kill the service with a deploy on its way (the builder: in the middle of its build);
    then every function has its status as `before`, the canary answers, the deploy in flight
    and a new one go all the way to running. Adds both to `before`."""
    flying = f"inflight-{service}"
    deploy(platform, flying, in_flight(service))
    if service == "builder":
        wait_for(
            lambda: status_of(platform, flying)["image_status"] == "in_progress",
            30,
            "the build in progress",
            interval=0.02,
        )
    instances = runtime_processes("canary")
    killed = time.monotonic()
    back = kill_and_wait(platform, service)
    if service == "deployer":
        # Instances belong to the platform: the canary's process serves on, adopted by the new
        # deployer, and no probe fails.
        time.sleep(2)
        assert runtime_processes("canary") == instances
    wait_for(
        lambda: reach("GET", invoke_url(platform, "canary"), timeout=5) == (200, {"canary": True}),
        30,
        "the canary answering",
    )
    answering = time.monotonic() - killed
    try:
        wait_for(lambda: still(platform, before), 30, f"every status as before the {service} died")
    except AssertionError:
        now = statuses(platform)
        changed = {n: (s, now.get(n)) for n, s in before.items() if now.get(n) != s}
        details = {n: (status_of(platform, n), log_text(platform, n)[-3000:]) for n in changed}
        raise AssertionError(f"after the {service} died: {changed}; {details}") from None
    settled = time.monotonic() - killed
    wait_status(platform, flying, 60, status="running")
    assert http("GET", invoke_url(platform, flying)) == (200, {"words": "1.2 million"})
    landed = time.monotonic() - killed
    if service == "builder":  # the interrupted build was made again, from the start
        build_log = log_text(platform, flying, build=True)
        assert build_log.count("unpacking the source") == 2, build_log
    fresh = f"after-{service}"
    deploy(platform, fresh, CANARY)
    wait_status(platform, fresh, 60, status="running")
    assert http("GET", invoke_url(platform, fresh)) == (200, {"canary": True})
    before.update({flying: ("completed", "running"), fresh: ("completed", "running")})
    missed = Counter(c[1] for c in canary.calls if c[0] >= killed and c[1] != 200)
    if service == "deployer":
        assert runtime_processes("canary") == instances
        assert not missed, f"canary probes failed while the deployer was killed: {dict(missed)}"
    print(
        f"\n{service} killed: healthy again in {back:.2f} s; canary answering after "
        f"{answering:.2f} s (failed probes by status: {dict(missed)}); statuses as before "
        f"after {settled:.2f} s; the deploy in flight running after {landed:.2f} s; "
        f"a new deploy running after {time.monotonic() - killed:.2f} s"
    )


def test_each_service_killed_is_restarted_and_loses_nothing(
    platform: Platform, canary: Prober
) -> None:
    before = statuses(platform)
    assert before["canary"] == ("completed", "running")
    stuck = {n: s for n, s in before.items() if s[0] in ("pending", "in_progress")}
    stuck |= {n: s for n, s in before.items() if s[1] == "pending"}
    assert not stuck, stuck
    for service in SERVICES:
        survive_kill(platform, canary, service, before)
    assert statuses(platform) == before
    assert_platform_answers(platform)
