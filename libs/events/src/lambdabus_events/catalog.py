"""The lifecycle CloudEvent catalog: one pydantic model per `io.lambdabus.<entity>.<verb>` type.

Each model is a whole CloudEvent (attributes plus typed `data`); its `type` is a `Literal`, so
`parse_lifecycle` picks the right model from the JSON alone. JSON Schemas in `schemas/events/`
are generated from these models (see `lambdabus_events.schemagen`).
"""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal, Self, TypeVar, Union

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from lambdabus_events.models import (
    BuildResources,
    EnvName,
    FunctionConfig,
    Runtime,
    ScaleSpec,
    SecretKeyName,
    SecretKeyRef,
    SourceRef,
    env_digest,
)
from lambdabus_events.names import LABEL_MAX, LABEL_PATTERN, Label
from lambdabus_events.presets import BuildPreset, ReplicasPreset, ResourcesPreset

SCHEMA_BASE = "https://lambdabus.io/schemas/events/"
TYPE_PREFIX = "io.lambdabus."
# Namespace for deterministic event ids (uuid5), so a retried publish carries the same
# CloudEvent id and therefore the same Nats-Msg-Id.
_ID_NAMESPACE = uuid.UUID("6f1d8c1e-3a57-4b6e-9a43-5b0c8f0f2a11")
# `subject` is `<namespace>/<name>`, two RFC 1035 labels.
_LABEL_BODY = LABEL_PATTERN.removeprefix("^").removesuffix("$")
_SUBJECT_PATTERN = f"^{_LABEL_BODY}/{_LABEL_BODY}$"

Service = Literal["gateway", "builder", "deployer", "router", "logs"]


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FunctionRef(_Data):
    namespace: Label
    name: Label
    uid: str
    generation: int = Field(ge=1)


class FunctionSpecSummary(_Data):
    """A function's spec as lifecycle events carry it: everything but the env values, which
    stay in the function record (events live in the LIFECYCLE stream for a year and are read by
    auditors). `env_digest` changes whenever a value does."""

    runtime: Runtime
    env_keys: list[EnvName] = Field(description="names of the env variables, sorted")
    env_digest: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description="HMAC-SHA256 over the sorted (name, value) items, keyed by a random salt "
        "of the function's own: equal digests mean an unchanged env; values cannot be guessed",
    )
    replicas: int
    timeout: float
    memory: int
    description: str
    cpu: int
    pids: int
    open_files: int
    tmp_size: int
    network: Literal["outbound", "none"]
    invoke_auth: Literal["none", "token"]
    max_concurrency: int | None
    secrets: list[Label]
    env_from: dict[EnvName, SecretKeyRef]
    handler: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    command: list[str] = Field(default_factory=list, description="runtime custom's program")
    # -- Kyma presets (defaults: what a spec stored before presets existed ran with)
    resources_preset: ResourcesPreset = "M"
    replicas_preset: ReplicasPreset = "S"
    build_preset: BuildPreset = "normal"
    memory_request: int | None = None
    cpu_request: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    build_resources: BuildResources | None = None
    preset_overrides: list[str] = Field(default_factory=list)
    # -- end of Kyma presets
    # -- autoscaling (issue 11)
    scale: ScaleSpec | None = None
    concurrency: int = 0
    # -- the kubernetes backend (issue 10)
    image: str | None = None
    gpu: int = 0
    # -- LUNA's user_docker_commands (issue 10, kubernetes backend)
    user_docker_commands: list[str] = Field(default_factory=list)

    @classmethod
    def of(cls, config: FunctionConfig, *, salt: str) -> FunctionSpecSummary:
        fields = config.model_dump(exclude={"env"})
        return cls(**fields, env_keys=sorted(config.env), env_digest=env_digest(config.env, salt))


