"""Builder settings: `LAMBDABUS_BUILDER_*` (plus the shared `LAMBDABUS_NATS_*`, `LAMBDABUS_STORE_*`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from lambdabus_builder.buildbox import TRUST_VARIABLES
from lambdabus_platform.kube.settings import KubeApiSettings, KubeSettings
from lambdabus_platform.sandbox import SandboxMode
from lambdabus_platform.settings import GcSettings, ServiceSettings, StoreSettings

MiB = 1024 * 1024


def default_python() -> str:
    """The interpreter function virtualenvs are made from: the base interpreter of this one
    (not a virtualenv's), else `python3.11` on PATH."""
    base = getattr(sys, "_base_executable", None)
    if base and Path(base).exists():
        return str(base)
    return shutil.which("python3.11") or sys.executable


def _trust_env() -> dict[str, str]:
    # The builder's own TLS trust and proxy variables, handed to networked build steps.
    return {k: os.environ[k] for k in TRUST_VARIABLES if os.environ.get(k)}


class BuilderSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="LAMBDABUS_BUILDER_", extra="ignore", populate_by_name=True
    )

    port: int = Field(default=8082, ge=0, le=65535)
    trust_env: dict[str, str] = Field(
        default_factory=_trust_env,
        description="TLS trust and proxy variables (SSL_CERT_FILE, SSL_CERT_DIR, "
        "NODE_EXTRA_CA_CERTS, HTTPS_PROXY, ...) given to build steps that use the network; "
        "default: those of the builder's environment",
    )
    state_dir: Path = Field(
        default=Path(".lambdabus/builder"),
        description="the builder's own directory: dependency environments and artifacts",
    )
    store: StoreSettings = Field(default_factory=StoreSettings)
    gc: GcSettings = Field(default_factory=GcSettings)
    # -- the kubernetes backend (issue 10): Kaniko Jobs push images; build contexts go to S3
    # (the endpoint and credentials of LAMBDABUS_S3_*, the bucket LAMBDABUS_BUILD_CONTEXT_BUCKET)
    backend: Literal["local", "kubernetes"] = Field(
        default="local",
        validation_alias=AliasChoices("LAMBDABUS_BACKEND", "LAMBDABUS_BUILDER_BACKEND"),
        description="local: directories on this machine; kubernetes: images built by Kaniko "
        "Jobs (`LAMBDABUS_BACKEND`)",
    )
    max_build_jobs: int = Field(
        default=5,
        ge=1,
        le=256,
        description="kubernetes: build Jobs running at once in the cluster (Kyma's default "
        "5); further builds stay `pending` until one finishes",
    )
    kube: KubeSettings = Field(default_factory=KubeSettings)
    registry_auth_file: Path | None = Field(
        default=None,
        description="kubernetes: a Docker config.json with the registry's credentials (its "
        "dockerconfigjson Secret mounted), for tagging an image built for one function into "
        "another's repository without a Job; unset: anonymous",
    )
    kube_api: KubeApiSettings = Field(default_factory=KubeApiSettings)
    max_concurrent_builds: int = Field(default=2, ge=1, le=64, description="builds running at once")
    build_timeout: float = Field(
        default=600.0, gt=0, description="seconds per build, queue wait excluded"
    )
    reconcile_interval: float = Field(
        default=30.0, gt=0, description="seconds between two reconciliations of KV against builds"
    )
    lease_seconds: float = Field(
        default=10.0,
        gt=0,
        le=15,
        description="a build's claim lasts this long unless its builder renews it (every third "
        "of it); a builder that dies loses its builds to another replica after it",
    )
    # Python dependencies (uv)
    python: str = Field(
        default_factory=default_python, description="interpreter of the function virtualenvs"
    )
    index_url: str | None = Field(default=None, description="Python package index (unset: PyPI)")
    extra_index_url: list[str] = Field(
        default_factory=list, description="more indexes (a JSON list)"
    )
    find_links: list[str] = Field(
        default_factory=list, description="wheel directories or pages (a JSON list)"
    )
    no_index: bool = Field(default=False, description="install from find_links only")
    compile_bytecode: bool = Field(
        default=True,
        description="precompile installed packages: instances run on a read-only root, where "
        "Python cannot write bytecode caches at import",
    )
    uv_cache_dir: Path | None = Field(
        default=None,
        description="None: uv's own default. Unsandboxed builds only: a sandboxed build gets "
        "a cache of its own, so that no build can plant a package another one installs",
    )
    # Node dependencies (npm)
    node: str = Field(default="node", description="Node.js executable")
    npm: str = Field(default="npm", description="npm executable")
    npm_registry: str | None = Field(default=None, description="unset: npm's default registry")
    npm_offline: bool = Field(
        default=False, description="install from npm's cache only (--offline)"
    )
    npm_cache: Path | None = Field(default=None, description="npm's cache dir; None: npm's default")
    sandbox: SandboxMode = Field(
        default="auto",
        description="run uv, npm (and its install scripts) and the compile check in the "
        "bubblewrap sandbox: `auto` falls back to none (saying so in each build log) where "
        "bubblewrap cannot run, `bubblewrap` requires it",
    )
    allow_unsafe_requirements: bool = Field(
        default=False,
        description="install requirements.txt options (-r, -e, --index-url, ...), local paths, "
        "VCS and URL requirements, and package.json file:/git/URL specs (refused by default: "
        "checked again here after the gateway's upload check; builds stay sandboxed either way)",
    )
    # Archive limits (the gateway checked them on upload; the same rules apply on extraction)
    max_uncompressed_bytes: int = Field(
        default=250 * MiB, gt=0, description="a source archive unpacked"
    )
    max_archive_entries: int = Field(default=10_000, gt=0, description="entries per zip")
