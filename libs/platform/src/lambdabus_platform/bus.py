"""The NATS adapter: the one module that talks to nats-py.

It connects, declares the platform's streams, KV buckets and object store idempotently, and
offers the few operations the services need (KV with compare-and-set, lifecycle publishing with
deterministic `Nats-Msg-Id`, ordered replays, object store blobs) in the platform's own terms.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from lambdabus_events.catalog import LifecycleEvent
from lambdabus_events.cloudevents_io import to_json
from lambdabus_platform.errors import (
    AlreadyExists,
    Conflict,
    LambdabusError,
    NotFound,
    TemporaryError,
)
from lambdabus_platform.groupcommit import GroupCommit
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.subjects import (
    ARTIFACTS_BUCKET,
    FUNCTION_LOAD_BUCKET,
    FUNCTION_LOAD_TTL_SECONDS,
    KV_BUCKETS,
    NO_HISTORY_BUCKETS,
    REPLICAS_BUCKET,
    REPLICAS_TTL_SECONDS,
    STREAMS,
    lifecycle_subject,
)

log = logging.getLogger(__name__)

_DAY = 86_400.0
_NO_MESSAGE_FOUND = 10057  # JetStream's err_code for deleting a message that is not there


@dataclass(frozen=True)
class KvEntry:
    key: str
    value: bytes
    revision: int


@dataclass(frozen=True)
class StoredObject:
    name: str
    size: int
    modified: float  # seconds since the epoch; now when the store did not say


def _mtime(value: str | None) -> float:
    """An object's write time as the object store records it (RFC 3339); now if unknown, so
    a sweep takes it for young."""
    if value:
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return time.time()


@dataclass(frozen=True)
class StreamMessage:
    subject: str
    data: bytes
    sequence: int
    time: datetime | None


@dataclass(frozen=True)
class PublishAck:
    sequence: int
    duplicate: bool


class _Refused(Exception):
    """NATS refused the credentials (raised from nats-py's error callback to end its retries)."""


def tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    """The client's TLS context, when a CA or a client certificate is configured."""
    if not (settings.tls_ca_file or settings.tls_cert_file):
        return None
    context = ssl.create_default_context(
        cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None
    )
    if settings.tls_cert_file is not None:
        context.load_cert_chain(
            str(settings.tls_cert_file),
            str(settings.tls_key_file) if settings.tls_key_file else None,
        )
    return context


def connect_options(settings: NatsSettings) -> dict[str, Any]:
    """Credentials, TLS and inbox prefix as keyword arguments of `nats.connect`."""
    options: dict[str, Any] = {"inbox_prefix": settings.inbox_prefix}
    if settings.user is not None:
        options["user"] = settings.user
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if settings.token is not None:
        options["token"] = settings.token.get_secret_value()
    if settings.creds_file is not None:
        options["user_credentials"] = str(settings.creds_file)
    if settings.nkey_seed_file is not None:
        options["nkeys_seed"] = str(settings.nkey_seed_file)
    context = tls_context(settings)
    if context is not None:
        options["tls"] = context
    return options


async def _end_subscription(sub: Any) -> None:
    """Unsubscribe an ordered consumer's subscription and delete its consumer on the server.

    nats-py only unsubscribes: the server keeps the ephemeral consumer for its inactive
    threshold (five minutes for a KV watch), and a stream holds at most 1,000 consumers, so a
    few short reads a second would soon be refused (`maximum consumers limit reached`)."""
    with contextlib.suppress(Exception):
        await sub.unsubscribe()
    with contextlib.suppress(Exception):
        # the consumer's current name: an ordered consumer renames itself when it resets
        await asyncio.wait_for(sub._js._jsm.delete_consumer(sub._stream, sub._consumer), 2.0)


async def _end_watch(watcher: KeyValue.KeyWatcher) -> None:
    sub = watcher._sub
    await watcher.stop()  # type: ignore[no-untyped-call]
    if sub is not None:
        await _end_subscription(sub)


_KV_OP: Final = "KV-Operation"
_KV_REMOVED: Final = frozenset({"DEL", "PURGE"})
_KV_MARKER: Final = "Nats-Marker-Reason"  # nats-server 2.11+: a TTL or purge marker


def _from_seq(seq: int) -> api.ConsumerConfig:
    return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq)


