"""Trigger consumers kept in step with the `triggers` KV bucket: one durable consumer on EVENTS
and one delivery loop per trigger, and no consumer left behind.

Edge-triggered: the bucket is watched; a new trigger starts its delivery (which declares its
consumer), a deleted one stops it and deletes its consumer. Level-triggered: on start and every
`reconcile_seconds`, every `trigger_*` consumer whose trigger is gone is deleted (consumers are
listed first, triggers read after, so a consumer made meanwhile is never taken for an orphan),
and should the watch fail, the bucket is read afresh and what vanished meanwhile is stopped.

Replicas of the router all read every trigger's consumer; JetStream shares its messages out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping

from pydantic import ValidationError

from lambdabus_events.models import TriggerRecord
from lambdabus_events.names import is_label
from lambdabus_platform.bus import Bus, Kv
from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.subjects import TRIGGERS_BUCKET, trigger_consumer, trigger_key
from lambdabus_router.calls import Caller
from lambdabus_router.consumer import cancelled
from lambdabus_router.delivery import EVENTS_STREAM, TriggerDelivery
from lambdabus_router.metrics import DeliveryMetrics
from lambdabus_router.proxy import Router
from lambdabus_router.settings import RouterSettings

log = logging.getLogger("lambdabus.router.triggers")

CONSUMER_PREFIX = "trigger_"


# -- pure ---------------------------------------------------------------------------------------


def decode(value: bytes) -> TriggerRecord | None:
    """The trigger a `triggers` value holds; None for a deleted key or a value that is not one."""
    if not value:
        return None
    try:
        return TriggerRecord.model_validate_json(value)
    except ValidationError:
        return None


def parse_consumer(name: str) -> tuple[str, str] | None:
    """`(namespace, trigger)` of a trigger consumer's name (`trigger_<ns>_<name>_<uid>`: labels
    hold no `_`), or None for another name."""
    parts = name.split("_")
    if len(parts) != 4 or parts[0] != CONSUMER_PREFIX[:-1]:
        return None
    if not is_label(parts[1]) or not is_label(parts[2]) or not parts[3]:
        return None
    return parts[1], parts[2]


def orphans(consumers: Iterable[str], triggers: Iterable[TriggerRecord]) -> list[str]:
    """The trigger consumers no trigger owns (any consumer not named like one is left alone)."""
    owned = {trigger_consumer(t.namespace, t.name, t.uid) for t in triggers}
    return [c for c in consumers if parse_consumer(c) is not None and c not in owned]


# -- the shell ----------------------------------------------------------------------------------


class Triggers:
    """Runs one `TriggerDelivery` per trigger in the bucket."""

    def __init__(
        self,
        bus: Bus,
        router: Router,
        caller: Caller,
        metrics: DeliveryMetrics,
        settings: RouterSettings,
    ) -> None:
        self._bus = bus
        self._kv: Kv = bus.kv(TRIGGERS_BUCKET)
        self._router = router
        self._caller = caller
        self._metrics = metrics
        self._settings = settings
        self._running: dict[str, TriggerDelivery] = {}  # by KV key
        self._lock = asyncio.Lock()
        self._stopping = False
        self._changed = asyncio.Condition()

    @property
    def deliveries(self) -> Mapping[str, TriggerDelivery]:
        return self._running

    async def until(self, predicate: Callable[[Triggers], bool]) -> None:
        """Wait until the running deliveries satisfy `predicate` (for tests and tools)."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Triggers]:
        tasks: list[asyncio.Task[None]] = []
        try:
            try:
                await self.sweep()
            except Exception:  # the periodic sweep tries again
                log.warning("trigger sweep failed", exc_info=True)
            tasks.append(asyncio.create_task(self._follow(), name="triggers:watch"))
            tasks.append(asyncio.create_task(self._sweep_every(), name="triggers:sweep"))
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
        for delivery in self._running.values():
            delivery.stop_fetching()

    async def stop(self, grace: float) -> None:
        self._stopping = True
        async with self._lock:
            running = list(self._running.values())
            self._running.clear()
        await asyncio.gather(*(d.stop(grace) for d in running), return_exceptions=True)

    # -- following the bucket ---------------------------------------------------------------

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.1
        while not (self._stopping or cancelled()):
            opened = loop.time()
            try:
                async for entry in self._kv.watch(">"):
                    await self._apply(entry.key, decode(entry.value))
                    if self._stopping or cancelled():
                        return
            except Exception:
                log.warning("triggers watch failed; re-opening", exc_info=True)
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

    async def _apply(self, key: str, record: TriggerRecord | None) -> None:
        async with self._lock:
            current = self._running.get(key)
            if current is not None and record is not None and current.record.uid == record.uid:
                return
            if current is not None:
                await self._retire(current)
                del self._running[key]
            if record is not None and not self._stopping:
                if key != trigger_key(record.namespace, record.name):
                    log.warning("ignoring a trigger stored under another key", extra={"key": key})
                else:
                    delivery = TriggerDelivery(
                        record,
                        bus=self._bus,
                        router=self._router,
                        caller=self._caller,
                        metrics=self._metrics,
                        settings=self._settings,
                    )
                    self._running[key] = delivery
                    delivery.start()
                    log.info(
                        "trigger delivering",
                        extra={
                            "trigger": key,
                            "function": record.function,
                            "consumer": delivery.consumer,
                        },
                    )
        async with self._changed:
            self._changed.notify_all()

    async def _retire(self, delivery: TriggerDelivery) -> None:
        """A trigger is gone: its deliveries in flight are dropped, its consumer deleted."""
        await delivery.stop(0)
        r = delivery.record
        try:
            await self._bus.delete_consumer(EVENTS_STREAM, delivery.consumer)
        except LambdabusError as exc:  # the sweep deletes it later
            log.warning(
                "could not delete a consumer",
                extra={"consumer": delivery.consumer, "error": str(exc)},
            )
        self._metrics.forget(r.namespace, r.name)
        log.info(
            "trigger stopped",
            extra={"trigger": f"{r.namespace}.{r.name}", "consumer": delivery.consumer},
        )

    # -- sweeping -----------------------------------------------------------------------------

    async def _sweep_every(self) -> None:
        while not (self._stopping or cancelled()):
            await asyncio.sleep(self._settings.reconcile_seconds)
            try:
                await self.sweep()
            except Exception:
                log.warning("trigger sweep failed", exc_info=True)

    async def sweep(self) -> list[str]:
        """Delete every trigger consumer whose trigger is gone; the names deleted."""
        consumers = await self._bus.consumer_names(EVENTS_STREAM, prefix=CONSUMER_PREFIX)
        triggers = [t for e in await self._kv.values(">") if (t := decode(e.value)) is not None]
        deleted = []
        for name in orphans(consumers, triggers):
            if await self._bus.delete_consumer(EVENTS_STREAM, name):
                deleted.append(name)
        if deleted:
            log.info("deleted consumers of deleted triggers", extra={"consumers": deleted})
        return deleted
