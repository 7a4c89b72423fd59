"""Wire models shared by every service: function specs, records and the status each service owns.

These shapes travel in lifecycle events and live in JetStream KV, so they are part of the contract.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from lambdabus_events import presets
from lambdabus_events.names import Label
from lambdabus_events.presets import BuildPreset, ReplicasPreset, ResourcesPreset

Runtime = Literal["python3.11", "nodejs20", "custom"]
RUNTIMES: tuple[Runtime, ...] = ("python3.11", "nodejs20", "custom")
DEFAULT_RUNTIME: Runtime = "python3.11"

ENTRYPOINTS: dict[Runtime, tuple[str, ...]] = {
    "python3.11": ("lambda_main.py", "handler.py"),
    "nodejs20": ("handler.js",),
    "custom": (),  # the program is `command[0]`
}

EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=256)]

_MEMORY = re.compile(r"^(\d+)(Mi|M|Gi|G)?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Env names a function may not set: the runtime and the sandbox depend on them.
RESERVED_ENV = frozenset(
    {
        "PATH",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONUSERBASE",
        "NODE_OPTIONS",
        "NODE_PATH",
        "HOME",
        "TMPDIR",
    }
)
RESERVED_ENV_PREFIXES = ("LAMBDABUS_", "LD_")
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_ENV_TOTAL_BYTES = 256 * 1024


def env_problem(env: dict[str, str]) -> str | None:
    """What is wrong with a function's env (reserved names, sizes), or None."""
    total = 0
    for key, value in env.items():
        if key in RESERVED_ENV or key.startswith(RESERVED_ENV_PREFIXES):
            return (
                f"env variable {key} is reserved: the runtime and the sandbox set it "
                f"(reserved: {', '.join(sorted(RESERVED_ENV))}, and names starting with "
                f"{' or '.join(RESERVED_ENV_PREFIXES)})"
            )
        size = len(key.encode()) + len(value.encode())
        if len(value.encode()) > MAX_ENV_VALUE_BYTES:
            return (
                f"env variable {key} is {len(value.encode())} bytes; a value may have at most "
                f"{MAX_ENV_VALUE_BYTES} bytes (use a secret mounted as a file for larger data)"
            )
        total += size
    if total > MAX_ENV_TOTAL_BYTES:
        return f"the env holds {total} bytes; at most {MAX_ENV_TOTAL_BYTES} in all"
    return None


def env_digest(env: dict[str, str], salt: str) -> str:
    """HMAC-SHA256, keyed by the function's own random `salt`, over the sorted (name, value)
    items: tells whether an env changed without carrying its values (lifecycle events hold
    this, never the values). Keyed, so a short value cannot be guessed from the digest by
    whoever reads the events."""
    material = json.dumps(sorted(env.items()), separators=(",", ":"), ensure_ascii=False)
    return hmac.new(salt.encode(), material.encode(), hashlib.sha256).hexdigest()


SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]{1,253}$"
SecretKeyName = Annotated[str, Field(pattern=SECRET_KEY_PATTERN)]


class SecretKeyRef(_Strict):
    """`env_from` entry: the value of one key of a secret in the function's namespace."""

    secret: Label
    key: SecretKeyName


# -- Kubeless handler and labels (issue 12) ------------------------------------------------------

HANDLER_PATTERN = r"^[A-Za-z_$][A-Za-z0-9_$]*(\.[A-Za-z_$][A-Za-z0-9_$]*)+$"
# Kubernetes label keys: an optional DNS subdomain prefix and '/', then a name of at most 63
# characters (alphanumerics, '-', '_', '.', starting and ending with an alphanumeric).
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
LabelKey = Annotated[str, Field(pattern=LABEL_KEY_PATTERN, max_length=317)]
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)]
SOURCE_SUFFIXES: dict[Runtime, tuple[str, ...]] = {
    "python3.11": (".py",),
    "nodejs20": (".js", ".cjs", ".mjs"),
}


def split_handler(handler: str) -> tuple[str, str]:
    """`"pkg.mod.fn"` → `("pkg/mod", "fn")`: the module's path without suffix, and the function."""
    module, _, function = handler.rpartition(".")
    return module.replace(".", "/"), function


