"""The pool of pre-started runtimes with real sandboxes (bubblewrap, the real runtime, this
machine's cgroups or rlimits): whatever it started and did not make an instance ends with
it, a slot that was taken and never specialised too.

Skipped, saying why, where bubblewrap cannot make a sandbox here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from lambdabus_deployer.cgroups import (
    BACKGROUND_CPU_WEIGHT,
    DEFAULT_CPU_WEIGHT,
    CgroupHierarchy,
    V1Cgroup,
    V2Cgroup,
    cpu_quota_us,
    cpu_shares,
)
from lambdabus_deployer.limits import Limiter, Limits, RunLimits
from lambdabus_deployer.local import limiter_for
from lambdabus_deployer.plan import PoolKey
from lambdabus_deployer.pool import Pool, Slot, pool_dir
from lambdabus_deployer.runtime import locate_runtime
from lambdabus_deployer.settings import DeployerSettings
from lambdabus_platform.sandbox import detect_sandbox


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


async def _pool(
    tmp_path: Path, refill_delay: float = 0.1
) -> tuple[Pool, PoolKey, DeployerSettings, Limiter]:
    sandbox = await detect_sandbox("auto")
    if not sandbox.enabled:
        pytest.skip(f"no sandbox here: {sandbox.reason}")
    settings = DeployerSettings(
        port=0,
        state_dir=tmp_path / "deployer",
        pool_size=2,
        pool_refill_delay_seconds=refill_delay,
    )
    settings.state_dir.mkdir()
    pool_dir(settings).mkdir(mode=0o700)
    settings.sockets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
    prefix = Path(os.path.realpath(sys.executable)).parent.parent
    key = PoolKey(
        runtime="python3.11",
        env_dir=str(env),
        network="none",
        tmp_size=16,
        interpreter_dirs=() if prefix == Path("/usr") else (str(prefix),),
    )
    limiter = await limiter_for(settings)
    pool = Pool(
        settings,
        sandbox=sandbox,
        limiter=limiter,
        runtime=locate_runtime(settings),
        wanted=lambda: {key: object()},
    )
    return pool, key, settings, limiter


async def _cgroup_pool(tmp_path: Path) -> tuple[Pool, PoolKey, Limiter, CgroupHierarchy]:
    """`_pool`, where cgroups limit the slots (else the test is skipped)."""
    pool, key, _, limiter = await _pool(tmp_path)
    if limiter.hierarchy is None:
        await pool.aclose()
        pytest.skip("no cgroups here: the pool's slots are limited by rlimits only")
    return pool, key, limiter, limiter.hierarchy


async def _idle(pool: Pool, count: int) -> None:
    deadline = time.monotonic() + 30
    while len([s for s in pool.idle() if s.alive]) < count:
        assert time.monotonic() < deadline, f"the pool did not reach {count} idle"
        await asyncio.sleep(0.05)


async def test_a_slot_taken_and_never_used_ends_with_the_pool(tmp_path: Path) -> None:
    pool, key, settings, limiter = await _pool(tmp_path)
    pool.refill()
    await _idle(pool, 2)
    taken = pool.take(key)  # taken by an instance start that then never specialises it
    assert taken is not None
    deadline = time.monotonic() + 30
    while len(pool.idle()) < 2:  # the pool starts another in its place
        assert time.monotonic() < deadline, "the pool did not refill"
        await asyncio.sleep(0.05)
    started = [taken, *pool.idle()]
    pids = [pid for s in started for pid in (s.handle.pid, s.handle.child_pid) if pid]
    assert all(_alive(pid) for pid in pids)

    await pool.aclose()

    assert all(s.handle.process.returncode is not None for s in started)
    assert not [pid for pid in pids if _alive(pid)]
    assert json.loads((settings.state_dir / "pool.json").read_text()) == []
    assert list(pool_dir(settings).iterdir()) == []
    if limiter.hierarchy is not None:
        assert all(limiter.hierarchy.find(s.id) is None for s in started)


async def test_a_cold_start_that_finds_no_idle_runtime_grows_that_keys_pool(
    tmp_path: Path,
) -> None:
    pool, key, _, _ = await _pool(tmp_path)
    try:
        pool.refill()
        await _idle(pool, 2)
        burst = [pool.take(key) for _ in range(3)]  # three wakes at once: two idle
        assert burst[2] is None
        assert pool.sizer.target(key, time.monotonic()) == 3
        await _idle(pool, 3)  # the next burst of three finds three
        for slot in burst:
            if slot is not None:
                await pool.release(slot)
    finally:
        await pool.aclose()


async def test_the_replacement_of_a_taken_runtime_starts_after_the_refill_delay(
    tmp_path: Path,
) -> None:
    pool, key, _, _ = await _pool(tmp_path, refill_delay=1.0)
    try:
        pool.refill()
        await _idle(pool, 2)
        slot = pool.take(key)
        assert slot is not None
        taken_at = time.monotonic()
        await asyncio.sleep(0.5)  # the cold start that took it runs alone meanwhile
        assert len(pool.idle()) == 1
        assert pool._filling is None or pool._filling.done()
        await _idle(pool, 2)
        assert time.monotonic() - taken_at >= 1.0
        await pool.release(slot)
    finally:
        await pool.aclose()


def _cpu_weight(cgroup: V1Cgroup | V2Cgroup) -> str:
    """The cgroup's weight on contended cores as the kernel has it: v1 shares or v2 weight."""
    if isinstance(cgroup, V1Cgroup):
        return (cgroup.dirs["cpu"] / "cpu.shares").read_text().strip()
    return (cgroup.dir / "cpu.weight").read_text().strip()


