"""`python -m lambdabus_logs`: run the logs service.

It answers logs queries (`LogQuery` over NATS request/reply on `LOGS_QUERY_SUBJECT`) from the
LOGS stream (build and runtime lines) and the LIFECYCLE stream (a function's audit trail), and
writes one audit line per lifecycle transition to its own log.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from lambdabus_events.catalog import LifecycleEvent
from lambdabus_logs.queries import LogQueries, QueryMetrics
from lambdabus_logs.settings import LogsSettings
from lambdabus_platform.eventapi import REQUESTS, SUBSCRIPTIONS
from lambdabus_platform.service import (
    ServiceContext,
    Setup,
    run,
    serve_requests,
    subscribe_lifecycle,
)
from lambdabus_platform.subjects import LOGS_QUERY_SUBJECT

log = logging.getLogger("lambdabus.logs")


def make_setup(settings: LogsSettings) -> Setup:
    @contextlib.asynccontextmanager
    async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
        async def on_lifecycle(event: LifecycleEvent) -> None:
            """Every lifecycle transition: one audit line."""
            log.info("audit", extra={"type": event.type, "subject": event.subject, "id": event.id})

        subscribe_lifecycle(ctx, SUBSCRIPTIONS["logs-audit"], handler=on_lifecycle)
        queries = LogQueries(
            ctx.bus, QueryMetrics(ctx.metrics.registry), max_reply_bytes=settings.max_reply_bytes
        )
        serve_requests(ctx, REQUESTS[LOGS_QUERY_SUBJECT], handler=queries.answer)
        yield

    return setup


def main() -> int:
    settings = LogsSettings()
    return run("logs", settings, make_setup(settings))


if __name__ == "__main__":
    raise SystemExit(main())