class _HandlerAndLabels(_Strict):
    """Kubeless's `handler` (`<module>.<function>`) and Kubernetes-style `labels`."""

    handler: str | None = Field(
        default=None,
        max_length=256,
        description="`<module>.<function>` as in Kubeless (`helloget.foo`, `index.helloGet`); "
        "the module is a file at the archive root, or a dotted path below it. Absent: "
        "lambda_main.py/handler.py `main` (Python), handler.js `main` (Node)",
    )
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=64,
        description="RFC 1123 label keys to values; filter with `?label=k=v`",
    )

    @field_validator("handler")
    @classmethod
    def _handler_shape(cls, value: str | None) -> str | None:
        if value is not None and re.fullmatch(HANDLER_PATTERN, value) is None:
            raise ValueError(
                "must be <module>.<function>, e.g. 'helloget.foo' (helloget.py's foo) or "
                "'index.helloGet'; a module below the root is a dotted path, 'pkg.mod.fn'"
            )
        return value


class BuildResources(_Strict):
    """What a build of the function may use (Kyma's buildResources): cpu in millicores,
    memory in MiB. Kept and shown; the local builder does not limit its steps by them."""

    cpu_request: int = Field(default=700, ge=10, le=64000)
    memory_request: int = Field(default=700, ge=16, le=65536)
    cpu: int = Field(default=1100, ge=10, le=64000)
    memory: int = Field(default=1100, ge=16, le=65536)

    @model_validator(mode="after")
    def _requests_within_limits(self) -> BuildResources:
        if self.cpu_request > self.cpu or self.memory_request > self.memory:
            raise ValueError("a build request is more than its limit")
        return self


class ScaleSpec(_Strict):
    """Autoscaling on concurrency (Knative's KPA): between `min` and `max` instances, aiming at
    `target` requests in flight per instance; `min: 0` scales to zero after `idle_seconds`
    without a request."""

    min: int = Field(default=0, ge=0, le=64, description="fewest instances (0: scale to zero)")
    max: int = Field(default=10, ge=1, le=64, description="most instances")
    target: float = Field(
        default=10.0, gt=0, le=10_000, description="requests in flight per instance aimed at"
    )
    idle_seconds: float = Field(
        default=60.0, ge=1, le=86_400, description="without a request, then scaled to `min`"
    )

    @model_validator(mode="after")
    def _min_within_max(self) -> ScaleSpec:
        if self.min > self.max:
            raise ValueError(f"scale.min ({self.min}) is more than scale.max ({self.max})")
        return self


