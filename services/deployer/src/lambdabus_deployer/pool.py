"""The pool of pre-started runtimes (issue 11, "cold start in milliseconds"; Fission's pool
manager, without its specialisation over HTTP).

For each `PoolKey` in use (a Python runtime, a dependency environment, a network mode, a /tmp
size) the pool keeps `pool_size` sandboxes already running `python -m lambdabus_runtime --pool`
(more for a key whose cold starts found none idle: `PoolSizer`):
bubblewrap made, slirp4netns attached (network outbound), the interpreter started and the
runtime imported, waiting for one line on stdin. Each has its own uid, scratch tmpfs, socket
dir, log files, cgroup (`pool-…`, the pool's loose limits) and an empty code dir of its own,
bound read-only at the fixed path the runtime loads code from.

Specialising a slot to one instance (`specialise`): its code dir is filled with hard links
(or copies) of the artifact's code, its cgroup is renamed to the instance's and given the
instance's limits, its processes get the instance's rlimits, and the line naming the
function (flags and env) is written to its stdin, which is then closed. From then on it is
that instance, recorded in the process table like any other, for its whole life: a slot is
never given back to the pool nor to another function. An idle slot ends by itself when the
deployer goes (EOF on its stdin); its leftovers are cleaned at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import resource
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lambdabus_deployer.cgroups import BACKGROUND_CPU_WEIGHT, DEFAULT_CPU_WEIGHT
from lambdabus_deployer.detached import open_log_file
from lambdabus_deployer.limits import Limiter, Limits, RunLimits
from lambdabus_deployer.plan import POOL_TITLE_ROOM, PoolKey, RuntimePaths, render_pooled
from lambdabus_deployer.settings import DeployerSettings
from lambdabus_deployer.zygote import STUB, Zygote, ZygoteError
from lambdabus_platform.sandbox import (
    Identity,
    Sandbox,
    SandboxProcess,
    SandboxSpec,
    SandboxStartError,
    launch,
)

log = logging.getLogger("lambdabus.deployer.pool")

SLOT_PREFIX = "pool-"  # slot ids and their cgroups
# What an idle slot may use: memory and cpu enough to start the interpreter and import the
# runtime; rlimits (open files; processes without a cgroup) as high as any function may get,
# since its runtime lowers them to its function's before loading its code, and cannot raise.
# (Never above our own hard limits: without CAP_SYS_RESOURCE, which even root may lack in a
# container, they cannot be raised; `Limiter.specialise` refuses a function asking for more.)
SLOT_LIMITS = Limits(memory=128, cpu=1000, pids=32768, open_files=65536, tmp_size=64)


def _hard(res: int, value: int) -> int:
    limit = resource.getrlimit(res)[1]
    return value if limit == resource.RLIM_INFINITY else min(value, limit)


LOGS_DIR = "instance-logs"


def _said(path: Path, most: int = 1024) -> str:
    """The start of what a failed start wrote to its stderr file, on one line ("" if none)."""
    try:
        with path.open("rb") as f:
            head = f.read(most)
    except OSError:
        return ""
    return " ".join(head.decode(errors="replace").split())


@dataclass
class PoolSizer:
    """How many idle slots each key keeps: `base` (the pool size); one more for each cold start
    that found none idle (a miss: the next burst of that key finds one more), up to `most`;
    and one fewer for each `shrink_after` seconds without a miss, back to `base`. Pure: the
    caller gives the time."""

    base: int
    most: int
    shrink_after: float
    _extra: dict[PoolKey, tuple[int, float]] = field(default_factory=dict)

    def _extra_now(self, key: PoolKey, now: float) -> int:
        extra, since = self._extra.get(key, (0, now))
        return max(0, extra - int((now - since) // self.shrink_after))

    def missed(self, key: PoolKey, now: float) -> None:
        if self.base == 0:
            return  # no pool at all
        extra = min(max(self.most - self.base, 0), self._extra_now(key, now) + 1)
        self._extra[key] = (extra, now)

    def target(self, key: PoolKey, now: float) -> int:
        if self.base == 0:
            return 0
        extra = self._extra_now(key, now)
        if extra == 0:
            self._extra.pop(key, None)
        return self.base + extra

    def next_shrink(self, now: float) -> float | None:
        """In how many seconds some key gives a slot back (None: none is grown)."""
        due = [
            self.shrink_after - (now - since) % self.shrink_after
            for key, (_, since) in self._extra.items()
            if self._extra_now(key, now) > 0
        ]
        return min(due) if due else None

    def forget(self, keys: set[PoolKey]) -> None:
        for key in set(self._extra) - keys:
            del self._extra[key]


def pool_dir(settings: DeployerSettings) -> Path:
    """Where the slots' scratch and code dirs are (they keep them once specialised)."""
    return settings.state_dir / "pool"


