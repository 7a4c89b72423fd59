"""`Spawned`: a child started off the event loop (its fork and pre-exec set-up in a worker
thread), reaped by a thread of its own, awaited like asyncio's processes. Real subprocesses."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lambdabus_platform.sandbox import Spawned


def _slow_setup() -> None:
    time.sleep(0.5)  # as a child's cgroup joins and uid switch, only longer


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


async def test_the_loop_runs_while_a_child_is_set_up_before_exec() -> None:
    gaps: list[float] = []

    async def ticking() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(ticking())
    try:
        child = await Spawned.start(
            [sys.executable, "-c", "pass"], stdin=subprocess.DEVNULL, preexec_fn=_slow_setup
        )
        assert await asyncio.wait_for(child.wait(), 10) == 0
    finally:
        ticker.cancel()
    # asyncio's own start would have held the loop for the whole 0.5 s set-up
    assert len(gaps) > 10
    assert max(gaps) < 0.25, max(gaps)


async def test_exit_codes_signals_and_a_child_nobody_awaits_is_reaped() -> None:
    child = await Spawned.start([sys.executable, "-c", "raise SystemExit(7)"])
    assert await child.wait() == 7
    assert child.returncode == 7
    child.kill()  # ended and reaped: no signal to a pid that may be someone else's now

    sleeper = await Spawned.start([sys.executable, "-c", "import time; time.sleep(60)"])
    assert sleeper.returncode is None
    sleeper.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(sleeper.wait(), 10) == -signal.SIGTERM

    left = await Spawned.start([sys.executable, "-c", "import time; time.sleep(0.2)"])
    pid = left.pid
    del left  # as an instance a stopping deployer leaves running
    gc.collect()
    deadline = time.monotonic() + 10
    while _state(pid) is not None:  # neither running nor a zombie: reaped
        assert time.monotonic() < deadline, f"{pid} is {_state(pid)}"
        await asyncio.sleep(0.05)


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def test_a_cancelled_start_leaves_no_child_behind(tmp_path: Path) -> None:
    token = f"spawned-cancel-{os.getpid()}-{time.monotonic_ns()}"
    starting = asyncio.create_task(
        Spawned.start(
            [sys.executable, "-c", "import time, sys; time.sleep(60)", token],
            preexec_fn=_slow_setup,
        )
    )
    await asyncio.sleep(0.1)  # the child is being set up
    starting.cancel()
    await asyncio.sleep(1.0)  # it still starts (its set-up was under way): then it is killed
    deadline = time.monotonic() + 10
    while left := [pid for pid in _processes_with(token) if _state(pid) not in (None, "Z")]:
        assert time.monotonic() < deadline, f"{left} outlived a cancelled start"
        await asyncio.sleep(0.05)
    while [pid for pid in _processes_with(token) if _state(pid) == "Z"]:
        assert time.monotonic() < deadline, "a zombie: nobody reaped it"
        await asyncio.sleep(0.05)


async def test_a_sandbox_killed_before_it_reported_its_pid_1_takes_that_child_along() -> None:
    """As bubblewrap whose start was cut short: the parent is killed, and its child (the
    sandbox's pid 1, detached: no parent-death signal) with it, though nobody was told its pid."""
    from lambdabus_platform.sandbox import Identity, SandboxProcess

    token = f"pid1-{os.getpid()}-{time.monotonic_ns()}"
    parent = await Spawned.start(
        ["sh", "-c", f"{sys.executable} -c 'import time; time.sleep(60)' {token} & wait"],
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while not (children := [pid for pid in _processes_with(token) if pid != parent.pid]):
        assert time.monotonic() < deadline, "the child never started"
        await asyncio.sleep(0.02)
    (child,) = children
    handle = SandboxProcess(process=parent, identity=Identity(os.getuid(), os.getgid()))
    handle.kill()
    assert await asyncio.wait_for(parent.wait(), 10) == -signal.SIGKILL
    while _state(child) not in (None, "Z"):
        assert time.monotonic() < deadline, f"{child} outlived its killed parent"
        await asyncio.sleep(0.05)