class FunctionConfig(_HandlerAndLabels):
    """What a user may set on a function besides its name and source."""

    runtime: Runtime = DEFAULT_RUNTIME
    env: dict[EnvName, str] = Field(default_factory=dict)
    replicas: int = Field(
        default=1, ge=0, le=64, description="instances run now (default: `min_replicas`)"
    )
    timeout: float = Field(default=30.0, gt=0, le=900, description="seconds per invocation")
    memory: int = Field(
        default=128, ge=16, le=16384, description="MiB per instance (default: the preset's limit)"
    )
    description: str = Field(default="", max_length=1024)
    cpu: int = Field(
        default=100, ge=10, le=64000, description="millicores per instance (default: the preset's)"
    )
    pids: int = Field(default=128, ge=8, le=32768, description="processes per instance")
    open_files: int = Field(default=1024, ge=64, le=65536, description="open files per process")
    tmp_size: int = Field(default=64, ge=1, le=16384, description="MiB of /tmp per instance")
    network: Literal["outbound", "none"] = Field(
        default="outbound", description="outbound: the internet, never the host; none: no network"
    )
    invoke_auth: Literal["none", "token"] = Field(
        default="none", description="token: the router needs a bearer token that may invoke"
    )
    max_concurrency: int | None = Field(
        default=None, ge=1, le=100_000, description="reserved concurrency; excess gets 429"
    )
    secrets: list[Label] = Field(
        default_factory=list, max_length=32, description="mounted as /secrets/<name>/<key>"
    )
    env_from: dict[EnvName, SecretKeyRef] = Field(default_factory=dict)
    # -- custom runtime (Kubeless's contract: a program that listens on $PORT and answers
    # GET /healthz); see `command_problem`
    command: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=list,
        max_length=64,
        description="runtime custom: the program (a path inside the archive) and its arguments",
    )

    @model_validator(mode="after")
    def _command_fits_runtime(self) -> FunctionConfig:
        problem = command_problem(self.runtime, self.command)
        if problem:
            raise ValueError(problem)
        return self

    # -- LUNA's user_docker_commands (kubernetes backend): Dockerfile instructions run in the
    # function's image after its dependencies are installed; see `docker_command_problem`
    user_docker_commands: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=list,
        max_length=64,
        description="Dockerfile instructions run after the dependencies (kubernetes backend): "
        "RUN, ENV, USER and WORKDIR only",
    )

    @field_validator("user_docker_commands")
    @classmethod
    def _docker_commands_allowed(cls, value: list[str]) -> list[str]:
        for i, line in enumerate(value):
            problem = docker_command_problem(line)
            if problem:
                raise ValueError(f"user_docker_commands[{i}] {line[:200]!r}: {problem}")
        return value

    # -- autoscaling (issue 11): with `scale`, the deployer's autoscaler sets the instances
    # between scale.min and scale.max (`replicas` is only the count it starts from); without
    # it, `replicas` is a fixed count. `min_replicas`/`max_replicas` (Kyma's presets) do not
    # scale anything. `concurrency` is per instance; `max_concurrency` is per function.
    scale: ScaleSpec | None = Field(
        default=None, description="autoscaling on concurrency; absent: `replicas` is fixed"
    )
    concurrency: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="requests in flight per instance at most (0: no limit); more wait in "
        "the router",
    )

    # -- Kyma presets (lambdabus_events.presets): the fields each governs are filled from it
    # unless set explicitly; `preset_overrides` records which were.
    resources_preset: ResourcesPreset = Field(
        default=presets.DEFAULT_RESOURCES_PRESET,
        description="memory, cpu and their requests: XS, S, M, L, XL (Kyma's values)",
    )
    replicas_preset: ReplicasPreset = Field(
        default=presets.DEFAULT_REPLICAS_PRESET,
        description="min_replicas and max_replicas: S, M, L, XL (Kyma's values)",
    )
    build_preset: BuildPreset = Field(
        default=presets.DEFAULT_BUILD_PRESET,
        description="build_resources: local-dev, slow, normal, fast (Kyma's values)",
    )
    memory_request: int = Field(
        default=64, ge=16, le=16384, description="MiB an instance is expected to use"
    )
    cpu_request: int = Field(
        default=50, ge=10, le=64000, description="millicores an instance is expected to use"
    )
    min_replicas: int = Field(
        default=1, ge=0, le=64, description="fewest instances (run today: `replicas`)"
    )
    max_replicas: int = Field(
        default=1, ge=0, le=64, description="most instances, for the autoscaler to come"
    )
    build_resources: BuildResources = Field(default_factory=lambda: BuildResources())
    preset_overrides: list[str] = Field(
        default_factory=list,
        description="set by the platform: the fields a preset governs that the spec set itself",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_presets(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        try:
            return presets.resolve(data)
        except presets.UnknownPreset:
            return data  # the preset field's own validation names the allowed values

    @model_validator(mode="after")
    def _presets_consistent(self) -> FunctionConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is more than max_replicas "
                f"({self.max_replicas})"
            )
        if self.scale is None and self.replicas > self.max_replicas:
            raise ValueError(
                f"replicas ({self.replicas}) is more than max_replicas ({self.max_replicas}); "
                "raise max_replicas or choose a larger replicas_preset"
            )
        if self.memory_request > self.memory or self.cpu_request > self.cpu:
            raise ValueError("a request (memory_request, cpu_request) is more than its limit")
        return self

    # -- end of Kyma presets

    # -- the Kubernetes backend (issue 10)
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$",
        description="a prebuilt image (`registry/app:tag`) serving on 8080 with GET /healthz: "
        "no build (Knative's pre-built container, Kubeless's custom image); the kubernetes "
        "backend only",
    )
    gpu: int = Field(
        default=0, ge=0, le=16, description="GPUs per instance (`nvidia.com/gpu`; kubernetes)"
    )
    # -- end of the Kubernetes backend

    @field_validator("env")
    @classmethod
    def _env_allowed(cls, value: dict[str, str]) -> dict[str, str]:
        problem = env_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("env_from")
    @classmethod
    def _env_from_allowed(cls, value: dict[str, SecretKeyRef]) -> dict[str, SecretKeyRef]:
        problem = env_problem(dict.fromkeys(value, ""))
        if problem:
            raise ValueError(problem)
        return value

    def secret_names(self) -> set[str]:
        """Every secret the function uses, mounted or through env_from."""
        return {*self.secrets, *(ref.secret for ref in self.env_from.values())}

    @field_validator("memory", mode="before")
    @classmethod
    def _memory_quantity(cls, value: object) -> object:
        """Accept 256, "256", "256Mi" or "1Gi"; store MiB."""
        if isinstance(value, str):
            match = _MEMORY.fullmatch(value.strip())
            if match is None:
                raise ValueError(
                    "memory must be MiB as an integer, or a quantity like '256Mi' or '1Gi'"
                )
            amount, unit = int(match.group(1)), match.group(2) or "Mi"
            return amount * 1024 if unit in ("Gi", "G") else amount
        return value


