"""The lease decisions of deployer replicas, and the log files instances write."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from lambdabus_deployer.detached import LogFollower, status_exit_code
from lambdabus_deployer.leader import Observed, dead_here, decide, replica_id, safety_margin
from lambdabus_platform.bus import KvEntry

D = 10.0


def entry(holder: str, revision: int) -> KvEntry:
    return KvEntry(key="deployer", value=json.dumps({"holder": holder}).encode(), revision=revision)


def test_a_missing_lease_is_created() -> None:
    assert decide("a", None, None, 0.0, D) == ("create", None)


def test_the_holder_renews_and_a_released_lease_is_taken_at_once() -> None:
    assert decide("a", entry("a", 3), None, 5.0, D)[0] == "update"
    assert decide("b", entry("", 4), None, 5.0, D)[0] == "update"


def test_a_standby_waits_a_whole_lease_after_the_last_change_it_saw() -> None:
    action, seen = decide("b", entry("a", 7), None, 100.0, D)
    assert (action, seen) == ("wait", Observed(7, 100.0))
    action, seen = decide("b", entry("a", 7), seen, 109.9, D)
    assert (action, seen) == ("wait", Observed(7, 100.0))
    # a renewal restarts the count
    action, seen = decide("b", entry("a", 8), seen, 109.95, D)
    assert (action, seen) == ("wait", Observed(8, 109.95))
    assert decide("b", entry("a", 8), seen, 119.95, D)[0] == "update"


def test_a_leader_stops_before_a_standby_may_take_over() -> None:
    # The leader's renewal starts at t=0 and lands; the standby sees it no earlier.
    leader_stops = 0.0 + D - safety_margin(D)
    assert safety_margin(D) > 0
    _, seen = decide("b", entry("a", 1), None, 0.0, D)
    assert seen is not None
    standby_may = seen.since + D
    assert leader_stops < standby_may


def test_a_followed_log_file_is_read_to_its_end_and_emptied_past_its_size(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        path = tmp_path / "out"
        path.write_bytes(b"a" * 100 + b"\n")
        ended = asyncio.Event()
        follower = LogFollower(path, 0, ended, max_bytes=50, cap_bytes=1000)
        assert await follower.read(4096) == b"a" * 100 + b"\n"
        ended.set()
        assert await follower.read(4096) == b""  # read past 50 bytes: emptied
        assert path.stat().st_size == 0
        assert follower.offset == 0
        path.write_bytes(b"x" * 2000)
        again = LogFollower(path, 0, ended, max_bytes=50, cap_bytes=1000)
        assert await again.read(4096) == b""
        assert again.skipped == 2000
        follower.close()
        again.close()

    asyncio.run(go())


def test_a_followed_log_file_resumes_at_its_offset(tmp_path: Path) -> None:
    async def go() -> None:
        path = tmp_path / "out"
        path.write_bytes(b"one\ntwo\n")
        ended = asyncio.Event()
        ended.set()
        follower = LogFollower(path, 4, ended, max_bytes=1 << 20, cap_bytes=1 << 22)
        assert await follower.read(4096) == b"two\n"
        follower.close()

    asyncio.run(go())


def test_the_exit_code_comes_from_the_status_file(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text('{ "child-pid": 12 }\n{ "exit-code": 3 }\n')
    assert status_exit_code(str(status)) == 3
    status.write_text('{ "child-pid": 12 }\n')
    assert status_exit_code(str(status)) is None


def test_a_dead_holder_of_this_machine_is_replaced_at_once() -> None:
    assert decide("b", entry("a", 7), None, 100.0, D, dead=lambda h: h == "a")[0] == "update"
    assert decide("b", entry("a", 7), None, 100.0, D, dead=lambda h: False)[0] == "wait"


def test_only_a_holder_known_to_be_gone_counts_as_dead() -> None:
    assert not dead_here(replica_id())  # this process runs
    child = subprocess.Popen(["sleep", "30"])
    holder = replica_id(child.pid)
    assert not dead_here(holder)
    child.kill()
    child.wait()
    assert dead_here(holder)
    # another machine, or a name we cannot read: never taken for dead
    assert not dead_here("other-boot:1:2:3:abc")
    assert not dead_here("a")
