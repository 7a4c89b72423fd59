"""NATS behind credentials, against the real nats-server of the session: no anonymous or
wrongly keyed client gets in, and each user can do what its service needs and nothing the
tests below try. Every refused attempt is checked on its own, through the server's answer
(a permissions violation) and the state it leaves (nothing stored, nothing changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import nkeys
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from lambdabus_events.catalog import FunctionDeleted, FunctionDeletedData, lifecycle_event
from lambdabus_platform.bus import Bus, connect_options
from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.eventapi import REQUESTS
from lambdabus_platform.natsauth import inbox_prefix
from lambdabus_platform.natsserver import NatsServer
from lambdabus_platform.service import ServiceContext, serve, serve_requests
from lambdabus_platform.settings import NatsSettings, ServiceSettings
from lambdabus_platform.subjects import (
    FUNCTIONS_BUCKET,
    LIFECYCLE_PREFIX,
    LOGS_QUERY_SUBJECT,
    lifecycle_subject,
)

pytestmark = pytest.mark.timeout(60)

DENIED = 1.0  # seconds to wait for an answer that a refused request never gets


class Client_:
    """A raw nats-py connection as one user, recording the server's permission errors."""

    def __init__(self, nc: Client, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors
        self.js = nc.jetstream(timeout=DENIED)

    async def violation(self, verb: str, subject: str) -> bool:
        """Whether the server said `Permissions Violation for <verb> to "<subject>"`."""
        needle = f'permissions violation for {verb} to "{subject}"'.lower()
        for _ in range(50):
            if any(needle in e.lower() for e in self.errors):
                return True
            await asyncio.sleep(0.02)
        return False


@contextlib.asynccontextmanager
async def connected(server: NatsServer, user: str) -> AsyncIterator[Client_]:
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        server.url,
        **connect_options(server.settings(user)),
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:
        yield Client_(nc, errors)
    finally:
        await nc.close()


@pytest.fixture
async def function_record(bus: Bus) -> AsyncIterator[str]:
    """A function record holding an env value, as the gateway writes them (removed after: it
    is no valid record, and every deployer a later test starts would read it)."""
    key = f"perm.{uuid.uuid4().hex[:8]}"
    await bus.kv(FUNCTIONS_BUCKET).put(key, b'{"env": {"API_KEY": "s3cr3t"}}')
    yield key
    await bus.kv(FUNCTIONS_BUCKET).delete(key)


async def lifecycle_count(bus: Bus) -> int:
    return await bus.count("LIFECYCLE", f"{LIFECYCLE_PREFIX}.>")


# -- who gets in ----------------------------------------------------------------------------


async def refused(url: str, **options: Any) -> str:
    """The error of a connect that NATS refuses (the half-open client closed after)."""
    nc = Client()
    try:
        await nc.connect(url, allow_reconnect=False, connect_timeout=2, **options)
    except nats.errors.Error as exc:
        return str(exc)
    finally:
        await nc.close()
    raise AssertionError("NATS let the client in")


async def test_an_anonymous_client_is_refused(nats_server: NatsServer) -> None:
    assert "authorization" in (await refused(nats_server.url)).lower()


async def test_the_bus_says_the_credentials_were_refused(nats_server: NatsServer) -> None:
    settings = NatsSettings(url=nats_server.url, connect_wait_seconds=2)
    with pytest.raises(LambdabusError) as caught:
        async with Bus.connect(settings, name="anonymous"):
            pass
    assert caught.value.code == "nats_unauthorized"


async def test_a_wrong_password_is_refused(nats_server: NatsServer) -> None:
    error = await refused(nats_server.url, user="admin", password="not-the-password")
    assert "authorization" in error.lower()


async def test_an_unknown_nkey_is_refused(nats_server: NatsServer, tmp_path: Path) -> None:
    seed = tmp_path / "stranger.nk"
    seed.write_bytes(nkeys.encode_seed(b"\x01" * 32, nkeys.PREFIX_BYTE_USER))
    assert "authorization" in (await refused(nats_server.url, nkeys_seed=str(seed))).lower()


def test_seed_files_are_private_and_reused(nats_server: NatsServer) -> None:
    for key in nats_server.keys.values():
        assert key.seed_file.stat().st_mode & 0o777 == 0o600
        assert key.public_key.startswith("U")
    folder = next(iter(nats_server.keys.values())).seed_file.parent
    assert folder.stat().st_mode & 0o777 == 0o700
    config = folder.parent / "nats.conf"
    text = config.read_text()
    assert "no_auth_user" not in text
    for key in nats_server.keys.values():  # public keys only: no seed in the server config
        assert key.seed_file.read_text().strip() not in text


# -- the auditor ----------------------------------------------------------------------------


async def test_the_auditor_reads_lifecycle(nats_server: NatsServer, bus: Bus) -> None:
    uid = uuid.uuid4().hex
    event = lifecycle_event(
        FunctionDeleted,
        FunctionDeletedData(namespace="audit", name="fn", uid=uid, generation=1),
        service="gateway",
        subject="audit/fn",
        key=f"{uid}:deleted",
    )
    seq = await bus.publish_lifecycle(event)
    async with connected(nats_server, "auditor") as auditor:
        sub = await auditor.js.pull_subscribe(
            f"{LIFECYCLE_PREFIX}.>",
            durable=f"audit-{uuid.uuid4().hex[:8]}",
            stream="LIFECYCLE",
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq
            ),
        )
        [msg] = await sub.fetch(1, timeout=5)
        assert json.loads(msg.data)["id"] == event.id
        await msg.ack()
        assert not auditor.errors


