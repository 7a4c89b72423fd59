"""Per-instance limits: how each is enforced on this machine, and the instance's size-limited
scratch dir. `detect_limiter` decides once per deployer; `Limiter.start` gives one run of an
instance what it needs: a cgroup (memory, cpu and pids for the whole process tree), or rlimits
where no cgroup is writable (per process only), a tmpfs of `tmp_size` MiB on its scratch dir
(or RLIMIT_FSIZE), the `preexec` that puts the child in place before it drops privileges, and
whether the kernel's OOM killer struck.

tmpfs pages are memory: what an instance writes to its /tmp counts against its memory cgroup,
so a function with `memory: 128, tmp_size: 64` that fills /tmp has 64 MiB left for itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import resource
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from lambdabus_deployer.cgroups import (
    DEFAULT_CPU_WEIGHT,
    CgroupHierarchy,
    CgroupLimits,
    InstanceCgroup,
    detect_cgroups,
    join,
)
from lambdabus_deployer.plan import DesiredRevision
from lambdabus_deployer.settings import LimitsMode, ScratchMode
from lambdabus_events.models import InstanceLimits
from lambdabus_platform.errors import PermanentError

log = logging.getLogger("lambdabus.deployer.limits")

MiB = 1024 * 1024
OOM_KILLED = "OOMKilled"


class LimitsUnavailable(PermanentError):
    code = "limits_unavailable"


@dataclass(frozen=True)
class Limits:
    """What the spec asks for one instance."""

    memory: int  # MiB
    cpu: int  # millicores
    pids: int
    open_files: int
    tmp_size: int  # MiB

    @classmethod
    def of(cls, revision: DesiredRevision) -> Limits:
        return cls(
            memory=revision.memory,
            cpu=revision.cpu,
            pids=revision.pids,
            open_files=revision.open_files,
            tmp_size=revision.tmp_size,
        )


# -- pure ------------------------------------------------------------------------------------


def limits_report(
    limits: Limits,
    *,
    cgroup: bool,
    tmpfs: bool,
    log_rate: int,
    per_instance_uid: bool = False,
) -> InstanceLimits:
    """What the status says an instance runs under (see `InstanceLimits`)."""
    if cgroup:
        memory: int | None = limits.memory
        cpu: int | None = limits.cpu
        pids: int | None = limits.pids
    else:
        memory = limits.memory  # RLIMIT_AS for Python, the heap cap for Node: per process
        cpu = None
        pids = limits.pids if per_instance_uid else None
    return InstanceLimits(
        enforced_by="cgroup" if cgroup else "rlimit",
        memory=memory,
        cpu=cpu,
        pids=pids,
        open_files=limits.open_files,
        tmp_size=limits.tmp_size,
        tmp_enforced_by="tmpfs" if tmpfs else "rlimit",
        log_lines_per_second=log_rate,
    )


RLimit = tuple[int, int]  # (resource.RLIMIT_*, value): soft and hard alike


def rlimits(
    limits: Limits,
    *,
    cgroup: bool,
    tmpfs: bool,
    python: bool,
    per_instance_uid: bool = False,
    privileged: bool = True,
    hard: Callable[[int], int] = lambda _: resource.RLIM_INFINITY,
) -> tuple[RLimit, ...]:
    """The rlimits of an instance's first process (inherited by all it starts). Open files
    always; the others only for what no cgroup or tmpfs enforces: the address space of Python
    (V8 reserves far more than it uses: Node gets its heap flag instead, see
    `runtime_command`), processes only when the instance has a uid of its own (RLIMIT_NPROC
    counts every process of the uid), and the size of each file it writes."""

    def capped(res: int, value: int) -> RLimit:
        # Without privilege a hard limit cannot be raised: stay under ours.
        limit = hard(res)
        if privileged or limit == resource.RLIM_INFINITY:
            return res, value
        return res, min(value, limit)

    found = [capped(resource.RLIMIT_NOFILE, limits.open_files)]
    if not cgroup:
        if python:
            found.append(capped(resource.RLIMIT_AS, limits.memory * MiB))
        if per_instance_uid:
            found.append(capped(resource.RLIMIT_NPROC, limits.pids))
    if not tmpfs:
        found.append(capped(resource.RLIMIT_FSIZE, limits.tmp_size * MiB))
    return tuple(found)


INODES_PER_MIB = 256  # a file per 4 KiB on average: enough, and a bound on kernel memory


def tmpfs_options(size_mib: int, uid: int, gid: int) -> str:
    inodes = max(1024, size_mib * INODES_PER_MIB)
    return f"size={size_mib}m,nr_inodes={inodes},mode=0700,uid={uid},gid={gid}"


def oom_message(memory: int) -> str:
    return f"{OOM_KILLED}: it used more than its {memory} MiB of memory and the kernel killed it"


# -- I/O: the scratch dir --------------------------------------------------------------------

ChildAction = Callable[[], None]  # runs in the child between fork and exec


class ScratchFs(Protocol):
    """How an instance's scratch dir (its /tmp, HOME and TMPDIR) is limited in size."""

    @property
    def kind(self) -> Literal["tmpfs", "rlimit"]: ...

    def prepare(
        self, path: Path, size_mib: int, owner: tuple[int, int] | None = None
    ) -> ChildAction | None:
        """What the child does to its scratch dir before it execs (None: nothing). The tmpfs
        belongs to `owner` (uid, gid), by default to the dir's owner."""
        ...