def _summarized(value: object) -> object:
    """A full spec (a FunctionConfig, or its JSON as events stored before env values left
    them carried it) becomes its summary: no code path can put env values into an event."""
    if isinstance(value, FunctionConfig):  # without its record's salt: a digest of nothing
        return FunctionSpecSummary.of(value, salt=secrets.token_hex(16))
    if isinstance(value, dict) and "env" in value:
        env = {str(k): str(v) for k, v in dict(value["env"] or {}).items()}
        rest = {k: v for k, v in value.items() if k != "env"}
        defaults = FunctionConfig().model_dump(mode="json", exclude={"env"})
        digest = env_digest(env, secrets.token_hex(16))
        return {**defaults, **rest, "env_keys": sorted(env), "env_digest": digest}
    return value


class FunctionCreatedData(FunctionRef):
    spec: FunctionSpecSummary
    source: SourceRef

    _spec = field_validator("spec", mode="before")(_summarized)


class FunctionUpdatedData(FunctionRef):
    spec: FunctionSpecSummary
    source: SourceRef

    _spec = field_validator("spec", mode="before")(_summarized)
    changes: list[Literal["source", "config"]] = Field(
        description="what changed: 'source' needs a new build, 'config' only a redeploy"
    )


class FunctionDeletedData(FunctionRef):
    pass


class BuildQueuedData(FunctionRef):
    source_sha256: str
    runtime: str


class BuildStartedData(FunctionRef):
    source_sha256: str
    runtime: str


class BuildSucceededData(FunctionRef):
    source_sha256: str
    runtime: str
    artifact: str = Field(description="artifact reference the deployer runs")
    duration_seconds: float = Field(ge=0)
    dependencies_cached: bool


class BuildFailedData(FunctionRef):
    source_sha256: str
    runtime: str
    reason: str
    message: str


class DeploymentData(FunctionRef):
    replicas: int = Field(ge=0)
    ready_replicas: int = Field(ge=0)
    reason: str = ""
    message: str = ""


class DeploymentScaledData(DeploymentData):
    """`deployment.scaled`: `replicas` is the new count. The autoscaler's decisions also say
    the count it scaled from and to (`reason` is then Panic, Stable, Held, Idle, Woken or
    Bounds, and `message` the values that led to it); a change of `replicas` in the spec, or
    reaching a count, leaves them out."""

    from_replicas: int | None = Field(default=None, ge=0)
    to_replicas: int | None = Field(default=None, ge=0)


class RevisionData(FunctionRef):
    """A revision of a function (`generation`: the function generation that made it)."""

    revision: str = Field(min_length=1, max_length=80, description="`<name>-00001`")


class TriggerData(_Data):
    namespace: Label
    name: Label
    function: Label
    filter: dict[str, str]


class ScheduleData(_Data):
    namespace: Label
    name: Label
    function: Label
    cron: str
    timezone: str


class DeliveryDeadletteredData(_Data):
    namespace: Label
    trigger: Label
    function: Label
    event_id: str
    event_source: str
    event_type: str
    attempts: int = Field(ge=1)
    reason: str


class SecretData(_Data):
    """A secret's name and key names; its values never travel in an event."""

    namespace: Label
    name: Label
    keys: list[SecretKeyName]
    version: int = Field(ge=1)


DataT = TypeVar("DataT", bound=_Data)


