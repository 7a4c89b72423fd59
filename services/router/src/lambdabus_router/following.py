"""What trigger and schedule consumers share: one delivery per record of a KV bucket, kept in
step with it, and no consumer left behind.

Edge-triggered: the bucket is watched; a new record starts its delivery (which declares its
consumer), a deleted one stops it and deletes its consumer. Level-triggered: on start and every
`reconcile_seconds`, every consumer (named `<prefix><ns>_<name>_<uid>`) whose record is gone is
deleted (consumers are listed first, records read after, so a consumer made meanwhile is never
taken for an orphan), and should the watch fail, the bucket is read afresh and what vanished
meanwhile is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any, Generic, Self, TypeVar

from pydantic import ValidationError

from lambdabus_events.models import ScheduleRecord, TriggerRecord
from lambdabus_events.names import is_label
from lambdabus_platform.bus import Bus, Kv
from lambdabus_platform.subjects import trigger_key
from lambdabus_router.consumer import cancelled
from lambdabus_router.delivery import EVENTS_STREAM, TriggerDelivery
from lambdabus_router.settings import RouterSettings

R = TypeVar("R", TriggerRecord, ScheduleRecord)
T = TypeVar("T")


# -- pure ---------------------------------------------------------------------------------------


def decode_record(record_type: type[R], value: bytes) -> R | None:
    """The record a KV value holds; None for a deleted key or a value that is not one."""
    if not value:
        return None
    try:
        return record_type.model_validate_json(value)
    except ValidationError:
        return None


def parse_consumer_name(prefix: str, name: str) -> tuple[str, str] | None:
    """`(namespace, name)` of a consumer named `<prefix><ns>_<name>_<uid>` (labels hold no
    `_`), or None for another name."""
    parts = name.split("_")
    if len(parts) != 4 or parts[0] != prefix[:-1]:
        return None
    if not is_label(parts[1]) or not is_label(parts[2]) or not parts[3]:
        return None
    return parts[1], parts[2]


def orphan_consumers(prefix: str, consumers: Iterable[str], owned: Iterable[str]) -> list[str]:
    """The consumers named like `prefix`'s that are not `owned` (any other name is left alone)."""
    kept = set(owned)
    return [c for c in consumers if parse_consumer_name(prefix, c) is not None and c not in kept]


# -- the shell ----------------------------------------------------------------------------------


