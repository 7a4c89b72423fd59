"""The NATS adapter against a real nats-server: declarations, KV compare-and-set, dedup."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.js import api

from lambdabus_platform.bus import Bus, connect_options
from lambdabus_platform.errors import AlreadyExists, Conflict
from lambdabus_platform.service import (
    RequestSubscription,
    ServiceContext,
    serve,
    serve_requests,
)
from lambdabus_platform.settings import NatsSettings, ServiceSettings


async def test_declare_is_idempotent(nats_settings: NatsSettings) -> None:
    async with (
        Bus.connect(nats_settings, name="a") as one,
        Bus.connect(nats_settings, name="b") as two,
    ):
        await asyncio.gather(one.declare(), two.declare())
        await one.declare()


@pytest.fixture
async def scratch(nats_settings: NatsSettings) -> AsyncIterator[str]:
    """A KV bucket of the test's own, as the platform's are declared: what these tests write is
    no platform record, which every deployer a later test starts would read."""
    name = f"scratch-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(nats_settings.url, **connect_options(nats_settings))
    try:
        js = nc.jetstream()
        await js.create_key_value(api.KeyValueConfig(bucket=name, history=5))
        yield name
        await js.delete_key_value(name)
    finally:
        await nc.close()


async def test_kv_compare_and_set(bus: Bus, scratch: str) -> None:
    kv = bus.kv(scratch)
    rev = await kv.create("cas.one", b"v1")
    with pytest.raises(AlreadyExists):
        await kv.create("cas.one", b"again")
    rev2 = await kv.update("cas.one", b"v2", rev)
    with pytest.raises(Conflict):
        await kv.update("cas.one", b"stale", rev)
    entry = await kv.get("cas.one")
    assert entry is not None
    assert (entry.value, entry.revision) == (b"v2", rev2)
    await kv.delete("cas.one", rev2)
    assert await kv.get("cas.one") is None
    # a deleted key can be created again
    await kv.create("cas.one", b"v3")


async def test_kv_values_by_pattern(bus: Bus, scratch: str) -> None:
    kv = bus.kv(scratch)
    for name in ("a", "b", "c"):
        await kv.put(f"listing.{name}", name.encode())
    await kv.put("other.a", b"x")
    await kv.delete("listing.c")
    values = {e.key: e.value for e in await kv.values("listing.*")}
    assert values == {"listing.a": b"a", "listing.b": b"b"}
    assert await kv.values("nothing-here.*") == []


async def test_kv_reads_leave_no_consumer_behind(bus: Bus, scratch: str) -> None:
    """Each read and watch makes an ephemeral consumer; one left on the server after the read
    (nats-py leaves it for five minutes) counts against the stream's 1,000 consumers, and a
    platform that reads a bucket every second would be refused after a while."""
    kv = bus.kv(scratch)
    stream = f"KV_{scratch}"
    await kv.put("consumers.a", b"a")
    before = len(await bus.consumer_names(stream))
    for _ in range(1_100):
        assert [e.key for e in await kv.values("consumers.*")] == ["consumers.a"]
    async with contextlib.aclosing(kv.watch("consumers.*")) as watch:
        async for entry in watch:
            assert entry.key == "consumers.a"
            break
    assert len(await bus.consumer_names(stream)) == before


async def test_publish_dedups_on_msg_id(bus: Bus) -> None:
    first = await bus.publish("lambdabus.events.test.dedup", b"1", msg_id="same-id")
    second = await bus.publish("lambdabus.events.test.dedup", b"2", msg_id="same-id")
    assert first == second
    third = await bus.publish("lambdabus.events.test.dedup", b"3", msg_id="other-id")
    assert third == first + 1


async def test_kv_watch_sees_values_then_changes(bus: Bus, scratch: str) -> None:
    kv = bus.kv(scratch)
    await kv.put("watch.a", b"1")
    seen: list[tuple[str, bytes]] = []

    async def collect() -> None:
        async for entry in kv.watch("watch.*"):
            seen.append((entry.key, entry.value))
            if len(seen) == 3:
                return

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.1)
    await kv.put("watch.b", b"2")
    await kv.delete("watch.a")
    await asyncio.wait_for(task, 5)
    assert seen == [("watch.a", b"1"), ("watch.b", b"2"), ("watch.a", b"")]


async def test_request_reply(bus: Bus, nats_settings: NatsSettings) -> None:
    """`Bus.request` to a FastStream request subscriber (`serve_requests`), replicas in a queue
    group: each request is answered once."""
    calls = 0

    async def echo(data: bytes) -> bytes:
        nonlocal calls
        calls += 1
        return data.upper()

    @contextlib.asynccontextmanager
    async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
        subscription = RequestSubscription("test", "lambdabus.rpc.test.echo", "echo", "echo")
        serve_requests(ctx, subscription, handler=echo)
        yield

    stops = [asyncio.Event(), asyncio.Event()]
    readies: list[asyncio.Future[str]] = [asyncio.get_running_loop().create_future() for _ in stops]
    tasks = [
        asyncio.create_task(
            serve(
                "echo",
                ServiceSettings(nats=nats_settings),
                setup,
                stop=stop,
                on_ready=ready.set_result,
            )
        )
        for stop, ready in zip(stops, readies, strict=True)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*readies), 30)
        for n in range(10):
            assert await bus.request("lambdabus.rpc.test.echo", f"hi{n}".encode()) == (
                f"HI{n}".encode()
            )
        assert calls == 10
    finally:
        for stop in stops:
            stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def test_logs_stream_keeps_at_most_logs_max_bytes(nats_settings: NatsSettings) -> None:
    """A function flooding its logs cannot fill the disk: past `logs_max_bytes` the LOGS
    stream drops its oldest lines and keeps taking new ones."""
    small = nats_settings.model_copy(update={"logs_max_bytes": 64 * 1024})
    subject = "lambdabus.logs.runtime.flood.test"
    line = b"x" * 1024
    async with Bus.connect(small, name="flood") as bus:
        await bus.declare()
        try:
            sequences = [await bus.publish(subject, line) for _ in range(300)]
            kept = await bus.count("LOGS", subject)
            assert 0 < kept < 64, kept
            assert await bus.get_message("LOGS", sequences[0]) is None  # the oldest went first
            newest = await bus.get_message("LOGS", sequences[-1])
            assert newest is not None
            assert newest.data == line
        finally:
            async with Bus.connect(nats_settings, name="restore") as restore:
                await restore.declare()  # the other tests share this server


async def test_closing_the_bus_logs_no_disconnect_warning(
    nats_settings: NatsSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """`lambdabus up` printed "nats disconnected" at every start: its own close of the
    connection that declared the streams."""
    caplog.set_level(logging.INFO, logger="lambdabus_platform.bus")
    async with Bus.connect(nats_settings, name="quiet") as bus:
        assert bus.connected
    await asyncio.sleep(0.1)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