async def test_the_auditor_cannot_forge_a_lifecycle_event(
    nats_server: NatsServer, bus: Bus
) -> None:
    before = await lifecycle_count(bus)
    subject = lifecycle_subject("io.lambdabus.function.deleted", "victim", "fn")
    async with connected(nats_server, "auditor") as auditor:
        with pytest.raises(nats.errors.TimeoutError):
            await auditor.js.publish(subject, b'{"forged": true}')
        assert await auditor.violation("publish", subject)
    assert await lifecycle_count(bus) == before


@pytest.mark.parametrize(
    "subject",
    ["lambdabus.events.t.com.example.x", "lambdabus.rpc.logs.query", "anything.at.all"],
)
async def test_the_auditor_cannot_publish_anywhere(nats_server: NatsServer, subject: str) -> None:
    async with connected(nats_server, "auditor") as auditor:
        await auditor.nc.publish(subject, b"x")
        assert await auditor.violation("publish", subject)


async def test_the_auditor_cannot_read_a_function_record(
    nats_server: NatsServer, function_record: str
) -> None:
    async with connected(nats_server, "auditor") as auditor:
        with pytest.raises(nats.errors.TimeoutError):
            await auditor.js.get_msg(
                f"KV_{FUNCTIONS_BUCKET}", subject=f"$KV.{FUNCTIONS_BUCKET}.{function_record}"
            )
        assert await auditor.violation("publish", f"$JS.API.STREAM.MSG.GET.KV_{FUNCTIONS_BUCKET}")


async def test_the_auditor_cannot_watch_a_bucket(nats_server: NatsServer) -> None:
    async with connected(nats_server, "auditor") as auditor:
        with pytest.raises(nats.errors.TimeoutError):
            await auditor.js.key_value(FUNCTIONS_BUCKET)
        assert await auditor.violation("publish", f"$JS.API.STREAM.INFO.KV_{FUNCTIONS_BUCKET}")
        stream = f"KV_{FUNCTIONS_BUCKET}"
        await auditor.nc.publish(f"$JS.API.CONSUMER.CREATE.{stream}", b"{}")
        assert await auditor.violation("publish", f"$JS.API.CONSUMER.CREATE.{stream}")


async def test_the_auditor_cannot_delete_a_key(
    nats_server: NatsServer, bus: Bus, function_record: str
) -> None:
    subject = f"$KV.{FUNCTIONS_BUCKET}.{function_record}"
    async with connected(nats_server, "auditor") as auditor:
        with pytest.raises(nats.errors.TimeoutError):
            await auditor.js.publish(subject, b"", headers={"KV-Operation": "DEL"})
        assert await auditor.violation("publish", subject)
    entry = await bus.kv(FUNCTIONS_BUCKET).get(function_record)
    assert entry is not None
    assert b"s3cr3t" in entry.value


async def test_the_auditor_cannot_read_the_object_store(nats_server: NatsServer, bus: Bus) -> None:
    await bus.object_put("sha256/perm", b"source code")
    async with connected(nats_server, "auditor") as auditor:
        with pytest.raises(nats.errors.TimeoutError):
            await auditor.js.get_last_msg("OBJ_artifacts", "$O.artifacts.M.>")
        assert await auditor.violation("publish", "$JS.API.STREAM.MSG.GET.OBJ_artifacts")
        await auditor.nc.publish("$JS.API.CONSUMER.CREATE.OBJ_artifacts", b"{}")
        assert await auditor.violation("publish", "$JS.API.CONSUMER.CREATE.OBJ_artifacts")


