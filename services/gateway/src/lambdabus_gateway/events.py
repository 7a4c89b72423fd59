"""`POST /v1/events`: read user CloudEvents in any HTTP mode, refuse the whole request if any
event is invalid, and store every event in the EVENTS stream before answering.

Each event goes to `lambdabus.events.t.<escaped type>` with `Nats-Msg-Id` derived from its
(source, id), so JetStream stores a re-sent event once within its duplicate window.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from lambdabus_gateway.cloudevent import (
    CE_PREFIX,
    STRUCTURED,
    NotCloudEvents,
    Problem,
    batch_events,
    binary_event,
    detect_mode,
    encode_event,
    structured_event,
    validate_cloudevent,
)
from lambdabus_gateway.uploads import read_body
from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import InvalidRequest, PayloadTooLarge
from lambdabus_platform.subjects import event_dedup_id, event_subject

EVENTS_STREAM = "EVENTS"

# Room for the headers of a NATS message beside its payload.
_HEADER_ROOM = 1024


@dataclass(frozen=True)
class Limits:
    max_event: int
    max_batch: int
    max_batch_events: int


@dataclass(frozen=True)
class Stored:
    ids: list[str]
    duplicates: int

    def to_json(self) -> dict[str, Any]:
        return {"accepted": len(self.ids), "ids": self.ids, "duplicates": self.duplicates}


def invalid(problems: list[tuple[int | None, Problem]]) -> InvalidRequest:
    """One 400 for every problem found; `details.attribute` (and `details.index` in a batch)
    name the first, `details.problems` lists them all."""
    lines: list[str] = []
    listed: list[dict[str, Any]] = []
    for index, problem in problems:
        entry: dict[str, Any] = {"attribute": problem.attribute, "message": problem.message}
        if index is not None:
            entry["index"] = index
        lines.append(problem.message if index is None else f"event {index}: {problem.message}")
        listed.append(entry)
    first_index, first = problems[0]
    details: dict[str, Any] = {"problems": listed}
    if first.attribute:
        details["attribute"] = first.attribute
    if first_index is not None:
        details["index"] = first_index
    return InvalidRequest("; ".join(lines), code="invalid_cloudevent", details=details)


async def read_events(request: web.Request, limits: Limits) -> tuple[bool, list[dict[str, Any]]]:
    """Whether the request is a batch, and its events, each valid; or a 400 naming what is
    wrong, or a 413."""
    has_ce = any(key.lower().startswith(CE_PREFIX) for key in request.headers)
    try:
        mode = detect_mode(request.headers.get("Content-Type"), has_ce)
    except NotCloudEvents as exc:
        raise InvalidRequest(
            str(exc),
            code="unsupported_content_type",
            details={"content_type": request.headers.get("Content-Type")},
        ) from None
    if mode == "batch":
        body = await read_body(request, limits.max_batch, "the batch")
        events, problems = batch_events(body)
        if len(events) > limits.max_batch_events:
            raise PayloadTooLarge(
                f"the batch holds {len(events)} events; the limit is {limits.max_batch_events}",
                details={"limit": limits.max_batch_events},
            )
    else:
        body = await read_body(request, limits.max_event, "the event")
        if mode == "binary":
            event, found = binary_event(request.headers.items(), body)
        else:
            event, found = structured_event(body)
        events = [event] if not found else []
        problems = [(None, p) for p in found]
    if not problems:
        for index, event in enumerate(events):
            where = index if mode == "batch" else None
            problems += [(where, p) for p in validate_cloudevent(event)]
    if problems:
        raise invalid(problems)
    return mode == "batch", events


def encoded(
    events: list[dict[str, Any]], *, batch: bool, limits: Limits, max_payload: int
) -> list[bytes]:
    """The stored form of each event. A single event's body was bounded as it was read; a
    batch's events are bounded one by one here. All must fit in a NATS message."""
    limit = max_payload - _HEADER_ROOM
    if batch:
        limit = min(limit, limits.max_event)
    out = []
    for index, event in enumerate(events):
        payload = encode_event(event)
        if len(payload) > limit:
            where = f"event {index}" if batch else "the event"
            raise PayloadTooLarge(
                f"{where} is {len(payload)} bytes as stored; the limit is {limit}",
                details={"limit": limit, **({"index": index} if batch else {})},
            )
        out.append(payload)
    return out


async def store(bus: Bus, events: list[dict[str, Any]], payloads: list[bytes]) -> Stored:
    """Publish every event and wait for every ack: each is stored (fsynced) before the 202.
    They go through the EVENTS group commit, so the events of this request and those of
    concurrent requests share a write. A failure part way leaves some stored: the client
    retries the whole request, and the stored ones are recognised as duplicates."""
    headers = {"Content-Type": STRUCTURED}
    acks = await asyncio.gather(
        *(
            bus.publish_grouped(
                EVENTS_STREAM,
                event_subject(event["type"]),
                payload,
                msg_id=event_dedup_id(event["source"], event["id"]),
                headers=headers,
            )
            for event, payload in zip(events, payloads, strict=True)
        )
    )
    return Stored([str(e["id"]) for e in events], sum(1 for ack in acks if ack.duplicate))
