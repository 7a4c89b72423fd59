"""Schedules fired and delivered: every router replica follows the `schedules` KV bucket,
fires each schedule's ticks into EVENTS and delivers them through a durable consumer of its
own, with the retries and dead letters of a trigger (`TriggerDelivery`).

Exactly one delivery per tick, whatever the number of replicas: each replica publishes a due
tick with `Nats-Msg-Id` `<ns>/<schedule>/<tick>` (`schedule_tick_id`), so EVENTS stores it once
(within its duplicate window), then records the tick in the `schedule-ticks` bucket with
compare-and-set; a replica that finds the tick recorded fires nothing. The schedule's consumer is
shared by the replicas, so JetStream hands each stored tick to one of them.

After downtime only the newest missed tick is due (`due_tick`): a schedule that missed many
ticks fires once, with that tick's time. A new schedule fires no tick from before it was made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from lambdabus_events.models import (
    SCHEDULE_FIRED_TYPE,
    ScheduleRecord,
    ScheduleTick,
    TriggerRecord,
)
from lambdabus_platform.bus import Bus, Kv
from lambdabus_platform.cron import ScheduleProblem, Timing, parse_timing
from lambdabus_platform.errors import AlreadyExists, Conflict, LambdabusError
from lambdabus_platform.subjects import (
    SCHEDULE_TICKS_BUCKET,
    SCHEDULES_BUCKET,
    event_subject,
    schedule_consumer,
    schedule_tick_id,
    trigger_key,
)
from lambdabus_router.calls import Caller
from lambdabus_router.consumer import cancelled
from lambdabus_router.delivery import EVENTS_STREAM, TriggerDelivery
from lambdabus_router.events import STRUCTURED
from lambdabus_router.following import (
    BucketFollower,
    orphan_consumers,
    parse_consumer_name,
)
from lambdabus_router.metrics import DeliveryMetrics
from lambdabus_router.proxy import Router
from lambdabus_router.settings import RouterSettings

log = logging.getLogger("lambdabus.router.schedules")

CONSUMER_PREFIX = "schedule_"
_ID_NAMESPACE = uuid.UUID("0b6f3a52-9f0e-4c5e-8d8a-7c1f2e4b9a63")
_STRUCTURED = {"Content-Type": STRUCTURED}
# A tick that could not be fired (NATS away) is tried again after this long.
_RETRY = timedelta(seconds=1)


# -- pure ---------------------------------------------------------------------------------------


def tick_text(tick: datetime) -> str:
    """A tick as the event's `time` and in its message id: RFC 3339, UTC, `Z`."""
    return tick.astimezone(UTC).isoformat().replace("+00:00", "Z")


def due_tick(
    timing: Timing, created_at: datetime, fired: datetime | None, now: datetime
) -> datetime | None:
    """The tick to fire at `now`: the newest tick not after `now`, if it is not before the
    schedule was made and after the newest tick already fired; else None. Ticks missed in
    between are not fired one by one: the newest stands for them."""
    tick = timing.latest(now)
    if tick < created_at:
        return None
    if fired is not None and tick <= fired:
        return None
    return tick


def fired_event(record: ScheduleRecord, tick: datetime) -> dict[str, Any]:
    """The structured-mode CloudEvent of one tick; its id is the same from every replica."""
    when = tick_text(tick)
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid5(_ID_NAMESPACE, f"{record.uid}|{when}")),
        "source": f"/lambdabus/schedules/{record.namespace}",
        "type": SCHEDULE_FIRED_TYPE,
        "subject": f"{record.namespace}/{record.name}",
        "time": when,
        "datacontenttype": "application/json",
        "data": record.data,
    }


def delivery_record(record: ScheduleRecord) -> TriggerRecord:
    """The trigger a schedule's delivery runs as: its ticks, to its function, with its policy."""
    return TriggerRecord(
        namespace=record.namespace,
        name=record.name,
        uid=record.uid,
        function=record.function,
        filter={
            "type": SCHEDULE_FIRED_TYPE,
            "source": f"/lambdabus/schedules/{record.namespace}",
            "subject": f"{record.namespace}/{record.name}",
        },
        delivery=record.delivery,
        created_at=record.created_at,
    )


def parse_consumer(name: str) -> tuple[str, str] | None:
    return parse_consumer_name(CONSUMER_PREFIX, name)


def orphans(consumers: Iterable[str], schedules: Iterable[ScheduleRecord]) -> list[str]:
    owned = (schedule_consumer(s.namespace, s.name, s.uid) for s in schedules)
    return orphan_consumers(CONSUMER_PREFIX, consumers, owned)


# -- the shell ----------------------------------------------------------------------------------


@dataclass
class Running:
    record: ScheduleRecord
    timing: Timing
    delivery: TriggerDelivery
    fired: datetime | None = None  # the newest tick known fired (by any replica)