async def test_the_auditor_cannot_take_a_services_consumer(
    nats_server: NatsServer, bus: Bus
) -> None:
    """Pulling from (or reconfiguring) the builder's durable would steal its events."""
    await bus.ensure_consumer(
        "LIFECYCLE",
        "builder",
        filter_subjects=["lambdabus.lifecycle.function.*.*.*"],
        ack_wait=30,
        max_ack_pending=16,
    )
    async with connected(nats_server, "auditor") as auditor:
        for subject in (
            "$JS.API.CONSUMER.MSG.NEXT.LIFECYCLE.builder",
            "$JS.API.CONSUMER.CREATE.LIFECYCLE.builder",
            "$JS.API.CONSUMER.DELETE.LIFECYCLE.builder",
            # the nameless create, whose payload may name any consumer
            "$JS.API.CONSUMER.CREATE.LIFECYCLE",
        ):
            await auditor.nc.publish(subject, b'{"stream_name": "LIFECYCLE", "config": {}}')
            assert await auditor.violation("publish", subject), subject
    state = await bus.consumer_state("LIFECYCLE", "builder")
    assert state is not None
    assert state.delivered == 0  # nobody pulled from it
    await bus.delete_consumer("LIFECYCLE", "builder")


@pytest.mark.parametrize("stream", ["LOGS", "EVENTS", "DLQ"])
async def test_the_auditor_cannot_read_another_stream(nats_server: NatsServer, stream: str) -> None:
    """Function logs, user events and dead letters are not the audit trail."""
    async with connected(nats_server, "auditor") as auditor:
        for subject in (
            f"$JS.API.CONSUMER.CREATE.{stream}.peek",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.peek",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
        ):
            await auditor.nc.publish(subject, b"{}")
            assert await auditor.violation("publish", subject), subject


async def test_the_auditor_cannot_read_another_users_replies(nats_server: NatsServer) -> None:
    subject = f"{inbox_prefix('gateway')}.>"
    async with connected(nats_server, "auditor") as auditor:
        await auditor.nc.subscribe(subject)
        assert await auditor.violation("subscription", subject)


# -- the services ---------------------------------------------------------------------------


async def test_the_builder_cannot_read_secrets(nats_server: NatsServer) -> None:
    async with connected(nats_server, "builder") as builder:
        with pytest.raises(nats.errors.TimeoutError):
            await builder.js.get_msg("KV_secrets", subject="$KV.secrets.team.db")
        assert await builder.violation("publish", "$JS.API.STREAM.MSG.GET.KV_secrets")
        await builder.nc.publish("$JS.API.DIRECT.GET.KV_secrets.$KV.secrets.team.db", b"")
        assert await builder.violation(
            "publish", "$JS.API.DIRECT.GET.KV_secrets.$KV.secrets.team.db"
        )
        # nor watch it
        await builder.nc.publish("$JS.API.CONSUMER.CREATE.KV_secrets", b"{}")
        assert await builder.violation("publish", "$JS.API.CONSUMER.CREATE.KV_secrets")


async def test_the_router_cannot_read_secrets(nats_server: NatsServer) -> None:
    async with connected(nats_server, "router") as router:
        with pytest.raises(nats.errors.TimeoutError):
            await router.js.get_msg("KV_secrets", subject="$KV.secrets.team.db")
        assert await router.violation("publish", "$JS.API.STREAM.MSG.GET.KV_secrets")


@pytest.mark.parametrize(
    ("user", "event_type"),
    [
        ("builder", "io.lambdabus.function.deleted"),
        ("deployer", "io.lambdabus.build.succeeded"),
        ("router", "io.lambdabus.deployment.ready"),
        ("gateway", "io.lambdabus.delivery.deadlettered"),
        ("logs", "io.lambdabus.function.created"),
    ],
)
async def test_a_service_cannot_publish_another_services_lifecycle_events(
    nats_server: NatsServer, bus: Bus, user: str, event_type: str
) -> None:
    before = await lifecycle_count(bus)
    subject = lifecycle_subject(event_type, "victim", "fn")
    async with connected(nats_server, user) as service:
        with pytest.raises(nats.errors.TimeoutError):
            await service.js.publish(subject, b'{"forged": true}')
        assert await service.violation("publish", subject)
    assert await lifecycle_count(bus) == before


async def test_a_service_publishes_its_own_lifecycle_events(
    nats_server: NatsServer, bus: Bus
) -> None:
    subject = lifecycle_subject("io.lambdabus.build.started", "own", "fn")
    async with connected(nats_server, "builder") as builder:
        ack = await builder.js.publish(subject, b"{}", timeout=5)
    assert ack.stream == "LIFECYCLE"