_CLONE_NEWNS = 0x00020000
_MS_NOSUID = 2
_MS_NODEV = 4
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18

# Resolved now, in the parent: the child only calls them (no dynamic loading after fork).
_libc = ctypes.CDLL(None, use_errno=True)
_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_mount = _libc.mount
_mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount_private_tmpfs(target: bytes, options: bytes) -> None:
    """In the child: a mount namespace of its own in which `target` is a fresh tmpfs. Nothing
    propagates to the host, and the kernel frees the tmpfs with the namespace, when the last
    process of the instance has exited: nothing to unmount, nothing left when the deployer is
    killed, no copy of it in another sandbox's mount namespace."""
    _check(_unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    _check(
        _mount(b"lambdabus", target, b"tmpfs", _MS_NOSUID | _MS_NODEV, options),
        f"mount tmpfs on {os.fsdecode(target)}",
    )


@dataclass(frozen=True)
class TmpfsScratch:
    """A tmpfs of the instance's `tmp_size` on its scratch dir, mounted by the child in a
    private mount namespace (needs CAP_SYS_ADMIN, i.e. root, before privileges drop). Owner and
    mode are those of the dir, so whoever the sandbox runs as keeps writing it."""

    kind: Literal["tmpfs", "rlimit"] = "tmpfs"

    def prepare(
        self, path: Path, size_mib: int, owner: tuple[int, int] | None = None
    ) -> ChildAction | None:
        if owner is None:
            st = path.stat()
            owner = (st.st_uid, st.st_gid)
        target = os.fsencode(path)
        options = tmpfs_options(size_mib, *owner).encode()
        return lambda: mount_private_tmpfs(target, options)


@dataclass(frozen=True)
class PlainScratch:
    """A plain dir; RLIMIT_FSIZE limits each file instead."""

    kind: Literal["tmpfs", "rlimit"] = "rlimit"

    def prepare(
        self, path: Path, size_mib: int, owner: tuple[int, int] | None = None
    ) -> ChildAction | None:
        return None


def probe_tmpfs(where: Path) -> str:
    """Why a child cannot mount its scratch tmpfs here ("" if it can): tried in a child."""
    probe = where / f".tmpfs-probe-{os.getpid()}"
    true = shutil.which("true") or "/bin/true"
    try:
        probe.mkdir(parents=True, exist_ok=True)
        action = TmpfsScratch().prepare(probe, 1)
        subprocess.run([true], preexec_fn=action, check=True, capture_output=True)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) else str(exc)
        return f"cannot mount a tmpfs ({detail or exc})"
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()
    return ""


