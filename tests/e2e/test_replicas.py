"""`lambdabus up --replicas 2`: two processes of every service against one nats-server, every
one listed by `GET /v1/replicas`; calls go through either router and either gateway, both
logs replicas answer a share of the log queries, and a router killed with SIGKILL is restarted
under its id and port while the other keeps answering.

One deployer leads, the other stands by: 20 functions with `replicas: 2` run exactly 40
instances; a builder killed with SIGKILL in the middle of a build leaves it to the other, which
completes it once; the leading deployer killed with SIGKILL, the standby leads within 15 s and
adopts the 40 instances (the same processes, none restarted). A client calling 5 functions
through a router throughout meets no failure: every call here is a 200.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import SERVICES, Platform, platform_up
from tests.e2e.helpers import (
    OFFLINE_ENV,
    WHEELHOUSE,
    cli,
    http,
    runtime_processes,
    status_of,
    wait_for,
    wait_running,
    without_forks,
)
from tests.e2e.test_faults import in_flight

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HEARTBEAT = 1.0
REPLICA_IDS = {(s, f"{s}-{n}") for s in SERVICES for n in (1, 2)}


def answer(result: tuple[int, Any]) -> tuple[int, Any]:
    """A call's result in brief: the status, and the function's body or the platform's code."""
    status, body = result
    if status != 200 and isinstance(body, dict) and "error" in body:
        return status, body["error"].get("code")
    return status, body


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    if not WHEELHOUSE.exists():
        pytest.fail("run `make fixtures` first: the examples' dependencies for offline builds")
    beats = {f"LAMBDABUS_{s.upper()}_HEARTBEAT_SECONDS": str(HEARTBEAT) for s in SERVICES}
    with platform_up(
        tmp_path_factory.mktemp("replicas") / "state",
        env={**OFFLINE_ENV, **beats},
        args=("--replicas", "2"),
    ) as running:
        yield running
        running.process.send_signal(signal.SIGINT)
        running.process.wait(60)


def replica_pids(platform: Platform, service: str) -> dict[str, int]:
    """The live processes of `python -m lambdabus_<service>` below `up`, by replica id."""
    found = {}
    matching = []
    for pid in platform.descendants():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[1:3] == [b"-m", f"lambdabus_{service}".encode()]:
            matching.append(pid)
    for pid in without_forks(matching):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        prefix = f"LAMBDABUS_{service.upper()}_REPLICA_ID=".encode()
        for item in environ:
            if item.startswith(prefix):
                found[item.removeprefix(prefix).decode()] = pid
    return found


