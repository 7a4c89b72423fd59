"""Router settings: `LAMBDABUS_ROUTER_*` (plus the shared `LAMBDABUS_NATS_*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from lambdabus_platform.settings import QuotaSettings, ServiceSettings

MiB = 1024 * 1024

Balance = Literal["least_in_flight", "round_robin"]
EventLoop = Literal["uvloop", "asyncio"]


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_ROUTER_", extra="ignore")

    port: int = Field(default=8081, ge=0, le=65535)
    event_loop: EventLoop = Field(
        default="uvloop",
        description="uvloop (libuv, faster on the data plane: bench/invoke.py) or asyncio's own",
    )
    fast_path: bool = Field(
        default=True,
        description="serve plain invocations with the router's own HTTP/1.1 protocol "
        "(`front`); everything else, and all of it when false, goes through aiohttp",
    )
    max_body_bytes: int = Field(default=6 * MiB, gt=0, description="largest invocation body")
    quota: QuotaSettings = Field(default_factory=QuotaSettings)
    busy_retry_after_seconds: float = Field(
        default=1.0, gt=0, description="Retry-After of a 429 for max_concurrency or the quota"
    )
    timeout_margin_seconds: float = Field(
        default=1.0, ge=0, description="added to the function's timeout before answering 504"
    )
    connect_timeout_seconds: float = Field(
        default=2.0, gt=0, description="to open a connection to an instance"
    )
    balance: Balance = Field(
        default="least_in_flight", description="least_in_flight or round_robin across instances"
    )
    auth_max_failures: int = Field(
        default=20,
        ge=1,
        description="failed token checks (invoke_auth: token) per client address per window",
    )
    auth_failure_window_seconds: float = Field(
        default=60.0, gt=0, description="the window of auth_max_failures"
    )
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
    # -- event deliveries and asynchronous invocations --------------------------------------
    deliveries: bool = Field(
        default=True, description="deliver trigger events and run asynchronous invocations"
    )
    ack_wait_margin_seconds: float = Field(
        default=15.0,
        gt=0,
        description="added to a trigger's delivery timeout for its consumer's ack wait: a "
        "message whose answer is this late is delivered again",
    )
    wait_seconds: float = Field(
        default=1.0,
        gt=0,
        description="how long a message waits before it is tried again when its function has "
        "no ready instance (not counted as an attempt)",
    )
    pull_expires_seconds: float = Field(
        default=5.0, gt=0, le=60, description="life of one pull request on a consumer"
    )
    reconcile_seconds: float = Field(
        default=30.0,
        gt=0,
        description="how often trigger consumers are checked against the `triggers` bucket",
    )
    max_backoff_seconds: float = Field(
        default=3600.0, gt=0, description="the longest wait between two delivery attempts"
    )
    reply_max_bytes: int = Field(
        default=1 * MiB, gt=0, description="largest function answer read as a reply event"
    )
    invocations_max_in_flight: int = Field(
        default=256, ge=1, description="asynchronous invocations run at once by one router"
    )
    invocations_ack_wait_seconds: float = Field(
        default=30.0,
        gt=0,
        description="ack wait of the invocations consumer (kept alive while a call runs longer)",
    )
    result_max_bytes: int = Field(
        default=512 * 1024,
        gt=0,
        description="largest asynchronous result kept in the invocation record",
    )
    callback_attempts: int = Field(
        default=3, ge=1, le=10, description="posts of an async result to its callback URL"
    )
    callback_timeout_seconds: float = Field(default=10.0, gt=0, description="per callback post")
    stats_publish_seconds: float = Field(
        default=5.0,
        gt=0,
        description="how often this router writes its per-function call statistics to the "
        "`function-metrics` bucket (what `GET .../metrics` adds up across routers)",
    )
    # -- autoscaling (issue 11)
    load_publish_seconds: float = Field(
        default=1.0,
        gt=0,
        le=10,
        description="how often this router writes its requests in flight per function to the "
        "`function-load` bucket (the autoscaler's input)",
    )
    load_sample_seconds: float = Field(
        default=0.1, gt=0, le=1, description="how often the requests in flight are sampled"
    )
    # -- scale from zero (issue 11): a request for a function with `scale` and no instance
    cold_queue_max_requests: int = Field(
        default=100,
        ge=0,
        description="requests held per function while it wakes; more get 503 with Retry-After",
    )
    cold_start_timeout_seconds: float = Field(
        default=30.0, gt=0, description="how long a held request waits for an instance"
    )
    wake_repeat_seconds: float = Field(
        default=0.5, gt=0, description="how often a held request repeats its wake request"
    )