class Schedules(BucketFollower[ScheduleRecord, Running]):
    """Fires the ticks of every schedule in the bucket and runs one delivery per schedule."""

    record_type = ScheduleRecord
    noun = "schedule"
    consumer_prefix = CONSUMER_PREFIX
    log = log

    def __init__(
        self,
        bus: Bus,
        router: Router,
        caller: Caller,
        metrics: DeliveryMetrics,
        settings: RouterSettings,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(bus, bus.kv(SCHEDULES_BUCKET), settings)
        self._ticks: Kv = bus.kv(SCHEDULE_TICKS_BUCKET)
        self._router = router
        self._caller = caller
        self._metrics = metrics
        self._clock = clock
        self._wake = asyncio.Event()

    @property
    def schedules(self) -> Mapping[str, Running]:
        return self._running

    def _orphans(self, consumers: Iterable[str], records: Iterable[ScheduleRecord]) -> list[str]:
        return orphans(consumers, records)

    def _delivery(self, item: Running) -> TriggerDelivery:
        return item.delivery

    def _side_tasks(self) -> list[tuple[Coroutine[Any, Any, None], str]]:
        return [(self._tick(), "tick")]

    def _applied(self) -> None:
        self._wake.set()

    async def _first_sweep(self) -> None:
        with contextlib.suppress(Exception):
            await self.sweep()

    def stop_fetching(self) -> None:
        self._wake.set()
        super().stop_fetching()

    def _start(self, key: str, record: ScheduleRecord) -> None:
        try:
            timing = parse_timing(record.cron, record.timezone)
        except ScheduleProblem as exc:  # the gateway parsed it; another version may not
            log.warning(
                "ignoring a schedule whose cron does not parse",
                extra={"schedule": key, "error": exc.message},
            )
            return
        delivery = TriggerDelivery(
            delivery_record(record),
            bus=self._bus,
            router=self._router,
            caller=self._caller,
            metrics=self._metrics,
            settings=self._settings,
            consumer=schedule_consumer(record.namespace, record.name, record.uid),
        )
        self._running[key] = Running(record, timing, delivery)
        delivery.start()
        log.info(
            "schedule running",
            extra={"schedule": key, "function": record.function, "cron": record.cron},
        )

    async def _retire(self, item: Running) -> None:
        await item.delivery.stop(0)
        r = item.record
        with contextlib.suppress(LambdabusError):  # the sweep deletes it later
            await self._bus.delete_consumer(EVENTS_STREAM, item.delivery.consumer)
        with contextlib.suppress(Exception):
            entry = await self._ticks.get(trigger_key(r.namespace, r.name))
            if entry is not None:
                await self._ticks.delete(entry.key, entry.revision)
        self._metrics.forget(r.namespace, r.name)
        log.info("schedule stopped", extra={"schedule": f"{r.namespace}.{r.name}"})

    # -- firing -------------------------------------------------------------------------------

    async def _tick(self) -> None:
        while not (self._stopping or cancelled()):
            self._wake.clear()
            now = self._clock()
            wake = now + timedelta(seconds=self._settings.reconcile_seconds)
            for key, item in list(self._running.items()):
                tick = due_tick(item.timing, item.record.created_at, item.fired, now)
                if tick is not None:
                    try:
                        await self.fire(key, item, tick)
                    except Exception as exc:
                        log.warning(
                            "could not fire a tick; trying again",
                            extra={"schedule": key, "tick": tick_text(tick), "error": str(exc)},
                        )
                        wake = min(wake, now + _RETRY)
                        continue
                wake = min(wake, item.timing.next_after(now))
            delay = (wake - self._clock()).total_seconds()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    async def fire(self, key: str, item: Running, tick: datetime) -> bool:
        """Fire `tick` unless a replica recorded it (or a newer one); True if this one did."""
        r = item.record
        entry = await self._ticks.get(key)
        known = _tick_of(entry.value, r.uid) if entry is not None else None
        if known is not None and known >= tick:
            item.fired = known
            return False
        event = fired_event(r, tick)
        await self._bus.publish(
            event_subject(SCHEDULE_FIRED_TYPE),
            json.dumps(event, separators=(",", ":")).encode(),
            msg_id=schedule_tick_id(r.namespace, r.name, tick_text(tick)),
            headers=_STRUCTURED,
        )
        value = ScheduleTick(uid=r.uid, tick=tick).model_dump_json().encode()
        try:
            if entry is None:
                await self._ticks.create(key, value)
            else:
                await self._ticks.update(key, value, entry.revision)
        except (AlreadyExists, Conflict):
            pass  # another replica recorded it meanwhile; the publish was deduplicated
        item.fired = tick
        log.info("schedule fired", extra={"schedule": key, "tick": tick_text(tick)})
        return True


def _tick_of(value: bytes, uid: str) -> datetime | None:
    """The tick a `schedule-ticks` value records for incarnation `uid`; None otherwise."""
    if not value:
        return None
    try:
        tick = ScheduleTick.model_validate_json(value)
    except ValidationError:
        return None
    return tick.tick if tick.uid == uid else None
