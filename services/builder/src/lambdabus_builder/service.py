"""The builder service's wiring: the artifact store, the local backend and the `Builder`, its
durable consumer of function events, and its reconciliation loop, for the service's lifetime."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from lambdabus_builder.backend import BuildBackend
from lambdabus_builder.builds import Builder
from lambdabus_builder.claims import replica_id
from lambdabus_builder.collect import KINDS, DiskCollector
from lambdabus_builder.local import LocalBackend
from lambdabus_builder.metrics import BuildMetrics
from lambdabus_builder.settings import BuilderSettings
from lambdabus_platform.blobstore import open_blob_store
from lambdabus_platform.eventapi import SUBSCRIPTIONS
from lambdabus_platform.gc import GcMetrics
from lambdabus_platform.service import ServiceContext, Setup, subscribe_lifecycle

DURABLE = "builder"


def make_setup(
    settings: BuilderSettings, backend: BuildBackend | None = None, replica: str | None = None
) -> Setup:
    """The service's setup; `backend` replaces the local one (tests pass a wrapped one),
    `replica` this process's replica id (`claims.replica_id()`)."""

    @contextlib.asynccontextmanager
    async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
        async with open_blob_store(settings.store, ctx.bus) as blobs:
            chosen = backend if backend is not None else LocalBackend(settings)
            builder = Builder(
                bus=ctx.bus,
                settings=settings,
                backend=chosen,
                blobs=blobs,
                metrics=BuildMetrics.create(ctx.metrics.registry),
                replica=replica if replica is not None else replica_id(),
            )
            subscribe_lifecycle(ctx, SUBSCRIPTIONS[DURABLE], handler=builder.handle)
            await builder.start()
            collecting: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()
            if isinstance(chosen, LocalBackend):
                metrics = GcMetrics.create(ctx.metrics.registry, KINDS)
                collecting = DiskCollector(ctx.bus, chosen, settings.gc, metrics).running()
            try:
                async with collecting:
                    yield
            finally:
                await builder.close()

    return setup
