"""`python -m lambdabus_builder`: run the builder service.

It consumes function lifecycle events through its durable consumer. Turning sources into
runnable artifacts (the local and Kaniko backends) is not built yet, so it records what it saw
and leaves the function's image status `pending` — the gateway reports exactly that.
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

log = logging.getLogger("lambdabus.builder")


class BuilderSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_BUILDER_", extra="ignore")

    port: int = Field(default=8082, ge=0, le=65535)


@contextlib.asynccontextmanager
async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
    async def on_function_event(event: LifecycleEvent) -> None:
        """function.created / updated / deleted: what the builder will build or forget."""
        log.info(
            "function event", extra={"type": event.type, "subject": event.subject, "id": event.id}
        )

    subscribe_lifecycle(
        ctx,
        entity_filter("function"),
        durable="builder",
        handler=on_function_event,
    )
    yield


def main() -> int:
    return run("builder", BuilderSettings(), setup)


if __name__ == "__main__":
    raise SystemExit(main())
