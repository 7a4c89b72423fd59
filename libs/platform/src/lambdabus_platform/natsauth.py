"""Who may do what on NATS: one user per service (plus `auditor` and the launcher's `admin`),
each with the least publish/subscribe permissions it needs, and the nats-server
`authorization` block that enforces them. Pure: no I/O, no keys generated here.

Every service and the auditor connect with an nkey (see `natskeys`); the server config holds
only public keys. No `no_auth_user`: a client without a key is refused.

How the JetStream API maps onto permissions: a client asks JetStream by publishing a request
to `$JS.API.<verb>.<stream>[.<consumer>...]` with a reply inbox; the answer comes on that
inbox, so a user needs publish on the API subjects it uses and subscribe on its own inbox
prefix (`inbox_prefix(user)`, e.g. `_INBOX_gateway.>`), which no other user may subscribe to.
Stream writes are publishes to the stream's subjects (`$KV.<bucket>.<key>` for a KV bucket);
acks are publishes to `$JS.ACK.<stream>.<consumer>.>`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from lambdabus_platform.subjects import (
    ARTIFACTS_BUCKET,
    BUILD_INPUTS_BUCKET,
    BUILDS_BUCKET,
    DEPLOYMENTS_BUCKET,
    DLQ_PREFIX,
    EVENT_TYPE_PREFIX,
    FUNCTION_LOAD_BUCKET,
    FUNCTION_METRICS_BUCKET,
    FUNCTIONS_BUCKET,
    INVOCATIONS_BUCKET,
    INVOKE_PREFIX,
    LEASES_BUCKET,
    LIFECYCLE_PREFIX,
    LOGS_PREFIX,
    LOGS_QUERY_SUBJECT,
    REDRIVE_PREFIX,
    REPLICAS_BUCKET,
    REVISION_DEPLOYMENTS_BUCKET,
    REVISIONS_BUCKET,
    SCHEDULE_TICKS_BUCKET,
    SCHEDULES_BUCKET,
    STARTING_PREFIX,
    TRIGGERS_BUCKET,
    WAKE_PREFIX,
)

# Buckets of other parts of issue 7, granted here by name (their code declares them).
TOKENS_BUCKET: Final = "tokens"  # API tokens: the gateway writes, the router reads
SECRETS_BUCKET: Final = "secrets"  # encrypted secrets: the gateway writes, the deployer reads
QUOTAS_BUCKET: Final = "quotas"  # per-namespace overrides: the gateway writes, the router reads

SERVICE_USERS: Final = ("gateway", "builder", "deployer", "router", "logs")
AUDITOR: Final = "auditor"
ADMIN: Final = "admin"
USERS: Final = (*SERVICE_USERS, AUDITOR, ADMIN)

_API: Final = "$JS.API"
ANY: Final = "*"  # any consumer name (one subject token)


def inbox_prefix(user: str) -> str:
    """The inbox prefix of a user's connections (nats-py `inbox_prefix`): replies to its
    requests come under `<prefix>.>`, which only that user may subscribe to."""
    return f"_INBOX_{user}"


@dataclass(frozen=True)
class Access:
    """What one user does, in the platform's terms; `permissions` turns it into subjects."""

    user: str
    lifecycle: tuple[str, ...] = ()  # lifecycle entities it publishes (`function`, `build`...)
    publish: tuple[str, ...] = ()  # stream subjects it publishes to (patterns)
    request: tuple[str, ...] = ()  # request/reply subjects it calls
    serve: tuple[str, ...] = ()  # request/reply subjects it answers (queue subscriptions)
    listen: tuple[str, ...] = ()  # core subjects it subscribes to, answering nothing
    notify: tuple[str, ...] = ()  # core subjects it publishes to, expecting no answer
    kv_read: tuple[str, ...] = ()
    kv_write: tuple[str, ...] = ()  # implies read
    # Buckets it writes only its own keys of, `<user>.<id>` (heartbeats), without reading.
    kv_write_own: tuple[str, ...] = ()
    objects_read: tuple[str, ...] = ()
    objects_write: tuple[str, ...] = ()  # implies read
    # Streams it reads through consumers it makes and drops (replays, bounded reads).
    read: tuple[str, ...] = ()
    # Durable consumers it owns, per stream: a name, or ANY (every consumer of the stream is
    # its own). No other user may create, read, ack or delete another user's durable.
    durables: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    direct_get: tuple[str, ...] = ()  # streams it reads single messages of, by sequence
    delete_messages: tuple[str, ...] = ()  # streams it removes single messages from
    list_consumers: tuple[str, ...] = ()  # streams whose consumer names it lists
    # Outside clients create consumers by name only: the nameless (legacy) create of an
    # ephemeral consumer can take any name in its payload, another user's durable included.
    named_consumers_only: bool = False
    everything: bool = False  # the launcher's admin: declares streams and buckets