def command_problem(runtime: str, command: list[str]) -> str | None:
    """What is wrong with a function's `command` for its runtime, or None. The program must be
    a file inside the archive: a relative path without `..`."""
    if runtime != "custom":
        return "command is only for runtime custom" if command else None
    if not command:
        return 'runtime custom needs command: the program and its arguments, e.g. ["./server"]'
    if any("\0" in part for part in command):
        return "command must not contain NUL characters"
    program = command[0]
    parts = program.split("/")
    if program.startswith("/") or ".." in parts or "\\" in program:
        return (
            f"command[0] {program!r} is outside the archive: name the program by its path "
            "inside the archive, e.g. ./server"
        )
    if not [p for p in parts if p not in ("", ".")]:
        return f"command[0] {program!r} names no file"
    return None


DOCKER_INSTRUCTIONS = ("RUN", "ENV", "USER", "WORKDIR")


def docker_command_problem(line: str) -> str | None:
    """What is wrong with one of LUNA's `user_docker_commands`, or None: one Dockerfile
    instruction on one line, of RUN, ENV, USER or WORKDIR (no FROM, COPY, ADD, ... that would
    change what the image is built from)."""
    if "\n" in line or "\r" in line or "\0" in line:
        return "must be one line (one Dockerfile instruction)"
    instruction = line.strip().split(None, 1)
    if not instruction:
        return "is empty"
    word = instruction[0].upper()
    if word not in DOCKER_INSTRUCTIONS:
        return f"{instruction[0]} is not allowed: only {', '.join(DOCKER_INSTRUCTIONS)} are"
    if len(instruction) == 1:
        return f"{word} needs arguments"
    return None


def build_recipe(user_docker_commands: list[str]) -> str:
    """What of a spec besides the source goes into a function's image (LUNA's
    `user_docker_commands`), hashed: "" when nothing; another recipe needs a new build."""
    if not user_docker_commands:
        return ""
    return hashlib.sha256(json.dumps(user_docker_commands).encode()).hexdigest()[:32]


def command_path(command: list[str]) -> str:
    """The program's path inside the archive, normalised (`./bin//srv` → `bin/srv`)."""
    return "/".join(p for p in command[0].split("/") if p not in ("", "."))


class FunctionSpec(FunctionConfig):
    """A function as a user declares it (the `spec` part of an upload)."""

    name: Label


# -- git sources (Kyma's `source.gitRepository`) ------------------------------------------------

_GIT_REFERENCE = re.compile(r"^[A-Za-z0-9_/@+][A-Za-z0-9._/@+-]{0,254}$")


class GitAuth(_Strict):
    """How the platform authenticates to a git server: a secret of the function's namespace
    with `username` and `password` (`basic`), or `key` (an SSH private key without a
    passphrase) and optionally `known_hosts` (`key`)."""

    type: Literal["basic", "key"]
    secret: Label


class GitSource(_Strict):
    """`source: {"git": {...}}` of a function: a repository, a branch, tag or full commit
    sha, and the directory inside it that holds the function."""

    url: str = Field(
        min_length=1,
        max_length=2048,
        description="https://, http://, ssh:// or git@host:path",
    )
    reference: str = Field(
        min_length=1, max_length=255, description="a branch, a tag or a full 40-hex commit sha"
    )
    base_dir: str = Field(
        default="/", max_length=1024, description="the function's directory in the repository"
    )
    auth: GitAuth | None = None

    @field_validator("reference")
    @classmethod
    def _plain_reference(cls, value: str) -> str:
        if not _GIT_REFERENCE.fullmatch(value) or ".." in value or value.endswith((".", "/")):
            raise ValueError(
                "reference must be a branch, tag or commit name (letters, digits, . _ / @ + -; "
                "not starting with '-' or '.', no '..')"
            )
        return value

    @field_validator("base_dir")
    @classmethod
    def _relative_dir(cls, value: str) -> str:
        parts = [p for p in value.strip().split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts) or any("\0" in p for p in parts):
            raise ValueError("base_dir must be a directory inside the repository (no '..')")
        return "/" + "/".join(parts)


GitSyncReason = Literal["", "SourceUpdated", "SourceUpdateFailed"]


class GitSourceState(GitSource):
    """A git source with what the last look at it found: the commit the function's source
    archive was made from, and whether the last poll succeeded (Kyma's `ConfigurationReady`
    reasons `SourceUpdated` / `SourceUpdateFailed`)."""

    commit: Annotated[str, Field(pattern=r"^([0-9a-f]{40}|[0-9a-f]{64})$")]
    reason: GitSyncReason = ""
    message: str = Field(default="", max_length=2048)
    checked_at: datetime | None = None

    def source(self) -> GitSource:
        return GitSource(
            url=self.url, reference=self.reference, base_dir=self.base_dir, auth=self.auth
        )


