"""Delivery of one trigger's events to its function, at least once.

The trigger's durable consumer on EVENTS (`trigger_consumer(...)`) brings every event its subject
filters hold (the type filter, and the trigger's redrive subject); `match_trigger` checks the
rest of the filter. Each matching event is POSTed in CloudEvents binary mode (structured mode
when an extension is an integer or a boolean: `delivery_request`) to a ready instance of the
function; the answer goes through the delivery plan (`plan.next_action`):

- 2xx: a reply event in the answer is published to EVENTS, then the message is acked.
- retry: nak with the back-off as delay; JetStream brings it back then.
- give up: a `DeadLetter` on the DLQ stream (msg id `<trigger uid>:<stream seq>`), the
  `io.lambdabus.delivery.deadlettered` lifecycle event (same key), then the ack. A crash between
  those steps repeats them, and the ids make the repeats no-ops.

While the function has no ready instance the consumer is not read at all, so events wait in the
stream, undelivered and uncounted. A message that finds no instance anyway (it went away during
the fetch) is sent back for `wait_seconds`, not counted as an attempt.

Attempts are counted in memory per stream sequence. A message this router has not seen (after a
restart, or one another replica tried) counts JetStream's deliveries minus one as attempts made:
every delivery was an attempt but the rare ones that found no instance, so this errs towards
fewer retries, never more.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lambdabus_events.catalog import (
    DeliveryDeadlettered,
    DeliveryDeadletteredData,
    lifecycle_event,
)
from lambdabus_events.models import DeadLetter, TriggerRecord
from lambdabus_platform.bus import Bus, PulledMessage
from lambdabus_platform.subjects import (
    REDRIVE_PREFIX,
    dlq_subject,
    event_dedup_id,
    event_subject,
    redrive_subject,
    trigger_consumer,
    type_filter_subject,
)
from lambdabus_router import plan
from lambdabus_router.calls import Answer, Caller, CallFailed, NoReadyInstance
from lambdabus_router.consumer import ConsumerLoop
from lambdabus_router.events import STRUCTURED, InvalidEvent, delivery_request, parse_structured
from lambdabus_router.events import reply_events as find_replies
from lambdabus_router.matching import match_trigger
from lambdabus_router.metrics import DeliveryMetrics
from lambdabus_router.proxy import Router
from lambdabus_router.settings import RouterSettings

log = logging.getLogger("lambdabus.router.delivery")

EVENTS_STREAM = "EVENTS"
DLQ_STREAM = "DLQ"
_REDRIVE = REDRIVE_PREFIX + "."
_JSON = {"Content-Type": "application/json"}
_STRUCTURED = {"Content-Type": STRUCTURED}


@dataclass(slots=True)
class Tries:
    """What this router knows of one message's attempts (deliveries that found no ready
    instance are not among them)."""

    attempts: int
    first_at: datetime | None
    reason: str = ""
    message: str = ""
    last_status: int | None = None
    verdict: plan.DeadLetter | None = None  # decided, not yet stored (publishing failed)


class TriesMemory:
    """Tries per stream sequence, the least recently used forgotten beyond `capacity` (a
    forgotten message falls back to JetStream's delivery count)."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[int, Tries] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, seq: int) -> Tries | None:
        return self._items.get(seq)

    def put(self, seq: int, tries: Tries) -> None:
        self._items[seq] = tries
        self._items.move_to_end(seq)
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def drop(self, seq: int) -> None:
        self._items.pop(seq, None)


def consumer_subjects(record: TriggerRecord) -> list[str]:
    """What a trigger's consumer reads: events by the type filter, and its redrives."""
    return [
        type_filter_subject(record.filter.get("type")),
        redrive_subject(record.namespace, record.name),
    ]


class TriggerDelivery:
    """The delivery loop of one trigger (one incarnation: its uid)."""

    def __init__(
        self,
        record: TriggerRecord,
        *,
        bus: Bus,
        router: Router,
        caller: Caller,
        metrics: DeliveryMetrics,
        settings: RouterSettings,
        consumer: str | None = None,
    ) -> None:
        self.record = record
        # A schedule's delivery names its consumer apart (`schedule_...`), so the trigger
        # sweep never takes it for an orphan.
        self.consumer = consumer or trigger_consumer(record.namespace, record.name, record.uid)
        self.fid = (record.namespace, record.function)
        self._bus = bus
        self._caller = caller
        self._metrics = metrics
        self._settings = settings
        self._policy = record.delivery
        self._tries = TriesMemory(2 * self._policy.max_in_flight + 64)
        self._labels = (record.namespace, record.name)
        self.declared = asyncio.Event()  # its consumer exists (for tests and tools)
        fid = self.fid
        self._loop = ConsumerLoop(
            bus,
            EVENTS_STREAM,
            self.consumer,
            self.handle,
            limit=self._policy.max_in_flight,
            ensure=self.ensure,
            expires=settings.pull_expires_seconds,
            ready=lambda: caller.ready(fid),
            until_ready=lambda: router.until(lambda _: caller.ready(fid)),
        )

    def start(self) -> None:
        self._loop.start()

    def stop_fetching(self) -> None:
        self._loop.stop_fetching()

    async def stop(self, grace: float) -> None:
        await self._loop.stop(grace)

    @property
    def in_flight(self) -> int:
        return self._loop.in_flight

    async def ensure(self) -> None:
        """Declare the trigger's consumer: from the trigger's creation on, so events stored
        after it was made are delivered even if the consumer is made later."""
        r = self.record
        await self._bus.ensure_consumer(
            EVENTS_STREAM,
            self.consumer,
            filter_subjects=consumer_subjects(r),
            ack_wait=self._policy.timeout + self._settings.ack_wait_margin_seconds,
            max_ack_pending=self._policy.max_in_flight,
            start_time=r.created_at,
            description=f"trigger {r.namespace}/{r.name} to function {r.function}",
        )
        self.declared.set()

    # -- one message ------------------------------------------------------------------------

    async def handle(self, msg: PulledMessage) -> None:
        seq = msg.stream_seq
        tries = self._tries.get(seq)
        try:
            event = parse_structured(msg.data)
        except InvalidEvent as exc:
            await self._dead_letter(
                msg, _raw(msg.data), "invalid_event", str(exc), attempts=1, tries=tries
            )
            return
        redriven = msg.subject.startswith(_REDRIVE)
        if not redriven and not match_trigger(event.attrs, self.record.filter):
            await msg.ack()
            self._metrics.delivery(*self._labels, "skipped")
            return
        made = tries.attempts if tries is not None else msg.deliveries - 1
        if tries is not None and tries.verdict is not None:
            verdict = tries.verdict
            await self._dead_letter(
                msg, event.structured, verdict.reason, verdict.message, attempts=made, tries=tries
            )
            return
        if made > self._policy.retries:  # a message this router had not seen, tried enough
            await self._dead_letter(
                msg,
                event.structured,
                (tries.reason if tries is not None else "") or "retries_exhausted",
                f"gave up after {made} attempts",
                attempts=made,
                tries=tries,
            )
            return
        answer: Answer | None = None
        headers, body = delivery_request(event)
        try:
            answer = await self._caller.call(
                self.fid,
                "POST",
                "/",
                headers,
                body,
                timeout=self._policy.timeout,
            )
        except NoReadyInstance:
            if tries is None:  # remember that this delivery was no attempt
                self._tries.put(seq, Tries(made, None))
            await msg.nak(self._settings.wait_seconds)
            self._metrics.delivery(*self._labels, "waiting")
            return
        except CallFailed as exc:
            outcome: plan.Outcome = exc.kind
            detail = exc.message
        else:
            outcome = answer.status
            detail = ""
        attempts = made + 1
        self._metrics.attempt(*self._labels, str(outcome))
        retry_after = (
            plan.parse_retry_after(answer.header("Retry-After"))
            if answer is not None and answer.status >= 300
            else None
        )
        action = plan.next_action(
            outcome,
            attempts,
            self._policy,
            retry_after,
            max_delay=self._settings.max_backoff_seconds,
        )
        if isinstance(action, plan.Ack):
            assert answer is not None
            await self._replies(answer)
            await msg.ack()
            self._tries.drop(seq)
            self._metrics.delivery(*self._labels, "delivered")
            self._metrics.delivered_after(*self._labels, max(0.0, time.time() - msg.stored_at))
            return
        last_status = answer.status if answer is not None else None
        first_at = (tries.first_at if tries is not None else None) or datetime.now(UTC)
        if isinstance(action, plan.Retry):
            self._tries.put(seq, Tries(attempts, first_at, action.reason, detail, last_status))
            await msg.nak(action.delay)
            self._metrics.delivery(*self._labels, "retried")
            return
        tries = Tries(attempts, first_at, action.reason, detail, last_status, action)
        self._tries.put(seq, tries)
        await self._dead_letter(
            msg,
            event.structured,
            action.reason,
            f"{action.message}: {detail}" if detail else action.message,
            attempts=attempts,
            tries=tries,
        )

    async def _replies(self, answer: Answer) -> None:
        """Publish the CloudEvents a 2xx answer carries. An invalid one is logged and counted,
        not failed; a publish NATS does not acknowledge raises (the delivery is done again)."""
        try:
            if not answer.complete and any(k.lower().startswith("ce-") for k, _ in answer.headers):
                raise InvalidEvent(
                    f"the answer is larger than {self._settings.reply_max_bytes} bytes"
                )
            replies = find_replies(answer.headers, answer.body)
            subjects = [event_subject(reply["type"]) for reply in replies]
        except InvalidEvent as exc:
            log.warning(
                "ignoring an invalid reply event",
                extra={"trigger": f"{self.record.namespace}/{self.record.name}", "error": str(exc)},
            )
            self._metrics.reply("invalid")
            return
        for reply, subject in zip(replies, subjects, strict=True):
            payload = json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode()
            try:
                await self._bus.publish(
                    subject,
                    payload,
                    msg_id=event_dedup_id(reply["source"], reply["id"]),
                    headers=_STRUCTURED,
                )
            except Exception:
                self._metrics.reply("failed")
                raise
            self._metrics.reply("published")

    async def _dead_letter(
        self,
        msg: PulledMessage,
        event: dict[str, Any],
        reason: str,
        message: str,
        *,
        attempts: int,
        tries: Tries | None,
    ) -> None:
        r = self.record
        key = f"{r.uid}:{msg.stream_seq}"
        now = datetime.now(UTC)
        letter = DeadLetter(
            namespace=r.namespace,
            trigger=r.name,
            trigger_uid=r.uid,
            function=r.function,
            event=event,
            reason=reason,
            message=message,
            attempts=max(1, attempts),
            last_status=tries.last_status if tries is not None else None,
            first_attempt_at=tries.first_at if tries is not None else None,
            deadlettered_at=now,
        )
        await self._bus.publish(
            dlq_subject(r.namespace, r.name),
            letter.model_dump_json().encode(),
            msg_id=key,
            headers=_JSON,
        )
        data = DeliveryDeadletteredData(
            namespace=r.namespace,
            trigger=r.name,
            function=r.function,
            event_id=_text(event.get("id")),
            event_source=_text(event.get("source")),
            event_type=_text(event.get("type")),
            attempts=max(1, attempts),
            reason=reason,
        )
        await self._bus.publish_lifecycle(
            lifecycle_event(
                DeliveryDeadlettered,
                data,
                service="router",
                subject=f"{r.namespace}/{r.function}",
                key=key,
            )
        )
        await msg.ack()
        self._tries.drop(msg.stream_seq)
        self._metrics.delivery(*self._labels, "deadlettered")
        self._metrics.dead_letter(*self._labels, reason)
        log.info(
            "event dead-lettered",
            extra={
                "trigger": f"{r.namespace}/{r.name}",
                "function": r.function,
                "stream_seq": msg.stream_seq,
                "reason": reason,
                "attempts": attempts,
            },
        )


def _raw(data: bytes) -> dict[str, Any]:
    """What a dead letter holds of a message that is not a valid event: the JSON object it
    is, else its bytes."""
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        value = None
    if isinstance(value, dict):
        return value
    return {"data_base64": base64.b64encode(data).decode()}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
