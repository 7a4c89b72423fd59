"""Router settings: `LAMBDABUS_ROUTER_*` (plus the shared `LAMBDABUS_NATS_*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lambdabus_platform.settings import ServiceSettings

MiB = 1024 * 1024

Balance = Literal["least_in_flight", "round_robin"]


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_ROUTER_", extra="ignore")

    port: int = Field(default=8081, ge=0, le=65535)
    max_body_bytes: int = Field(default=6 * MiB, gt=0, description="largest invocation body")
    timeout_margin_seconds: float = Field(
        default=1.0, ge=0, description="added to the function's timeout before answering 504"
    )
    connect_timeout_seconds: float = Field(
        default=2.0, gt=0, description="to open a connection to an instance"
    )
    balance: Balance = "least_in_flight"
    pool_size_per_instance: int = Field(
        default=256, ge=0, description="open connections per instance (0: unbounded)"
    )
    keepalive_seconds: float = Field(
        default=15.0,
        gt=0,
        description="idle time before a pooled connection closes; keep it below the instances'",
    )
    buffer_response_bytes: int = Field(
        default=1 * MiB,
        ge=0,
        description="responses up to this Content-Length are relayed in one write; "
        "longer or unsized ones are streamed",
    )
