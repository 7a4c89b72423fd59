"""Logs service settings: `LAMBDABUS_LOGS_*` (plus the shared `LAMBDABUS_NATS_*`, whose
`LOGS_MAX_AGE_DAYS` is how long log lines are kept)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lambdabus_platform.settings import ServiceSettings


class LogsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_LOGS_", extra="ignore")

    port: int = Field(default=8084, ge=0, le=65535)
    max_reply_bytes: int = Field(
        default=4 * 1024 * 1024,
        gt=1024,
        description="largest query reply; the server's max_payload caps it too",
    )
