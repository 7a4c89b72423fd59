"""`python -m lambdabus_router`: run the router service (the data plane, default port 8081).

It keeps the endpoints of every function from the `deployments` KV bucket (and which functions
exist from `functions`) and relays `ANY /{ns}/{name}/{path...}` to a ready instance.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from lambdabus_platform.service import ServiceContext, Setup, run
from lambdabus_platform.subjects import DEPLOYMENTS_BUCKET, FUNCTIONS_BUCKET
from lambdabus_router.metrics import InvocationMetrics
from lambdabus_router.proxy import Router
from lambdabus_router.settings import RouterSettings

# aiohttp's own cap on a request body sits above ours, so that the router answers 413 itself.
_SLACK = 1024 * 1024


def make_setup(
    settings: RouterSettings, *, on_router: Callable[[Router], None] | None = None
) -> Setup:
    """The router's part of the service shell; `on_router` hands the running router to an
    embedding test or tool."""

    @contextlib.asynccontextmanager
    async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
        router = Router(settings, InvocationMetrics(ctx.metrics.registry))
        async with router.running(ctx.bus.kv(DEPLOYMENTS_BUCKET), ctx.bus.kv(FUNCTIONS_BUCKET)):
            router.add_routes(ctx.app)
            if on_router is not None:
                on_router(router)
            yield

    return setup


def client_max_size(settings: RouterSettings) -> int:
    return settings.max_body_bytes + _SLACK


def main() -> int:
    settings = RouterSettings()
    return run("router", settings, make_setup(settings), client_max_size=client_max_size(settings))


if __name__ == "__main__":
    raise SystemExit(main())