class SourceRef(_Strict):
    """Where a function's source archive is: content-addressed by sha256 in the artifact store."""

    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: int = Field(ge=0)
    kind: Literal["archive", "inline", "git"]
    entrypoint: str
    files: int = Field(ge=1)
    git: GitSourceState | None = Field(
        default=None, description="kind git: the repository and the commit the archive is of"
    )


class FunctionRecord(_Strict):
    """The gateway-owned record of a function, stored in the `functions` KV bucket."""

    namespace: Label
    name: Label
    uid: str
    generation: int = Field(ge=1)
    spec: FunctionConfig
    source: SourceRef
    created_at: datetime
    updated_at: datetime
    env_salt: str = Field(
        default="",
        description="random, per function: keys the env digest its lifecycle events carry",
    )


ImageStatus = Literal["pending", "in_progress", "error", "completed", "not_found"]
LambdaStatus = Literal["waiting", "running", "terminated", "not_found", "pending"]
ConditionType = Literal["ConfigurationReady", "BuildReady", "Running"]
ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(_Strict):
    type: ConditionType
    status: ConditionStatus
    reason: str
    message: str = ""
    last_transition_time: datetime | None = None


class BuildClaim(_Strict):
    """Which builder replica builds a queued or started build, and until when: the holder renews
    `expires_at` while it works; once it has passed, another replica may take the build over."""

    holder: str = Field(description="the claiming builder replica's id")
    expires_at: datetime = Field(description="the lease's end, unless the holder renews it")


class BuildState(_Strict):
    """The builder-owned build status of one function, stored in the `builds` KV bucket."""

    namespace: Label
    name: Label
    uid: str
    generation: int
    phase: Literal["queued", "started", "succeeded", "failed"]
    source_sha256: str = ""
    runtime: str = Field(
        default="", description="the runtime built for; another one needs a new build"
    )
    recipe: str = Field(
        default="",
        description="`build_recipe` of the spec built (its user_docker_commands); another one "
        "needs a new build",
    )
    reason: str = ""
    message: str = ""
    artifact: str | None = Field(default=None, description="artifact reference the deployer runs")
    dependencies_cached: bool = False
    duration_seconds: float | None = None
    updated_at: datetime
    claim: BuildClaim | None = Field(
        default=None,
        description="the replica building it (queued and started builds); written with "
        "compare-and-set, so one replica builds it at a time",
    )
    image_status: ImageStatus | None = Field(
        default=None,
        description="set by a backend that knows better than the phase (kubernetes: `pending` "
        "while the build Job waits for a slot or its pod cannot be scheduled, `not_found` "
        "when the Job is gone); None: from the phase",
    )


class ArtifactManifest(_Strict):
    """What a local build produces for the deployer: `manifest.json` in the artifact directory.

    The local backends share one machine, so the artifact is a directory: the unpacked code
    and a dependency environment (a virtualenv, or a node_modules tree) cached by the hash of
    (runtime, dependency file) and shared by every function with the same dependencies.
    """

    runtime: Runtime
    entrypoint: str
    style: Literal["luna", "kyma", "node", "custom"]
    code_dir: str = Field(description="absolute path of the unpacked, read-only code")
    env_dir: str = Field(description="absolute path of the dependency environment")
    source_sha256: str
    deps_key: str = Field(
        description="the dependency cache key: sha256 of (runtime, dependency file)"
    )
    function: str = Field(
        default="main", description="the function the runtime calls in the entry point"
    )
    env_digest: str = Field(
        default="",
        description="`sha256:<hex>` over the dependency environment's tree (paths, modes, "
        "contents, symlink targets), recorded when it was sealed; the deployer runs nothing "
        "from an environment that no longer matches it (or from a manifest without one)",
    )


InstancePhase = Literal["starting", "ready", "unhealthy", "backoff", "stopped", "crashed"]


class InstanceState(_Strict):
    id: str
    generation: int
    phase: InstancePhase
    endpoint: str | None = None
    restarts: int = 0
    last_exit: str = ""
    started_at: datetime | None = Field(
        default=None, description="when its current process started (each restart anew)"
    )