class BucketFollower(ABC, Generic[R, T]):
    """Runs one item (holding a `TriggerDelivery`) per record of a KV bucket."""

    # What a subclass names: its record type, the noun of its logs and task names, the prefix of
    # its consumers' names, and its logger.
    record_type: type[R]
    noun: str
    consumer_prefix: str
    log: logging.Logger

    def __init__(self, bus: Bus, kv: Kv, settings: RouterSettings) -> None:
        self._bus = bus
        self._kv = kv
        self._settings = settings
        self._running: dict[str, T] = {}  # by KV key
        self._lock = asyncio.Lock()
        self._stopping = False
        self._changed = asyncio.Condition()

    @abstractmethod
    def _orphans(self, consumers: Iterable[str], records: Iterable[R]) -> list[str]:
        """The consumers (named with `consumer_prefix`) no record owns."""

    @abstractmethod
    def _delivery(self, item: T) -> TriggerDelivery:
        """The delivery an item runs (its record has the item's uid)."""

    @abstractmethod
    def _start(self, key: str, record: R) -> None:
        """Start a record's item and put it in `_running` (the key is the record's)."""

    @abstractmethod
    async def _retire(self, item: T) -> None:
        """A record is gone: stop its item and delete its consumer."""

    def _decode_value(self, value: bytes) -> R | None:
        return decode_record(self.record_type, value)

    def _side_tasks(self) -> list[tuple[Coroutine[Any, Any, None], str]]:
        """More tasks to run while running, with their names."""
        return []

    def _applied(self) -> None:
        """Called after each change of the bucket is applied."""

    async def _first_sweep(self) -> None:
        try:
            await self.sweep()
        except Exception:  # the periodic sweep tries again
            self.log.warning(f"{self.noun} sweep failed", exc_info=True)

    async def until(self, predicate: Callable[[Self], bool]) -> None:
        """Wait until the running items satisfy `predicate` (for tests and tools)."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        tasks: list[asyncio.Task[None]] = []
        plural = f"{self.noun}s"
        try:
            await self._first_sweep()
            tasks.append(asyncio.create_task(self._follow(), name=f"{plural}:watch"))
            for coroutine, name in self._side_tasks():
                tasks.append(asyncio.create_task(coroutine, name=f"{plural}:{name}"))
            tasks.append(asyncio.create_task(self._sweep_every(), name=f"{plural}:sweep"))
            yield self
        finally:
            self._stopping = True
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=self._settings.shutdown_grace_seconds)
            await self.stop(self._settings.shutdown_grace_seconds)

    def stop_fetching(self) -> None:
        """Stop reading every consumer (SIGTERM): deliveries in flight go on."""
        self._stopping = True
        for item in self._running.values():
            self._delivery(item).stop_fetching()

    async def stop(self, grace: float) -> None:
        self._stopping = True
        async with self._lock:
            running = list(self._running.values())
            self._running.clear()
        await asyncio.gather(
            *(self._delivery(item).stop(grace) for item in running), return_exceptions=True
        )

    # -- following the bucket ---------------------------------------------------------------

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.1
        while not (self._stopping or cancelled()):
            opened = loop.time()
            try:
                async for entry in self._kv.watch(">"):
                    await self._apply(entry.key, self._decode_value(entry.value))
                    if self._stopping or cancelled():
                        return
            except Exception:
                self.log.warning(f"{self.noun}s watch failed; re-opening", exc_info=True)
            delay = 0.1 if loop.time() - opened > 60 else min(delay * 2, 5.0)
            await asyncio.sleep(delay)
            with contextlib.suppress(Exception):
                await self._resync()
                delay = 0.1

    async def _resync(self) -> None:
        """After a broken watch: stop what was deleted meanwhile (the new watch shows what is
        there, not what went away)."""
        present = {entry.key for entry in await self._kv.values(">")}
        for key in [k for k in self._running if k not in present]:
            await self._apply(key, None)

    async def _apply(self, key: str, record: R | None) -> None:
        async with self._lock:
            current = self._running.get(key)
            if (
                current is not None
                and record is not None
                and self._delivery(current).record.uid == record.uid
            ):
                return
            if current is not None:
                await self._retire(current)
                del self._running[key]
            if record is not None and not self._stopping:
                if key != trigger_key(record.namespace, record.name):
                    self.log.warning(
                        f"ignoring a {self.noun} stored under another key", extra={"key": key}
                    )
                else:
                    self._start(key, record)
        self._applied()
        async with self._changed:
            self._changed.notify_all()

    # -- sweeping -----------------------------------------------------------------------------

    async def _sweep_every(self) -> None:
        while not (self._stopping or cancelled()):
            await asyncio.sleep(self._settings.reconcile_seconds)
            try:
                await self.sweep()
            except Exception:
                self.log.warning(f"{self.noun} sweep failed", exc_info=True)

    async def sweep(self) -> list[str]:
        """Delete every consumer whose record is gone; the names deleted."""
        consumers = await self._bus.consumer_names(EVENTS_STREAM, prefix=self.consumer_prefix)
        records = [
            r for e in await self._kv.values(">") if (r := self._decode_value(e.value)) is not None
        ]
        deleted = []
        for name in self._orphans(consumers, records):
            if await self._bus.delete_consumer(EVENTS_STREAM, name):
                deleted.append(name)
        if deleted:
            self.log.info(
                f"deleted consumers of deleted {self.noun}s", extra={"consumers": deleted}
            )
        return deleted
