"""`python -m lambdabus_deployer`: run the deployer service.

It consumes build and function lifecycle events through its durable consumer. Running instances
(the local sandbox and Kubernetes backends) is not built yet, so it records what it saw and the
function's lambda status stays `waiting` — the gateway reports exactly that.
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

log = logging.getLogger("lambdabus.deployer")


class DeployerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_DEPLOYER_", extra="ignore")

    port: int = Field(default=8083, ge=0, le=65535)


@contextlib.asynccontextmanager
async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
    async def on_event(event: LifecycleEvent) -> None:
        """build.succeeded, function.updated / deleted: what the deployer will run or stop."""
        log.info(
            "lifecycle event", extra={"type": event.type, "subject": event.subject, "id": event.id}
        )

    subscribe_lifecycle(ctx, entity_filter("build"), durable="deployer-builds", handler=on_event)
    subscribe_lifecycle(
        ctx, entity_filter("function"), durable="deployer-functions", handler=on_event
    )
    yield


def main() -> int:
    return run("deployer", DeployerSettings(), setup)


if __name__ == "__main__":
    raise SystemExit(main())