class LifecycleEvent(BaseModel):
    """Attributes every lifecycle CloudEvent carries (CloudEvents 1.0, JSON format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    EVENT_TYPE: ClassVar[str] = ""

    specversion: Literal["1.0"] = "1.0"
    id: str = Field(min_length=1)
    source: str = Field(pattern=r"^/lambdabus/(gateway|builder|deployer|router|logs)$")
    type: str
    subject: str = Field(
        pattern=_SUBJECT_PATTERN, max_length=2 * LABEL_MAX + 1, description="<namespace>/<name>"
    )
    time: AwareDatetime = Field(description="RFC 3339 with an offset, as CloudEvents requires")
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: str = Field(min_length=1)
    # Extension attributes: who caused it, when an API call did (its token's id and name).
    actorid: str | None = Field(default=None, min_length=1, max_length=64)
    actorname: str | None = Field(default=None, min_length=1, max_length=128)
    data: _Data

    def with_actor(self, actor_id: str, actor_name: str) -> Self:
        """The same event, naming who caused it (the id stays: the transition is the same)."""
        return self.model_copy(update={"actorid": actor_id, "actorname": actor_name})

    @property
    def entity(self) -> str:
        return self.type.removeprefix(TYPE_PREFIX).split(".")[0]

    @property
    def verb(self) -> str:
        return self.type.removeprefix(TYPE_PREFIX).split(".")[1]

    @property
    def namespace(self) -> str:
        return self.subject.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.subject.split("/", 1)[1]


class FunctionCreated(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.function.created"
    type: Literal["io.lambdabus.function.created"] = "io.lambdabus.function.created"
    data: FunctionCreatedData


class FunctionUpdated(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.function.updated"
    type: Literal["io.lambdabus.function.updated"] = "io.lambdabus.function.updated"
    data: FunctionUpdatedData


class FunctionDeleted(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.function.deleted"
    type: Literal["io.lambdabus.function.deleted"] = "io.lambdabus.function.deleted"
    data: FunctionDeletedData


class BuildQueued(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.build.queued"
    type: Literal["io.lambdabus.build.queued"] = "io.lambdabus.build.queued"
    data: BuildQueuedData


class BuildStarted(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.build.started"
    type: Literal["io.lambdabus.build.started"] = "io.lambdabus.build.started"
    data: BuildStartedData


class BuildSucceeded(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.build.succeeded"
    type: Literal["io.lambdabus.build.succeeded"] = "io.lambdabus.build.succeeded"
    data: BuildSucceededData


class BuildFailed(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.build.failed"
    type: Literal["io.lambdabus.build.failed"] = "io.lambdabus.build.failed"
    data: BuildFailedData


class DeploymentStarted(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.deployment.started"
    type: Literal["io.lambdabus.deployment.started"] = "io.lambdabus.deployment.started"
    data: DeploymentData


class DeploymentReady(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.deployment.ready"
    type: Literal["io.lambdabus.deployment.ready"] = "io.lambdabus.deployment.ready"
    data: DeploymentData


class DeploymentFailed(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.deployment.failed"
    type: Literal["io.lambdabus.deployment.failed"] = "io.lambdabus.deployment.failed"
    data: DeploymentData


class DeploymentScaled(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.deployment.scaled"
    type: Literal["io.lambdabus.deployment.scaled"] = "io.lambdabus.deployment.scaled"
    data: DeploymentScaledData


class DeploymentStopped(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.deployment.stopped"
    type: Literal["io.lambdabus.deployment.stopped"] = "io.lambdabus.deployment.stopped"
    data: DeploymentData


class TriggerCreated(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.trigger.created"
    type: Literal["io.lambdabus.trigger.created"] = "io.lambdabus.trigger.created"
    data: TriggerData


class TriggerDeleted(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.trigger.deleted"
    type: Literal["io.lambdabus.trigger.deleted"] = "io.lambdabus.trigger.deleted"
    data: TriggerData


class ScheduleCreated(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.schedule.created"
    type: Literal["io.lambdabus.schedule.created"] = "io.lambdabus.schedule.created"
    data: ScheduleData


class ScheduleDeleted(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.schedule.deleted"
    type: Literal["io.lambdabus.schedule.deleted"] = "io.lambdabus.schedule.deleted"
    data: ScheduleData


class SecretCreated(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.secret.created"
    type: Literal["io.lambdabus.secret.created"] = "io.lambdabus.secret.created"
    data: SecretData


class SecretUpdated(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.secret.updated"
    type: Literal["io.lambdabus.secret.updated"] = "io.lambdabus.secret.updated"
    data: SecretData


class SecretDeleted(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.secret.deleted"
    type: Literal["io.lambdabus.secret.deleted"] = "io.lambdabus.secret.deleted"
    data: SecretData


class RevisionCreated(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.revision.created"
    type: Literal["io.lambdabus.revision.created"] = "io.lambdabus.revision.created"
    data: RevisionData


class RevisionReady(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.revision.ready"
    type: Literal["io.lambdabus.revision.ready"] = "io.lambdabus.revision.ready"
    data: RevisionData


class RevisionDeleted(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.revision.deleted"
    type: Literal["io.lambdabus.revision.deleted"] = "io.lambdabus.revision.deleted"
    data: RevisionData


class DeliveryDeadlettered(LifecycleEvent):
    EVENT_TYPE: ClassVar[str] = "io.lambdabus.delivery.deadlettered"
    type: Literal["io.lambdabus.delivery.deadlettered"] = "io.lambdabus.delivery.deadlettered"
    data: DeliveryDeadletteredData


CATALOG: tuple[type[LifecycleEvent], ...] = (
    FunctionCreated,
    FunctionUpdated,
    FunctionDeleted,
    BuildQueued,
    BuildStarted,
    BuildSucceeded,
    BuildFailed,
    DeploymentStarted,
    DeploymentReady,
    DeploymentFailed,
    DeploymentScaled,
    DeploymentStopped,
    TriggerCreated,
    TriggerDeleted,
    ScheduleCreated,
    ScheduleDeleted,
    SecretCreated,
    SecretUpdated,
    SecretDeleted,
    DeliveryDeadlettered,
    RevisionCreated,
    RevisionReady,
    RevisionDeleted,
)
EVENT_TYPES: dict[str, type[LifecycleEvent]] = {cls.EVENT_TYPE: cls for cls in CATALOG}

AnyLifecycleEvent = Annotated[
    Union[  # noqa: UP007 - a discriminated union needs the explicit form
        FunctionCreated,
        FunctionUpdated,
        FunctionDeleted,
        BuildQueued,
        BuildStarted,
        BuildSucceeded,
        BuildFailed,
        DeploymentStarted,
        DeploymentReady,
        DeploymentFailed,
        DeploymentScaled,
        DeploymentStopped,
        TriggerCreated,
        TriggerDeleted,
        ScheduleCreated,
        ScheduleDeleted,
        SecretCreated,
        SecretUpdated,
        SecretDeleted,
        DeliveryDeadlettered,
        RevisionCreated,
        RevisionReady,
        RevisionDeleted,
    ],
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[AnyLifecycleEvent] = TypeAdapter(AnyLifecycleEvent)


def schema_url(event_type: str) -> str:
    return f"{SCHEMA_BASE}{event_type}.json"


def lifecycle_event(
    cls: type[LifecycleEvent],
    data: _Data,
    *,
    service: Service,
    subject: str,
    key: str,
    time: datetime | None = None,
) -> LifecycleEvent:
    """Build a catalog event with a deterministic id.

    `key` names what makes this transition unique (for example the function uid and
    generation); the same `(type, subject, key)` always yields the same id, so a retried
    publish is deduplicated by JetStream through `Nats-Msg-Id`.
    """
    event_id = str(uuid.uuid5(_ID_NAMESPACE, f"{cls.EVENT_TYPE}|{subject}|{key}"))
    return cls(
        id=event_id,
        source=f"/lambdabus/{service}",
        type=cls.EVENT_TYPE,
        subject=subject,
        time=time or datetime.now(UTC),
        dataschema=schema_url(cls.EVENT_TYPE),
        data=data,
    )


def parse_lifecycle(raw: bytes | str) -> LifecycleEvent:
    """Parse a structured-mode JSON CloudEvent into its catalog model.

    Raises pydantic `ValidationError` on an unknown type or a malformed event.
    """
    event: LifecycleEvent = _ADAPTER.validate_json(raw)
    return event