class Kv:
    """One KV bucket with compare-and-set semantics expressed as platform errors."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, key: str) -> KvEntry | None:
        try:
            entry = await self._kv.get(key)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if entry.value is None or entry.revision is None:
            return None
        return KvEntry(key, entry.value, entry.revision)

    async def create(self, key: str, value: bytes) -> int:
        """Create `key`; AlreadyExists if it holds a value."""
        try:
            return await self._kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise AlreadyExists(f"{key} already exists") from exc

    async def update(self, key: str, value: bytes, revision: int) -> int:
        """Write `key` only if it is still at `revision`; Conflict otherwise."""
        try:
            return await self._kv.update(key, value, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise Conflict(f"{key} changed since revision {revision}") from exc

    async def put(self, key: str, value: bytes) -> int:
        return await self._kv.put(key, value)

    async def delete(self, key: str, revision: int | None = None) -> None:
        try:
            await self._kv.delete(key, last=revision)
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise Conflict(f"{key} changed since revision {revision}") from exc

    async def watch(self, pattern: str = ">") -> AsyncGenerator[KvEntry, None]:
        """Current values of matching keys, then every change, in order. A deleted or purged
        key comes as an entry with `value == b""`."""
        watcher = await self._kv.watch(pattern)
        try:
            async for entry in watcher:
                if entry is None:  # end of the initial values
                    continue
                deleted = entry.operation in ("DEL", "PURGE")
                yield KvEntry(
                    entry.key, b"" if deleted else (entry.value or b""), entry.revision or 0
                )
        finally:
            await _end_watch(watcher)

    async def values(self, pattern: str = ">") -> list[KvEntry]:
        """Current values of keys matching a subject pattern (e.g. `default.*`), in one pass.

        A pull consumer of the last message per key, created without delivering anything, says
        exactly how many there are; that many are fetched, then the consumer is deleted. (A
        watch cannot be used: nats-py ends its initial values when the consumer's info shows
        nothing pending and no message was handled yet, which also holds while the first
        messages are in flight, so a loaded machine saw an empty list for a full bucket.)"""
        kv: Any = self._kv  # nats-py's stream, subject prefix and JetStream context
        js: JetStreamContext = kv._js
        stream: str = kv._stream
        name = uuid.uuid4().hex
        info = await js.add_consumer(
            stream,
            api.ConsumerConfig(
                name=name,
                filter_subject=f"{kv._pre}{pattern}",
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=api.AckPolicy.NONE,
                inactive_threshold=30.0,
                mem_storage=True,
                num_replicas=1,
            ),
        )
        count = int(info.num_pending or 0)
        entries: list[KvEntry] = []
        try:
            for msg in await _fetch_pending(js, stream, name, count, js._timeout, complete=True):
                headers = msg.headers or {}
                if headers.get(_KV_OP) in _KV_REMOVED or _KV_MARKER in headers:
                    continue
                entries.append(
                    KvEntry(
                        msg.subject.removeprefix(kv._pre), msg.data, msg.metadata.sequence.stream
                    )
                )
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(js.delete_consumer(stream, name), 2.0)
        return entries


async def _fetch_pending(
    js: JetStreamContext,
    stream: str,
    consumer: str,
    count: int,
    timeout: float,
    *,
    complete: bool = False,
) -> list[Msg]:
    """The next `count` messages of a pull consumer that has at least that many pending; fewer
    when some went meanwhile (expired, purged), unless `complete` (a snapshot a caller takes
    for the whole: then TemporaryError). Nothing at all in `timeout`: the server is slow,
    TemporaryError."""
    out: list[Msg] = []
    if count <= 0:
        return out
    sub = await js.pull_subscribe_bind(consumer=consumer, stream=stream)
    try:
        while len(out) < count:
            out += await sub.fetch(min(count - len(out), 1000), timeout=timeout)
    except TimeoutError as exc:  # nats-py raises asyncio's and its own subclass of it
        if not out or complete:
            raise TemporaryError(f"reading {stream} timed out; retry") from exc
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return out[:count]


class Bus:
    """A connection to NATS with JetStream, and the platform's named resources on it."""

    def __init__(self, nc: Client, settings: NatsSettings) -> None:
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(timeout=settings.request_timeout)
        self._settings = settings
        self._kv: dict[str, Kv] = {}
        self._objects: ObjectStore | None = None
        self._groups: dict[str, GroupCommit] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, settings: NatsSettings, *, name: str) -> AsyncIterator[Bus]:
        """Connect (retrying until NATS answers), yield, then drain on exit."""
        connecting = True

        async def _error(exc: Exception) -> None:
            # nats-py retries a refused first connect forever, telling only this callback:
            # a refusal of our credentials is final, so end the connect here.
            if connecting and "authorization" in str(exc).lower():
                raise _Refused(str(exc))
            log.warning("nats error", extra={"error": str(exc)})

        closing = False

        async def _disconnected() -> None:
            if not closing:  # our own drain on exit is no news
                log.warning("nats disconnected")

        async def _reconnected() -> None:
            log.info("nats reconnected")

        delay, deadline = 0.1, asyncio.get_running_loop().time() + settings.connect_wait_seconds
        while True:
            nc = Client()
            options: dict[str, Any] = {
                **connect_options(settings),
                "name": f"lambdabus-{name}",
                "connect_timeout": settings.connect_timeout,
                "allow_reconnect": True,
                "max_reconnect_attempts": -1,
                "reconnect_time_wait": 0.5,
                "error_cb": _error,
                "disconnected_cb": _disconnected,
                "reconnected_cb": _reconnected,
            }
            try:
                await nc.connect(settings.url, **options)
                connecting = False
                break
            except _Refused as exc:
                with contextlib.suppress(Exception):
                    await nc.close()
                raise LambdabusError(
                    f"NATS at {settings.url} refused the credentials of {name!r}: {exc}; "
                    "check LAMBDABUS_NATS_NKEY_SEED_FILE (or _CREDS_FILE, _USER/_PASSWORD, _TOKEN)",
                    code="nats_unauthorized",
                ) from None
            except (nats.errors.NoServersError, OSError) as exc:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise TemporaryError(f"cannot reach NATS at {settings.url}: {exc}") from exc
                log.info("waiting for NATS", extra={"url": settings.url, "retry_in": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        bus = cls(nc, settings)
        try:
            yield bus
        finally:
            closing = True
            for group in bus._groups.values():
                await group.close()
            if nc.is_connected:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.drain(), timeout=5)
            if not nc.is_closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), timeout=5)

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    @property
    def url(self) -> str:
        return self._settings.url

    @property
    def max_payload(self) -> int:
        """The largest message the server takes (a reply included), in bytes."""
        return int(self._nc.max_payload)

    async def declare(self, *, object_bucket: str | None = ARTIFACTS_BUCKET) -> None:
        """Declare streams, KV buckets and the object store; safe to call from every replica."""
        s = self._settings
        max_age = {
            "LIFECYCLE": s.lifecycle_max_age_days * _DAY,
            "EVENTS": s.events_max_age_days * _DAY,
            "LOGS": s.logs_max_age_days * _DAY,
            "DLQ": s.events_max_age_days * _DAY,
        }
        for spec in STREAMS:
            config = api.StreamConfig(
                name=spec.name,
                description=spec.description,
                subjects=list(spec.subjects),
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
                max_age=max_age[spec.name],
                max_bytes=s.logs_max_bytes if spec.name == "LOGS" else -1,
                discard=api.DiscardPolicy.OLD,
                duplicate_window=(
                    s.events_duplicate_window_seconds
                    if spec.name == "EVENTS"
                    else s.duplicate_window_seconds
                ),
                num_replicas=s.replicas,
                allow_direct=True,
                # Group commit (`publish_grouped`) stores concurrent events in atomic batches.
                allow_atomic=True if spec.name == "EVENTS" else None,
            )
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError:
                # Exists with another config (e.g. a changed retention setting): converge on ours.
                await self._js.update_stream(config)
        for bucket in KV_BUCKETS:
            kv = await self._js.create_key_value(
                api.KeyValueConfig(
                    bucket=bucket,
                    history=1 if bucket in NO_HISTORY_BUCKETS else 5,
                    storage=api.StorageType.FILE,
                    replicas=s.replicas,
                )
            )
            self._kv[bucket] = Kv(kv)
        # Heartbeats: nothing worth a disk write; a killed replica's beat expires on its own.
        heartbeats = await self._js.create_key_value(
            api.KeyValueConfig(
                bucket=REPLICAS_BUCKET,
                history=1,
                ttl=REPLICAS_TTL_SECONDS,
                storage=api.StorageType.MEMORY,
                replicas=s.replicas,
            )
        )
        self._kv[REPLICAS_BUCKET] = Kv(heartbeats)
        load = await self._js.create_key_value(
            api.KeyValueConfig(
                bucket=FUNCTION_LOAD_BUCKET,
                history=1,
                ttl=FUNCTION_LOAD_TTL_SECONDS,
                storage=api.StorageType.MEMORY,
                replicas=s.replicas,
            )
        )
        self._kv[FUNCTION_LOAD_BUCKET] = Kv(load)
        if object_bucket is not None:
            self._objects = await self._js.create_object_store(
                object_bucket,
                api.ObjectStoreConfig(storage=api.StorageType.FILE, replicas=s.replicas),
            )

    def kv(self, bucket: str) -> Kv:
        """A declared KV bucket. Bound without asking the server (no stream info), so a user
        needs no right on a bucket it does not use; a bucket nobody declared answers errors."""
        if bucket not in self._kv:
            self._kv[bucket] = Kv(
                KeyValue(
                    name=bucket,
                    stream=f"KV_{bucket}",
                    pre=f"$KV.{bucket}.",
                    js=self._js,
                    direct=False,
                )
            )
        return self._kv[bucket]

    async def publish(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> int:
        """Publish to a stream and wait for the ack; returns the stream sequence."""
        ack = await self.publish_ack(subject, payload, msg_id=msg_id, headers=headers)
        return ack.sequence

    async def publish_ack(
        self,
        subject: str,
        payload: bytes,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> PublishAck:
        """`publish`, answering also whether the stream had the `msg_id` already (in its
        duplicate window): then nothing new was stored and `sequence` is the first copy's."""
        hdrs = dict(headers or {})
        if msg_id is not None:
            hdrs["Nats-Msg-Id"] = msg_id
        try:
            ack = await self._js.publish(subject, payload, headers=hdrs or None)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise TemporaryError("NATS JetStream did not acknowledge the publish; retry") from exc
        return PublishAck(int(ack.seq), bool(ack.duplicate))

    async def publish_grouped(
        self,
        stream: str,
        subject: str,
        payload: bytes,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> PublishAck:
        """`publish_ack` through the group commit of `stream` (see `groupcommit`): publishes
        made at the same time are stored as one atomic batch, with one fsync, and each returns
        once its message is stored. For a hot path with many concurrent publishers (user
        events); `subject` must be one of `stream`'s."""
        group = self._groups.get(stream)
        if group is None:
            group = self._groups[stream] = GroupCommit(
                self._nc, self._js, stream, timeout=self._settings.request_timeout
            )
        hdrs = dict(headers or {})
        if msg_id is not None:
            hdrs["Nats-Msg-Id"] = msg_id
        ack = await group.publish(subject, payload, hdrs)
        return PublishAck(ack.sequence, ack.duplicate)

    def group_batches(self, stream: str) -> int:
        """How many atomic batches the group commit of `stream` stored so far."""
        group = self._groups.get(stream)
        return group.batches if group is not None else 0

    async def get_message(self, stream: str, sequence: int) -> StreamMessage | None:
        """The message stored at `sequence` of `stream` (a direct get), or None if there is
        none (never stored, deleted, or expired)."""
        if sequence < 1:
            return None
        try:
            raw = await self._js.get_msg(stream, seq=sequence, direct=True)
        except nats.js.errors.NotFoundError:
            return None
        except nats.errors.TimeoutError as exc:
            raise TemporaryError(f"reading {stream} timed out; retry") from exc
        if raw.seq != sequence or raw.subject is None:
            return None
        return StreamMessage(raw.subject, bytes(raw.data or b""), sequence, raw.time)

    async def delete_message(self, stream: str, sequence: int) -> bool:
        """Remove one message of `stream`; False if it was not there (anymore)."""
        try:
            return bool(await self._js.delete_msg(stream, sequence))
        except nats.js.errors.APIError as exc:
            # The server answers "no message found" (10057) as a 500, not a 404.
            if isinstance(exc, nats.js.errors.NotFoundError) or exc.err_code == _NO_MESSAGE_FOUND:
                return False
            raise
        except nats.errors.TimeoutError as exc:
            raise TemporaryError(f"deleting from {stream} timed out; retry") from exc

    async def publish_lifecycle(
        self,
        event: LifecycleEvent,
        *,
        attempts: int = 3,
        actor: tuple[str, str] | None = None,
    ) -> int:
        """Publish a catalog event (structured-mode JSON by the CloudEvents SDK). Its
        deterministic id is the `Nats-Msg-Id`, so retrying a publish whose ack was lost is
        safe: JetStream stores it once. `actor` (token id, name) names who caused it, as the
        `actorid`/`actorname` extension attributes. Raises TemporaryError when every attempt
        failed."""
        if actor is not None:
            event = event.with_actor(*actor)
        subject = lifecycle_subject(event.type, event.namespace, event.name)
        payload = to_json(event)
        for attempt in range(1, attempts + 1):
            try:
                return await self.publish(
                    subject,
                    payload,
                    msg_id=event.id,
                    headers={"Content-Type": "application/cloudevents+json"},
                )
            except TemporaryError:
                if attempt == attempts:
                    raise
                await asyncio.sleep(0.2 * attempt)
        raise AssertionError("unreachable")

    async def replay(
        self,
        stream: str,
        filter_subject: str,
        *,
        since: datetime | None = None,
        deliver_all: bool = False,
        after_sequence: int | None = None,
    ) -> AsyncIterator[StreamMessage]:
        """Read a stream in order from `since`, or from just after `after_sequence` (a reader
        resuming where it stopped), or from now, then follow it live.

        Uses an ordered ephemeral consumer, deleted when the reader stops; it resumes itself on
        reconnect.
        """
        config = api.ConsumerConfig()
        if after_sequence is not None:
            policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = after_sequence + 1
        elif since is not None:
            policy = api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = since
        elif deliver_all:
            policy = api.DeliverPolicy.ALL
        else:
            policy = api.DeliverPolicy.NEW
        sub = await self._js.subscribe(
            filter_subject,
            stream=stream,
            ordered_consumer=True,
            deliver_policy=policy,
            config=config,
            idle_heartbeat=5.0,
        )
        try:
            async for msg in sub.messages:
                meta = msg.metadata
                yield StreamMessage(msg.subject, msg.data, meta.sequence.stream, meta.timestamp)
        finally:
            await _end_subscription(sub)

    async def read(
        self,
        stream: str,
        filter_subject: str,
        *,
        since: datetime | None = None,
        start_seq: int | None = None,
        limit: int,
        newest: bool = False,
    ) -> list[StreamMessage]:
        """A bounded read that does not follow: at most `limit` messages of `stream` matching
        `filter_subject` stored now, from `start_seq` or `since` (else from the first), oldest
        first. With `newest`, the last `limit` of them instead of the first, found without
        reading the ones before: probe consumers count what is pending from a sequence, and the
        read starts where at least `limit` remain.
        """
        if limit <= 0:
            return []
        if since is not None:
            lower = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=since
            )
        elif start_seq is not None:
            lower = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq)
            )
        else:
            lower = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
        name, pending = await self._probe(stream, filter_subject, lower)
        if newest and pending > limit:
            await self._drop_consumer(stream, name)
            name, pending = await self._seek_newest(stream, filter_subject, limit)
        try:
            messages = await self._fetch(stream, name, pending if newest else min(pending, limit))
        finally:
            await self._drop_consumer(stream, name)
        return messages[-limit:] if newest else messages

    async def _probe(
        self, stream: str, filter_subject: str, config: api.ConsumerConfig
    ) -> tuple[str, int]:
        """Create a read-only ephemeral pull consumer; (its name, messages pending for it)."""
        name = uuid.uuid4().hex
        info = await self._js.add_consumer(
            stream,
            config.evolve(
                name=name,
                filter_subject=filter_subject,
                ack_policy=api.AckPolicy.NONE,
                inactive_threshold=30.0,
                mem_storage=True,
                num_replicas=1,
            ),
        )
        return name, int(info.num_pending or 0)

    async def _seek_newest(self, stream: str, filter_subject: str, count: int) -> tuple[str, int]:
        """A consumer from a sequence after which at least `count` (and not many more) matching
        messages are stored: gallop back from the end, then bisect the last step."""
        state = (await self._js.stream_info(stream)).state
        first, last = int(state.first_seq), int(state.last_seq)
        step, above = count, last + 1  # `above`: a start known to leave fewer than `count`
        while True:
            start = max(first, last - step + 1)
            name, pending = await self._probe(stream, filter_subject, _from_seq(start))
            if pending >= count or start == first:
                break
            await self._drop_consumer(stream, name)
            above, step = start, step * 4
        # Narrow a start that leaves far more than needed (a burst of matching messages).
        while pending > 2 * count + 256 and above - start > 1:
            middle = (start + above) // 2
            mid_name, mid_pending = await self._probe(stream, filter_subject, _from_seq(middle))
            if mid_pending >= count:
                await self._drop_consumer(stream, name)
                name, pending, start = mid_name, mid_pending, middle
            else:
                await self._drop_consumer(stream, mid_name)
                above = middle
        return name, pending

    async def _fetch(self, stream: str, consumer: str, count: int) -> list[StreamMessage]:
        """The next `count` messages of a consumer that has at least that many pending."""
        found = await _fetch_pending(
            self._js, stream, consumer, count, self._settings.request_timeout
        )
        return [
            StreamMessage(m.subject, m.data, m.metadata.sequence.stream, m.metadata.timestamp)
            for m in found
        ]

    async def _drop_consumer(self, stream: str, name: str) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError, nats.errors.TimeoutError):
            await self._js.delete_consumer(stream, name)

    async def publish_nowait(self, subject: str, payload: bytes) -> None:
        """Fire-and-forget publish (the stream still stores it): for high-volume log lines,
        where waiting for an ack per line would cost more than a lost line."""
        await self._nc.publish(subject, payload)

    @contextlib.asynccontextmanager
    async def listening(
        self, subject: str, handler: Callable[[str, bytes], Awaitable[None]]
    ) -> AsyncIterator[None]:
        """A core NATS subscription for the block (no queue group: every subscriber hears
        every message); `handler(subject, payload)`, whose errors are logged."""

        async def on_message(msg: Msg) -> None:
            try:
                await handler(msg.subject, bytes(msg.data))
            except Exception:
                log.exception("handling a message failed", extra={"subject": msg.subject})

        sub = await self._nc.subscribe(subject, cb=on_message)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def request(self, subject: str, payload: bytes, *, timeout: float | None = None) -> bytes:
        """Core NATS request/reply between services."""
        try:
            msg = await self._nc.request(
                subject, payload, timeout=timeout or self._settings.request_timeout
            )
        except nats.errors.NoRespondersError as exc:
            raise TemporaryError(f"no service answers on {subject}; is it running?") from exc
        except nats.errors.TimeoutError as exc:
            raise TemporaryError(f"no answer on {subject} in time; retry") from exc
        return bytes(msg.data)

    async def count(self, stream: str, filter_subject: str) -> int:
        """How many messages of `stream` match `filter_subject` now."""
        info = await self._js.stream_info(stream, subjects_filter=filter_subject)
        return sum((info.state.subjects or {}).values())

    # -- durable pull consumers -----------------------------------------------------------

    async def ensure_consumer(
        self,
        stream: str,
        name: str,
        *,
        filter_subjects: Sequence[str],
        ack_wait: float,
        max_ack_pending: int,
        start_time: datetime | None = None,
        description: str = "",
    ) -> None:
        """Declare a durable pull consumer (idempotent; a changed `ack_wait` or
        `max_ack_pending` is applied to the existing one). Explicit acks, no delivery limit
        (the caller counts attempts), from the first message stored at or after `start_time`
        (else from the stream's first). Replicas that read it share its messages: each goes to
        one of them."""
        config = api.ConsumerConfig(
            name=name,
            durable_name=name,
            description=description or None,
            deliver_policy=(
                api.DeliverPolicy.BY_START_TIME if start_time else api.DeliverPolicy.ALL
            ),
            opt_start_time=start_time,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            filter_subjects=list(filter_subjects),
            max_ack_pending=max_ack_pending,
        )
        try:
            await self._js.add_consumer(stream, config)
        except nats.js.errors.BadRequestError as exc:
            # It exists with a setting that cannot change (its start): keep it as it is.
            if not await self.consumer_exists(stream, name):
                raise LambdabusError(
                    f"cannot create consumer {name} on {stream}: {exc.description}"
                ) from exc
            log.warning(
                "keeping an existing consumer whose settings differ",
                extra={"stream": stream, "consumer": name, "error": exc.description},
            )
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise TemporaryError(f"creating consumer {name} on {stream} timed out; retry") from exc

    async def consumer_exists(self, stream: str, name: str) -> bool:
        try:
            await self._js.consumer_info(stream, name)
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise TemporaryError(f"reading consumer {name} on {stream} timed out; retry") from exc
        return True

    async def consumer_state(self, stream: str, name: str) -> ConsumerState | None:
        """Where a consumer is (None if there is none of that name)."""
        try:
            info = await self._js.consumer_info(stream, name)
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise TemporaryError(f"reading consumer {name} on {stream} timed out; retry") from exc
        return ConsumerState(
            pending=int(info.num_pending or 0),
            ack_pending=int(info.num_ack_pending or 0),
            redelivered=int(info.num_redelivered or 0),
            delivered=int(info.delivered.consumer_seq if info.delivered else 0),
        )

    async def consumer_names(self, stream: str, *, prefix: str = "") -> list[str]:
        """Names of the consumers of `stream` that start with `prefix`."""
        names: list[str] = []
        offset = 0
        try:
            while True:
                page = await self._js.consumers_info(stream, offset=offset)
                names.extend(info.name for info in page if info.name.startswith(prefix))
                offset += len(page)
                if len(page) < _LIST_PAGE:
                    return names
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise TemporaryError(f"listing the consumers of {stream} timed out; retry") from exc

    async def delete_consumer(self, stream: str, name: str) -> bool:
        """Delete a durable consumer; False if there was none of that name."""
        try:
            return bool(await self._js.delete_consumer(stream, name))
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
            raise TemporaryError(f"deleting consumer {name} on {stream} timed out; retry") from exc

    @contextlib.asynccontextmanager
    async def pull(
        self, stream: str, consumer: str, *, expires: float = 5.0
    ) -> AsyncIterator[Pull]:
        """Read a durable pull consumer (see `Pull`) for the life of the context. Messages
        received and not handed out by then are sent back at once (nak) for others to take."""
        puller = Pull(self._nc, stream, consumer, expires=expires)
        await puller.open()
        try:
            yield puller
        finally:
            await puller.close()

    # -- object store ---------------------------------------------------------------------

    def _store(self) -> ObjectStore:
        if self._objects is None:  # bound without asking the server, as `kv` is
            self._objects = ObjectStore(
                name=ARTIFACTS_BUCKET,
                stream=f"OBJ_{ARTIFACTS_BUCKET}",
                js=self._js,
            )
        return self._objects

    async def object_put(self, name: str, data: bytes) -> None:
        await self._store().put(name, data)

    async def object_get(self, name: str) -> bytes:
        try:
            result = await self._store().get(name)
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError) as exc:
            raise NotFound(f"object {name} not found") from exc
        except nats.js.errors.DigestMismatchError as exc:
            raise LambdabusError(
                f"object {name} is corrupt in the object store", code="corrupt_blob"
            ) from exc
        except nats.errors.TimeoutError as exc:
            raise TemporaryError(f"NATS object store timed out reading {name}; retry") from exc
        return bytes(result.data or b"")

    async def object_exists(self, name: str) -> bool:
        try:
            info = await self._store().get_info(name)
        except nats.js.errors.ObjectNotFoundError:
            return False
        return not info.deleted

    async def object_modified(self, name: str) -> float | None:
        """When the object was last written (seconds since the epoch); None if it is absent."""
        try:
            info = await self._store().get_info(name)
        except nats.js.errors.ObjectNotFoundError:
            return None
        return None if info.deleted else _mtime(info.mtime)

    async def object_list(self) -> list[StoredObject]:
        """Every object in the store: its name, size and when it was written."""
        watcher = await self._store().watch(ignore_deletes=True)
        found: list[StoredObject] = []
        try:
            async for info in watcher:
                if info is None:
                    break
                if not info.deleted and info.name:
                    found.append(StoredObject(info.name, info.size or 0, _mtime(info.mtime)))
        finally:
            await _end_watch(watcher)  # type: ignore[arg-type]
        return found

    async def object_delete(self, name: str) -> None:
        with contextlib.suppress(
            nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError
        ):
            await self._store().delete(name)


