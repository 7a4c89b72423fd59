"""Per-instance limits with real cgroups and real instances (the deployer in-process, a real
nats-server, the real runtime): a fork bomb stops at the pids limit while a neighbour keeps its
latency, a memory hog's child takes the whole instance down as OOMKilled and it restarts, a disk
filler gets ENOSPC at its /tmp size, and a CPU spinner gets its share of a core.

Skipped, saying why, where this machine gives no writable cgroup (or, for /tmp, no tmpfs mount).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from lambdabus_deployer.cgroups import CgroupHierarchy, InstanceCgroup, detect_cgroups
from lambdabus_deployer.limits import TmpfsScratch, probe_tmpfs
from lambdabus_events.models import DeploymentState
from lambdabus_platform.bus import Bus
from lambdabus_platform.natsserver import run_nats_server
from lambdabus_platform.settings import NatsSettings
from tests.integration.test_deployer import World, ready_with, running_deployer

pytestmark = pytest.mark.timeout(120)

FAST = """\
async def main(request):
    return {"ok": True}
"""

# Every process forks for good: each child forks too, and a refused fork is tried again.
FORK_BOMB = """\
import os


def bomb():
    while True:
        try:
            os.fork()
        except OSError:
            pass


async def main(request):
    if os.fork() == 0:
        bomb()
    return {"started": True}
"""

# The runtime stays small; a child it starts touches twice the instance's memory.
MEMORY_HOG = """\
import subprocess
import sys

EAT = "hoard = bytearray(2 * 96 * 1024 * 1024)\\nprint('ate it all', flush=True)\\n"


def main(request):
    child = subprocess.run([sys.executable, "-c", EAT])
    return {"child": child.returncode}
"""

DISK_FILLER = """\
import errno
import os


async def main(request):
    written = 0
    chunk = b"x" * (256 * 1024)
    try:
        with open(os.path.join(os.environ["TMPDIR"], "filler"), "wb") as f:
            while True:
                f.write(chunk)
                f.flush()
                written += len(chunk)
    except OSError as exc:
        error = errno.errorcode.get(exc.errno, str(exc.errno))
    os.remove(os.path.join(os.environ["TMPDIR"], "filler"))
    return {"error": error, "written": written}
"""

# The spin runs in a child process: the runtime itself stays idle and answers its health checks.
SPINNER = """\
import subprocess
import sys

SPIN = "import time\\nend = time.monotonic() + 4\\nwhile time.monotonic() < end:\\n    pass\\n"


def main(request):
    subprocess.Popen([sys.executable, "-c", SPIN])
    return {"spinning": True}