# -- one run of an instance ------------------------------------------------------------------


def _preexec(
    procs_files: tuple[str, ...], scratch: ChildAction | None, limits: tuple[RLimit, ...]
) -> None:
    """In the child between fork and exec, before any privilege is dropped."""
    join(procs_files)
    if scratch is not None:
        scratch()
    for res, value in limits:
        resource.setrlimit(res, (value, value))


@dataclass
class RunLimits:
    """The limits of one run of an instance (see `Limiter.start`)."""

    preexec: ChildAction
    cgroup: InstanceCgroup | None
    _baseline: int = 0
    _oom: bool = False
    _watch: asyncio.Task[None] | None = field(default=None, repr=False)
    # A specialised pre-started run: the cpu limit it gets once it listens (see `settle`).
    _settle: Callable[[], None] | None = field(default=None, repr=False)
    _settling: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def baseline(self) -> int:
        return self._baseline

    def settle_after(self, seconds: float) -> None:
        """`settle` in `seconds` (at once if 0), in place of when it was due: a pooled run that
        now listens keeps its start-up boost while it answers the request that woke it."""
        if self._settle is None:
            return
        if seconds <= 0:
            self.settle()
            return
        if self._settling is not None:
            self._settling.cancel()

        async def _later() -> None:
            await asyncio.sleep(seconds)
            self._settling = None
            self.settle()

        self._settling = asyncio.create_task(_later())

    def settle(self) -> None:
        """Give the run its own cpu limit (a pooled run starts with the pool's: its function
        loads at full speed, as a startup CPU boost). Once; nothing for other runs."""
        settle, self._settle = self._settle, None
        if self._settling is not None:
            self._settling.cancel()
            self._settling = None
        if settle is not None:
            try:
                settle()
            except OSError as exc:
                log.warning("cannot set an instance's cpu limit", extra={"error": str(exc)})

    async def detach(self) -> None:
        """Stop watching the run and leave its cgroup (a deployer stops, the run goes on),
        with its own cpu limit: a boost still running would be nobody's to end (a next
        leader adopts the cgroup as it finds it)."""
        self.settle()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    def oom_killed(self) -> bool:
        """Did the kernel's OOM killer kill a process of this run (then all of it is killed)."""
        if not self._oom and self.cgroup is not None:
            self._oom = self.cgroup.oom_kills() > self._baseline
        return self._oom

    async def kill_all(self) -> None:
        """SIGKILL every process of the run: one that escaped the process group too."""
        if self.cgroup is not None:
            await asyncio.to_thread(self.cgroup.kill_all)

    async def watch_oom(self, interval: float) -> None:
        """An OOM kill of any process takes the whole instance: the runtime must not live on
        without the child it started (cgroup v2's memory.oom.group does the same)."""
        while not self.oom_killed():  # noqa: ASYNC110 (a counter in a file: nothing to await)
            await asyncio.sleep(interval)
        await self.kill_all()

    async def close(self) -> None:
        """Kill what is left and remove the cgroup. (The scratch tmpfs goes with the last
        process of the run: it lives in the run's own mount namespace.)"""
        self.settle()
        if self._watch is not None:
            self._watch.cancel()
            try:
                await self._watch
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("the OOM watch of an instance failed")
        if self.cgroup is not None:
            self.oom_killed()  # read the counter while the cgroup is still there
            try:
                await asyncio.to_thread(self.cgroup.remove)
            except OSError as exc:
                log.warning("cannot remove an instance cgroup", extra={"error": str(exc)})