ACCESS: Final[Mapping[str, Access]] = {
    "gateway": Access(
        "gateway",
        kv_write_own=(REPLICAS_BUCKET,),
        lifecycle=("function", "trigger", "secret", "schedule"),
        publish=(f"{EVENT_TYPE_PREFIX}.>", f"{REDRIVE_PREFIX}.>", f"{INVOKE_PREFIX}.>"),
        request=(LOGS_QUERY_SUBJECT,),
        kv_write=(
            FUNCTIONS_BUCKET,
            TRIGGERS_BUCKET,
            INVOCATIONS_BUCKET,
            TOKENS_BUCKET,
            SECRETS_BUCKET,
            QUOTAS_BUCKET,
            SCHEDULES_BUCKET,
            REVISIONS_BUCKET,
        ),
        # replicas: GET /v1/replicas
        kv_read=(
            BUILDS_BUCKET,
            DEPLOYMENTS_BUCKET,
            FUNCTION_METRICS_BUCKET,
            REPLICAS_BUCKET,
            REVISION_DEPLOYMENTS_BUCKET,
        ),
        objects_write=(ARTIFACTS_BUCKET,),
        read=("LIFECYCLE", "LOGS", "DLQ"),
        direct_get=("DLQ",),
        delete_messages=("DLQ",),
    ),
    "builder": Access(
        "builder",
        kv_write_own=(REPLICAS_BUCKET,),
        lifecycle=("build",),
        publish=(f"{LOGS_PREFIX}.build.>",),
        kv_write=(BUILDS_BUCKET, BUILD_INPUTS_BUCKET),
        # garbage collection: which artifacts the kept revisions and deployments still run
        kv_read=(
            FUNCTIONS_BUCKET,
            REVISIONS_BUCKET,
            REVISION_DEPLOYMENTS_BUCKET,
            DEPLOYMENTS_BUCKET,
        ),
        objects_read=(ARTIFACTS_BUCKET,),
        durables={"LIFECYCLE": ("builder",)},
    ),
    "deployer": Access(
        "deployer",
        kv_write_own=(REPLICAS_BUCKET,),
        lifecycle=("deployment", "revision"),
        publish=(f"{LOGS_PREFIX}.runtime.>",),
        kv_write=(DEPLOYMENTS_BUCKET, LEASES_BUCKET, REVISION_DEPLOYMENTS_BUCKET),
        # quotas: per-namespace numbers (max instances), nothing secret
        kv_read=(
            FUNCTIONS_BUCKET,
            BUILDS_BUCKET,
            SECRETS_BUCKET,
            QUOTAS_BUCKET,
            FUNCTION_LOAD_BUCKET,  # autoscaling: the routers' load samples
            REVISIONS_BUCKET,
        ),
        durables={"LIFECYCLE": ("deployer-builds", "deployer-functions")},
        listen=(f"{WAKE_PREFIX}.>",),  # scale from zero: the routers' wake requests
        notify=(f"{STARTING_PREFIX}.>",),  # scale from zero: where a woken instance listens
    ),
    "router": Access(
        "router",
        kv_write_own=(REPLICAS_BUCKET,),
        lifecycle=("delivery",),
        publish=(f"{EVENT_TYPE_PREFIX}.>", f"{DLQ_PREFIX}.>"),
        kv_write=(
            INVOCATIONS_BUCKET,
            SCHEDULE_TICKS_BUCKET,
            FUNCTION_METRICS_BUCKET,
            FUNCTION_LOAD_BUCKET,  # autoscaling: its load samples, `<ns>.<fn>.<router id>`
        ),
        kv_read=(
            DEPLOYMENTS_BUCKET,
            FUNCTIONS_BUCKET,
            TRIGGERS_BUCKET,
            TOKENS_BUCKET,
            QUOTAS_BUCKET,
            SCHEDULES_BUCKET,
            REVISIONS_BUCKET,
            REVISION_DEPLOYMENTS_BUCKET,
        ),
        durables={"EVENTS": (ANY,)},
        list_consumers=("EVENTS",),
        notify=(f"{WAKE_PREFIX}.>",),  # scale from zero: wake a function
        listen=(f"{STARTING_PREFIX}.>",),  # scale from zero: where a woken instance listens
    ),
    "logs": Access(
        "logs",
        kv_write_own=(REPLICAS_BUCKET,),
        serve=(LOGS_QUERY_SUBJECT,),
        read=("LOGS", "LIFECYCLE"),
        durables={"LIFECYCLE": ("logs-audit",)},
    ),
    AUDITOR: Access(AUDITOR, read=("LIFECYCLE",), named_consumers_only=True),
    ADMIN: Access(ADMIN, everything=True),
}


