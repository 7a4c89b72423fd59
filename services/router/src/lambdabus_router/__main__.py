"""`python -m lambdabus_router`: run the router service (the data plane, default port 8081).

It keeps the endpoints of every function from the `deployments` KV bucket (and which functions
exist from `functions`) and relays `ANY /{ns}/{name}/{path...}` to a ready instance; it delivers
the events of every trigger in the `triggers` bucket and runs asynchronous invocations
(`dispatch`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from lambdabus_platform.httpauth import Authenticator
from lambdabus_platform.service import ServiceContext, Setup, run
from lambdabus_platform.subjects import (
    DEPLOYMENTS_BUCKET,
    FUNCTION_LOAD_BUCKET,
    FUNCTION_METRICS_BUCKET,
    FUNCTIONS_BUCKET,
    QUOTAS_BUCKET,
    REVISION_DEPLOYMENTS_BUCKET,
    REVISIONS_BUCKET,
    STARTING_PREFIX,
    TOKENS_BUCKET,
    wake_subject,
)
from lambdabus_platform.tokens import FailureLimiter
from lambdabus_platform.tokenstore import TokenStore
from lambdabus_router.dispatch import Dispatch, dispatching
from lambdabus_router.front import Front, quiet_malformed
from lambdabus_router.load import LoadReporter
from lambdabus_router.metrics import DeliveryMetrics, InvocationMetrics
from lambdabus_router.proxy import Router
from lambdabus_router.settings import RouterSettings
from lambdabus_router.stats import CallStats

# aiohttp's own cap on a request body sits above ours, so that the router answers 413 itself.
_SLACK = 1024 * 1024


def make_setup(
    settings: RouterSettings,
    *,
    on_router: Callable[[Router], None] | None = None,
    on_dispatch: Callable[[Dispatch], None] | None = None,
) -> Setup:
    """The router's part of the service shell; `on_router` and `on_dispatch` hand the running
    router and its asynchronous side to an embedding test or tool."""

    @contextlib.asynccontextmanager
    async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
        tokens = TokenStore(ctx.bus.kv(TOKENS_BUCKET))
        limiter = FailureLimiter(settings.auth_max_failures, settings.auth_failure_window_seconds)
        router = Router(
            settings, InvocationMetrics(ctx.metrics.registry), Authenticator(tokens, limiter)
        )
        stats = CallStats(
            ctx.bus.kv(FUNCTION_METRICS_BUCKET), interval=settings.stats_publish_seconds
        )
        router.stats = stats
        load = LoadReporter(
            ctx.bus.kv(FUNCTION_LOAD_BUCKET),
            lambda: router.active.items(),
            by_revision=lambda: list(router.revision_in_flight.items()),
            sample=settings.load_sample_seconds,
            publish=settings.load_publish_seconds,
        )
        router.load = load

        async def wake(fid: tuple[str, str]) -> None:
            await ctx.bus.publish_nowait(wake_subject(*fid), b"")

        router.wake = wake
        quiet_malformed()  # a caller's malformed request logs no error (either server's)
        if settings.fast_path:
            ctx.front = Front(router)
        async with (
            tokens.watching(),
            stats.running(),
            load.running(),
            ctx.bus.listening(f"{STARTING_PREFIX}.>", router.on_starting),
            router.running(
                ctx.bus.kv(DEPLOYMENTS_BUCKET),
                ctx.bus.kv(FUNCTIONS_BUCKET),
                ctx.bus.kv(QUOTAS_BUCKET),
                (ctx.bus.kv(REVISIONS_BUCKET), ctx.bus.kv(REVISION_DEPLOYMENTS_BUCKET)),
            ),
        ):
            router.add_routes(ctx.app)
            if on_router is not None:
                on_router(router)
            if not settings.deliveries:
                yield
                return
            metrics = DeliveryMetrics(ctx.metrics.registry)
            async with dispatching(ctx.bus, router, metrics, settings, ctx.stopping) as dispatch:
                if on_dispatch is not None:
                    on_dispatch(dispatch)
                yield

    return setup


def client_max_size(settings: RouterSettings) -> int:
    return settings.max_body_bytes + _SLACK


def loop_factory(settings: RouterSettings) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The router's event loop: uvloop unless the settings ask for asyncio's own."""
    if settings.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def main() -> int:
    settings = RouterSettings()
    return run(
        "router",
        settings,
        make_setup(settings),
        client_max_size=client_max_size(settings),
        loop_factory=loop_factory(settings),
    )


if __name__ == "__main__":
    raise SystemExit(main())
