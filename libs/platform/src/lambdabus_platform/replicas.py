"""The heartbeat registry: every service process (a replica) says every few seconds that it is
alive, under which id, and in which role; the gateway lists the live ones (`GET /v1/replicas`).

Each replica writes one key, `<service>.<replica id>`, of the `replicas` KV bucket (in memory,
one value per key, entries older than `REPLICAS_TTL_SECONDS` expire). A value carries the time
of the beat and the replica's interval, so the age is computed by the reader and a replica is
live while its last beat is younger than `STALE_AFTER_BEATS` intervals; a replica that stops
cleanly deletes its key, one that is killed ages out. NATS permissions (`natsauth.ACCESS`) let
a service write only keys under its own name.

The role API, for services that elect a leader (builder, deployer): every replica starts
`active`; `ctx.heartbeat.set_role("leader")` or `set_role("standby")` changes the role shown,
and the next beat goes out at once (`await ctx.heartbeat.beat()` waits until it is written).
The role is what the replica says of itself: the registry shows it, it decides nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from lambdabus_platform.bus import Kv
from lambdabus_platform.subjects import REPLICAS_BUCKET, REPLICAS_TTL_SECONDS

log = logging.getLogger("lambdabus.replicas")

__all__ = ["REPLICAS_BUCKET", "REPLICAS_TTL_SECONDS", "Beat", "Heartbeat", "Replica", "ReplicaRole"]

ReplicaRole = Literal["leader", "standby", "active"]
ROLES: Final[tuple[ReplicaRole, ...]] = get_args(ReplicaRole)
# A replica whose last beat is older than this many of its intervals is not listed.
STALE_AFTER_BEATS: Final = 3
_NOT_IN_ID = re.compile(r"[^A-Za-z0-9_-]+")
_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


@dataclass(frozen=True)
class Beat:
    """One replica's last word: who, in which role, when (unix seconds), how often it speaks."""

    service: str
    id: str
    role: ReplicaRole
    at: float
    interval: float
    url: str | None = None


@dataclass(frozen=True)
class Replica:
    """A live replica as `GET /v1/replicas` lists it."""

    service: str
    id: str
    role: ReplicaRole
    heartbeat_age: float
    url: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "id": self.id,
            "role": self.role,
            "heartbeat_age": self.heartbeat_age,
            "url": self.url,
        }


def default_replica_id(host: str, pid: int) -> str:
    """`<host>-<pid>`, with every character a KV key token cannot hold replaced by `-`: unique
    among the processes of one host, and across hosts (and containers) by their names."""
    name = _NOT_IN_ID.sub("-", host).strip("-")[:100] or "host"
    return f"{name}-{pid}"


def is_replica_id(value: str) -> bool:
    return bool(_ID.fullmatch(value))


def beat_key(service: str, replica_id: str) -> str:
    if not (is_replica_id(service) and is_replica_id(replica_id)):
        raise ValueError(f"not a replica key: {service!r}, {replica_id!r}")
    return f"{service}.{replica_id}"


def encode_beat(beat: Beat) -> bytes:
    return json.dumps(
        {
            "service": beat.service,
            "id": beat.id,
            "role": beat.role,
            "at": beat.at,
            "interval": beat.interval,
            "url": beat.url,
        },
        separators=(",", ":"),
    ).encode()


def decode_beat(key: str, value: bytes) -> Beat | None:
    """The beat stored under `key`, or None if the value is not one (or names another key)."""
    try:
        data = json.loads(value)
        beat = Beat(
            service=str(data["service"]),
            id=str(data["id"]),
            role=data["role"],
            at=float(data["at"]),
            interval=float(data["interval"]),
            url=None if data.get("url") is None else str(data["url"]),
        )
    except (ValueError, TypeError, KeyError):
        return None
    if beat.role not in ROLES or beat.interval <= 0:
        return None
    if key != f"{beat.service}.{beat.id}":
        return None
    return beat


def live_replicas(beats: Iterable[Beat], now: float) -> list[Replica]:
    """The replicas whose last beat is recent enough, by service then id; the age never below
    zero (clocks of two hosts disagree a little)."""
    found = []
    for beat in beats:
        age = max(0.0, now - beat.at)
        if age <= STALE_AFTER_BEATS * beat.interval:
            found.append(
                Replica(beat.service, beat.id, beat.role, round(age, 3), beat.url),
            )
    return sorted(found, key=lambda r: (r.service, r.id))


async def list_replicas(kv: Kv, *, clock: Callable[[], float] = time.time) -> list[Replica]:
    """Every live replica in the bucket (one read of its current values)."""
    beats = [b for e in await kv.values(">") if (b := decode_beat(e.key, e.value)) is not None]
    return live_replicas(beats, clock())


class Heartbeat:
    """This process's beat: `run` writes it every `interval` seconds until cancelled;
    `withdraw` deletes it (a clean stop)."""

    def __init__(
        self,
        kv: Kv,
        service: str,
        replica_id: str,
        *,
        interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = beat_key(service, replica_id)
        self.service = service
        self.id = replica_id
        self.interval = interval
        self.url: str | None = None
        self._kv = kv
        self._clock = clock
        self._role: ReplicaRole = "active"
        self._wake = asyncio.Event()
        self._failing = False

    @property
    def role(self) -> ReplicaRole:
        return self._role

    def set_role(self, role: ReplicaRole) -> None:
        """Say this replica is `leader`, `standby` or `active`; the next beat goes out now."""
        if role not in ROLES:
            raise ValueError(f"not a replica role: {role!r}")
        if role != self._role:
            self._role = role
            self._wake.set()

    def current(self) -> Beat:
        return Beat(self.service, self.id, self._role, self._clock(), self.interval, self.url)

    async def beat(self) -> None:
        """Write the beat now."""
        await self._kv.put(self.key, encode_beat(self.current()))

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.beat()
            except Exception as exc:
                # NATS away for a moment: the beat ages, the next one says we are back.
                if not self._failing:
                    log.info("heartbeat not written", extra={"error": repr(exc)})
                self._failing = True
            else:
                if self._failing:
                    log.info("heartbeat written again")
                self._failing = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def withdraw(self) -> None:
        """Delete the beat: this replica is gone (best effort; otherwise it ages out)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._kv.delete(self.key), 2)


@contextlib.asynccontextmanager
async def beating(heartbeat: Heartbeat) -> AsyncIterator[Heartbeat]:
    """Beat for the lifetime of the block, then withdraw."""
    task = asyncio.create_task(heartbeat.run(), name=f"heartbeat {heartbeat.key}")
    try:
        yield heartbeat
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await heartbeat.withdraw()
