"""Answering logs queries: which part of which stream a `LogQuery` reads (`plan`), the reply
made from what was read (`render`), both pure, and the thin shell that does the reading
(`LogQueries.answer`, served on `LOGS_QUERY_SUBJECT`).

The LOGS and LIFECYCLE streams are the storage: nothing is copied, so the logs of a deleted
function stay readable until the stream's retention drops them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import ValidationError

from lambdabus_events.catalog import parse_lifecycle
from lambdabus_events.models import MAX_QUERY_LIMIT, LogLine, LogQuery, LogQueryKind
from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import InvalidRequest, LambdabusError
from lambdabus_platform.subjects import lifecycle_filter, logs_subject

log = logging.getLogger("lambdabus.logs")

# Room for the reply's own JSON around the lines.
_ENVELOPE = 64


@dataclass(frozen=True)
class ReadPlan:
    stream: str
    filter_subject: str
    since: datetime | None
    newest: bool
    keep: int  # lines the reply may hold
    read: int  # messages to read: one more than `keep`, to tell a truncated answer


def plan(query: LogQuery) -> ReadPlan:
    if query.kind == "lifecycle":
        stream, subject = "LIFECYCLE", lifecycle_filter(None, query.namespace, query.name)
    else:
        stream, subject = "LOGS", logs_subject(query.kind, query.namespace, query.name)
    if query.invocation is not None:
        # One invocation's lines are found among the others: read as many as a query may.
        keep = query.limit if query.tail is None else min(query.tail, query.limit)
        return ReadPlan(stream, subject, query.since, query.tail is not None, keep, MAX_QUERY_LIMIT)
    if query.tail is None:
        return ReadPlan(stream, subject, query.since, False, query.limit, query.limit + 1)
    keep = min(query.tail, query.limit)
    # Asking for the last N is no truncation; only a `limit` below N cuts the answer short.
    read = keep + 1 if query.tail > query.limit else keep
    return ReadPlan(stream, subject, query.since, True, keep, read)


def _valid(kind: LogQueryKind, payload: bytes) -> bool:
    try:
        if kind == "lifecycle":
            parse_lifecycle(payload)
        else:
            LogLine.model_validate_json(payload)
    except (ValidationError, ValueError):
        return False
    return True


def _of_invocation(payload: bytes, invocation: str) -> bool:
    try:
        return LogLine.model_validate_json(payload).invocation == invocation
    except (ValidationError, ValueError):
        return False


@dataclass(frozen=True)
class Rendered:
    body: bytes
    lines: int
    truncated: bool
    malformed: int


def render(
    kind: LogQueryKind,
    payloads: Sequence[bytes],
    read: ReadPlan,
    *,
    budget: int,
    invocation: str | None = None,
) -> Rendered:
    """The `LogQueryResult` JSON for what was read: the stored JSON of each line as it is
    (checked, not re-encoded), the newest or oldest `keep` of them that fit in `budget` bytes.
    A message that is not a line of its kind is left out, and with `invocation`, a line
    written during another invocation."""
    truncated = len(payloads) > read.keep
    valid = [p for p in payloads if _valid(kind, p)]
    malformed = len(payloads) - len(valid)
    if invocation is not None:
        valid = [p for p in valid if _of_invocation(p, invocation)]
        # asking for the last N of them is no truncation, as without `invocation`
        truncated = len(valid) > read.keep and not read.newest
    chosen = valid[-read.keep :] if read.newest else valid[: read.keep]
    room = budget - _ENVELOPE
    ordered = reversed(chosen) if read.newest else iter(chosen)
    fitting: list[bytes] = []
    for payload in ordered:
        room -= len(payload) + 1
        if room < 0:
            truncated = True
            break
        fitting.append(payload)
    if read.newest:
        fitting.reverse()
    items = b",".join(fitting)
    field = b'"events"' if kind == "lifecycle" else b'"lines"'
    other = b'"lines"' if kind == "lifecycle" else b'"events"'
    body = (
        b"{"
        + field
        + b":["
        + items
        + b"],"
        + other
        + b':[],"truncated":'
        + (b"true" if truncated else b"false")
        + b"}"
    )
    return Rendered(body, len(fitting), truncated, malformed)


def error_reply(error: LambdabusError) -> bytes:
    return json.dumps(error.to_json()).encode()


class QueryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.queries = Counter(
            "lambdabus_logs_queries",
            "logs queries answered, by kind and outcome",
            ["kind", "outcome"],
            registry=registry,
        )
        self.lines = Counter(
            "lambdabus_logs_lines_returned",
            "lines (or lifecycle events) returned by logs queries",
            ["kind"],
            registry=registry,
        )
        self.duration = Histogram(
            "lambdabus_logs_query_duration_seconds",
            "time to answer one logs query",
            ["kind"],
            registry=registry,
        )


class LogQueries:
    """Reads the streams for `LogQuery` requests; never raises, every request gets a reply."""

    def __init__(self, bus: Bus, metrics: QueryMetrics, *, max_reply_bytes: int) -> None:
        self._bus = bus
        self._metrics = metrics
        self._max_reply_bytes = max_reply_bytes

    async def answer(self, raw: bytes) -> bytes:
        started = time.perf_counter()
        try:
            query = LogQuery.model_validate_json(raw)
        except ValidationError as exc:
            self._metrics.queries.labels("unknown", "invalid").inc()
            return error_reply(InvalidRequest(_problems(exc)))
        kind = query.kind
        try:
            read = plan(query)
            messages = (
                []
                if read.read == 0
                else await self._bus.read(
                    read.stream,
                    read.filter_subject,
                    since=read.since,
                    limit=read.read,
                    newest=read.newest,
                )
            )
            budget = min(self._max_reply_bytes, self._bus.max_payload)
            rendered = render(
                kind,
                [m.data for m in messages],
                read,
                budget=budget,
                invocation=query.invocation,
            )
        except LambdabusError as exc:
            self._metrics.queries.labels(kind, "unavailable" if exc.temporary else "error").inc()
            return error_reply(exc)
        except Exception:
            log.exception("logs query failed", extra={"kind": kind})
            self._metrics.queries.labels(kind, "error").inc()
            return error_reply(LambdabusError("the logs query failed; see the logs service log"))
        if rendered.malformed:
            log.warning(
                "left out malformed stored lines",
                extra={"count": rendered.malformed, "subject": read.filter_subject},
            )
        self._metrics.queries.labels(kind, "ok").inc()
        self._metrics.lines.labels(kind).inc(rendered.lines)
        self._metrics.duration.labels(kind).observe(time.perf_counter() - started)
        return rendered.body


def _problems(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "request"
        parts.append(f"{where}: {error['msg']}")
    return "not a logs query: " + "; ".join(parts)
