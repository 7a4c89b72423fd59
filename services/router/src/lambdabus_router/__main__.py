"""`python -m lambdabus_router`: run the router service (the data plane, default port 8081).

It follows deployment events to learn endpoints. Forwarding invocations and delivering
triggered events are not built yet: every data-plane path answers 404 with the JSON error shape.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lambdabus_events.catalog import LifecycleEvent
from lambdabus_platform.service import ServiceContext, run, subscribe_lifecycle
from lambdabus_platform.settings import ServiceSettings
from lambdabus_platform.subjects import entity_filter

log = logging.getLogger("lambdabus.router")


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_ROUTER_", extra="ignore")

    port: int = Field(default=8081, ge=0, le=65535)


@contextlib.asynccontextmanager
async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
    async def on_deployment(event: LifecycleEvent) -> None:
        """deployment.*: endpoints appear and disappear."""
        log.info("deployment event", extra={"type": event.type, "subject": event.subject})

    subscribe_lifecycle(
        ctx, entity_filter("deployment"), durable="router-deployments", handler=on_deployment
    )
    yield


def main() -> int:
    return run("router", RouterSettings(), setup)


if __name__ == "__main__":
    raise SystemExit(main())