@dataclass(frozen=True)
class Permissions:
    """A user's nats-server permissions: allow lists (and deny lists that carve out of them)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    publish_deny: tuple[str, ...] = ()
    allow_responses: bool = False


def _unique(subjects: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(subjects))


def _consumer_ops(stream: str, name: str, *, legacy_create: bool) -> list[str]:
    """Create (by name, and by durable name), look at, read, ack and delete a consumer."""
    subjects = [
        f"{_API}.CONSUMER.CREATE.{stream}.{name}",
        f"{_API}.CONSUMER.CREATE.{stream}.{name}.>",  # the form with a filter subject
        f"{_API}.CONSUMER.DURABLE.CREATE.{stream}.{name}",
        f"{_API}.CONSUMER.INFO.{stream}.{name}",
        f"{_API}.CONSUMER.MSG.NEXT.{stream}.{name}",
        f"{_API}.CONSUMER.DELETE.{stream}.{name}",
        f"$JS.ACK.{stream}.{name}.>",
        f"$JS.ACK.*.*.{stream}.{name}.>",  # the ack form with a domain and account hash
    ]
    if legacy_create and name == ANY:
        subjects.append(f"{_API}.CONSUMER.CREATE.{stream}")  # an ephemeral, named by the server
    return subjects


def _owned_durables(accesses: Mapping[str, Access], user: str) -> dict[str, list[str]]:
    """Durable names of other users, per stream: none of them is this user's to touch."""
    others: dict[str, list[str]] = {}
    for other, access in accesses.items():
        if other == user:
            continue
        for stream, names in access.durables.items():
            others.setdefault(stream, []).extend(n for n in names if n != ANY)
    return others


def _bucket_reads(stream: str) -> list[str]:
    """Reading a KV or object store bucket's stream: info, gets, and the ordered (ephemeral)
    consumers of watches and listings with their flow control."""
    return [
        f"{_API}.STREAM.INFO.{stream}",
        f"{_API}.STREAM.MSG.GET.{stream}",
        f"{_API}.DIRECT.GET.{stream}",
        f"{_API}.DIRECT.GET.{stream}.>",
        f"{_API}.CONSUMER.CREATE.{stream}",
        f"{_API}.CONSUMER.CREATE.{stream}.>",
        f"{_API}.CONSUMER.INFO.{stream}.*",
        f"{_API}.CONSUMER.DELETE.{stream}.*",
        f"{_API}.CONSUMER.MSG.NEXT.{stream}.*",  # the pull consumer of a one-pass read
        f"$JS.FC.{stream}.>",
    ]


