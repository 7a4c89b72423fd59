"""Deployer restarts and takeovers while functions serve: instances belong to the platform.

A client calls 5 functions through the router in a loop throughout. The deployer is stopped
with SIGTERM (an upgrade) and killed with SIGKILL, and the launcher starts it again; then a
second deployer is started by hand against the same NATS and state dir, and the leading one is
killed with SIGKILL: the standby leads within 15 s. Every time: no failed call, and the same
instance processes before and after (none restarted).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.conftest import Platform, stop
from tests.e2e.helpers import http, offline_platform, runtime_processes, wait_for, without_forks

NS = "default"
FUNCTIONS = tuple(f"steady{i}" for i in range(5))
SOURCE = {"lambda_main.py": "async def main(request):\n    return {'steady': True}\n"}


@dataclass
class Loop:
    """Calls the functions round robin from a thread; records (when, name, status)."""

    router: str
    calls: list[tuple[float, str, int]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        index = 0
        while not self.stopping.is_set():
            name = FUNCTIONS[index % len(FUNCTIONS)]
            index += 1
            started = time.monotonic()
            try:
                status, _ = http("GET", f"{self.router}/{NS}/{name}", timeout=10)
            except OSError:
                status = 0
            self.calls.append((started, name, status))
            self.stopping.wait(0.02)

    def since(self, start: float) -> list[tuple[float, str, int]]:
        return [c for c in self.calls if c[0] >= start]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(tmp_path_factory, "restarts")


@pytest.fixture(scope="module")
def loop(platform: Platform) -> Iterator[Loop]:
    for name in FUNCTIONS:
        status, body = http(
            "POST",
            f"{platform.urls['gateway']}/v1/namespaces/{NS}/functions",
            {"name": name, "source": {"files": SOURCE}},
        )
        assert status == 202, body
    for name in FUNCTIONS:
        wait_for(
            lambda n=name: http("GET", f"{platform.urls['router']}/{NS}/{n}")[0] == 200,
            120,
            f"{name} answering",
        )
    client = Loop(platform.urls["router"])
    thread = threading.Thread(target=client.run, daemon=True)
    thread.start()
    yield client
    client.stopping.set()
    thread.join(15)


def instance_pids() -> dict[str, list[int]]:
    return {name: sorted(runtime_processes(name)) for name in FUNCTIONS}


def deployer_pids(platform: Platform) -> list[int]:
    found = []
    for pid in platform.descendants():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", b"lambdabus_deployer"] and len(argv) <= 4:
            found.append(pid)
    return without_forks(found)


def leads(url: str) -> bool:
    """The deployer at `url` says it leads (its `lambdabus_deployer_leader` gauge)."""
    try:
        status, text = http("GET", f"{url}/metrics", timeout=5)
    except OSError:
        return False
    return status == 200 and "lambdabus_deployer_leader 1.0" in str(text)


def assert_served_throughout(loop: Loop, start: float, what: str) -> None:
    # enough calls after the event to say the instances kept serving
    wait_for(lambda: len(loop.since(start)) >= 50, 60, f"calls during {what}")
    calls = loop.since(start)
    failed = [c for c in calls if c[2] != 200]
    print(f"\n{what}: {len(failed)} failed of {len(calls)} calls")
    assert not failed, f"{len(failed)}/{len(calls)} calls failed during {what}: {failed[:5]}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_deployer_restart_keeps_every_instance_serving(
    platform: Platform, loop: Loop, sig: signal.Signals
) -> None:
    before = instance_pids()
    assert all(len(pids) == 1 for pids in before.values()), before
    url = platform.urls["deployer"]
    wait_for(lambda: leads(url), 30, "the deployer leading")
    (old,) = deployer_pids(platform)
    start = time.monotonic()
    os.kill(old, sig)
    wait_for(lambda: set(deployer_pids(platform)) - {old}, 30, "a new deployer")
    wait_for(lambda: leads(url), 30, "the new deployer leading")
    took = time.monotonic() - start
    print(f"\n{sig.name}: the new deployer leads after {took:.2f} s")
    # it has adopted them: a reconcile pass later, the same processes still serve
    time.sleep(3)
    assert instance_pids() == before
    assert_served_throughout(loop, start, f"a deployer {sig.name} and restart")


def test_kill_9_of_the_leader_the_standby_leads_within_15_s(platform: Platform, loop: Loop) -> None:
    url = platform.urls["deployer"]
    wait_for(lambda: leads(url), 30, "the deployer leading")
    (leader,) = deployer_pids(platform)
    env = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{leader}/environ").read_text().split("\0")
        if "=" in item
    )
    env["LAMBDABUS_DEPLOYER_PORT"] = "0"  # the same NATS user, state dir and settings
    standby = subprocess.Popen(
        [sys.executable, "-m", "lambdabus_deployer"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    drain: threading.Thread | None = None
    try:
        assert standby.stderr is not None
        standby_url = ""
        for line in standby.stderr:
            if '"event": "listening"' in line:
                standby_url = line.split('"url": "', 1)[1].split('"', 1)[0]
                break
        assert standby_url, "the second deployer did not start"
        drain = threading.Thread(target=standby.stderr.read, daemon=True)
        drain.start()  # ends with the process
        time.sleep(2)
        assert not leads(standby_url), "two deployers lead"
        assert leads(url)
        before = instance_pids()
        start = time.monotonic()
        os.kill(leader, signal.SIGKILL)
        wait_for(lambda: leads(standby_url), 30, "the standby leading", interval=0.05)
        took = time.monotonic() - start
        print(f"\nkill -9 of the leading deployer: the standby leads after {took:.2f} s")
        assert took <= 15
        # the launcher's new deployer is a standby now
        wait_for(lambda: set(deployer_pids(platform)) - {leader}, 30, "a new deployer")
        time.sleep(3)
        assert not leads(url)
        assert instance_pids() == before
        assert_served_throughout(loop, start, "a kill -9 of the leading deployer")
        # with a standby beside it (events it pulls go back), the new leader deploys
        status, body = http(
            "POST",
            f"{platform.urls['gateway']}/v1/namespaces/{NS}/functions",
            {"name": "late", "source": {"files": SOURCE}},
        )
        assert status == 202, body
        wait_for(
            lambda: http("GET", f"{platform.urls['router']}/{NS}/late")[0] == 200,
            90,
            "a function deployed under the new leader answering",
        )
    finally:
        standby.send_signal(signal.SIGTERM)  # hands the lease back at once
        standby.wait(30)
        if drain is not None:
            drain.join(10)
        if standby.stderr is not None:
            standby.stderr.close()
    wait_for(lambda: leads(url), 30, "the launcher's deployer leading again")
    assert instance_pids() == before


def test_stopping_the_platform_stops_every_instance(platform: Platform, loop: Loop) -> None:
    """Instances outlive a deployer, not the platform's deliberate stop (`up` stopped)."""
    running = [pid for pids in instance_pids().values() for pid in pids]
    assert len(running) == len(FUNCTIONS)
    loop.stopping.set()
    code, left = stop(platform, signal.SIGTERM)
    assert code == 0
    assert left == set(), f"processes left behind: {left}"
    assert instance_pids() == {name: [] for name in FUNCTIONS}
    assert runtime_processes("late") == []
