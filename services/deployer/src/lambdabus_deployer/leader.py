"""Leader election of deployer replicas: a lease record in the `leases` KV bucket, written
with compare-and-set only (the pattern of Kubernetes controllers' Lease objects).

- A replica acquires the lease by creating the key, or by updating it (at the revision it read)
  when it is released (no holder), when it has not changed for a whole `duration` as this
  replica observed it (its own monotonic clock: no clock of another machine is trusted), or
  when its holder is a process of this machine's boot and pid namespace that is gone (pid and
  start time: a replica killed with SIGKILL here is replaced at once; a dead process acts no
  more).
- The leader renews every `duration / 3`. It acts only while its last successful renewal
  started less than `duration - margin` ago: a leader that cannot renew stops acting before any
  standby may take the lease (a standby waits a full `duration` after it saw the last write,
  which landed after the leader started it).
- A graceful stop releases the lease (CAS, holder emptied) after the leader stopped acting, so
  a standby takes over at its next poll.

`decide` is the pure core; `Elector` is its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lambdabus_deployer.process_table import start_time
from lambdabus_platform.bus import Kv, KvEntry

log = logging.getLogger("lambdabus.deployer.leader")

Role = Literal["leader", "standby"]
Action = Literal["create", "update", "wait"]


@dataclass(frozen=True)
class Observed:
    """The last lease revision this replica saw, and when (its monotonic clock)."""

    revision: int
    since: float


def safety_margin(duration: float) -> float:
    """How long before a standby could take the lease a leader that could not renew stops."""
    return min(2.0, duration / 4)


def replica_id(pid: int | None = None) -> str:
    """This replica's name in the lease: `<boot id>:<pid namespace>:<pid>:<start time>:<random>`,
    so a replica on the same machine (and pid namespace) can tell a dead holder for sure."""
    pid = os.getpid() if pid is None else pid
    return f"{_boot_id()}:{_pid_namespace()}:{pid}:{start_time(pid) or 0}:{uuid.uuid4().hex[:6]}"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def dead_here(holder: str) -> bool:
    """The holder is a process of this boot and pid namespace that no longer runs (a replica
    killed with SIGKILL): its lease need not be waited out. False when we cannot know."""
    parts = holder.split(":")
    if len(parts) != 5 or parts[0] in ("", "unknown") or parts[0] != _boot_id():
        return False
    try:
        namespace, pid, started = int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return False
    if namespace == 0 or namespace != _pid_namespace() or started == 0:
        return False
    return start_time(pid) != started


def holder_of(entry: KvEntry | None) -> str:
    if entry is None:
        return ""
    try:
        value = json.loads(entry.value)
    except ValueError:
        return ""
    return str(value.get("holder", "")) if isinstance(value, dict) else ""


def decide(
    me: str,
    entry: KvEntry | None,
    observed: Observed | None,
    now: float,
    duration: float,
    dead: Callable[[str], bool] = lambda _: False,
) -> tuple[Action, Observed | None]:
    """What to do with the lease as read now: create it, update it (acquire or renew), or wait
    (another holds it); and what this replica has now observed. `dead(holder)`: the holder is
    known to be gone (a dead process of this machine), so its lease is taken at once."""
    if entry is None:
        return "create", None
    seen = (
        observed
        if observed is not None and observed.revision == entry.revision
        else Observed(entry.revision, now)
    )
    holder = holder_of(entry)
    if holder in ("", me) or dead(holder):
        return "update", seen
    if now - seen.since >= duration:
        return "update", seen  # unchanged for a whole lease: its holder is gone
    return "wait", seen


class Elector:
    """Keeps trying to lead; `leading` is set while this replica may act."""

    def __init__(
        self,
        kv: Kv,
        me: str,
        *,
        duration: float,
        poll: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        on_role: Callable[[Role], None] = lambda _: None,
        key: str = "deployer",
    ) -> None:
        self._on_role = on_role
        self.key = key
        self.kv = kv
        self.me = me
        self.duration = duration
        self.renew_every = duration / 3
        self.margin = safety_margin(duration)
        self.poll = poll
        self._clock = clock
        self._observed: Observed | None = None
        self._revision: int | None = None  # of our own last write, while we hold it
        self._valid_until = 0.0
        self.leading = asyncio.Event()
        self.lost = asyncio.Event()
        self.lost.set()
        self.leaderships = 0

    @property
    def role(self) -> Role:
        return "leader" if self.leading.is_set() else "standby"

    def _value(self, holder: str) -> bytes:
        return json.dumps(
            {"holder": holder, "duration": self.duration, "renewed": time.time()}
        ).encode()

    async def _try(self) -> None:
        started = self._clock()
        entry = await self.kv.get(self.key)
        action, self._observed = decide(
            self.me, entry, self._observed, started, self.duration, dead_here
        )
        if action == "wait":
            self._step_down("another replica holds the lease")
            return
        try:
            if action == "create":
                revision = await self.kv.create(self.key, self._value(self.me))
            else:
                assert entry is not None
                revision = await self.kv.update(self.key, self._value(self.me), entry.revision)
        except Exception as exc:  # a CAS conflict: someone else wrote first
            self._step_down(f"lease write refused: {exc!r}")
            return
        self._revision = revision
        self._valid_until = started + self.duration - self.margin
        if not self.leading.is_set():
            self.leaderships += 1
            log.info("leading the deployers", extra={"replica": self.me})
            self.lost.clear()
            self.leading.set()
            self._on_role("leader")

    def _step_down(self, why: str) -> None:
        if self.leading.is_set():
            log.warning("no longer leading", extra={"replica": self.me, "reason": why})
            self.leading.clear()
            self.lost.set()
            self._on_role("standby")
        self._revision = None

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._try(), max(self.renew_every, self.poll))
            except Exception as exc:
                log.info("cannot reach the lease", extra={"error": repr(exc)})
            wait = self.renew_every if self.leading.is_set() else self.poll
            deadline = self._clock() + wait
            while self._clock() < deadline:
                if self.leading.is_set() and self._clock() >= self._valid_until:
                    self._step_down("the lease could not be renewed in time")
                await asyncio.sleep(min(0.1, wait))

    async def release(self) -> None:
        """Give the lease up (after this replica stopped acting): a standby leads at once."""
        revision, self._revision = self._revision, None
        if self.leading.is_set():
            self.leading.clear()
            self._on_role("standby")
        self.lost.set()
        if revision is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.kv.update(self.key, self._value(""), revision), 2)


class _Role:
    """This process's role among the deployer replicas: `ROLE.role` is "leader" while it leads
    (holds the lease and acts), else "standby" (what a registry of replicas reports)."""

    def __init__(self) -> None:
        self._elector: Elector | None = None

    def update(self, *, elector: Elector) -> None:
        self._elector = elector

    @property
    def role(self) -> Role:
        return self._elector.role if self._elector is not None else "standby"


ROLE = _Role()