def is_slot(instance: str) -> bool:
    return instance.startswith(SLOT_PREFIX)


@dataclass
class Slot:
    """One pre-started sandboxed runtime, not yet any function's."""

    id: str
    key: PoolKey
    identity: Identity
    scratch: Path
    socket_dir: Path
    code_dir: Path
    handle: SandboxProcess
    control: int  # the write end of its stdin
    stdout: Path
    stderr: Path
    status: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def alive(self) -> bool:
        return self.handle.process.returncode is None

    def close_control(self) -> None:
        """Close our end of its stdin (once: the number may be another file's afterwards)."""
        if self.control >= 0:
            with contextlib.suppress(OSError):
                os.close(self.control)
            self.control = -1


def _private_dir(path: Path, identity: Identity) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chown(path, identity.uid, identity.gid)
    path.chmod(0o700)


def _link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, dest, follow_symlinks=False)


def fill_code(source: Path, dest: Path) -> None:
    """The artifact's code into a slot's (empty) code dir: hard links where the file system
    allows, else copies; symlinks stay symlinks (as the read-only bind shows them)."""
    shutil.copytree(source, dest, symlinks=True, copy_function=_link_or_copy, dirs_exist_ok=True)


class Pool:
    """The pre-started runtimes of this deployer (the leader's local backend)."""

    def __init__(
        self,
        settings: DeployerSettings,
        *,
        sandbox: Sandbox,
        limiter: Limiter,
        runtime: RuntimePaths,
        wanted: Callable[[], Mapping[PoolKey, object]],
    ) -> None:
        self.settings = settings
        self.sandbox = sandbox
        self.limiter = limiter
        self.runtime = runtime
        self._wanted = wanted
        self._slots: dict[PoolKey, list[Slot]] = {}
        self._filling: asyncio.Task[None] | None = None
        self.sizer = PoolSizer(
            base=settings.pool_size,
            most=max(settings.pool_size, settings.pool_max_size),
            shrink_after=settings.pool_shrink_seconds,
        )
        self._shrink: asyncio.TimerHandle | None = None
        self._refill_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._starting: set[asyncio.Future[Slot]] = set()  # `start_now`'s, not yet up
        self._stopping: set[asyncio.Task[None]] = set()
        self._again = False
        self._closed = False
        self._failures: dict[PoolKey, int] = {}
        # The ids of the idle slots, in a file: what a killed deployer's slots left (their
        # cgroups) is removed at the next start. (An idle slot itself ends when its deployer
        # does: EOF on its stdin. Specialised ones are in the process table, as instances.)
        self._ids_path = settings.state_dir / "pool.json"
        # Every started slot not yet specialised, idle or taken: the pool's to stop at close.
        self._live: dict[str, Slot] = {}
        # Python runtimes forked from a zygote of this deployer's interpreter (`pool_fork`).
        self._forker: Zygote | None = None

    def _save_ids(self) -> None:
        tmp = self._ids_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sorted(self._live)))
        os.replace(tmp, self._ids_path)

    async def clean_leftovers(self) -> None:
        """At start: the cgroups of the idle slots a previous deployer left (killing what is
        still in them); their dirs and log files go with the deployer's other leftovers."""
        try:
            left = json.loads(self._ids_path.read_text())
        except (OSError, ValueError):
            left = []
        ids = [i for i in left if isinstance(i, str) and is_slot(i)]
        await self.limiter.clean_leftovers(ids)
        self._ids_path.unlink(missing_ok=True)

    @property
    def size(self) -> int:
        return self.settings.pool_size if self.sandbox.enabled else 0

    def idle(self) -> list[Slot]:
        return [slot for slots in self._slots.values() for slot in slots]

    def take(self, key: PoolKey) -> Slot | None:
        """A live slot for `key`, now the caller's (the pool starts another)."""
        slots = self._slots.get(key, [])
        taken: Slot | None = None
        while slots and taken is None:
            slot = slots.pop(0)
            if slot.alive:
                taken = slot
            else:
                self._discard(slot)
        if taken is None and self.size > 0 and key in self._slots:
            # (a key not filled yet, a function's first start, is no miss)
            self.sizer.missed(key, time.monotonic())
            log.info("no pre-started runtime was idle: a fresh start", extra={"env": key.env_dir})
        self._refill_soon()
        return taken

    def _refill_soon(self) -> None:
        """Refill after `pool_refill_delay_seconds`: the cold start that just took a slot (or
        found none) runs its course first. Starting a slot forks the deployer, holding its
        interpreter for milliseconds, right on that start's path otherwise. Once per delay: a
        stream of takes does not put the refill off for ever."""
        delay = self.settings.pool_refill_delay_seconds
        if delay <= 0:
            self.refill()
        elif self._refill_timer is None and not self._closed:

            def _due() -> None:
                self._refill_timer = None
                self.refill()

            self._refill_timer = asyncio.get_running_loop().call_later(delay, _due)

    def refill(self) -> None:
        """Bring every wanted key to `pool_size` idle slots (in the background, one at a time:
        a pool never competes with instances for the CPU in a burst)."""
        if self._closed or self.size == 0:
            return
        if self._filling is not None and not self._filling.done():
            self._again = True
            return
        self._filling = asyncio.create_task(self._fill(), name="pool fill")

    async def _fill(self) -> None:
        while True:
            self._again = False
            wanted = set(self._wanted())
            self.sizer.forget(wanted)
            for key in list(self._slots):
                if key not in wanted:  # no function uses it any more
                    for slot in self._slots.pop(key):
                        await self._stop(slot)
            for key in wanted:
                slots = self._slots.setdefault(key, [])
                for slot in [s for s in slots if not s.alive]:
                    slots.remove(slot)
                    self._discard(slot)
                target = self.sizer.target(key, time.monotonic())
                while len(slots) > target and not self._closed:  # grown, and shrunk since
                    await self._stop(slots.pop())
                while len(slots) < target and not self._closed:
                    if self._failures.get(key, 0) >= 3:
                        break  # said once; the next function change tries again
                    try:
                        slots.append(await self._start(key))
                        self._failures.pop(key, None)
                    except Exception as exc:
                        self._failed(key, exc)
                        self._retry_later(self._failures.get(key, 0))
                        break
                    if self._again:
                        break
            if not self._again or self._closed:
                self._shrink_later()
                return

    def _retry_later(self, failures: int) -> None:
        """Refill again a while after a failed start (1 s, then 2 s), so that a key short of
        its slots gets them without waiting for the next take; after three failures running
        the key is not tried any more (`_fill`)."""
        if failures >= 3 or self._closed or self._retry_timer is not None:
            return

        def _due() -> None:
            self._retry_timer = None
            self.refill()

        self._retry_timer = asyncio.get_running_loop().call_later(float(failures), _due)

    def _shrink_later(self) -> None:
        """Refill (which trims) when the next grown key is due to give a slot back."""
        if self._shrink is not None:
            self._shrink.cancel()
            self._shrink = None
        due = self.sizer.next_shrink(time.monotonic())
        if due is not None and not self._closed:
            self._shrink = asyncio.get_running_loop().call_later(due + 0.01, self.refill)

    def forget_failures(self) -> None:
        self._failures.clear()

    def _failed(self, key: PoolKey, error: BaseException) -> None:
        """One more start of `key` failed (after three running, it is not tried any more).
        A first failure is said at info level: a pre-start is background work, tried again
        a second later (now and then a start has ended with bubblewrap's exit status 1 on a
        loaded machine, its words `bwrap: loopback: Failed RTM_NEWADDR: No child processes`,
        cause not found yet); a second one running is a warning."""
        failures = self._failures[key] = self._failures.get(key, 0) + 1
        log.log(
            logging.INFO if failures == 1 else logging.WARNING,
            "cannot pre-start a runtime for the pool",
            extra={"env": key.env_dir, "error": str(error), "failures_running": failures},
        )

    async def start_now(self, key: PoolKey, *, wait: float | None = None) -> Slot | None:
        """A slot of `key` started for a cold start that found none idle, at the default cpu
        weight (it is on that start's path), and the caller's: a miss then costs a slot's start
        (bubblewrap, the interpreter, the runtime's imports at the pool's 1 cpu, ~0.1 s) instead
        of a fresh start at the function's own cpu limit (0.5 to 1 s at the default 100m).
        None: no pool (off, closed), the key failed to start three times running, or the slot
        was not up within `wait` seconds if given (the caller starts afresh; the slot, once
        up, joins the idle ones, as does the slot of a start whose caller was cancelled). A
        start waits as long as a fresh one would (the sandbox's start timeout); a key whose
        starts fail stops being tried after three."""
        if self._closed or self.size == 0 or self._failures.get(key, 0) >= 3:
            return None
        starting = asyncio.ensure_future(self._start(key, weight=DEFAULT_CPU_WEIGHT))
        self._starting.add(starting)
        starting.add_done_callback(self._starting.discard)
        try:
            slot = await asyncio.wait_for(asyncio.shield(starting), wait)
        except TimeoutError:
            starting.add_done_callback(lambda done: self._adopt_started(key, done))
            log.warning(
                "a pre-started runtime was not up in time; starting afresh",
                extra={"env": key.env_dir, "seconds": wait},
            )
            return None
        except asyncio.CancelledError:
            starting.add_done_callback(lambda done: self._adopt_started(key, done))
            raise
        except Exception as exc:
            self._failed(key, exc)
            raise
        self._failures.pop(key, None)
        return slot

    def _adopt_started(self, key: PoolKey, done: asyncio.Future[Slot]) -> None:
        """A slot started for a cold start that no longer waits for it: idle in the pool if
        some function still has its key, else stopped (`aclose` stops it if the pool closed)."""
        if done.cancelled():
            return
        error = done.exception()
        if error is not None:
            self._failed(key, error)
            return
        slot = done.result()
        if self._closed:
            return  # in `_live`: `aclose` stops it
        if key in self._wanted():
            self._slots.setdefault(key, []).append(slot)
        else:  # (the function that wanted it was removed meanwhile)
            stopping = asyncio.get_running_loop().create_task(self._stop(slot))
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopping.discard)

    async def _start(self, key: PoolKey, *, weight: int = BACKGROUND_CPU_WEIGHT) -> Slot:
        s = self.settings
        slot_id = f"{SLOT_PREFIX}{secrets.token_hex(5)}"
        identity = self.sandbox.identity(slot_id)
        root = pool_dir(s)
        scratch = root / slot_id
        code_dir = root / f"{slot_id}.code"
        socket_dir = s.sockets_dir / secrets.token_hex(6)
        await asyncio.to_thread(_private_dir, scratch, identity)
        await asyncio.to_thread(_private_dir, socket_dir, identity)
        code_dir.mkdir(mode=0o755)
        code_dir.chmod(0o755)
        limits = await self.limiter.start(
            slot_id,
            Limits(
                memory=SLOT_LIMITS.memory,
                cpu=SLOT_LIMITS.cpu,
                pids=_hard(resource.RLIMIT_NPROC, SLOT_LIMITS.pids),
                open_files=key.open_files or _hard(resource.RLIMIT_NOFILE, SLOT_LIMITS.open_files),
                tmp_size=key.tmp_size,
            ),
            scratch,
            python=False,
            owner=(identity.uid, identity.gid),
            own_uid=True,
            weight=weight,
        )
        logs = s.state_dir / LOGS_DIR
        logs.mkdir(mode=0o700, exist_ok=True)
        tag = f"{slot_id}.{secrets.token_hex(3)}"
        paths = [logs / f"{tag}.{name}" for name in ("stdout", "stderr", "status")]
        spec = render_pooled(
            key,
            code_dir=str(code_dir),
            scratch=str(scratch),
            socket_dir=str(socket_dir),
            runtime=self.runtime,
            path=s.path,
        )
        control_r, control_w = os.pipe()
        zygote = self._zygote(key)
        relay_r = relay_w = None
        if zygote is not None:  # the sandbox's command waits for the status of the fork
            relay_r, relay_w = os.pipe()
            forked_spec, spec = spec, dataclasses.replace(spec, command=STUB)
        fds: list[int] = []
        try:
            fds = [open_log_file(path) for path in paths]
            handle = await launch(
                self.sandbox,
                spec,
                key=slot_id,
                preexec=limits.preexec,
                stdin=control_r if relay_r is None else relay_r,
                stdout=fds[0],
                stderr=fds[1],
                start_timeout=s.start_timeout,
                detached=True,
                status_fd=fds[2],
            )
            if zygote is not None:
                assert relay_w is not None
                assert handle.child_pid is not None
                try:
                    await zygote.fork_into(
                        handle.child_pid,
                        self._fork_request(forked_spec, slot_id, identity),
                        [control_r, fds[0], fds[1], relay_w],
                    )
                except BaseException:
                    handle.kill()
                    await handle.process.wait()
                    await handle.close()
                    raise
        except BaseException as exc:
            said = _said(paths[1])  # bubblewrap's own words, before its file goes
            os.close(control_w)
            await limits.close()
            for path in paths:
                path.unlink(missing_ok=True)
            for directory in (scratch, code_dir, socket_dir):
                shutil.rmtree(directory, True)
            if said and isinstance(exc, SandboxStartError):
                raise SandboxStartError(f"{exc.message}: {said}") from exc
            raise
        finally:
            os.close(control_r)
            for fd in (*fds, *(f for f in (relay_r, relay_w) if f is not None)):
                os.close(fd)
        await limits.detach()  # the cgroup stays, renamed when the slot is specialised
        slot = Slot(
            id=slot_id,
            key=key,
            identity=identity,
            scratch=scratch,
            socket_dir=socket_dir,
            code_dir=code_dir,
            handle=handle,
            control=control_w,
            stdout=paths[0],
            stderr=paths[1],
            status=paths[2],
        )
        self._live[slot_id] = slot
        self._save_ids()
        return slot

    def _zygote(self, key: PoolKey) -> Zygote | None:
        """The zygote a key's runtimes are forked from (`pool_fork`, Python), started on use."""
        if not self.settings.pool_fork or key.runtime == "nodejs20" or not self.runtime.pythonpath:
            return None
        if os.geteuid() != 0:  # entering another uid's namespaces takes root
            return None
        # The zygote runs as root outside any sandbox: its interpreter is this deployer's own,
        # never what the build's `bin/python` points to, and a key whose environment is of
        # another interpreter starts its runtimes itself.
        python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        if os.path.realpath(Path(key.env_dir) / "bin" / "python") != python:
            return None
        if self._forker is None:
            entries = [p for p in self.runtime.pythonpath.split(":") if p]
            self._forker = Zygote(python, entries, POOL_TITLE_ROOM)
        return self._forker

    def _fork_request(
        self, spec: SandboxSpec, slot_id: str, identity: Identity
    ) -> dict[str, object]:
        """What the zygote needs to make `spec`'s runtime a process of the slot's sandbox."""
        env = dict(spec.env)
        procs: list[str] = []
        if self.limiter.hierarchy is not None:
            cgroup = self.limiter.hierarchy.find(slot_id)
            if cgroup is None:
                raise ZygoteError(f"the cgroup of {slot_id} is gone")
            procs = list(cgroup.procs_files)
        assert self.runtime.pythonpath is not None
        return {
            "cgroup_procs": procs,
            "uid": identity.uid,
            "gid": identity.gid,
            "chdir": spec.chdir,
            "env": env,
            "executable": spec.command[0],
            "pythonpath": [p for p in env.get("PYTHONPATH", "").split(":") if p],
            "host_pythonpath": [p for p in self.runtime.pythonpath.split(":") if p],
        }

    async def specialise(
        self,
        slot: Slot,
        *,
        instance: str,
        code: Path,
        message: Callable[[Sequence[tuple[int, int]]], bytes],
        limits: Limits,
        python: bool,
    ) -> RunLimits:
        """Make `slot` the instance `instance` (see the module's doc); the caller records it.
        On failure the slot is stopped and the error raised (the caller starts afresh)."""
        try:
            fill_code(code, slot.code_dir)  # a few links: quicker than a thread hop
            boost = self.settings.pool_start_boost_seconds
            run, rlimits = await self.limiter.specialise(
                slot.id,
                instance,
                limits,
                python=python,
                own_uid=True,
                boost=(SLOT_LIMITS.cpu, boost) if boost > 0 else None,
            )
            try:
                view = memoryview(message(rlimits))
                while view:
                    view = view[os.write(slot.control, view) :]
            except BaseException:
                await run.close()
                raise
        except BaseException:
            await self._stop(slot)
            raise
        finally:
            slot.close_control()
        # pool.json keeps the id until its next write: not written here, on the cold start's
        # path. A next deployer finds no cgroup of that name (renamed) and removes nothing.
        self._live.pop(slot.id, None)
        return run

    async def release(self, slot: Slot) -> None:
        """A taken slot its taker will not specialise: stopped, its leftovers removed."""
        await self._stop(slot)

    async def _stop(self, slot: Slot) -> None:
        slot.handle.kill()
        slot.close_control()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(slot.handle.process.wait(), 5)
        await slot.handle.close()
        # off the event loop: removing a cgroup waits for its last process, and dirs take a
        # while to remove (a cold start may be under way)
        await asyncio.to_thread(self._remove_leftovers, slot)
        self._forget(slot)

    def _discard(self, slot: Slot) -> None:
        """Remove what a slot that ended left: its cgroup, dirs, log files, record."""
        slot.close_control()
        self._remove_leftovers(slot)
        self._forget(slot)

    def _forget(self, slot: Slot) -> None:
        self._live.pop(slot.id, None)
        self._save_ids()

    def _remove_leftovers(self, slot: Slot) -> None:
        found = self.limiter.hierarchy.find(slot.id) if self.limiter.hierarchy else None
        if found is not None:
            with contextlib.suppress(OSError):
                found.remove()
        for directory in (slot.scratch, slot.code_dir, slot.socket_dir):
            shutil.rmtree(directory, True)
        for path in (slot.stdout, slot.stderr, slot.status):
            path.unlink(missing_ok=True)

    async def aclose(self) -> None:
        """Stop every slot not specialised: the idle ones, and any taken but never made an
        instance (specialised ones are instances: not the pool's any more)."""
        self._closed = True
        for timer in (self._shrink, self._refill_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        if self._filling is not None:
            self._filling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filling
        for starting in list(self._starting):  # a start cut short cleans up after itself
            starting.cancel()
        await asyncio.gather(*self._starting, *self._stopping, return_exceptions=True)
        idle = {slot.id for slot in self.idle()}
        self._slots.clear()
        slots = list(self._live.values())
        lost = [slot.id for slot in slots if slot.id not in idle]
        if lost:
            log.warning("stopping pre-started runtimes taken but never used", extra={"slots": lost})
        for slot in slots:
            slot.handle.kill()  # at once: what follows may be cut short by a shutdown's limit
        await asyncio.gather(*(self._stop(slot) for slot in slots), return_exceptions=True)
        forker, self._forker = self._forker, None
        if forker is not None:
            with contextlib.suppress(Exception):
                await forker.aclose()
