"""The builder service's wiring: the artifact store, the backend (local, or kubernetes with
`LAMBDABUS_BACKEND=kubernetes`) and the `Builder`, its durable consumer of function events, and
its reconciliation loop, for the service's lifetime."""

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
from lambdabus_platform.imageregistry import ImageRegistry
from lambdabus_platform.s3 import S3Objects
from lambdabus_platform.service import ServiceContext, Setup, subscribe_lifecycle

DURABLE = "builder"
_SLOT_WAIT = 600.0  # seconds a kubernetes build may wait for a build slot, beyond its Job's


def make_setup(
    settings: BuilderSettings, backend: BuildBackend | None = None, replica: str | None = None
) -> Setup:
    """The service's setup; `backend` replaces the local one (tests pass a wrapped one),
    `replica` this process's replica id (`claims.replica_id()`)."""

    @contextlib.asynccontextmanager
    async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
        async with (
            open_blob_store(settings.store, ctx.bus) as blobs,
            _backend(settings, backend) as chosen,
        ):
            builder = Builder(
                bus=ctx.bus,
                settings=_slots_for(settings),
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


@contextlib.asynccontextmanager
async def _backend(
    settings: BuilderSettings, given: BuildBackend | None
) -> AsyncIterator[BuildBackend]:
    """`given`, else the one `settings.backend` names, with its clients for the lifetime."""
    if given is not None:
        yield given
    elif settings.backend == "kubernetes":
        # Here, not at the top: the Kubernetes client's models cost ~65 MiB of memory, which a
        # builder on the local backend never uses (and copies the page tables of at each fork).
        from lambdabus_builder.kube import KubeBuildBackend
        from lambdabus_platform.kube.client import KubeClient

        s3 = settings.store.s3
        async with (
            KubeClient.connect(settings.kube_api) as client,
            S3Objects.open(s3, settings.kube.build_context_bucket) as contexts,
            ImageRegistry.open(
                insecure=settings.kube.insecure_registries, auth_file=settings.registry_auth_file
            ) as registry,
        ):
            yield KubeBuildBackend(settings, client, contexts, s3, registry)
    else:
        yield LocalBackend(settings)


def _slots_for(settings: BuilderSettings) -> BuilderSettings:
    """Kubernetes builds run in the cluster, this process only watches them: it takes as many
    at once as the cluster's build Job limit allows (the backend holds the rest `pending`), and
    gives each at least the Job's own deadline (`LAMBDABUS_BUILD_DEADLINE`) and some to wait
    for a slot."""
    if settings.backend != "kubernetes":
        return settings
    slots = max(settings.max_concurrent_builds, settings.max_build_jobs)
    timeout = max(settings.build_timeout, settings.kube.build_deadline + _SLOT_WAIT)
    return settings.model_copy(update={"max_concurrent_builds": slots, "build_timeout": timeout})