@contextlib.asynccontextmanager
async def _specialised(
    pool: Pool,
    key: PoolKey,
    limiter: Limiter,
    instance: str,
    *,
    cpu: int,
    memory: int = 128,
    boost: tuple[int, float] | None = None,
) -> AsyncIterator[tuple[Slot, RunLimits, V1Cgroup | V2Cgroup]]:
    """A slot taken from the pool and given `instance`'s limits, as a cold start does; its
    run's limits and the instance's cgroup. Closed (and the slot stopped) on the way out."""
    assert limiter.hierarchy is not None
    slot = pool.take(key)
    assert slot is not None
    run, _ = await limiter.specialise(
        slot.id,
        instance,
        Limits(memory=memory, cpu=cpu, pids=64, open_files=256, tmp_size=16),
        python=True,
        boost=boost,
    )
    try:
        found = limiter.hierarchy.find(instance)
        assert isinstance(found, V1Cgroup | V2Cgroup)
        yield slot, run, found
    finally:
        await run.close()
        await pool.release(slot)


def _expected(cgroup: V1Cgroup | V2Cgroup, weight: int) -> str:
    return str(cpu_shares(weight) if isinstance(cgroup, V1Cgroup) else weight)


async def test_idle_runtimes_start_in_the_background_and_a_specialised_one_runs_at_full_weight(
    tmp_path: Path,
) -> None:
    pool, key, limiter, hierarchy = await _cgroup_pool(tmp_path)
    try:
        pool.refill()
        await _idle(pool, 2)
        idle = pool.idle()
        for idle_slot in idle:
            found = hierarchy.find(idle_slot.id)
            assert isinstance(found, V1Cgroup | V2Cgroup)
            assert _cpu_weight(found) == _expected(found, BACKGROUND_CPU_WEIGHT)
        async with _specialised(pool, key, limiter, "inst-weight", cpu=250) as (slot, _, instance):
            assert _cpu_weight(instance) == _expected(instance, DEFAULT_CPU_WEIGHT)
            assert hierarchy.find(slot.id) is None  # renamed, not copied
    finally:
        await pool.aclose()


def _memory_limits(cgroup: V1Cgroup | V2Cgroup) -> set[int]:
    """The cgroup's memory limits in bytes: memory and memory+swap (v1), or memory.max (v2)."""
    if isinstance(cgroup, V1Cgroup):
        names = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
        files = [cgroup.dirs["memory"] / n for n in names]
    else:
        files = [cgroup.dir / "memory.max"]
    return {int(f.read_text()) for f in files if f.exists()}


@pytest.mark.parametrize("memory", [512, 64])
async def test_a_slot_is_given_a_memory_limit_above_or_below_its_own(
    tmp_path: Path, memory: int
) -> None:
    """A slot idles under SLOT_LIMITS' 128 MiB; a function of 512 MiB (or 64) specialises it
    (with swap accounted, v1 refuses memory above memory+swap at any step)."""
    pool, key, limiter, _ = await _cgroup_pool(tmp_path)
    try:
        pool.refill()
        await _idle(pool, 1)
        async with _specialised(pool, key, limiter, "inst-mem", cpu=100, memory=memory) as (
            slot,
            _,
            instance,
        ):
            assert slot.alive
            assert _memory_limits(instance) == {memory * 1024 * 1024}
    finally:
        await pool.aclose()


