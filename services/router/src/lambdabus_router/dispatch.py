"""The router's asynchronous data plane, started and stopped as one: trigger deliveries,
schedules and asynchronous invocations over an HTTP client of their own (its pools apart from the
synchronous path's, so a burst of events never queues invocations behind it).

On SIGTERM the service shell sets `stopping`: fetching stops at once, deliveries in flight get
`shutdown_grace_seconds` to finish, and what is left goes back to the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lambdabus_platform.bus import Bus
from lambdabus_router.calls import Caller
from lambdabus_router.invocations import Invocations
from lambdabus_router.metrics import DeliveryMetrics
from lambdabus_router.proxy import Router
from lambdabus_router.schedules import Schedules
from lambdabus_router.settings import RouterSettings
from lambdabus_router.triggers import Triggers
from lambdabus_router.upstream import Upstream


@dataclass
class Dispatch:
    triggers: Triggers
    invocations: Invocations
    caller: Caller
    schedules: Schedules

    def stop_fetching(self) -> None:
        self.triggers.stop_fetching()
        self.schedules.stop_fetching()
        self.invocations.stop_fetching()


@contextlib.asynccontextmanager
async def dispatching(
    bus: Bus,
    router: Router,
    metrics: DeliveryMetrics,
    settings: RouterSettings,
    stopping: asyncio.Event,
) -> AsyncIterator[Dispatch]:
    async with Upstream(
        pool_size=settings.pool_size_per_instance,
        connect_timeout=settings.connect_timeout_seconds,
        keepalive=settings.keepalive_seconds,
    ) as upstream:
        caller = Caller(
            router, upstream, body_limit=max(settings.reply_max_bytes, settings.result_max_bytes)
        )
        triggers = Triggers(bus, router, caller, metrics, settings)
        invocations = Invocations(bus, caller, metrics, settings)
        schedules = Schedules(bus, router, caller, metrics, settings)
        dispatch = Dispatch(triggers, invocations, caller, schedules)

        async def stop_on_signal() -> None:
            await stopping.wait()
            dispatch.stop_fetching()

        watcher = asyncio.create_task(stop_on_signal())
        try:
            async with invocations.running(), triggers.running(), schedules.running():
                yield dispatch
        finally:
            watcher.cancel()
            await asyncio.wait({watcher})