def permissions(user: str, accesses: Mapping[str, Access] = ACCESS) -> Permissions:
    """The least permissions that let `user` do what its `Access` says."""
    access = accesses[user]
    if access.everything:
        return Permissions(publish=(">",), subscribe=(">",))
    pub: list[str] = []
    sub: list[str] = [f"{inbox_prefix(user)}.>"]
    deny: list[str] = []

    pub += [f"{LIFECYCLE_PREFIX}.{entity}.>" for entity in access.lifecycle]
    pub += access.publish
    pub += access.request
    pub += access.notify
    sub += access.serve
    sub += access.listen

    for bucket in _unique((*access.kv_write, *access.kv_read)):
        stream = f"KV_{bucket}"
        pub += _bucket_reads(stream)
        if bucket in access.kv_write:
            pub.append(f"$KV.{bucket}.>")  # put, create, update, delete (a marker)

    for bucket in _unique((*access.objects_write, *access.objects_read)):
        stream = f"OBJ_{bucket}"
        pub += _bucket_reads(stream)
        # nats-py finds the stream of an object's chunks by subject: stream names only.
        pub.append(f"{_API}.STREAM.NAMES")
        if bucket in access.objects_write:
            # chunks and metadata; a replaced or deleted object's chunks are purged
            pub += [f"$O.{bucket}.>", f"{_API}.STREAM.PURGE.{stream}"]

    for bucket in access.kv_write_own:
        pub.append(f"$KV.{bucket}.{user}.*")  # put and delete of its own keys only

    legacy = not access.named_consumers_only
    for stream in access.read:
        pub.append(f"{_API}.STREAM.INFO.{stream}")
        pub += _consumer_ops(stream, ANY, legacy_create=legacy)
        if legacy:
            pub.append(f"$JS.FC.{stream}.>")  # flow control of ordered (push) consumers
    for stream, names in access.durables.items():
        pub.append(f"{_API}.STREAM.INFO.{stream}")
        for name in names:
            pub += _consumer_ops(stream, name, legacy_create=legacy)
    for stream in access.direct_get:
        pub += [
            f"{_API}.DIRECT.GET.{stream}",
            f"{_API}.DIRECT.GET.{stream}.>",
            f"{_API}.STREAM.MSG.GET.{stream}",
        ]
    for stream in access.delete_messages:
        pub.append(f"{_API}.STREAM.MSG.DELETE.{stream}")
    for stream in access.list_consumers:
        pub += [f"{_API}.CONSUMER.LIST.{stream}", f"{_API}.CONSUMER.NAMES.{stream}"]

    # Another user's durable consumers are not this user's to create, read, ack or delete,
    # even where it may make consumers of its own on that stream.
    for stream, others in _owned_durables(accesses, user).items():
        for name in others:
            if name not in access.durables.get(stream, ()):
                deny += _consumer_ops(stream, name, legacy_create=False)

    return Permissions(
        publish=_unique(pub),
        subscribe=_unique(sub),
        publish_deny=_unique(deny),
        allow_responses=bool(access.serve),
    )


def _quoted(subjects: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{s}"' for s in subjects) + "]"


def render_authorization(
    public_keys: Mapping[str, str], accesses: Mapping[str, Access] = ACCESS
) -> str:
    """The `authorization` block of nats.conf: one nkey user per entry of `public_keys`
    (user name → public nkey, `U...`), each with its permissions. No `no_auth_user`."""
    lines = ["authorization {", "  users = ["]
    for user, key in public_keys.items():
        if not (key.startswith("U") and key.isalnum()):
            raise ValueError(f"not a user public nkey: {key!r}")
        perms = permissions(user, accesses)
        publish = f"allow: {_quoted(perms.publish)}"
        if perms.publish_deny:
            publish += f", deny: {_quoted(perms.publish_deny)}"
        entry = [
            f"    # {user}",
            f'    {{ nkey: "{key}", permissions: {{',
            f"      publish: {{ {publish} }}",
            f"      subscribe: {{ allow: {_quoted(perms.subscribe)} }}",
        ]
        if perms.allow_responses:
            entry.append("      allow_responses: true")
        entry.append("    } }")
        lines += entry
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"
