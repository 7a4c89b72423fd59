"""Deployer settings: `LAMBDABUS_DEPLOYER_*` (plus the shared `LAMBDABUS_NATS_*`)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import SettingsConfigDict

from lambdabus_platform.kube.settings import KubeApiSettings, KubeSettings
from lambdabus_platform.sandbox import DEFAULT_UID_BASE, DEFAULT_UID_COUNT, SandboxMode
from lambdabus_platform.settings import SecretsSettings, ServiceSettings

LimitsMode = Literal["auto", "cgroup", "rlimit"]
ScratchMode = Literal["auto", "tmpfs", "rlimit"]


def _inherited_path() -> str:
    # The one variable of the platform's environment an instance keeps (see `plan.instance_env`).
    return os.environ.get("PATH") or os.defpath


class DeployerSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="LAMBDABUS_DEPLOYER_", extra="ignore", populate_by_name=True
    )

    port: int = Field(default=8083, ge=0, le=65535)
    state_dir: Path = Field(
        default=Path(".lambdabus/deployer"), description="its files on local disk"
    )

    health_interval: float = Field(default=1.0, gt=0, description="seconds between /healthz polls")
    health_timeout: float = Field(default=2.0, gt=0, description="seconds per health check")
    health_failures: int = Field(
        default=3, ge=1, description="consecutive failed polls before an instance is restarted"
    )
    start_timeout: float = Field(
        default=30.0, gt=0, description="seconds for an instance to say it listens"
    )
    restart_base_delay: float = Field(
        default=0.5, gt=0, description="first back-off before a crashed instance restarts"
    )
    restart_max_delay: float = Field(default=30.0, gt=0, description="longest back-off")
    start_attempts: int = Field(
        default=3,
        ge=1,
        description="tries to start an instance whose sandbox could not be set up (a transient "
        "fault of a busy host) before the deployment fails with StartFailed",
    )
    crashloop_restarts: int = Field(
        default=5,
        ge=1,
        description="this many exits of a revision's instances within crashloop_window "
        "(or of one instance in a row before it was ever ready) fail the deployment",
    )
    crashloop_window: float = Field(default=60.0, gt=0, description="seconds")
    sandbox: SandboxMode = Field(
        default="auto", description="auto (bubblewrap when installed), bubblewrap or none"
    )
    secrets: SecretsSettings = Field(default_factory=SecretsSettings)
    sandbox_uid_base: int = Field(
        default=DEFAULT_UID_BASE,
        ge=1000,
        description="as root, each function's instances run as a uid of this range (stable "
        "per function), unprivileged on the host",
    )
    sandbox_uid_count: int = Field(
        default=DEFAULT_UID_COUNT, ge=1, description="host uids from sandbox_uid_base on"
    )
    socket_dir: Path | None = Field(
        default=None,
        description="where instances' Unix sockets live (default: /run/lambdabus as root, "
        "else the temp dir; a short path, as socket paths are limited to 107 bytes)",
    )
    limits: LimitsMode = Field(
        default="auto",
        description="how instance memory, cpu and pids are limited: a cgroup per instance "
        "(v2, else v1) for its whole process tree, or rlimits per process; auto: a cgroup "
        "where one is writable",
    )
    cgroup_root: str = Field(
        default="lambdabus",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="the cgroup under the deployer's own that holds the instances' cgroups",
    )
    scratch: ScratchMode = Field(
        default="auto",
        description="how an instance's /tmp (its scratch dir) is limited to tmp_size: a tmpfs "
        "mounted by the deployer (needs root), or RLIMIT_FSIZE per file; auto: tmpfs if we can",
    )
    oom_poll_interval: float = Field(
        default=0.2, gt=0, description="seconds between reads of an instance's OOM kill counter"
    )
    reconcile_interval: float = Field(
        default=10.0, gt=0, description="seconds between comparing instances with the registry"
    )
    # -- autoscaling (issue 11): functions with `scale`
    autoscale_tick_seconds: float = Field(
        default=1.0, gt=0, le=10, description="seconds between the autoscaler's decisions"
    )
    autoscale_stable_window_seconds: float = Field(
        default=60.0, ge=6, le=3600, description="the autoscaler's stable window (Knative's 60 s)"
    )
    autoscale_panic_window_seconds: float = Field(
        default=6.0, ge=1, le=600, description="the autoscaler's panic window (Knative's 6 s)"
    )
    autoscale_sample_max_age_seconds: float = Field(
        default=5.0,
        gt=0,
        description="a router's load sample older than this counts no more (a router gone)",
    )
    log_line_max_bytes: int = Field(
        default=16384, ge=256, description="a longer line of a function is cut"
    )
    log_rate_lines_per_second: int = Field(
        default=2000, ge=1, description='per instance; beyond it "dropped N lines"'
    )
    lease_seconds: float = Field(
        default=10.0,
        ge=3,
        le=15,
        description="leader election of deployer replicas: a standby takes over this long after "
        "the leader's last renewal (renewed every third of it); a leader that cannot renew "
        "stops acting before",
    )
    log_file_max_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=4096,
        description="an instance writes its output to files the deployer ships from (so it "
        "outlives a deployer restart); a file read past this size is emptied",
    )
    drain_seconds: float = Field(
        default=5.0, ge=0, description="old instances keep serving this long after a switch"
    )
    stop_grace_seconds: float = Field(
        default=6.0,
        gt=0,
        description="SIGTERM to SIGKILL when stopping an instance (the runtime drains for 5 s)",
    )
    # -- the pool of pre-started runtimes (issue 11, cold starts)
    pool_size: int = Field(
        default=2,
        ge=0,
        le=64,
        description="pre-started sandboxed runtimes kept per runtime and dependency "
        "environment in use, each specialised to one function on demand (0: none)",
    )
    pool_max_size: int = Field(
        default=6,
        ge=0,
        le=64,
        description="the most idle pre-started runtimes one key may grow to: each cold start "
        "that finds none idle adds one for the next (below pool_size: pool_size)",
    )
    pool_shrink_seconds: float = Field(
        default=300.0,
        gt=0,
        description="a key grown past pool_size gives one idle pre-started runtime back for "
        "each this long without a cold start that found none",
    )
    pool_fork: bool = Field(
        default=True,
        description="pre-started Python runtimes are forked from one process of this interpreter "
        "that has the runtime imported (its pages shared: ~4 MiB each instead of ~12), into "
        "a sandbox bubblewrap made as for any runtime (Python environments of the deployer's "
        "own interpreter); false: each starts its own interpreter",
    )
    pool_refill_delay_seconds: float = Field(
        default=0.1,
        ge=0,
        le=10,
        description="after a cold start takes a pre-started runtime, the pool starts its "
        "replacement this much later, so that forking it does not hold the deployer up while "
        "that cold start is under way; 0: at once",
    )
    pool_boost_after_listening_seconds: float = Field(
        default=0.25,
        ge=0,
        le=10,
        description="a specialised pre-started runtime keeps the pool's 1 CPU this long after "
        "it listens, so that the requests that woke it are answered at full speed (a first "
        "request compiles and imports what the runtime had not run yet); 0: its own cpu "
        "limit as soon as it listens",
    )
    pool_start_boost_seconds: float = Field(
        default=1.0,
        ge=0,
        le=10,
        description="a specialised pre-started runtime keeps the pool's 1 CPU until it "
        "listens, at most this long, then gets its own cpu limit (memory and pids hold at "
        "once); 0: its own cpu limit from the start",
    )

    # -- the kubernetes backend (issue 10)
    backend: Literal["local", "kubernetes"] = Field(
        default="local",
        validation_alias=AliasChoices("LAMBDABUS_BACKEND", "LAMBDABUS_DEPLOYER_BACKEND"),
        description="local: sandboxed processes on this machine; kubernetes: Deployments, "
        "Services and HPAs in a cluster (`LAMBDABUS_BACKEND`)",
    )
    kube: KubeSettings = Field(default_factory=KubeSettings)
    kube_api: KubeApiSettings = Field(default_factory=KubeApiSettings)
    kube_create_namespaces: bool = Field(
        default=True,
        description="kubernetes: create a function namespace (and the platform's RoleBindings "
        "there) when missing; false where an operator creates them",
    )

    runtime_pythonpath: str | None = Field(
        default=None,
        description="PYTHONPATH holding lambdabus_runtime (default: where it is installed)",
    )
    node_server: Path | None = Field(
        default=None, description="the runtime's node server.js (default: from lambdabus_runtime)"
    )
    path: str = Field(
        default_factory=_inherited_path, description="PATH given to instances (default: ours)"
    )

    @field_validator("state_dir", "node_server", "socket_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        # Bind mounts and the process table need absolute paths; resolve once, here.
        return value.resolve() if value is not None else None

    @property
    def instances_dir(self) -> Path:
        return self.state_dir / "instances"

    @property
    def sockets_dir(self) -> Path:
        """The instances' socket dirs (one per deployer state dir, so deployers never share)."""
        if self.socket_dir is not None:
            return self.socket_dir
        tag = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:10]
        if os.geteuid() == 0:
            return Path("/run/lambdabus") / f"deployer-{tag}"
        return Path(tempfile.gettempdir()) / f"lambdabus-{os.geteuid()}" / f"deployer-{tag}"

    @property
    def process_table(self) -> Path:
        return self.state_dir / "instances.json"