"""


@pytest.fixture(scope="module")
def hierarchy() -> CgroupHierarchy:
    found, why = detect_cgroups("lambdabus")
    if found is None:
        pytest.skip(f"no writable cgroup on this machine: {why}")
    return found


@pytest.fixture
async def nats_url(tmp_path: Path) -> AsyncIterator[str]:
    # A nats-server of its own: the deployer reconciles every function in the KV.
    async with run_nats_server(
        tmp_path / ".lambdabus" / "nats", log_path=tmp_path / "nats.log"
    ) as s:
        yield s.url


@pytest.fixture
async def world(tmp_path: Path, nats_settings: NatsSettings, bus: Bus) -> AsyncIterator[World]:
    async with aiohttp.ClientSession() as http:
        yield World(bus=bus, tmp=tmp_path, nats=nats_settings, http=http)


def cgroup_of(hierarchy: CgroupHierarchy, state: DeploymentState) -> InstanceCgroup:
    found = hierarchy.find(state.instances[0].id)
    assert found is not None, f"no cgroup for {state.instances[0].id}"
    return found


async def latencies(world: World, endpoint: str, count: int) -> list[float]:
    taken = []
    for _ in range(count):
        start = time.perf_counter()
        assert await world.call(endpoint) == {"ok": True}
        taken.append(time.perf_counter() - start)
    return taken


def pause(cgroup: InstanceCgroup, sig: signal.Signals) -> None:
    for pid in cgroup.processes():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


async def eventually(check: object, timeout: float = 20.0) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "did not happen in time"
        await asyncio.sleep(0.05)


async def test_a_fork_bomb_stops_at_the_pids_limit_and_the_neighbour_keeps_its_latency(
    world: World, hierarchy: CgroupHierarchy
) -> None:
    async with running_deployer(world.settings()):
        await world.create("neighbour", FAST)
        await world.create("bomber", FORK_BOMB, pids=32)
        neighbour = await world.wait_state("neighbour", ready_with(1))
        bomber = await world.wait_state("bomber", ready_with(1))
        assert neighbour is not None
        assert bomber is not None
        assert bomber.limits is not None
        assert (bomber.limits.enforced_by, bomber.limits.pids) == ("cgroup", 32)
        cgroup = cgroup_of(hierarchy, bomber)
        endpoint = neighbour.endpoints[0]
        before = statistics.median(await latencies(world, endpoint, 200))

        await world.call(bomber.endpoints[0])
        await eventually(lambda: cgroup.fork_rejections() > 100)
        processes = len(cgroup.processes())
        # The machine's other load comes and goes: compare the neighbour with the bomb running
        # and with it stopped (SIGSTOP), in alternating rounds of the same run.
        running: list[float] = []
        paused: list[float] = []
        for _ in range(10):
            running += await latencies(world, endpoint, 20)
            pause(cgroup, signal.SIGSTOP)
            paused += await latencies(world, endpoint, 20)
            pause(cgroup, signal.SIGCONT)
        during, baseline = statistics.median(running), statistics.median(paused)
        ratio = during / baseline
        print(
            f"\nfork bomb at pids=32: {processes} processes, {cgroup.fork_rejections()} forks "
            f"refused; neighbour p50 {before * 1000:.2f} ms before it, {during * 1000:.2f} ms "
            f"while it runs, {baseline * 1000:.2f} ms while it is stopped (x{ratio:.2f})"
        )
        assert processes <= 32
        assert ratio <= 2.0, f"the neighbour's p50 went from {baseline:.4f} s to {during:.4f} s"
    # The deployer stopped: every process of the bomb is gone with its cgroup.
    assert hierarchy.find(bomber.instances[0].id) is None


async def test_a_memory_hog_is_oomkilled_reported_and_restarted(
    world: World, hierarchy: CgroupHierarchy
) -> None:
    async with running_deployer(world.settings()) as url:
        await world.create("hog", MEMORY_HOG, memory=96)
        first = await world.wait_state("hog", ready_with(1))
        assert first is not None
        assert first.limits is not None
        assert (first.limits.enforced_by, first.limits.memory) == ("cgroup", 96)
        try:
            answer = await world.call(first.endpoints[0])
        except aiohttp.ClientError:
            pass  # the instance went down before it answered
        else:  # it answered before the deployer saw the OOM kill, and went down after
            assert answer == {"child": -9}, answer
        again = await world.wait_state(
            "hog", lambda s: ready_with(1)(s) and s is not None and s.instances[0].restarts == 1
        )
        assert again is not None
        instance = again.instances[0]
        assert instance.id == first.instances[0].id  # the same slot, restarted with back-off
        assert instance.last_exit.startswith(
            "OOMKilled: it used more than its 96 MiB of memory and the kernel killed it"
        ), instance.last_exit
        assert "OOMKilled" in again.message
        lines = await world.logs(
            "hog", lambda ls: any("OOMKilled" in x.line and "restarting in" in x.line for x in ls)
        )
        assert not any("ate it all" in x.line for x in lines)
        async with world.http.get(f"{url}/metrics") as response:
            metrics = await response.text()
        assert "lambdabus_deployer_instance_oom_kills_total 1.0" in metrics


async def test_a_disk_filler_gets_enospc_at_its_tmp_size_and_lives_on(
    world: World, hierarchy: CgroupHierarchy
) -> None:
    problem = probe_tmpfs(world.tmp)
    if problem:
        pytest.skip(f"the deployer cannot mount a tmpfs here: {problem}")
    async with running_deployer(world.settings()):
        await world.create("filler", DISK_FILLER, tmp_size=8)
        state = await world.wait_state("filler", ready_with(1))
        assert state is not None
        assert state.limits is not None
        assert (state.limits.tmp_size, state.limits.tmp_enforced_by) == (8, "tmpfs")
        for _ in range(2):  # the instance lives on, and can fill it again
            answer = await world.call(state.endpoints[0])
            assert answer["error"] == "ENOSPC"
            assert 7 * 1024 * 1024 <= answer["written"] <= 8 * 1024 * 1024
        after = await world.wait_state("filler", ready_with(1))
        assert after is not None
        assert after.instances[0].restarts == 0
        # (under instances/ for a fresh start, pool/ for a pre-started runtime)
        [scratch] = [
            Path(r.scratch) for r in world.table().load() if r.instance == state.instances[0].id
        ]
        assert not _is_mount_point(scratch)  # the tmpfs is the instance's alone
        assert not any(scratch.iterdir())
    assert not scratch.exists()


def _is_mount_point(path: Path) -> bool:
    return any(
        line.split()[1] == str(path) for line in Path("/proc/self/mounts").read_text().splitlines()
    )


async def test_a_cpu_spinner_gets_its_share_of_a_core(
    world: World, hierarchy: CgroupHierarchy
) -> None:
    async with running_deployer(world.settings(start_timeout=30.0)):
        await world.create("spinner", SPINNER, cpu=100)
        state = await world.wait_state("spinner", ready_with(1), timeout=40)
        assert state is not None
        cgroup = cgroup_of(hierarchy, state)
        if cgroup.cpu_seconds() is None:
            pytest.skip("no CPU accounting (cpuacct) for instance cgroups here")
        await world.call(state.endpoints[0])
        await asyncio.sleep(1.0)  # the spinner is running
        cpu0, wall0 = cgroup.cpu_seconds(), time.monotonic()
        await asyncio.sleep(2.0)
        cpu1, wall1 = cgroup.cpu_seconds(), time.monotonic()
        assert cpu0 is not None
        assert cpu1 is not None
        share = (cpu1 - cpu0) / (wall1 - wall0)
        print(f"\ncpu=100: the spinner got {share:.3f} of a core")
        assert 0.04 <= share <= 0.2, share


RLIMITS = """\
import errno
import os
import resource