class InstanceLimits(_Strict):
    """The limits an instance of a function runs under, as enforced on this machine.

    `cgroup`: memory, cpu and pids hold for the instance's whole process tree (the memory
    includes the page cache and the /tmp files it writes). `rlimit` (no writable cgroup):
    per process only; memory is an address-space limit for Python (Node: its heap), and cpu and
    pids are not enforced (null). `tmp_size` is a tmpfs of that size (`tmp_enforced_by:
    "tmpfs"`) or, when the deployer cannot mount one, a limit on each file's size
    (`"rlimit"`). `open_files` is per process in both. The log rate is the deployer's.
    """

    enforced_by: Literal["cgroup", "rlimit"]
    memory: int | None = Field(description="MiB; null when not enforced")
    cpu: int | None = Field(description="millicores; null when not enforced")
    pids: int | None = Field(description="processes and threads; null when not enforced")
    open_files: int
    tmp_size: int = Field(description="MiB")
    tmp_enforced_by: Literal["tmpfs", "rlimit"]
    log_lines_per_second: int = Field(
        description="log lines per second per instance kept; the rest are counted and dropped"
    )


class DeploymentState(_Strict):
    """The deployer-owned deployment status of one function, in the `deployments` KV bucket.

    `endpoints` are the URLs of the ready instances that take traffic now; the router reads them.
    """

    namespace: Label
    name: Label
    uid: str
    generation: int
    phase: Literal["started", "ready", "failed", "scaled", "stopped"]
    replicas: int = 0
    ready_replicas: int = 0
    reason: str = ""
    message: str = ""
    endpoints: list[str] = Field(default_factory=list)
    timeout: float = 30.0
    instances: list[InstanceState] = Field(default_factory=list)
    sandboxed: bool = False
    limits: InstanceLimits | None = None
    updated_at: datetime
    revision: str = Field(
        default="", description="the revision the endpoints serve (`<name>-00001`), when known"
    )


class InstanceStarting(_Strict):
    """An instance of a function's latest revision being made of a pre-started runtime (core
    NATS `lambdabus.starting.<ns>.<fn>`, never stored): where it is about to listen. A router
    holding requests for the function sends them there as soon as it accepts connections;
    until then, and for everything else, the `deployments` state decides."""

    # Fields a newer deployer adds are ignored, not refused: during a rolling upgrade the
    # older routers still use the notice (it is only ever a hint; the state decides).
    model_config = ConfigDict(extra="ignore", frozen=True)

    namespace: Label
    name: Label
    uid: str
    revision: str = ""
    endpoint: str


LogKind = Literal["build", "runtime"]


class LogLine(_Strict):
    """One build or runtime log line, as published on the LOGS stream
    (`lambdabus.logs.<kind>.<ns>.<name>`)."""

    ts: datetime
    kind: LogKind
    namespace: Label
    name: Label
    uid: str
    generation: int
    stream: Literal["stdout", "stderr", "system"]
    instance: str | None = None
    line: str
    invocation: str | None = Field(
        default=None, description="the invocation during which the function wrote the line"
    )


class PresetsApplied(_Strict):
    """Which Kyma presets a function follows, and which governed fields its spec overrides."""

    resources: ResourcesPreset
    replicas: ReplicasPreset
    build: BuildPreset
    overridden: list[str] = Field(default_factory=list)
    min_replicas: int
    max_replicas: int


class PodStatus(_Strict):
    """One instance in LUNA's `pod_statuses`."""

    status: Literal["running", "waiting", "terminated"] = Field(
        description="running: it answers; waiting: starting, unhealthy or backing off before "
        "a restart; terminated: stopped or crashed for good"
    )
    phase: InstancePhase
    generation: int
    restarts: int
    started_at: datetime | None = None
    last_exit: str = ""


class FunctionStatus(_Strict):
    """What `GET .../functions/{name}/status` answers (LUNA image/lambda status, Kyma conditions)."""

    namespace: Label
    name: Label
    generation: int
    image_status: ImageStatus
    status: LambdaStatus
    conditions: list[Condition]
    replicas: int
    ready_replicas: int
    message: str = ""
    limits: InstanceLimits | None = None
    summary: str = Field(
        default="",
        description="the status in one line for a person: 'running (1/1 replicas ready)', "
        "'failed: <reason>' when the build or the deployment failed",
    )
    # -- Kyma presets and LUNA pod statuses
    presets: PresetsApplied | None = Field(
        default=None, description="the presets the spec follows and the fields it overrides"
    )
    pod_statuses: dict[str, PodStatus] = Field(
        default_factory=dict,
        description="LUNA's pod statuses: one entry per instance (on the local backend, per "
        "supervised process), keyed by its id",
    )


# The logs query, asked over NATS request/reply on `LOGS_QUERY_SUBJECT` and answered by the
# logs service; a request it cannot answer gets the platform's error shape instead.
MAX_QUERY_LIMIT = 10_000

LogQueryKind = Literal["build", "runtime", "lifecycle"]


