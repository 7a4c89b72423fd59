"""Per-instance cgroups: what to write for an instance's limits (pure, cgroup v1 and v2) and the
hierarchies that write it (I/O behind `CgroupHierarchy`), so that memory, CPU and processes are
limited for an instance's whole process tree, not per process.

An instance's cgroup is `<the deployer's own cgroup>/<root>/<instance id>` in every controller
it needs, so the deployer's own limits (a systemd unit, a container) still cover its instances.
The child joins it between fork and exec (`join`), before it drops privileges; every process it
starts is then in it, and only root can move them out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

MiB = 1024 * 1024
CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000  # the kernel refuses a quota under 1 ms
# Relative CPU weight when cores are contended (cgroup v2's `cpu.weight` scale: 1..10000, 100 the
# kernel's default; v1's `cpu.shares` is 1024 for 100). Instances run at the default; the pool's
# idle slots start at the least, so that pre-starting runtimes in the background does not slow
# the cold start that just took one (it runs on cores nothing else wants).
DEFAULT_CPU_WEIGHT = 100
BACKGROUND_CPU_WEIGHT = 1

V1_REQUIRED = ("memory", "cpu", "pids")
V1_OPTIONAL = ("cpuacct", "freezer")  # CPU usage, and a frozen kill of everything left
V2_REQUIRED = ("memory", "cpu", "pids")


@dataclass(frozen=True)
class CgroupLimits:
    memory: int  # MiB, the whole tree, page cache and tmpfs pages it writes included
    cpu: int  # millicores: 1000 = one core
    pids: int  # processes and threads
    weight: int = DEFAULT_CPU_WEIGHT  # share of contended cores, next to the other instances


Write = tuple[str, str, str]  # (controller, file, value); v2 has one directory: controller ""


def cpu_quota_us(millicores: int, period_us: int = CPU_PERIOD_US) -> int:
    """CPU time per period for `millicores` (1000 = one whole period per period)."""
    return max(MIN_CPU_QUOTA_US, millicores * period_us // 1000)


def cpu_shares(weight: int) -> int:
    """v1 `cpu.shares` for a v2 `cpu.weight` (the kernel's least is 2)."""
    return max(2, weight * 1024 // DEFAULT_CPU_WEIGHT)


def v1_writes(
    limits: CgroupLimits, *, memsw: bool, current: int | None = None, period_us: int = CPU_PERIOD_US
) -> list[Write]:
    """What to write, in order, into a v1 instance cgroup whose memory limit is `current` bytes
    (None: a new cgroup, unlimited). Swap is off: memory+swap equals memory where the kernel
    accounts swap (memsw), else swappiness 0. The kernel wants memsw >= memory at every step
    (else EINVAL): lowering the limits writes memory first, raising them (a pre-started slot
    given a function's larger limit) memsw first."""
    memory = str(limits.memory * MiB)
    writes: list[Write] = [("memory", "memory.limit_in_bytes", memory)]
    if memsw:
        memsw_write: Write = ("memory", "memory.memsw.limit_in_bytes", memory)
        raising = current is not None and limits.memory * MiB > current
        if raising:
            writes.insert(0, memsw_write)
        else:
            writes.append(memsw_write)
    else:
        writes.append(("memory", "memory.swappiness", "0"))
    writes += [
        ("cpu", "cpu.cfs_period_us", str(period_us)),
        ("cpu", "cpu.cfs_quota_us", str(cpu_quota_us(limits.cpu, period_us))),
        ("cpu", "cpu.shares", str(cpu_shares(limits.weight))),
        ("pids", "pids.max", str(limits.pids)),
    ]
    return writes


def v2_writes(limits: CgroupLimits, *, swap: bool, period_us: int = CPU_PERIOD_US) -> list[Write]:
    """What to write into a new v2 instance cgroup. `memory.oom.group`: an OOM kill takes the
    whole instance, as the v1 watcher does by hand."""
    writes: list[Write] = [("", "memory.max", str(limits.memory * MiB))]
    if swap:
        writes.append(("", "memory.swap.max", "0"))
    writes += [
        ("", "memory.oom.group", "1"),
        ("", "cpu.max", f"{cpu_quota_us(limits.cpu, period_us)} {period_us}"),
        ("", "cpu.weight", str(min(10_000, max(1, limits.weight)))),
        ("", "pids.max", str(limits.pids)),
    ]
    return writes


def v1_mounts(mounts: str) -> dict[str, str]:
    """Controller -> mount point of the v1 hierarchies in `/proc/self/mounts`."""
    found: dict[str, str] = {}
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup":
            for option in fields[3].split(","):
                found.setdefault(option, fields[1])
    return {c: m for c, m in found.items() if c in (*V1_REQUIRED, *V1_OPTIONAL)}


def v2_mount(mounts: str) -> str | None:
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return fields[1]
    return None


def own_cgroups(proc_self_cgroup: str) -> tuple[dict[str, str], str | None]:
    """The cgroup of this process in each v1 controller, and in the v2 hierarchy."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in proc_self_cgroup.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and controllers == "":
            v2 = path
        else:
            for controller in controllers.split(","):
                v1[controller] = path
    return v1, v2


def oom_kills(text: str) -> int:
    """The `oom_kill` counter of v1 `memory.oom_control` or v2 `memory.events`."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


# -- I/O -------------------------------------------------------------------------------------


class InstanceCgroup(Protocol):
    """One instance's cgroup (in every controller)."""

    @property
    def procs_files(self) -> tuple[str, ...]:
        """The `cgroup.procs` files the child writes its pid to (see `join`)."""
        ...

    def oom_kills(self) -> int: ...

    def fork_rejections(self) -> int:
        """How many forks the pids limit refused."""
        ...

    def cpu_seconds(self) -> float | None: ...

    def processes(self) -> set[int]: ...

    def kill_all(self, timeout: float = 5.0) -> None:
        """SIGKILL every process in it, until none is left (or `timeout`)."""
        ...

    def remove(self) -> None:
        """Kill what is left and remove the directories."""
        ...

    def rename(self, name: str) -> None:
        """Give it another name (its processes stay in it; a pooled run becomes an instance)."""
        ...


class CgroupHierarchy(Protocol):
    """Where this deployer makes its instances' cgroups: v1 or v2."""

    @property
    def version(self) -> Literal[1, 2]: ...

    def describe(self) -> str: ...

    def create(self, name: str, limits: CgroupLimits) -> InstanceCgroup:
        """A new cgroup with the limits written; an existing one of that name is reused."""
        ...

    def find(self, name: str) -> InstanceCgroup | None:
        """The cgroup of that name if it exists (a leftover of a previous run)."""
        ...


def join(procs_files: Sequence[str]) -> None:
    """Move the calling process into the cgroup. Runs in the child between fork and exec:
    plain os calls only."""
    pid = str(os.getpid()).encode()
    for path in procs_files:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)


def _events_max(path: Path) -> int:
    """The `max` counter of `pids.events` (v1 and v2 alike)."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "max":
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _read_small(path: str) -> str:
    """A cgroup file of a few lines, read without pathlib's and io's layers: the OOM counters
    are read five times a second per instance, on the event loop (~3x quicker than
    `Path.read_text`)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096).decode()
    finally:
        os.close(fd)


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _read_pids(path: Path) -> set[int]:
    try:
        return {int(x) for x in path.read_text().split()}
    except (OSError, ValueError):
        return set()


