"""Gateway settings: `LAMBDABUS_GATEWAY_*` (plus the shared `LAMBDABUS_NATS_*`, `LAMBDABUS_STORE_*`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from lambdabus_platform.settings import (
    QuotaSettings,
    SecretsSettings,
    ServiceSettings,
    StoreSettings,
)

MiB = 1024 * 1024


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="LAMBDABUS_GATEWAY_", extra="ignore", populate_by_name=True
    )

    port: int = Field(default=8080, ge=0, le=65535)
    backend: Literal["local", "kubernetes"] = Field(
        default="local",
        validation_alias=AliasChoices("LAMBDABUS_BACKEND", "LAMBDABUS_GATEWAY_BACKEND"),
        description="where functions run (`LAMBDABUS_BACKEND`): a spec only the kubernetes "
        "backend supports (`image`, `gpu`) is refused with 400 backend_unsupported on local",
    )
    store: StoreSettings = Field(default_factory=StoreSettings)
    secrets: SecretsSettings = Field(default_factory=SecretsSettings)
    quota: QuotaSettings = Field(default_factory=QuotaSettings)
    max_upload_bytes: int = Field(default=50 * MiB, gt=0, description="largest upload body")
    max_uncompressed_bytes: int = Field(
        default=250 * MiB, gt=0, description="largest unpacked archive"
    )
    max_archive_entries: int = Field(default=10_000, gt=0, description="entries per zip")
    revisions_kept: int = Field(
        default=20,
        ge=1,
        description="revisions kept per function, newest first; one the route names and the "
        "latest are never collected",
    )
    max_spec_bytes: int = Field(
        default=512 * 1024,
        gt=0,
        description="the largest spec (JSON) taken: room for an env of 256 KiB, the most allowed",
    )
    allow_unsafe_requirements: bool = Field(
        default=False,
        description="accept requirements.txt options (-r, -e, --index-url, ...), local paths, "
        "VCS and URL requirements, and package.json file:/git/URL specs at upload (the "
        "builder has its own setting; builds stay sandboxed either way)",
    )
    sse_keepalive_seconds: float = Field(
        default=15.0, gt=0, description="a comment on an idle SSE stream this often"
    )
    router_url: str = Field(
        default="http://127.0.0.1:8081", description="where invocations are relayed"
    )
    public_router_url: str | None = Field(
        default=None, description="the data-plane URL users call, if not router_url"
    )
    max_invoke_body_bytes: int = Field(
        default=6 * MiB, gt=0, description="request body of an invocation through the gateway"
    )
    max_event_bytes: int = Field(
        default=1 * MiB,
        gt=0,
        description="largest CloudEvent: the body of a binary or structured one, each of a batch",
    )
    max_batch_bytes: int = Field(default=10 * MiB, gt=0, description="largest batch body")
    max_batch_events: int = Field(default=1000, gt=0, description="most events in one batch")
    bootstrap_token_file: Path | None = Field(
        default=None,
        description="on the platform's first start, write a new admin token here (mode 0600); "
        "`lambdabus up` sets <data dir>/admin.token",
    )
    bootstrap_renew: bool = Field(
        default=False,
        description="when the bootstrap token file is gone, mint a new admin token into it "
        "(and revoke the old bootstrap one)",
    )
    auth_max_failures: int = Field(
        default=20, ge=1, description="failed authentications per client address per window"
    )
    auth_failure_window_seconds: float = Field(
        default=60.0, gt=0, description="the window of auth_max_failures"
    )
    # -- git sources
    git_poll_interval: float = Field(
        default=300.0,
        gt=0,
        description="seconds between polls of git-sourced functions' references",
    )
    git_allow_private: bool = Field(
        default=False,
        description="let git sources be on loopback, private and link-local addresses "
        "(a git server on this machine or the LAN); refused by default",
    )
    git_timeout: float = Field(default=120.0, gt=0, description="seconds per git command")
