"""`lambdabus up --replicas 2`: two processes of every service against one nats-server, every
one listed by `GET /v1/replicas`; calls go through either router and either gateway, both
logs replicas answer a share of the log queries, and a router killed with SIGKILL is restarted
under its id and port while the other keeps answering.

Two deployers each start every function today, in one shared state directory, and write its
endpoints in turn (leader election is another change, issue 9 item 2): a call may then meet a
moment without a ready endpoint (503 `no_ready_instance`, from the router). Nothing here counts
instances; a call must be answered by the router it was sent to, by the function or with that
one 503 — never refused, reset or failed otherwise. Once one deployer leads, every call here
must be a 200 (drop `NO_READY_INSTANCE` from the accepted answers)."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import SERVICES, Platform, platform_up
from tests.e2e.helpers import OFFLINE_ENV, WHEELHOUSE, cli, http, wait_for, wait_running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HEARTBEAT = 1.0
REPLICA_IDS = {(s, f"{s}-{n}") for s in SERVICES for n in (1, 2)}
NO_READY_INSTANCE = (503, "no_ready_instance")


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
    for pid in platform.descendants():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[1:3] != [b"-m", f"lambdabus_{service}".encode()]:
                continue
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
        if replica["service"] in ("gateway", "router", "logs"):
            assert replica["role"] == "active"
        else:  # builders and deployers may elect a leader
            assert replica["role"] in ("leader", "standby", "active")
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
    failed = [r for r in seen if r not in ((200, {"echo": {"n": 3}}), NO_READY_INSTANCE)]
    assert failed == [], f"{len(failed)} of {len(results)} calls failed: {failed[:3]}"
    assert seen.count((200, {"echo": {"n": 3}})) >= 10
    assert new != old
    print(
        f"\nrouter-1 killed: answering again after {back:.2f} s; router-2 answered "
        f"{during - killed_after} calls meanwhile ({seen.count(NO_READY_INSTANCE)} of "
        f"{len(seen)} calls in all met no ready instance)"
    )
    assert replica_pids(platform, "router")["router-2"]  # the other was never touched

    def router_1_listed_afresh() -> bool:
        items = listed(platform, "gateway")
        ids = {(r["service"], r["id"]) for r in items}
        return ids == REPLICA_IDS and len(items) == 10

    wait_for(router_1_listed_afresh, 30, "ten replicas listed after the restart")
