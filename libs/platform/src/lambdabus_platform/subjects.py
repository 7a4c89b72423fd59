"""NATS names of the platform: streams, subjects, KV buckets and keys. Pure functions, no I/O.

Every token placed in a subject is an RFC 1035 label or a catalog word, so no user input can
act as a NATS wildcard (`*`, `>`) or token separator (`.`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lambdabus_events.catalog import TYPE_PREFIX
from lambdabus_events.names import is_label

LIFECYCLE_PREFIX = "lambdabus.lifecycle"
EVENTS_PREFIX = "lambdabus.events"
LOGS_PREFIX = "lambdabus.logs"
DLQ_PREFIX = "lambdabus.dlq"


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    description: str


STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec(
        "LIFECYCLE", (f"{LIFECYCLE_PREFIX}.>",), "every lifecycle CloudEvent; the audit trail"
    ),
    StreamSpec("EVENTS", (f"{EVENTS_PREFIX}.>",), "user CloudEvents for triggers"),
    StreamSpec("LOGS", (f"{LOGS_PREFIX}.>",), "build and runtime log lines"),
    StreamSpec("DLQ", (f"{DLQ_PREFIX}.>",), "dead-lettered deliveries"),
)

# Request/reply subjects: outside every stream's subjects, so they are never stored.
LOGS_QUERY_SUBJECT = "lambdabus.rpc.logs.query"
# Scale from zero: a router holding a request for a function without an instance publishes
# `lambdabus.wake.<ns>.<fn>` (core NATS, no payload); the deployer leader wakes the function.
WAKE_PREFIX = "lambdabus.wake"


def wake_subject(namespace: str, name: str) -> str:
    return f"{WAKE_PREFIX}.{'.'.join(_checked(namespace, name))}"


# Scale from zero without waiting for the state: the deployer leader publishes
# `lambdabus.starting.<ns>.<fn>` (core NATS, an `InstanceStarting`) as it specialises a
# pre-started runtime for a function; a router holding requests for it connects to that
# endpoint the moment the runtime accepts connections there.
STARTING_PREFIX = "lambdabus.starting"


def starting_subject(namespace: str, name: str) -> str:
    return f"{STARTING_PREFIX}.{'.'.join(_checked(namespace, name))}"


# KV buckets, each owned by one service and read by others.
FUNCTIONS_BUCKET = "functions"  # gateway
BUILDS_BUCKET = "builds"  # builder
BUILD_INPUTS_BUCKET = "build-inputs"  # builder; `<inputs key>` → an artifact of those inputs
DEPLOYMENTS_BUCKET = "deployments"  # deployer
TRIGGERS_BUCKET = "triggers"  # gateway
INVOCATIONS_BUCKET = "invocations"  # gateway creates, router moves on
SECRETS_BUCKET = "secrets"  # gateway; encrypted values, read by the deployer only
QUOTAS_BUCKET = "quotas"  # gateway; per-namespace overrides (`<ns>`), read by the router
TOKENS_BUCKET = "tokens"  # gateway; routers read it (hashes of API tokens, never a secret)
SCHEDULES_BUCKET = "schedules"  # gateway
SCHEDULE_TICKS_BUCKET = "schedule-ticks"  # router; the newest tick fired per schedule
# router (each its own keys, `<ns>.<fn>.<router id>`); the gateway adds them up
FUNCTION_METRICS_BUCKET = "function-metrics"
LEASES_BUCKET = "leases"  # deployer; its replicas' leader lease (key `deployer`)
REVISIONS_BUCKET = "revisions"  # gateway; `<ns>.<fn>` → its revisions and its route
# deployer; `<ns>.<fn>.<revision>` → a revision's artifact and, run apart, its endpoints
REVISION_DEPLOYMENTS_BUCKET = "revision-deployments"
KV_BUCKETS: tuple[str, ...] = (
    FUNCTIONS_BUCKET,
    BUILDS_BUCKET,
    BUILD_INPUTS_BUCKET,
    DEPLOYMENTS_BUCKET,
    TRIGGERS_BUCKET,
    INVOCATIONS_BUCKET,
    SECRETS_BUCKET,
    QUOTAS_BUCKET,
    TOKENS_BUCKET,
    SCHEDULES_BUCKET,
    SCHEDULE_TICKS_BUCKET,
    FUNCTION_METRICS_BUCKET,
    LEASES_BUCKET,
    REVISIONS_BUCKET,
    REVISION_DEPLOYMENTS_BUCKET,
)
# The heartbeat registry (`replicas`): every service writes its own `<service>.<id>` keys, the
# gateway reads them. Declared apart from KV_BUCKETS: in memory, entries expire (see replicas.py).
REPLICAS_BUCKET = "replicas"
REPLICAS_TTL_SECONDS = 60.0  # the bucket's max age: a killed replica's last beat goes
# Load samples (`<ns>.<fn>.<router id>` → `load.LoadSample`): each router writes its requests
# in flight per function every second, the deployer leader's autoscaler reads them. In memory,
# entries expire: a router gone stops counting.
FUNCTION_LOAD_BUCKET = "function-load"
FUNCTION_LOAD_TTL_SECONDS = 30.0
# Buckets that keep no history: an old value (a replaced secret) must not stay readable.
NO_HISTORY_BUCKETS = frozenset({SECRETS_BUCKET})
# Object store bucket of the NATS artifact store backend.
ARTIFACTS_BUCKET = "artifacts"


def _checked(*tokens: str) -> tuple[str, ...]:
    for token in tokens:
        if not is_label(token):
            raise ValueError(f"not a safe subject token: {token!r}")
    return tokens


def function_key(namespace: str, name: str) -> str:
    """KV key of a function: `<ns>.<name>`."""
    return ".".join(_checked(namespace, name))


def namespace_key(namespace: str) -> str:
    """KV key of a per-namespace record (a quota): `<ns>`."""
    return _checked(namespace)[0]


def namespace_pattern(namespace: str) -> str:
    """KV key pattern of every function in a namespace: `<ns>.*`."""
    return f"{_checked(namespace)[0]}.*"


def lifecycle_subject(event_type: str, namespace: str, name: str) -> str:
    """`lambdabus.lifecycle.<entity>.<verb>.<ns>.<name>` for a catalog type."""
    entity, verb = event_type.removeprefix(TYPE_PREFIX).split(".")
    return ".".join((LIFECYCLE_PREFIX, *_checked(entity, verb, namespace, name)))


def lifecycle_filter(
    event_type: str | None = None, namespace: str | None = None, name: str | None = None
) -> str:
    """A subject filter over LIFECYCLE; None means any. Raises ValueError on an unsafe value."""
    if event_type is not None:
        if not event_type.startswith(TYPE_PREFIX) or event_type.count(".") != 3:
            raise ValueError(f"not a lifecycle event type: {event_type!r}")
        entity, verb = event_type.removeprefix(TYPE_PREFIX).split(".")
        _checked(entity, verb)
    else:
        entity = verb = "*"
    ns = _checked(namespace)[0] if namespace is not None else "*"
    fn = _checked(name)[0] if name is not None else "*"
    return ".".join((LIFECYCLE_PREFIX, entity, verb, ns, fn))


def entity_filter(entity: str) -> str:
    """Every lifecycle event of one entity (`function`, `build`, ...)."""
    return f"{LIFECYCLE_PREFIX}.{_checked(entity)[0]}.*.*.*"


def logs_subject(kind: str, namespace: str, name: str) -> str:
    """`lambdabus.logs.<build|runtime>.<ns>.<name>`."""
    if kind not in ("build", "runtime"):
        raise ValueError(f"not a log kind: {kind!r}")
    return ".".join((LOGS_PREFIX, kind, *_checked(namespace, name)))


# -- user events (EVENTS stream) -------------------------------------------------------------
#
#   lambdabus.events.t.<encoded type>       a user CloudEvent, by its type
#   lambdabus.events.r.<ns>.<trigger>       a dead letter sent again to one trigger (redrive)
#   lambdabus.events.i.<ns>.<function>      an asynchronous invocation
#
# The type's dots stay token separators, so a trigger on `com.example.order.created` or on the
# prefix `com.example.*` is a subject filter; every other byte outside [A-Za-z0-9_-] is written
# as `%XX`, so no attribute value can act as a wildcard (`*`, `>`) or add a token. A type with
# an empty token (leading, trailing or doubled dots) is escaped whole into one token.

EVENT_TYPE_PREFIX = f"{EVENTS_PREFIX}.t"
REDRIVE_PREFIX = f"{EVENTS_PREFIX}.r"
INVOKE_PREFIX = f"{EVENTS_PREFIX}.i"
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _escape(piece: str) -> str:
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in piece)


def encode_type(event_type: str) -> str:
    """A CloudEvent type as subject tokens (see above). Pure; never empty."""
    if not event_type:
        raise ValueError("a CloudEvent type is never empty")
    pieces = event_type.split(".")
    if any(p == "" for p in pieces):
        return _escape(event_type)
    return ".".join(_escape(p) for p in pieces)


def event_subject(event_type: str) -> str:
    return f"{EVENT_TYPE_PREFIX}.{encode_type(event_type)}"


def type_filter_subject(type_filter: str | None) -> str:
    """The narrowest subject filter that holds every event a trigger's `type` filter matches;
    the rest of the matching is done by `match_trigger`."""
    if not type_filter:
        return f"{EVENT_TYPE_PREFIX}.>"
    if not type_filter.endswith("*"):
        return event_subject(type_filter)
    prefix = type_filter[:-1]
    # A prefix that ends on a dot ends on a token boundary: `a.b.*` → `...t.a.b.>`.
    if prefix.endswith(".") and prefix.count(".") and "" not in prefix[:-1].split("."):
        return f"{EVENT_TYPE_PREFIX}.{encode_type(prefix[:-1])}.>"
    return f"{EVENT_TYPE_PREFIX}.>"


def redrive_subject(namespace: str, trigger: str) -> str:
    return ".".join((REDRIVE_PREFIX, *_checked(namespace, trigger)))


def invoke_subject(namespace: str, function: str) -> str:
    return ".".join((INVOKE_PREFIX, *_checked(namespace, function)))


def dlq_subject(namespace: str, trigger: str) -> str:
    return ".".join((DLQ_PREFIX, *_checked(namespace, trigger)))


def dlq_filter(namespace: str, trigger: str | None = None) -> str:
    """The dead letters of one trigger, or (no trigger) of every trigger of a namespace."""
    if trigger is not None:
        return dlq_subject(namespace, trigger)
    return f"{DLQ_PREFIX}.{_checked(namespace)[0]}.*"


def invocation_key(namespace: str, invocation_id: str) -> str:
    """KV key of an asynchronous invocation: `<ns>.<id>`, the id a uuid4 as 32 hex digits."""
    if len(invocation_id) != 32 or invocation_id.strip("0123456789abcdef"):
        raise ValueError(f"not an invocation id: {invocation_id!r}")
    return f"{_checked(namespace)[0]}.{invocation_id}"


def trigger_key(namespace: str, name: str) -> str:
    return function_key(namespace, name)


def trigger_consumer(namespace: str, name: str, uid: str) -> str:
    """The durable consumer name of one trigger (unique per trigger incarnation)."""
    _checked(namespace, name)
    return f"trigger_{namespace}_{name}_{uid.replace('-', '')[:12]}"


def event_dedup_id(source: str, event_id: str) -> str:
    """`Nats-Msg-Id` of a user event: the CloudEvents identity is (source, id)."""
    import hashlib

    return hashlib.sha256(f"{source}\0{event_id}".encode()).hexdigest()


def schedule_consumer(namespace: str, name: str, uid: str) -> str:
    """The durable consumer (on EVENTS) of one schedule incarnation's ticks."""
    _checked(namespace, name)
    return f"schedule_{namespace}_{name}_{uid.replace('-', '')[:12]}"


def schedule_tick_id(namespace: str, name: str, tick: str) -> str:
    """`Nats-Msg-Id` of one tick, `<ns>/<schedule>/<tick>`: however many routers publish it,
    EVENTS stores it once (within its duplicate window)."""
    _checked(namespace, name)
    return f"{namespace}/{name}/{tick}"
