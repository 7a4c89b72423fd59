"""Settings of the Kubernetes backend (issue 10): where images go, where Kaniko reads build
contexts from, and how the platform's own pods are found."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The oldest Kubernetes whose API the rendered objects are valid for (checked in the tests
# against its official JSON schemas with kubernetes-validate).
MIN_KUBERNETES_VERSION = "1.30"


class KubeSettings(BaseSettings):
    """The Kubernetes backend (builder and deployer with `LAMBDABUS_BACKEND=kubernetes`, and
    `lambdabus deploy --dry-run --backend kubernetes`)."""

    model_config = SettingsConfigDict(env_prefix="LAMBDABUS_", extra="ignore")

    registry: str = Field(
        default="registry.lambdabus.svc:5000",
        min_length=1,
        description="where function images are pushed and pulled: `<registry>/<ns>-<name>:<digest>`",
    )
    insecure_registries: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated registries Kaniko may reach over plain HTTP",
    )
    build_context_bucket: str = Field(
        default="lambdabus-artifacts",
        min_length=1,
        description="S3 bucket Kaniko reads build contexts from (`s3://<bucket>/<prefix><uid>.tar.gz`)",
    )
    build_context_prefix: str = Field(default="build-contexts/", description="key prefix")
    kaniko_image: str = Field(
        default="gcr.io/kaniko-project/executor:v1.23.2", description="Kaniko's executor image"
    )
    registry_secret: str = Field(
        default="lambdabus-registry",
        description="a kubernetes.io/dockerconfigjson Secret: Kaniko pushes and pods pull with it",
    )
    build_s3_secret: str = Field(
        default="lambdabus-s3",
        description="a Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for Kaniko's S3 reads",
    )
    platform_namespace: str = Field(
        default="lambdabus",
        description="the Kubernetes namespace the platform (and its router) runs in",
    )
    router_selector: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "lambdabus-router"},
        description="labels of the router's pods: the only pods that may reach function pods",
    )
    function_port: int = Field(default=8080, ge=1, le=65535, description="functions serve here")
    hpa_cpu_target: int = Field(
        default=50, ge=1, le=100, description="average CPU utilisation (%) the HPA aims for"
    )
    build_deadline: int = Field(default=1800, ge=60, description="seconds a build Job may run")
    build_ttl: int = Field(
        default=3600, ge=0, description="seconds a finished build Job is kept before cleanup"
    )
    function_uid: int = Field(default=1000, ge=1, description="uid of function containers")

    @field_validator("insecure_registries", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


class KubeApiSettings(BaseSettings):
    """How the Kubernetes backend reaches the API server (`lambdabus_platform.kube.client`)."""

    model_config = SettingsConfigDict(
        env_prefix="LAMBDABUS_KUBE_", extra="ignore", populate_by_name=True
    )

    kubeconfig: str | None = Field(
        default=None,
        validation_alias="KUBECONFIG",
        description="kubeconfig file; unset: the in-cluster service account, else ~/.kube/config",
    )
    context: str | None = Field(default=None, description="kubeconfig context; unset: current")
    retry_for: float = Field(
        default=30.0,
        ge=0,
        description="seconds one API call is retried (with back-off) while the API server is "
        "unreachable or answers 5xx/429, before the caller is told `ClusterUnavailable`",
    )
    backoff_initial: float = Field(default=0.2, gt=0, description="first retry delay (s)")
    backoff_max: float = Field(default=5.0, gt=0, description="longest retry delay (s)")
    request_timeout: float = Field(default=30.0, gt=0, description="seconds per API request")
    watch_timeout: int = Field(
        default=290,
        ge=1,
        description="seconds the server keeps one watch open before the client resumes it",
    )