@dataclass(frozen=True)
class Limiter:
    """What this machine lets the deployer enforce, decided once (`detect_limiter`)."""

    hierarchy: CgroupHierarchy | None
    scratch: ScratchFs
    note: str = ""  # why limits are weaker than they could be
    oom_poll_interval: float = 0.2

    @property
    def enforces_memory(self) -> bool:
        """The memory limit holds for the whole tree: no per-process limit (RLIMIT_AS, Node's
        heap flag) is needed, and an instance over it is OOMKilled."""
        return self.hierarchy is not None

    def report(self, limits: Limits, *, log_rate: int, own_uid: bool = False) -> InstanceLimits:
        return limits_report(
            limits,
            cgroup=self.hierarchy is not None,
            tmpfs=self.scratch.kind == "tmpfs",
            log_rate=log_rate,
            per_instance_uid=own_uid,
        )

    async def start(
        self,
        instance: str,
        limits: Limits,
        scratch: Path,
        *,
        python: bool,
        owner: tuple[int, int] | None = None,
        own_uid: bool = False,
        weight: int = DEFAULT_CPU_WEIGHT,
    ) -> RunLimits:
        """Make the cgroup of one run and say what its child does before exec (`preexec`):
        join the cgroup, mount its scratch tmpfs (owned by `owner`, the uid and gid the sandbox
        runs as; default: the scratch dir's owner), set its rlimits (RLIMIT_NPROC too without
        a cgroup, if `own_uid`: no other process runs as the instance's uid). `weight`: its
        cgroup's share of contended cores (the pool's slots start in the background). The
        scratch dir exists. `close()` the result when the run ends."""
        cgroup: InstanceCgroup | None = None
        if self.hierarchy is not None:
            cgroup = await asyncio.to_thread(
                self.hierarchy.create,
                instance,
                CgroupLimits(memory=limits.memory, cpu=limits.cpu, pids=limits.pids, weight=weight),
            )
        found = rlimits(
            limits,
            cgroup=cgroup is not None,
            tmpfs=self.scratch.kind == "tmpfs",
            python=python,
            per_instance_uid=own_uid,
            privileged=os.geteuid() == 0,
            hard=lambda res: resource.getrlimit(res)[1],
        )
        procs = cgroup.procs_files if cgroup is not None else ()
        mount = self.scratch.prepare(scratch, limits.tmp_size, owner)
        run = RunLimits(
            preexec=lambda: _preexec(procs, mount, found),
            cgroup=cgroup,
            _baseline=cgroup.oom_kills() if cgroup is not None else 0,
        )
        if cgroup is not None:
            run._watch = asyncio.create_task(run.watch_oom(self.oom_poll_interval))
        return run

    async def specialise(
        self,
        slot: str,
        instance: str,
        limits: Limits,
        *,
        python: bool,
        own_uid: bool = False,
        boost: tuple[int, float] | None = None,
    ) -> tuple[RunLimits, tuple[RLimit, ...]]:
        """A pre-started run (the pool's `slot`, started under `start(slot, SLOT_LIMITS)`)
        becomes `instance`: its cgroup is renamed and given the instance's limits, and the
        default cpu weight in place of the slot's background one (memory the slot already
        charged stays charged). Returns the run's limits and the rlimits its
        runtime sets on itself before it loads any code of the function (lowering one's own
        rlimits needs no privilege; setting another process's needs CAP_SYS_RESOURCE, which a
        container may not grant). Its scratch tmpfs keeps the size it was mounted with (the
        pool keys slots by `tmp_size`). `boost` (millicores, seconds): the cpu limit is that
        until `settle()`, at most those seconds; memory and pids hold at once.
        Quick file operations only: done on the event loop (this is the cold start's path)."""
        found = rlimits(
            limits,
            cgroup=self.hierarchy is not None,
            tmpfs=self.scratch.kind == "tmpfs",
            python=python,
            per_instance_uid=own_uid,
            privileged=os.geteuid() == 0,
            hard=lambda res: resource.getrlimit(res)[1],
        )
        for res, value in found:
            hard = resource.getrlimit(res)[1]
            if hard != resource.RLIM_INFINITY and value > hard:
                raise LimitsUnavailable(
                    f"a pre-started run cannot be given rlimit {res} = {value} (above {hard})"
                )
        cgroup: InstanceCgroup | None = None
        final = CgroupLimits(memory=limits.memory, cpu=limits.cpu, pids=limits.pids)
        settle: Callable[[], None] | None = None
        if self.hierarchy is not None:
            hierarchy = self.hierarchy
            found_cgroup = hierarchy.find(slot)
            if found_cgroup is None:
                raise LimitsUnavailable(f"the cgroup of {slot} is gone")
            found_cgroup.rename(instance)
            first = final
            if boost is not None and boost[0] > limits.cpu:
                first = CgroupLimits(memory=limits.memory, cpu=boost[0], pids=limits.pids)

                def settle() -> None:
                    hierarchy.create(instance, final)

            cgroup = hierarchy.create(instance, first)
        run = RunLimits(
            preexec=lambda: None,
            cgroup=cgroup,
            _baseline=cgroup.oom_kills() if cgroup is not None else 0,
            _settle=settle,
        )
        if cgroup is not None:
            run._watch = asyncio.create_task(run.watch_oom(self.oom_poll_interval))
        if boost is not None:
            run.settle_after(boost[1])  # (nothing to settle without a boost above its limit)
        return run, found

    async def adopt(self, instance: str, baseline: int) -> RunLimits:
        """The limits of a run a previous deployer started: its cgroup, if it has one, with the
        OOM count it had when the run started."""
        cgroup = self.hierarchy.find(instance) if self.hierarchy is not None else None
        run = RunLimits(preexec=lambda: None, cgroup=cgroup, _baseline=baseline)
        if cgroup is not None:
            run._watch = asyncio.create_task(run.watch_oom(self.oom_poll_interval))
        return run

    async def clean_leftovers(self, instances: Iterable[str]) -> None:
        """After a deployer was killed: the cgroups of the instances it ran, killing whatever
        still runs in them (daemons included)."""
        for instance in instances:
            found = self.hierarchy.find(instance) if self.hierarchy is not None else None
            if found is not None:
                try:
                    await asyncio.to_thread(found.remove)
                except OSError as exc:
                    log.warning("cannot remove a leftover cgroup", extra={"error": str(exc)})