# -- pull consumers: messages as they are stored -------------------------------------------------


@dataclass(frozen=True)
class ConsumerState:
    """A durable consumer's position: messages not delivered yet (`pending`), delivered and
    not acknowledged (`ack_pending`), delivered more than once (`redelivered`), and how many
    deliveries it made in all (`delivered`, redeliveries included)."""

    pending: int
    ack_pending: int
    redelivered: int
    delivered: int

    @property
    def idle(self) -> bool:
        """Nothing left to deliver or to acknowledge."""
        return self.pending == 0 and self.ack_pending == 0


_JS_API: Final = "$JS.API"
_LIST_PAGE: Final = 256  # consumers per page of the JetStream list API
_REQUEST_GRACE: Final = 1.0  # seconds a pull request is counted past its expiry


class PulledMessage:
    """One message of a durable pull consumer: subject, payload, headers, its place in the
    stream, how many times it was delivered (this time included) and when it was stored, and
    the acknowledgements — the first one sent counts, later ones do nothing."""

    __slots__ = (
        "_msg",
        "_settled",
        "data",
        "deliveries",
        "headers",
        "stored_at",
        "stream_seq",
        "subject",
    )

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self._settled = False
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: dict[str, str] = msg.headers or {}
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>,
        # or the newer form with <domain>.<account hash> after ACK and a token at the end.
        tokens = msg.reply.split(".")
        base = 2 if len(tokens) == 9 else 4
        self.deliveries = int(tokens[base + 2])
        self.stream_seq = int(tokens[base + 3])
        self.stored_at = int(tokens[base + 5]) / 1e9  # seconds since the epoch

    @property
    def settled(self) -> bool:
        return self._settled

    async def ack(self) -> None:
        """Done: the consumer never delivers it again."""
        if not self._settled:
            self._settled = True
            await _send(self._msg.ack())

    async def nak(self, delay: float | None = None) -> None:
        """Deliver it again, after `delay` seconds (else at once)."""
        if not self._settled:
            self._settled = True
            await _send(self._msg.nak(delay=delay if delay and delay > 0 else None))

    async def in_progress(self) -> None:
        """Still being worked on: restart its ack wait."""
        if not self._settled:
            await _send(self._msg.in_progress())

    async def term(self) -> None:
        """Never deliver it again, though it was not handled."""
        if not self._settled:
            self._settled = True
            await _send(self._msg.term())


