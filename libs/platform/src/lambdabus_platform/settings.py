"""Settings, built once in each service's `main` from `LAMBDABUS_*` environment variables.

One class per dependency (`NatsSettings`, `StoreSettings`, `S3Settings`, `HttpSettings`) and one
per service that composes them under its own prefix. Nothing else in the code reads os.environ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class NatsSettings(BaseSettings):
    """How to reach NATS, as whom, and how the platform's streams are shaped.

    Credentials (any one; `lambdabus up` hands each service its own nkey seed file): an nkey
    seed file, a creds file (JWT + seed, for a NATS in operator mode), user and password, or a
    token. TLS: a CA file to verify the server, a client certificate and key when the server
    asks for one.
    """

    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_NATS_", extra="ignore")

    url: str = Field(default="nats://127.0.0.1:4222", description="the NATS server")
    user: str | None = Field(default=None, description="user name (with the password)")
    password: SecretStr | None = None
    token: SecretStr | None = Field(default=None, description="a NATS auth token")
    creds_file: Path | None = Field(default=None, description="a .creds file (JWT and nkey seed)")
    nkey_seed_file: Path | None = Field(default=None, description="a file holding an nkey seed")
    tls_ca_file: Path | None = Field(default=None, description="CA to verify the server by")
    tls_cert_file: Path | None = Field(default=None, description="client certificate")
    tls_key_file: Path | None = Field(default=None, description="client certificate's key")
    inbox_prefix: str = Field(
        default="_INBOX",
        pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
        description="replies to this client's requests come under `<prefix>.>`; with per-user "
        "permissions, each user gets its own prefix so no other user can read its replies",
    )
    declare: bool = Field(
        default=True,
        description="declare streams, KV buckets and the object store at start (needs a user "
        "allowed to); `lambdabus up` declares them once as its admin user and turns this off "
        "for the services",
    )
    connect_timeout: float = Field(default=2.0, gt=0, description="seconds per connect attempt")
    request_timeout: float = Field(default=5.0, gt=0, description="seconds per NATS request")
    connect_wait_seconds: float = Field(
        default=30.0, ge=0, description="how long to wait for NATS at start"
    )
    replicas: int = Field(default=1, ge=1, le=5, description="stream replicas (1 when embedded)")
    lifecycle_max_age_days: float = Field(
        default=365.0,
        gt=0,
        description="how long the LIFECYCLE stream (the audit trail) keeps events",
    )
    logs_max_age_days: float = Field(
        default=7.0, gt=0, description="how long the LOGS stream keeps log lines"
    )
    logs_max_bytes: int = Field(
        default=1024**3,
        ge=1024,
        description="the LOGS stream keeps at most this many bytes; the oldest lines go first, "
        "so no function can fill the disk through its logs",
    )
    events_max_age_days: float = Field(
        default=7.0, gt=0, description="how long the EVENTS stream keeps published CloudEvents"
    )
    duplicate_window_seconds: float = Field(
        default=120.0, gt=0, description="JetStream's de-duplication window of the other streams"
    )
    events_duplicate_window_seconds: float = Field(
        default=600.0,
        gt=0,
        description="how long EVENTS remembers a (source, id) to store it once; the server keeps "
        "every message id of the window in memory",
    )


class S3Settings(BaseSettings):
    """The S3 backend of the artifact store (AWS, MinIO, or moto's server in tests)."""

    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_S3_", extra="ignore")

    endpoint_url: str | None = Field(default=None, description="unset: AWS itself")
    region: str = "us-east-1"
    bucket: str = "lambdabus-artifacts"
    access_key_id: str | None = Field(default=None, description="unset: the AWS default chain")
    secret_access_key: SecretStr | None = None
    prefix: str = Field(default="sha256/", description="key prefix of the stored blobs")
    connect_timeout: float = Field(default=5.0, gt=0, description="seconds")
    read_timeout: float = Field(default=60.0, gt=0, description="seconds")
    max_attempts: int = Field(default=3, ge=1, le=10, description="attempts per S3 call")


class StoreSettings(BaseSettings):
    """Which artifact store backend holds source archives and build artifacts."""

    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_STORE_", extra="ignore")

    backend: Literal["nats", "s3"] = Field(
        default="nats", description="nats (the JetStream object store) or s3"
    )
    s3: S3Settings = Field(default_factory=S3Settings)


class GcSettings(BaseSettings):
    """Garbage collection of what nothing references any more (`LAMBDABUS_GC_*`): artifacts of
    collected revisions and deleted functions and dependency environments no artifact uses (the
    builder), source blobs no function or kept revision names (the gateway)."""

    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_GC_", extra="ignore")

    enabled: bool = Field(default=True, description="sweep at all")
    grace_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="what is unreferenced is deleted only once it is this old (last written or "
        "used): it covers uploads not recorded yet and builds in progress, so keep it above "
        "the build timeout",
    )
    interval_seconds: float = Field(
        default=600.0, gt=0, description="seconds between two sweeps (the first one after one)"
    )


class HttpSettings(BaseSettings):
    """Where a service listens. Port 0 picks a free port, announced in the 'listening' log line."""

    model_config = SettingsConfigDict(extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)


class ServiceSettings(BaseSettings):
    """What every service has: NATS, an HTTP listener (healthz, metrics), logging."""

    model_config = SettingsConfigDict(extra="ignore", env_nested_delimiter="__")

    nats: NatsSettings = Field(default_factory=NatsSettings)
    host: str = Field(default="127.0.0.1", description="address of its HTTP listener")
    port: int = Field(
        default=0, ge=0, le=65535, description="its HTTP port; 0 picks a free one (`up` sets it)"
    )
    log_level: LogLevel = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")
    shutdown_grace_seconds: float = Field(
        default=10.0, gt=0, description="how long work in flight may finish on SIGTERM"
    )
    state_dir: Path = Field(default=Path(".lambdabus"), description="its files on local disk")
    replica_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,128}$",
        description="this process's name in the heartbeat registry (`GET /v1/replicas`); "
        "unset: <host name>-<pid>",
    )
    heartbeat_seconds: float = Field(
        default=2.0,
        gt=0,
        le=20,
        description="how often it writes its heartbeat; it is listed while the last one is "
        "younger than 3 intervals",
    )


class QuotaSettings(BaseSettings):
    """Default limits of every namespace (`LAMBDABUS_QUOTA_*`); an operator overrides them per
    namespace through `PUT /v1/namespaces/{ns}/quota` (the `quotas` KV bucket)."""

    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_QUOTA_", extra="ignore")

    max_functions: int = Field(default=100, ge=0, description="functions per namespace")
    max_instances: int = Field(default=50, ge=0, description="sum of the functions' replicas")
    max_concurrent_invocations: int = Field(
        default=1000, ge=0, description="invocations in flight per namespace (per router)"
    )


class SecretsSettings(BaseSettings):
    """Where the secrets key is: `LAMBDABUS_SECRETS_KEY` (base64 of 32 bytes) or
    `LAMBDABUS_SECRETS_KEY_FILE` (created at first start when missing)."""

    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_SECRETS_", extra="ignore")

    key: SecretStr | None = Field(default=None, description="base64 of a 32-byte AES key")
    key_file: Path | None = Field(
        default=None,
        description="the key file, created at first start when missing (default: secrets.key "
        "in the data dir; `lambdabus up` points the gateway and the deployer, and no other "
        "service, at it)",
    )