def detect_limiter(
    mode: LimitsMode,
    scratch_mode: ScratchMode,
    *,
    cgroup_root: str,
    state_dir: Path,
    oom_poll_interval: float = 0.2,
) -> Limiter:
    """Cgroups where one is writable (else rlimits), a tmpfs scratch where we may mount one
    (else RLIMIT_FSIZE). A mode that names a mechanism turns its absence into an error."""
    notes = []
    hierarchy: CgroupHierarchy | None = None
    if mode != "rlimit":
        hierarchy, why = detect_cgroups(cgroup_root)
        if hierarchy is None:
            if mode == "cgroup":
                raise LimitsUnavailable(
                    f"no writable cgroup for instance limits: {why}; "
                    "set LAMBDABUS_DEPLOYER_LIMITS=auto to fall back to rlimits"
                )
            notes.append(f"no cgroup ({why}): rlimits per process")
    scratch: ScratchFs = PlainScratch()
    if scratch_mode != "rlimit":
        problem = probe_tmpfs(state_dir)
        if not problem:
            scratch = TmpfsScratch()
        elif scratch_mode == "tmpfs":
            raise LimitsUnavailable(
                f"{problem}; set LAMBDABUS_DEPLOYER_SCRATCH=auto to fall back to RLIMIT_FSIZE"
            )
        else:
            notes.append(f"{problem}: /tmp limited per file")
    return Limiter(hierarchy, scratch, "; ".join(notes), oom_poll_interval)