def _kill(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _rmdir(directory: Path, timeout: float) -> None:
    """Remove a cgroup directory; it stays busy until its last process has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


@dataclass(frozen=True)
class V1Cgroup:
    dirs: dict[str, Path]  # controller -> directory (co-mounted controllers share one)

    @property
    def procs_files(self) -> tuple[str, ...]:
        unique = dict.fromkeys(self.dirs.values())
        return tuple(str(d / "cgroup.procs") for d in unique)

    def oom_kills(self) -> int:
        try:
            return oom_kills(_read_small(f"{self.dirs['memory']}/memory.oom_control"))
        except OSError:
            return 0

    def fork_rejections(self) -> int:
        return _events_max(self.dirs["pids"] / "pids.events")

    def cpu_seconds(self) -> float | None:
        if "cpuacct" not in self.dirs:
            return None
        try:
            return int((self.dirs["cpuacct"] / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return None

    def processes(self) -> set[int]:
        return _read_pids(self.dirs["pids"] / "cgroup.procs")

    def kill_all(self, timeout: float = 5.0) -> None:
        procs = self.dirs["pids"] / "cgroup.procs"
        freezer = self.dirs.get("freezer")
        deadline = time.monotonic() + timeout
        while (pids := _read_pids(procs)) and time.monotonic() < deadline:
            # Frozen, nothing forks while we kill: one pass gets all (a fork bomb too).
            frozen = freezer is not None and self._freeze(freezer, deadline)
            _kill(pids)
            if frozen and freezer is not None:
                _kill(_read_pids(procs))
                with contextlib.suppress(OSError):
                    _write(freezer / "freezer.state", "THAWED")  # the killed ones die now
            time.sleep(0.005)

    @staticmethod
    def _freeze(freezer: Path, deadline: float) -> bool:
        try:
            _write(freezer / "freezer.state", "FROZEN")
            while (freezer / "freezer.state").read_text().strip() != "FROZEN":
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)
        except OSError:
            return False
        return True

    def remove(self) -> None:
        self.kill_all()
        for directory in dict.fromkeys(self.dirs.values()):
            _rmdir(directory, timeout=5.0)

    def rename(self, name: str) -> None:
        for directory in dict.fromkeys(self.dirs.values()):
            directory.rename(directory.parent / name)


@dataclass(frozen=True)
class V1Hierarchy:
    roots: dict[str, Path]  # controller -> <mount>/<own cgroup>/<root name>
    memsw: bool
    version: Literal[1, 2] = 1

    def describe(self) -> str:
        return f"cgroup v1 ({', '.join(f'{c}: {p}' for c, p in sorted(self.roots.items()))})"

    def _dirs(self, name: str) -> dict[str, Path]:
        return {c: root / name for c, root in self.roots.items()}

    def create(self, name: str, limits: CgroupLimits) -> V1Cgroup:
        cgroup = V1Cgroup(self._dirs(name))
        try:
            existing = cgroup.dirs["memory"].is_dir()
            for directory in dict.fromkeys(cgroup.dirs.values()):
                directory.mkdir(exist_ok=True)
            current = (
                _read_int(cgroup.dirs["memory"] / "memory.limit_in_bytes") if existing else None
            )
            for controller, file, value in v1_writes(limits, memsw=self.memsw, current=current):
                _write(cgroup.dirs[controller] / file, value)
        except OSError:
            with contextlib.suppress(OSError):
                cgroup.remove()
            raise
        return cgroup

    def find(self, name: str) -> V1Cgroup | None:
        dirs = {c: d for c, d in self._dirs(name).items() if d.is_dir()}
        return V1Cgroup(dirs) if "pids" in dirs else None


@dataclass(frozen=True)
class V2Cgroup:
    dir: Path

    @property
    def procs_files(self) -> tuple[str, ...]:
        return (str(self.dir / "cgroup.procs"),)

    def oom_kills(self) -> int:
        try:
            return oom_kills(_read_small(f"{self.dir}/memory.events"))
        except OSError:
            return 0

    def fork_rejections(self) -> int:
        return _events_max(self.dir / "pids.events")

    def cpu_seconds(self) -> float | None:
        try:
            for line in (self.dir / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
        except (OSError, ValueError):
            pass
        return None

    def processes(self) -> set[int]:
        return _read_pids(self.dir / "cgroup.procs")

    def kill_all(self, timeout: float = 5.0) -> None:
        procs = self.dir / "cgroup.procs"
        deadline = time.monotonic() + timeout
        with contextlib.suppress(OSError):  # Linux 5.14+: the kernel kills them all
            _write(self.dir / "cgroup.kill", "1")
        while (pids := _read_pids(procs)) and time.monotonic() < deadline:
            _kill(pids)
            time.sleep(0.005)

    def remove(self) -> None:
        self.kill_all()
        _rmdir(self.dir, timeout=5.0)

    def rename(self, name: str) -> None:
        self.dir.rename(self.dir.parent / name)


@dataclass(frozen=True)
class V2Hierarchy:
    root: Path  # <mount>/<own cgroup>/<root name>
    swap: bool
    version: Literal[1, 2] = 2

    def describe(self) -> str:
        return f"cgroup v2 ({self.root})"

    def create(self, name: str, limits: CgroupLimits) -> V2Cgroup:
        cgroup = V2Cgroup(self.root / name)
        try:
            cgroup.dir.mkdir(exist_ok=True)
            for _, file, value in v2_writes(limits, swap=self.swap):
                _write(cgroup.dir / file, value)
        except OSError:
            with contextlib.suppress(OSError):
                cgroup.remove()
            raise
        return cgroup

    def find(self, name: str) -> V2Cgroup | None:
        directory = self.root / name
        return V2Cgroup(directory) if directory.is_dir() else None


# -- detection -------------------------------------------------------------------------------


def _probe(hierarchy: CgroupHierarchy) -> None:
    """Create and remove a cgroup with limits: raises OSError when we may not."""
    probe = hierarchy.create(f"probe-{os.getpid()}", CgroupLimits(memory=64, cpu=1000, pids=8))
    probe.remove()


def _v1(root_name: str, mounts: str, own: dict[str, str]) -> CgroupHierarchy:
    mounted = v1_mounts(mounts)
    missing = [c for c in V1_REQUIRED if c not in mounted or c not in own]
    if missing:
        raise OSError(f"cgroup v1: no {', '.join(missing)} hierarchy")
    roots = {
        c: Path(mounted[c]) / own[c].lstrip("/") / root_name
        for c in (*V1_REQUIRED, *V1_OPTIONAL)
        if c in mounted and c in own
    }
    for root in roots.values():
        root.mkdir(exist_ok=True)
    memsw = (roots["memory"].parent / "memory.memsw.limit_in_bytes").exists()
    hierarchy = V1Hierarchy(roots, memsw=memsw)
    _probe(hierarchy)
    return hierarchy


def _v2(root_name: str, mount: str, own: str) -> CgroupHierarchy:
    base = Path(mount) / own.lstrip("/")
    available = (base / "cgroup.controllers").read_text().split()
    missing = [c for c in V2_REQUIRED if c not in available]
    if missing:
        raise OSError(f"cgroup v2 at {base}: controllers {', '.join(missing)} are not available")
    enable = " ".join(f"+{c}" for c in V2_REQUIRED)
    # Fails (EBUSY) when our own cgroup holds processes and is not the root: v2 delegates
    # controllers only from cgroups without processes of their own.
    _write(base / "cgroup.subtree_control", enable)
    root = base / root_name
    root.mkdir(exist_ok=True)
    _write(root / "cgroup.subtree_control", enable)
    hierarchy = V2Hierarchy(root, swap=(root / "memory.swap.max").exists())
    _probe(hierarchy)
    return hierarchy


def detect_cgroups(root_name: str) -> tuple[CgroupHierarchy | None, str]:
    """The hierarchy this deployer can make instance cgroups in (v2 when it has the
    controllers, else v1), or None and why not."""
    try:
        mounts = Path("/proc/self/mounts").read_text()
        own_v1, own_v2 = own_cgroups(Path("/proc/self/cgroup").read_text())
    except OSError as exc:
        return None, f"cannot read this process's cgroups: {exc}"
    problems = []
    v2 = v2_mount(mounts)
    if v2 is not None and own_v2 is not None:
        try:
            return _v2(root_name, v2, own_v2), ""
        except OSError as exc:
            problems.append(str(exc))
    try:
        return _v1(root_name, mounts, own_v1), ""
    except OSError as exc:
        problems.append(str(exc))
    return None, "; ".join(problems) or "no cgroup hierarchy is mounted"
