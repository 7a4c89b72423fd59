"""Trigger consumers kept in step with the `triggers` KV bucket: one durable consumer on EVENTS
and one delivery loop per trigger, and no consumer left behind (`following`: edge-triggered by a
watch of the bucket, level-triggered by a periodic sweep of the `trigger_*` consumers).

Replicas of the router all read every trigger's consumer; JetStream shares its messages out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from lambdabus_events.models import TriggerRecord
from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.subjects import TRIGGERS_BUCKET, trigger_consumer
from lambdabus_router.calls import Caller
from lambdabus_router.delivery import EVENTS_STREAM, TriggerDelivery
from lambdabus_router.following import (
    BucketFollower,
    orphan_consumers,
    parse_consumer_name,
)
from lambdabus_router.metrics import DeliveryMetrics
from lambdabus_router.proxy import Router
from lambdabus_router.settings import RouterSettings

log = logging.getLogger("lambdabus.router.triggers")

CONSUMER_PREFIX = "trigger_"


# -- pure ---------------------------------------------------------------------------------------


def parse_consumer(name: str) -> tuple[str, str] | None:
    """`(namespace, trigger)` of a trigger consumer's name (`trigger_<ns>_<name>_<uid>`: labels
    hold no `_`), or None for another name."""
    return parse_consumer_name(CONSUMER_PREFIX, name)


def orphans(consumers: Iterable[str], triggers: Iterable[TriggerRecord]) -> list[str]:
    """The trigger consumers no trigger owns (any consumer not named like one is left alone)."""
    owned = (trigger_consumer(t.namespace, t.name, t.uid) for t in triggers)
    return orphan_consumers(CONSUMER_PREFIX, consumers, owned)


# -- the shell ----------------------------------------------------------------------------------


class Triggers(BucketFollower[TriggerRecord, TriggerDelivery]):
    """Runs one `TriggerDelivery` per trigger in the bucket."""

    record_type = TriggerRecord
    noun = "trigger"
    consumer_prefix = CONSUMER_PREFIX
    log = log

    def __init__(
        self,
        bus: Bus,
        router: Router,
        caller: Caller,
        metrics: DeliveryMetrics,
        settings: RouterSettings,
    ) -> None:
        super().__init__(bus, bus.kv(TRIGGERS_BUCKET), settings)
        self._router = router
        self._caller = caller
        self._metrics = metrics

    @property
    def deliveries(self) -> Mapping[str, TriggerDelivery]:
        return self._running

    def _orphans(self, consumers: Iterable[str], records: Iterable[TriggerRecord]) -> list[str]:
        return orphans(consumers, records)

    def _delivery(self, item: TriggerDelivery) -> TriggerDelivery:
        return item

    def _start(self, key: str, record: TriggerRecord) -> None:
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
            extra={"trigger": key, "function": record.function, "consumer": delivery.consumer},
        )

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