def reach(method: str, url: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    """`http`, with a server that does not answer (refused, reset, timed out) as status 0."""
    try:
        return http(method, url, body, timeout=timeout)
    except OSError as exc:
        return 0, repr(exc)


def queries_answered(url: str) -> float:
    """The logs queries a logs replica answered, from its /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("lambdabus_logs_queries_total{")
    )


def listed(platform: Platform, via: str = "gateway-2") -> list[dict[str, Any]]:
    status, body = http("GET", f"{platform.urls[via]}/v1/replicas")
    assert status == 200, body
    return body["items"]  # type: ignore[no-any-return]


def deployer_roles(platform: Platform) -> dict[str, str]:
    """The deployer replicas' roles as `GET /v1/replicas` shows them, by replica id."""
    return {r["id"]: r["role"] for r in listed(platform) if r["service"] == "deployer"}


def one_deployer_leads(platform: Platform) -> list[dict[str, Any]] | None:
    items = [r for r in listed(platform) if r["service"] == "deployer"]
    roles = sorted(r["role"] for r in items)
    return items if roles == ["leader", "standby"] else None


def test_two_of_every_service_run_and_are_listed(platform: Platform) -> None:
    for service in SERVICES:
        assert set(replica_pids(platform, service)) == {f"{service}-1", f"{service}-2"}
        # the first keeps the service's name and address; the other is listed apart
        assert platform.urls[service] != platform.urls[f"{service}-2"]

    def all_listed() -> list[dict[str, Any]] | None:
        items = listed(platform)
        return items if {(r["service"], r["id"]) for r in items} == REPLICA_IDS else None

    items = wait_for(all_listed, 30, "ten replicas listed")
    assert len(items) == 10
    for replica in items:
        name = replica["service"] + ("" if replica["id"].endswith("-1") else "-2")
        assert replica["url"] == platform.urls[name]
        assert 0 <= replica["heartbeat_age"] <= 3 * HEARTBEAT
        if replica["service"] in ("gateway", "router", "logs") or replica["service"] == "builder":
            assert replica["role"] == "active"
    # the deployers elect one leader; the other stands by
    roles = sorted(
        r["role"]
        for r in wait_for(lambda: one_deployer_leads(platform), 30, "one deployer leading")
    )
    assert roles == ["leader", "standby"]
    # both gateways answer from the one registry
    assert {(r["service"], r["id"]) for r in listed(platform, "gateway")} == REPLICA_IDS


def test_calls_go_through_either_router_and_survive_a_killed_one(
    platform: Platform, tmp_path: Path
) -> None:
    fn = tmp_path / "echo"
    fn.mkdir()
    (fn / "lambda_main.py").write_text(
        "async def main(request):\n    return {'echo': request.json}\n"
    )
    deployed = cli(platform, "deploy", str(fn), "--name", "echo")
    assert deployed.returncode == 0, deployed.stderr + deployed.stdout
    wait_running(platform, "echo")

    routers = [platform.urls["router"], platform.urls["router-2"]]
    gateways = [platform.urls["gateway"], platform.urls["gateway-2"]]
    for router in routers:  # each router learns the endpoints from its own KV watch
        wait_for(
            lambda r=router: (
                http("POST", f"{r}/default/echo", {"n": 1}) == (200, {"echo": {"n": 1}})
            ),
            30,
            f"echo answering through {router}",
        )
    for gateway in gateways:  # and each gateway relays to its router
        invoke = f"{gateway}/v1/namespaces/default/functions/echo/invoke"
        wait_for(
            lambda i=invoke: http("POST", i, {"n": 2}) == (200, {"echo": {"n": 2}}),
            30,
            f"echo answering through {gateway}",
        )

    # log queries go to the logs replicas' queue group: both answer a share
    for n in range(30):
        gateway = gateways[n % 2]
        status, _ = http("GET", f"{gateway}/v1/namespaces/default/functions/echo/build/logs")
        assert status == 200
    answered = [queries_answered(platform.urls[name]) for name in ("logs", "logs-2")]
    assert sum(answered) >= 30
    assert min(answered) > 0, answered

    # kill -9 the first router while a client calls the second one throughout
    old = replica_pids(platform, "router")["router-1"]
    results: list[tuple[int, Any]] = []
    stop = threading.Event()

    def caller() -> None:
        while not stop.is_set():
            results.append(reach("POST", f"{routers[1]}/default/echo", {"n": 3}))

    thread = threading.Thread(target=caller)
    thread.start()
    try:
        wait_for(lambda: len(results) >= 5, 30, "calls before the kill")
        killed_at, killed_after = time.monotonic(), len(results)
        os.kill(old, signal.SIGKILL)
        new = wait_for(
            lambda: (pid := replica_pids(platform, "router").get("router-1")) != old and pid,
            60,
            "router-1 restarted",
        )
        # back on the same address, answering
        wait_for(
            lambda: reach("POST", f"{routers[0]}/default/echo", {"n": 4}, timeout=5)[0] == 200,
            60,
            "router-1 answering again",
        )
        back = time.monotonic() - killed_at
        during = len(results)
        wait_for(lambda: len(results) >= during + 5, 30, "calls after the restart")
        wait_for(
            lambda: answer(results[-1]) == (200, {"echo": {"n": 3}}), 30, "a 200 after the restart"
        )
    finally:
        stop.set()
        thread.join(30)
    seen = [answer(r) for r in results]
    failed = [r for r in seen if r != (200, {"echo": {"n": 3}})]
    assert failed == [], f"{len(failed)} of {len(results)} calls failed: {failed[:3]}"
    assert seen.count((200, {"echo": {"n": 3}})) >= 10
    assert new != old
    print(
        f"\nrouter-1 killed: answering again after {back:.2f} s; router-2 answered "
        f"{during - killed_after} calls meanwhile, {len(seen)} calls in all, none failed"
    )
    assert replica_pids(platform, "router")["router-2"]  # the other was never touched

    def router_1_listed_afresh() -> bool:
        items = listed(platform, "gateway")
        ids = {(r["service"], r["id"]) for r in items}
        return ids == REPLICA_IDS and len(items) == 10

    wait_for(router_1_listed_afresh, 30, "ten replicas listed after the restart")


FLEET = tuple(f"fleet{i:02d}" for i in range(20))
CALLED = FLEET[:5]
TRIVIAL = {"lambda_main.py": "async def main(request):\n    return {'fleet': True}\n"}


def deploy(platform: Platform, name: str, files: dict[str, str], **config: Any) -> None:
    status, body = http(
        "POST",
        f"{platform.urls['gateway']}/v1/namespaces/default/functions",
        {"name": name, "source": {"files": files}, **config},
    )
    assert status == 202, body


def instances() -> dict[str, list[int]]:
    """The instance processes of every fleet function (the sandboxed runtime, not bwrap)."""
    return {name: sorted(runtime_processes(name)) for name in FLEET}


def restart_counts(platform: Platform) -> dict[str, int]:
    """Restarts so far of every fleet instance, by `function/instance`."""
    return {
        f"{name}/{pod}": p["restarts"]
        for name in FLEET
        for pod, p in status_of(platform, name)["pod_statuses"].items()
    }


def rss_kib(pid: int) -> int:
    """A process's resident memory (0 once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0
    return next((int(line.split()[1]) for line in lines if line.startswith("VmRSS:")), 0)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


@dataclass
class Loop:
    """Calls CALLED round robin through one router from a thread: (when, name, answer)."""

    router: str
    calls: list[tuple[float, str, tuple[int, Any]]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        index = 0
        while not self.stopping.is_set():
            name = CALLED[index % len(CALLED)]
            index += 1
            started = time.monotonic()
            self.calls.append(
                (started, name, answer(reach("GET", f"{self.router}/default/{name}")))
            )
            self.stopping.wait(0.02)

    def failed(self) -> list[tuple[float, str, tuple[int, Any]]]:
        return [c for c in self.calls if c[2] != (200, {"fleet": True})]


@pytest.mark.timeout(900)
def test_forty_instances_one_build_and_a_deployer_takeover_without_a_restart(
    platform: Platform,
) -> None:
    for name in FLEET:
        deploy(platform, name, TRIVIAL, replicas=2, max_replicas=2, memory=64)

    def all_ready() -> dict[str, dict[str, Any]] | None:
        found = {name: status_of(platform, name) for name in FLEET}
        return found if all(s.get("ready_replicas") == 2 for s in found.values()) else None

    started = time.monotonic()
    wait_for(all_ready, 480, "40 instances ready", interval=2)
    ready_after = time.monotonic() - started

    # exactly 2 instance processes per function: one deployer started them, not both
    def forty() -> dict[str, list[int]] | None:
        found = instances()
        return found if sum(map(len, found.values())) == 40 else None

    before = wait_for(
        forty,
        30,
        "exactly 40 instance processes",
        interval=1,
    )
    assert all(len(pids) == 2 for pids in before.values()), before
    rss_mib = sum(rss_kib(pid) for pids in before.values() for pid in pids) / 1024

    router = platform.urls["router-2"]
    for name in CALLED:
        wait_for(
            lambda n=name: answer(reach("GET", f"{router}/default/{n}")) == (200, {"fleet": True}),
            60,
            f"{name} answering",
        )
    loop = Loop(router)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        # kill -9 the builder building a slow function: the other takes the build over
        slow = "fleet-slow"
        deploy(platform, slow, in_flight("replicas"), memory=64)

        def building() -> int | None:
            """The builder with a build step running (a child process) while the build is."""
            for pid in replica_pids(platform, "builder").values():
                if children(pid) and status_of(platform, slow)["image_status"] == "in_progress":
                    return pid
            return None

        builder = wait_for(building, 60, "a builder building", interval=0.05)
        os.kill(builder, signal.SIGKILL)
        builder_killed = time.monotonic()
        wait_running(platform, slow, timeout=180)
        built_after = time.monotonic() - builder_killed
        # the build was under way when its builder died, and made again by the other
        build_log = cli(platform, "logs", slow, "--build")
        assert build_log.returncode == 0, build_log.stderr
        assert build_log.stdout.count("unpacking the source") == 2, build_log.stdout
        assert http("GET", f"{router}/default/{slow}") == (200, {"words": "1.2 million"})
        _, history = http(
            "GET", f"{platform.urls['gateway']}/v1/namespaces/default/functions/{slow}/history"
        )
        succeeded = [e for e in history["items"] if e["type"] == "io.lambdabus.build.succeeded"]
        assert len(succeeded) == 1, [e["type"] for e in history["items"]]

        # kill -9 the leading deployer: the standby leads within 15 s, adopting every instance
        def led() -> dict[str, str] | None:
            roles = deployer_roles(platform)
            return roles if sorted(roles.values()) == ["leader", "standby"] else None

        roles = wait_for(
            led,
            30,
            "one deployer leading",
        )
        (leader,) = [id_ for id_, role in roles.items() if role == "leader"]
        (standby,) = [id_ for id_, role in roles.items() if role == "standby"]
        instances_before = instances()
        assert instances_before == before  # the builder's death touched no instance
        # an instance may have been restarted before (a health check missed on a loaded
        # machine): the takeover must add no restart
        restarts_before = restart_counts(platform)
        killed = time.monotonic()
        calls_before = len(loop.calls)
        os.kill(replica_pids(platform, "deployer")[leader], signal.SIGKILL)
        wait_for(
            lambda: deployer_roles(platform).get(standby) == "leader",
            30,
            "the standby leading",
            interval=0.1,
        )
        takeover = time.monotonic() - killed
        assert takeover <= 15, f"the standby led after {takeover:.2f} s"
        # the killed one is back (restarted by `up`) as the standby
        wait_for(
            lambda: deployer_roles(platform) == {standby: "leader", leader: "standby"},
            60,
            "the restarted deployer standing by",
        )
        time.sleep(3)  # a reconcile pass of the new leader or more
        assert instances() == before
        statuses = {name: status_of(platform, name) for name in FLEET}
        assert sum(s["ready_replicas"] for s in statuses.values()) == 40
        restarts = restart_counts(platform)
        assert len(restarts) == 40, restarts
        restarted = {
            key: [c.get("message") for c in statuses[key.split("/")[0]].get("conditions", [])]
            for key, count in restarts.items()
            if count != restarts_before.get(key)
        }
        assert not restarted, (restarted, restarts_before)
        wait_for(lambda: len(loop.calls) >= calls_before + 50, 60, "calls after the takeover")
    finally:
        loop.stopping.set()
        thread.join(30)
    failed = loop.failed()
    print(
        f"\n40 instances ready after {ready_after:.1f} s ({rss_mib:.0f} MiB resident in all); "
        f"a builder killed mid-build, the "
        f"build running after {built_after:.1f} s; deployer takeover after "
        f"{takeover:.2f} s; {len(loop.calls)} calls through {router}, {len(failed)} failed"
    )
    assert not failed, f"{len(failed)} of {len(loop.calls)} calls failed: {failed[:5]}"
