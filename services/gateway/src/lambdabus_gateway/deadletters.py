"""Dead letters: events whose delivery the router gave up, kept on the DLQ stream
(`lambdabus.dlq.<ns>.<trigger>`, one `DeadLetter` JSON each). A dead letter's id is its DLQ
stream sequence.

A redrive sends the event again to its trigger alone (`lambdabus.events.r.<ns>.<trigger>`, which
the trigger's consumer also reads), then removes the dead letter. The redrive's `Nats-Msg-Id`
is `redrive:<sequence>`, so redriving twice at once sends it once.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from lambdabus_events.models import DeadLetter
from lambdabus_gateway.cloudevent import STRUCTURED, encode_event
from lambdabus_gateway.triggers import Triggers
from lambdabus_platform.bus import Bus, StreamMessage
from lambdabus_platform.errors import InvalidRequest, NotFound
from lambdabus_platform.subjects import DLQ_PREFIX, dlq_filter, redrive_subject

log = logging.getLogger("lambdabus.gateway.deadletters")

STREAM = "DLQ"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def parse_id(value: str) -> int:
    """A dead letter id (a positive stream sequence), or a 400."""
    if not value.isascii() or not value.isdigit() or int(value) < 1:
        raise InvalidRequest(
            f"{value!r} is not a dead letter id (a positive integer, as listed)",
            code="invalid_deadletter_id",
        )
    return int(value)


def parse_limit(value: str | None) -> int:
    if value in (None, ""):
        return DEFAULT_LIMIT
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise InvalidRequest(
            f"limit={value!r} must be a whole number from 1 to {MAX_LIMIT}", code="invalid_limit"
        )
    return int(value)


def item(message: StreamMessage, letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as the API shows it: its id, then the `DeadLetter` fields."""
    return {"id": str(message.sequence), **letter.model_dump(mode="json")}


def _in_namespace(message: StreamMessage, namespace: str) -> bool:
    return message.subject.startswith(f"{DLQ_PREFIX}.{namespace}.")


def _parse(message: StreamMessage) -> DeadLetter | None:
    try:
        return DeadLetter.model_validate_json(message.data)
    except ValidationError:
        log.warning(
            "skipping a malformed dead letter",
            extra={"subject": message.subject, "sequence": message.sequence},
        )
        return None


class DeadLetters:
    def __init__(self, *, bus: Bus, triggers: Triggers) -> None:
        self._bus = bus
        self._triggers = triggers

    async def list(
        self, namespace: str, trigger: str | None, *, after: int | None, limit: int
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Dead letters oldest first, from after the id `after`; and the id to continue
        after, if there may be more."""
        messages = await self._bus.read(
            STREAM,
            dlq_filter(namespace, trigger),
            start_seq=None if after is None else after + 1,
            limit=limit,
        )
        items = []
        for message in messages:
            letter = _parse(message)
            if letter is not None:
                items.append(item(message, letter))
        more = str(messages[-1].sequence) if len(messages) == limit else None
        return items, more

    async def get(self, namespace: str, sequence: int) -> tuple[StreamMessage, DeadLetter]:
        message = await self._bus.get_message(STREAM, sequence)
        letter = _parse(message) if message is not None else None
        if message is None or letter is None or not _in_namespace(message, namespace):
            raise NotFound(
                f"no dead letter {sequence} in namespace {namespace} (redriven already?)",
                code="deadletter_not_found",
            )
        return message, letter

    async def redrive(self, namespace: str, sequence: int) -> dict[str, Any]:
        message, letter = await self.get(namespace, sequence)
        # Its trigger must still be there to take it; otherwise the event would be lost.
        await self._triggers.get(namespace, letter.trigger)
        await self._bus.publish(
            redrive_subject(namespace, letter.trigger),
            encode_event(letter.event),
            msg_id=f"redrive:{sequence}",
            headers={"Content-Type": STRUCTURED},
        )
        await self._bus.delete_message(STREAM, sequence)
        log.info(
            "dead letter redriven",
            extra={"namespace": namespace, "trigger": letter.trigger, "sequence": sequence},
        )
        return {**item(message, letter), "redriven": True}