class LogQuery(_Strict):
    """Which lines of one function to read: its build or runtime log, or its lifecycle (the
    audit trail). Lines come oldest first; `tail` keeps the last N, `since` the ones stored at
    or after a time, both together the last N of those."""

    namespace: Label
    name: Label
    kind: LogQueryKind
    tail: int | None = Field(default=None, ge=0, description="only the last N lines")
    since: AwareDatetime | None = Field(
        default=None, description="only lines stored at or after this time (RFC 3339)"
    )
    limit: int = Field(
        default=MAX_QUERY_LIMIT,
        ge=1,
        le=MAX_QUERY_LIMIT,
        description="at most this many lines in the reply",
    )
    invocation: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._:/@+=-]{1,128}$",
        description="only the lines written during this invocation (runtime logs)",
    )


class LogQueryResult(_Strict):
    """The reply: `lines` for a build or runtime query, `events` (structured-mode CloudEvents)
    for a lifecycle one. `truncated`: the reply holds fewer than the query asked for, cut by
    `limit` or by the size a NATS reply may have."""

    lines: list[LogLine] = Field(default_factory=list)
    events: list[dict[str, Any]] = Field(default_factory=list)
    truncated: bool = False


# -- triggers, deliveries, dead letters, async invocations ---------------------------------------

Backoff = Literal["exponential", "linear"]


class DeliveryPolicy(_Strict):
    """How the router delivers a trigger's events to its function."""

    retries: int = Field(default=3, ge=0, le=100, description="attempts after the first")
    backoff: Backoff = "exponential"
    backoff_delay: float = Field(
        default=1.0, gt=0, le=3600, description="seconds before the first retry"
    )
    timeout: float = Field(default=30.0, gt=0, le=900, description="seconds per attempt")
    max_in_flight: int = Field(default=64, ge=1, le=10_000)


class TriggerSpec(_Strict):
    """A trigger as a user declares it: every event matching `filter` goes to `function`.

    Filter keys are CloudEvent attribute names (`type`, `source`, `subject`, or an extension);
    values match exactly, or by prefix when they end in `*`.
    """

    name: Label
    function: Label
    filter: dict[
        Annotated[str, Field(pattern=r"^[a-z0-9]{1,20}$")],
        Annotated[str, Field(min_length=1, max_length=1024)],
    ] = Field(default_factory=dict)
    delivery: DeliveryPolicy = Field(default_factory=DeliveryPolicy)


class TriggerRecord(_Strict):
    """The gateway-owned record of a trigger, in the `triggers` KV bucket (`<ns>.<name>`)."""

    namespace: Label
    name: Label
    uid: str
    function: Label
    filter: dict[str, str]
    delivery: DeliveryPolicy
    created_at: datetime


class DeadLetter(_Strict):
    """An event whose delivery was given up, on the DLQ stream (`lambdabus.dlq.<ns>.<trigger>`)."""

    namespace: Label
    trigger: Label
    trigger_uid: str
    function: Label
    event: dict[str, Any] = Field(description="the event as a structured-mode CloudEvent")
    reason: str = Field(
        description="why: http_status_<n>, timeout, connection_refused, invalid_event, ..."
    )
    message: str = ""
    attempts: int = Field(ge=1)
    last_status: int | None = None
    first_attempt_at: datetime | None = None
    deadlettered_at: datetime


# -- schedules ----------------------------------------------------------------------------------

SCHEDULE_FIRED_TYPE = "io.lambdabus.schedule.fired"


class ScheduleSpec(_Strict):
    """A schedule as a user declares it: at each tick of `cron` (in `timezone`), the function
    receives an `io.lambdabus.schedule.fired` CloudEvent whose data is `data`."""

    name: Label
    function: Label
    cron: str = Field(
        min_length=1,
        max_length=200,
        description="five-field cron ('*/5 * * * *'), '@hourly'-like, or '@every 30s'",
    )
    timezone: str = Field(default="UTC", min_length=1, max_length=64, description="IANA zone")
    data: dict[str, Any] = Field(default_factory=dict, description="the data of every tick")
    delivery: DeliveryPolicy = Field(default_factory=DeliveryPolicy)


class ScheduleRecord(_Strict):
    """The gateway-owned record of a schedule, in the `schedules` KV bucket (`<ns>.<name>`)."""

    namespace: Label
    name: Label
    uid: str
    function: Label
    cron: str
    timezone: str
    data: dict[str, Any]
    delivery: DeliveryPolicy
    created_at: datetime