def _cpu_quota(cgroup: V1Cgroup | V2Cgroup) -> int:
    """The cgroup's cpu quota per period, in microseconds."""
    if isinstance(cgroup, V1Cgroup):
        return int((cgroup.dirs["cpu"] / "cpu.cfs_quota_us").read_text())
    return int((cgroup.dir / "cpu.max").read_text().split()[0])


async def test_a_specialised_runtime_keeps_its_boost_until_it_has_listened_for_a_while(
    tmp_path: Path,
) -> None:
    pool, key, limiter, _ = await _cgroup_pool(tmp_path)
    try:
        pool.refill()
        await _idle(pool, 1)
        async with _specialised(pool, key, limiter, "inst-boost", cpu=100, boost=(1000, 30.0)) as (
            _,
            run,
            instance,
        ):
            assert _cpu_quota(instance) == cpu_quota_us(1000)  # importing at one core
            run.settle_after(0.3)  # it listens: the boost ends 0.3 s later, not in 30 s
            await asyncio.sleep(0.1)
            assert _cpu_quota(instance) == cpu_quota_us(1000)  # answering its first request
            await asyncio.sleep(0.5)
            assert _cpu_quota(instance) == cpu_quota_us(100)
    finally:
        await pool.aclose()


async def test_a_cold_start_that_finds_none_idle_gets_a_runtime_started_for_it_at_full_weight(
    tmp_path: Path,
) -> None:
    pool, key, _, limiter = await _pool(tmp_path, refill_delay=10.0)  # no refill meanwhile
    try:
        assert pool.take(key) is None  # nothing started yet
        slot = await pool.start_now(key)
        assert slot is not None
        assert slot.alive
        assert slot not in pool.idle()  # the caller's
        if limiter.hierarchy is not None:
            found = limiter.hierarchy.find(slot.id)
            assert isinstance(found, V1Cgroup | V2Cgroup)
            assert _cpu_weight(found) == _expected(found, DEFAULT_CPU_WEIGHT)
        # A start whose cold start is cancelled meanwhile leaves its runtime idle in the pool;
        # so does one that was not up within the wait (that cold start went on afresh).
        before = set(pool._live)
        starting = asyncio.create_task(pool.start_now(key))
        await asyncio.sleep(0.01)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert await pool.start_now(key, wait=0.001) is None
        deadline = time.monotonic() + 5  # before the refill (10 s) could start any
        while len([s for s in pool.idle() if s.id not in before and s.alive]) < 2:
            assert time.monotonic() < deadline, "a started runtime nobody waited for was lost"
            await asyncio.sleep(0.05)
        await pool.release(slot)
    finally:
        await pool.aclose()
    assert not _alive(slot.handle.pid)


async def test_runtimes_are_forked_only_from_the_deployers_own_interpreter(tmp_path: Path) -> None:
    """The zygote runs as root outside any sandbox: a key whose environment's `bin/python`
    is anything but this deployer's interpreter (a build may leave any file or link there)
    gets no zygote; its runtimes start themselves in their sandbox."""
    pool, key, settings, _ = await _pool(tmp_path)
    pool.settings = settings.model_copy(update={"pool_fork": True})
    try:
        assert pool._zygote(key) is not None  # the env's python is ours
        evil = tmp_path / "evil"
        (evil / "bin").mkdir(parents=True)
        (evil / "lib").mkdir()
        (evil / "lib" / "evil.sh").write_text("#!/bin/sh\nid > /tmp/owned\n")
        (evil / "bin" / "python").symlink_to("../lib/evil.sh")
        assert pool._zygote(dataclasses.replace(key, env_dir=str(evil))) is None
        copied = tmp_path / "copied"
        (copied / "bin").mkdir(parents=True)
        shutil.copy(os.path.realpath(sys.executable), copied / "bin" / "python")
        assert pool._zygote(dataclasses.replace(key, env_dir=str(copied))) is None
    finally:
        await pool.aclose()


async def test_a_failed_pre_start_is_retried_without_waiting_for_a_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pre-start that fails (bubblewrap's intermittent exit 1) is tried again a second
    later: the pool reaches its size with no cold start to set a refill off."""
    from lambdabus_platform.sandbox import SandboxStartError
    from lambdabus_platform.sandbox import launch as real

    failed: list[bool] = []

    async def launch(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(True)
            raise SandboxStartError("the sandbox ended (bubblewrap exit status 1) before …")
        return await real(*args, **kwargs)

    monkeypatch.setattr("lambdabus_deployer.pool.launch", launch)
    pool, _, _, _ = await _pool(tmp_path)
    try:
        pool.refill()
        await _idle(pool, 2)
        assert failed == [True]
    finally:
        await pool.aclose()