async def test_the_router_cannot_write_a_function_record(
    nats_server: NatsServer, bus: Bus, function_record: str
) -> None:
    subject = f"$KV.{FUNCTIONS_BUCKET}.{function_record}"
    async with connected(nats_server, "router") as router:
        with pytest.raises(nats.errors.TimeoutError):
            await router.js.publish(subject, b'{"env": {}}')
        assert await router.violation("publish", subject)
        # but reads it, as it must to route
        kv = Bus(router.nc, nats_server.settings("router")).kv(FUNCTIONS_BUCKET)
        entry = await kv.get(function_record)
        assert entry is not None
    stored = await bus.kv(FUNCTIONS_BUCKET).get(function_record)
    assert stored is not None
    assert b"s3cr3t" in stored.value


async def test_a_service_cannot_change_a_stream(nats_server: NatsServer) -> None:
    """Streams are declared once by the launcher's admin: no service may shorten LIFECYCLE's
    retention or delete it."""
    async with connected(nats_server, "gateway") as gateway:
        for subject in (
            "$JS.API.STREAM.UPDATE.LIFECYCLE",
            "$JS.API.STREAM.DELETE.LIFECYCLE",
            "$JS.API.STREAM.PURGE.LIFECYCLE",
        ):
            await gateway.nc.publish(subject, b"{}")
            assert await gateway.violation("publish", subject), subject


async def test_inboxes_are_per_user(nats_server: NatsServer) -> None:
    """A reply to the gateway's request reaches the gateway alone: no other service may
    subscribe under its inbox prefix, nor publish a forged reply into it."""
    gateway_inbox = f"{inbox_prefix('gateway')}.>"
    async with connected(nats_server, "router") as router:
        await router.nc.subscribe(gateway_inbox)
        assert await router.violation("subscription", gateway_inbox)
        await router.nc.publish(f"{inbox_prefix('gateway')}.x.y", b"forged")
        assert await router.violation("publish", f"{inbox_prefix('gateway')}.x.y")
        await router.nc.subscribe("_INBOX.>")
        assert await router.violation("subscription", "_INBOX.>")


async def test_the_logs_service_answers_the_gateway(nats_server: NatsServer) -> None:
    """Request/reply across users: the logs service may answer the requests it receives
    (allow_responses) though it may not publish into the gateway's inbox by itself."""
    async with (
        connected(nats_server, "logs") as logs,
        connected(nats_server, "gateway") as gateway,
    ):

        async def answer(msg: Msg) -> None:
            await msg.respond(b"pong")

        await logs.nc.subscribe(LOGS_QUERY_SUBJECT, queue="perm-test", cb=answer)
        await logs.nc.flush()
        # The subscription is the server's once flushed; the gateway's connection has been
        # seen, on a loaded run, to get "no responders" for a moment after that: ask again.
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            try:
                reply = await gateway.nc.request(LOGS_QUERY_SUBJECT, b"ping", timeout=5)
                break
            except nats.errors.NoRespondersError:
                assert asyncio.get_running_loop().time() < deadline, "the logs user never answered"
                await asyncio.sleep(0.05)
        assert reply.data == b"pong"
        assert reply.subject.startswith(inbox_prefix("gateway") + ".")
        await logs.nc.publish(f"{inbox_prefix('gateway')}.unasked", b"forged")
        assert await logs.violation("publish", f"{inbox_prefix('gateway')}.unasked")


async def test_the_gateway_stores_user_events_in_atomic_batches(
    nats_server: NatsServer, bus: Bus
) -> None:
    """The group commit needs no right beyond the gateway's publish on EVENTS and its inbox."""
    run = uuid.uuid4().hex
    async with Bus.connect(nats_server.settings("gateway"), name="gateway") as gateway:
        acks = await asyncio.gather(
            *(
                gateway.publish_grouped(
                    "EVENTS", "lambdabus.events.t.com.example.auth", b"{}", msg_id=f"{run}-{n}"
                )
                for n in range(50)
            )
        )
        assert gateway.group_batches("EVENTS") > 0
    assert len({ack.sequence for ack in acks}) == 50


async def test_the_logs_services_faststream_subscriber_answers_the_gateway(
    nats_server: NatsServer,
) -> None:
    """The logs query as the logs service serves it (a FastStream core subscriber in its
    queue group, under its own nkey), asked by the gateway's user."""

    async def pong(data: bytes) -> bytes:
        return b"pong:" + data

    @contextlib.asynccontextmanager
    async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
        serve_requests(ctx, REQUESTS[LOGS_QUERY_SUBJECT], handler=pong)
        yield

    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    settings = ServiceSettings(nats=nats_server.settings("logs", declare=False))
    task = asyncio.create_task(serve("logs", settings, setup, stop=stop, on_ready=ready.set_result))
    try:
        await asyncio.wait_for(asyncio.shield(ready), 30)
        async with Bus.connect(nats_server.settings("gateway"), name="gateway") as gateway:
            assert await gateway.request(LOGS_QUERY_SUBJECT, b"ping", timeout=5) == b"pong:ping"
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