class ScheduleTick(_Strict):
    """The newest tick a router fired for one schedule incarnation (`uid`), in the router-owned
    `schedule-ticks` KV bucket (`<ns>.<name>`); written with compare-and-set."""

    uid: str
    tick: datetime


InvocationStatus = Literal["queued", "running", "succeeded", "failed"]


class InvocationRecord(_Strict):
    """An asynchronous invocation, in the `invocations` KV bucket (`<ns>.<id>`): the gateway
    writes it `queued`, the router moves it on."""

    namespace: Label
    function: Label
    id: str
    status: InvocationStatus
    attempts: int = 0
    result: Any = None
    result_status: int | None = None
    result_content_type: str | None = None
    error: str | None = None
    callback_url: str | None = None
    created_at: datetime
    updated_at: datetime


class InvocationRequest(_Strict):
    """What an asynchronous invocation replays to the function, on `lambdabus.events.i.<ns>.<fn>`."""

    namespace: Label
    function: Label
    id: str
    method: str = "POST"
    path: str = "/"
    query: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    body_base64: str = ""
    callback_url: str | None = None
    delivery: DeliveryPolicy = Field(default_factory=DeliveryPolicy)


# -- secrets and quotas ------------------------------------------------------------------------


class SecretInfo(_Strict):
    """What the API shows of a secret: its key names and versions, never a value."""

    namespace: Label
    name: Label
    keys: list[SecretKeyName]
    version: int = Field(ge=1, description="1 at creation, +1 at every replacement")
    created_at: datetime
    updated_at: datetime


class Quota(_Strict):
    """Limits of one namespace. In the `quotas` KV bucket (`<ns>`) only the fields an operator
    set are stored; the rest come from the settings' defaults."""

    max_functions: int | None = Field(default=None, ge=0, le=1_000_000)
    max_instances: int | None = Field(
        default=None, ge=0, le=1_000_000, description="sum of the functions' replicas"
    )
    max_concurrent_invocations: int | None = Field(default=None, ge=0, le=10_000_000)

    def over(self, defaults: Quota) -> Quota:
        """These limits, each unset one taken from `defaults`."""
        return Quota(
            max_functions=self.max_functions
            if self.max_functions is not None
            else defaults.max_functions,
            max_instances=self.max_instances
            if self.max_instances is not None
            else defaults.max_instances,
            max_concurrent_invocations=self.max_concurrent_invocations
            if self.max_concurrent_invocations is not None
            else defaults.max_concurrent_invocations,
        )


# -- revisions and traffic (issue 11) ---------------------------------------------------------


class Revision(_Strict):
    """One immutable revision of a function: what ran at `generation` (the config and the
    source), named `<name>-00001`, `<name>-00002`, … A change of scale settings creates none."""

    name: str = Field(description="`<function>-<5 digits>`")
    generation: int = Field(ge=1, description="the function generation that created it")
    created: datetime
    spec: FunctionConfig
    source: SourceRef


class TrafficTarget(_Strict):
    """One entry of a function's route: a revision (by name, or the latest ready one) and its
    share of the requests, optionally under a tag (served at `/{ns}/{name}@{tag}/...`)."""

    revision: str | None = Field(default=None, description="a revision's name")
    latest: bool = Field(default=False, description="the latest ready revision, whichever it is")
    percent: int = Field(default=0, ge=0, le=100)
    tag: Label | None = None

    @model_validator(mode="after")
    def _one_target(self) -> TrafficTarget:
        if (self.revision is None) == (not self.latest):
            raise ValueError("a traffic entry names a revision or says latest: true (one of them)")
        return self


class FunctionRevisions(_Strict):
    """The gateway-owned revisions of one function and its route, in the `revisions` KV bucket
    (key `<ns>.<name>`). `traffic` None: 100% to the latest ready revision."""

    namespace: Label
    name: Label
    uid: str
    revisions: list[Revision] = Field(default_factory=list)
    next_number: int = Field(default=1, ge=1, description="the number the next revision gets")
    traffic: list[TrafficTarget] | None = None


class RevisionDeployment(_Strict):
    """The deployer-owned record of one revision, in the `revision-deployments` KV bucket (key
    `<ns>.<name>.<revision>`): the artifact it runs, and — while the deployer runs it apart
    from the function's latest revision, because traffic or a tag names it — its endpoints."""

    namespace: Label
    name: Label
    uid: str
    revision: str
    generation: int
    build_generation: int
    artifact: str = Field(default="", description="empty until the deployer ran it")
    endpoints: list[str] = Field(default_factory=list)
    ready: bool = False
    updated_at: datetime
    announced: list[Literal["created", "ready"]] = Field(
        default_factory=list, description="the revision.* events published for it already"
    )