def soft(which):
    return resource.getrlimit(which)[0]


async def main(request):
    big = os.path.join(os.environ["TMPDIR"], "big")
    try:
        with open(big, "wb") as f:
            f.write(b"x" * (3 * 1024 * 1024))
        wrote = "ok"
    except OSError as exc:
        wrote = errno.errorcode.get(exc.errno, str(exc.errno))
    if os.path.exists(big):
        os.remove(big)
    return {
        "nofile": soft(resource.RLIMIT_NOFILE),
        "as": soft(resource.RLIMIT_AS),
        "fsize": soft(resource.RLIMIT_FSIZE),
        "wrote": wrote,
    }
"""


async def test_with_cgroups_only_open_files_is_an_rlimit(
    world: World, hierarchy: CgroupHierarchy
) -> None:
    async with running_deployer(world.settings(limits="cgroup")):
        await world.create("probe", RLIMITS, memory=128, open_files=256, tmp_size=8)
        state = await world.wait_state("probe", ready_with(1))
        assert state is not None
        assert cgroup_of(hierarchy, state).processes()
        answer = await world.call(state.endpoints[0])
        infinity = -1  # RLIM_INFINITY
        assert answer == {"nofile": 256, "as": infinity, "fsize": infinity, "wrote": "ok"}


async def test_without_cgroups_rlimits_limit_each_process(world: World) -> None:
    async with running_deployer(world.settings(limits="rlimit", scratch="rlimit")):
        await world.create("probe", RLIMITS, memory=256, open_files=256, tmp_size=2)
        state = await world.wait_state("probe", ready_with(1))
        assert state is not None
        assert state.limits is not None
        assert state.limits.model_dump() == {
            "enforced_by": "rlimit",
            "memory": 256,
            "cpu": None,
            "pids": None,
            "open_files": 256,
            "tmp_size": 2,
            "tmp_enforced_by": "rlimit",
            "log_lines_per_second": 2000,
        }
        answer = await world.call(state.endpoints[0])
        assert answer == {
            "nofile": 256,
            "as": 256 * 1024 * 1024,
            "fsize": 2 * 1024 * 1024,
            "wrote": "EFBIG",  # a file over tmp_size (Python ignores SIGXFSZ)
        }


def test_the_scratch_tmpfs_is_the_childs_alone_and_has_the_owner_asked(tmp_path: Path) -> None:
    problem = probe_tmpfs(tmp_path)
    if problem:
        pytest.skip(f"no tmpfs mount here: {problem}")
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    mount = TmpfsScratch().prepare(scratch, 4, owner=(12345, 23456))
    seen = subprocess.run(
        ["sh", "-c", f"stat -c '%u:%g %a' {scratch}; grep ' {scratch} ' /proc/self/mounts"],
        preexec_fn=mount,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert seen[0] == "12345:23456 700"
    assert "tmpfs" in seen[1]
    assert "size=4096k" in seen[1]
    assert "nosuid,nodev" in seen[1]
    # On the host: a plain empty dir, no mount to undo.
    assert f" {scratch} " not in Path("/proc/self/mounts").read_text()
    assert scratch.stat().st_uid == os.getuid()
