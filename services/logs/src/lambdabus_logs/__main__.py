"""`python -m lambdabus_logs`: run the logs service.

It consumes the lifecycle stream for the audit trail through its durable consumer. Serving build
and runtime log queries is not built yet; the LIFECYCLE stream itself holds the audit history.
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
from lambdabus_platform.subjects import LIFECYCLE_PREFIX

log = logging.getLogger("lambdabus.logs")


class LogsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_LOGS_", extra="ignore")

    port: int = Field(default=8084, ge=0, le=65535)


@contextlib.asynccontextmanager
async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
    async def on_lifecycle(event: LifecycleEvent) -> None:
        """Every lifecycle transition: one audit line."""
        log.info("audit", extra={"type": event.type, "subject": event.subject, "id": event.id})

    subscribe_lifecycle(ctx, f"{LIFECYCLE_PREFIX}.>", durable="logs-audit", handler=on_lifecycle)
    yield


def main() -> int:
    return run("logs", LogsSettings(), setup)


if __name__ == "__main__":
    raise SystemExit(main())