async def _send(acknowledgement: Awaitable[None]) -> None:
    try:
        await acknowledgement
    except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
        raise TemporaryError("NATS is not connected; the message comes again later") from exc


class Pull:
    """Messages of one durable pull consumer as they are stored, for a caller that handles up
    to N at a time.

    `fetch(n)` returns as soon as any message is there (it does not wait for a full batch): the
    pull requests stay open on the server for `expires` seconds and their messages queue here
    for the next `fetch`. It asks for at most `n` minus what is queued or already asked for, so
    nothing waits here long enough to reach its ack wait.
    """

    def __init__(self, nc: Client, stream: str, consumer: str, *, expires: float) -> None:
        self.stream = stream
        self.consumer = consumer
        self._nc = nc
        self._next = f"{_JS_API}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._expires = expires
        self._queue: deque[PulledMessage] = deque()
        # Open pull requests, oldest first: [messages still to come, local expiry].
        self._requests: deque[list[float]] = deque()
        self._arrived = asyncio.Event()
        self._missing = False
        self._sub: Any = None

    async def open(self) -> None:
        self._sub = await self._nc.subscribe(self._inbox, cb=self._on_message)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for message in self.take_queued():
            with contextlib.suppress(Exception):
                await message.nak()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def take_queued(self) -> list[PulledMessage]:
        """Every message received and not handed out yet."""
        taken = list(self._queue)
        self._queue.clear()
        return taken

    async def fetch(self, max_messages: int, timeout: float) -> list[PulledMessage]:
        """Up to `max_messages`, as soon as there is one; [] after `timeout` seconds without
        any. NotFound when the consumer does not exist (deleted meanwhile)."""
        if not self._queue and not self._missing:
            loop = asyncio.get_running_loop()
            now = loop.time()
            while self._requests and self._requests[0][1] < now:
                self._requests.popleft()
            want = max_messages - int(sum(r[0] for r in self._requests))
            if want > 0:
                await self._request(want, now)
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
        if self._missing:
            self._missing = False
            raise NotFound(f"consumer {self.consumer} on {self.stream} does not exist")
        count = min(max_messages, len(self._queue))
        return [self._queue.popleft() for _ in range(count)]

    async def _request(self, batch: int, now: float) -> None:
        payload = json.dumps({"batch": batch, "expires": int(self._expires * 1e9)}).encode()
        self._requests.append([float(batch), now + self._expires + _REQUEST_GRACE])
        try:
            await self._nc.publish(self._next, payload, reply=self._inbox)
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            self._requests.pop()
            raise TemporaryError("NATS is not connected; cannot pull messages") from exc

    async def _on_message(self, msg: Msg) -> None:
        if msg.reply:  # a stored message (a status from the server has no reply subject)
            self._queue.append(PulledMessage(msg))
            if self._requests:
                head = self._requests[0]
                head[0] -= 1
                if head[0] <= 0:
                    self._requests.popleft()
            self._arrived.set()
            return
        headers = msg.headers or {}
        status = headers.get("Status", "")
        description = headers.get("Description", "").lower()
        if status in ("404", "408"):  # a pull request ended (expired) before it was filled
            if self._requests:
                self._requests.popleft()
        elif status == "409" and "exceeded" in description:  # a request over a limit: dropped
            if self._requests:
                self._requests.pop()
        elif status == "503" or (status == "409" and "deleted" in description):
            self._requests.clear()  # no consumer answers (no responders) or it was deleted
            self._missing = True
            self._arrived.set()
        elif status == "409":  # leadership change, server shutdown: ask again
            self._requests.clear()
            self._arrived.set()
        # 100: an idle heartbeat or flow control; nothing to do
