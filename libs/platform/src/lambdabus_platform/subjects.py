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

# KV buckets, each owned by one service and read by others.
FUNCTIONS_BUCKET = "functions"  # gateway
BUILDS_BUCKET = "builds"  # builder
DEPLOYMENTS_BUCKET = "deployments"  # deployer
KV_BUCKETS: tuple[str, ...] = (FUNCTIONS_BUCKET, BUILDS_BUCKET, DEPLOYMENTS_BUCKET)
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
