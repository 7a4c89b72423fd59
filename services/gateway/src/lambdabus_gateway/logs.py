"""Build logs, runtime logs and a function's lifecycle history, read through the logs service
(request/reply on NATS); `follow=1` then streams new lines from the LOGS stream as NDJSON."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from datetime import datetime, timedelta

from aiohttp import web
from pydantic import ValidationError

from lambdabus_events.models import LogKind, LogLine, LogQuery, LogQueryResult
from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import InvalidRequest, LambdabusError
from lambdabus_platform.streaming import with_keepalive
from lambdabus_platform.subjects import LOGS_QUERY_SUBJECT, logs_subject

NDJSON = "application/x-ndjson"
_INVOCATION = re.compile(r"^[A-Za-z0-9._:/@+=-]{1,128}$")


def parse_tail(value: str | None) -> int | None:
    if value in (None, ""):
        return None
    try:
        tail = int(value)
    except ValueError:
        raise InvalidRequest(
            f"tail={value!r} must be a whole number of lines", code="invalid_tail"
        ) from None
    if not 1 <= tail <= 100_000:
        raise InvalidRequest("tail must be between 1 and 100000", code="invalid_tail")
    return tail


def parse_invocation(value: str | None) -> str | None:
    """`?invocation=ID`: only the lines written during that invocation."""
    if not value:
        return None
    if _INVOCATION.fullmatch(value) is None:
        raise InvalidRequest(
            f"invocation={value!r} is not an invocation id (the X-Lambdabus-Invocation-Id of "
            "a call, or the id of an event)",
            code="invalid_invocation",
        )
    return value


async def query(bus: Bus, q: LogQuery, timeout: float = 10.0) -> LogQueryResult:
    raw = await bus.request(LOGS_QUERY_SUBJECT, q.model_dump_json().encode(), timeout=timeout)
    try:
        return LogQueryResult.model_validate_json(raw)
    except ValidationError:
        # the logs service answers errors in the platform's error shape
        body = json.loads(raw)
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise LambdabusError(
            error.get("message", "the logs service gave an unreadable answer"),
            code=error.get("code", "logs_unavailable"),
            status=502,
        ) from None


async def stream_logs(
    request: web.Request,
    bus: Bus,
    kind: LogKind,
    namespace: str,
    name: str,
    *,
    since: datetime | None,
    stopping: asyncio.Event,
    keepalive: float,
) -> web.StreamResponse:
    tail = parse_tail(request.query.get("tail"))
    follow = request.query.get("follow", "") in ("1", "true", "yes")
    if tail is None and since is None and follow:
        tail = 100
    invocation = parse_invocation(request.query.get("invocation"))
    result = await query(
        bus,
        LogQuery(
            namespace=namespace,
            name=name,
            kind=kind,
            tail=tail,
            since=since,
            invocation=invocation,
        ),
    )
    response = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-cache"})
    if result.truncated:
        response.headers["X-Lambdabus-Truncated"] = "true"
    await response.prepare(request)
    for line in result.lines:
        await response.write(line.model_dump_json().encode() + b"\n")
    if not follow:
        await response.write_eof()
        return response
    # Follow: new lines from the stream, from just after the last line shown.
    start = result.lines[-1].ts + timedelta(microseconds=1) if result.lines else None
    seen_last = result.lines[-1] if result.lines else None
    messages = bus.replay("LOGS", logs_subject(kind, namespace, name), since=start)
    try:
        async for item in with_keepalive(messages, keepalive, stopping):
            if item is None:
                await response.write(b"\n")
                continue
            line = LogLine.model_validate_json(item.data)
            if seen_last is not None and line == seen_last:
                continue
            if invocation is not None and line.invocation != invocation:
                continue
            await response.write(item.data + b"\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await messages.aclose()  # type: ignore[attr-defined]
    return response
