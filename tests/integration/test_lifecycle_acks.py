"""FastStream lifecycle subscribers ack explicitly, against a real nats-server: a handler that
fails has its event delivered again (after a back-off), one that keeps failing has it terminated
after its last delivery, and a malformed message is terminated at once."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from lambdabus_events.catalog import LifecycleEvent, TriggerCreated, TriggerData, lifecycle_event
from lambdabus_platform.bus import Bus
from lambdabus_platform.service import (
    LifecycleSubscription,
    ServiceContext,
    redelivery_delay,
    serve,
    subscribe_lifecycle,
)
from lambdabus_platform.settings import NatsSettings, ServiceSettings
from lambdabus_platform.subjects import lifecycle_filter

TYPE = "io.lambdabus.trigger.created"


def trigger_created(namespace: str, name: str) -> LifecycleEvent:
    data = TriggerData(namespace=namespace, name=name, function="f", filter={"type": "x"})
    return lifecycle_event(
        TriggerCreated, data, service="gateway", subject=f"{namespace}/{name}", key=name
    )


@contextlib.asynccontextmanager
async def subscriber(
    nats_settings: NatsSettings,
    namespace: str,
    durable: str,
    handler: Callable[[LifecycleEvent], Awaitable[None]],
    *,
    max_deliveries: int = 10,
) -> AsyncIterator[None]:
    """A service whose one FastStream subscriber runs `handler` on this namespace's events."""

    @contextlib.asynccontextmanager
    async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
        subscription = LifecycleSubscription(
            "acks", durable, lifecycle_filter(TYPE, namespace), "the test's subscriber"
        )
        subscribe_lifecycle(ctx, subscription, handler=handler, max_deliveries=max_deliveries)
        yield

    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    settings = ServiceSettings(nats=nats_settings, port=0)
    task = asyncio.create_task(serve("acks", settings, setup, stop=stop, on_ready=ready.set_result))
    try:
        await asyncio.wait_for(asyncio.shield(ready), 30)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_redelivery_backs_off() -> None:
    assert [redelivery_delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert redelivery_delay(30) == 60.0


async def test_a_failing_handler_gets_its_event_again(
    bus: Bus, nats_settings: NatsSettings
) -> None:
    namespace, durable = f"acks{uuid.uuid4().hex[:8]}", f"acks_{uuid.uuid4().hex[:8]}"
    seen: list[str] = []

    async def flaky(event: LifecycleEvent) -> None:
        seen.append(event.id)
        if len(seen) == 1:
            raise RuntimeError("the first delivery fails")

    event = trigger_created(namespace, "t1")
    async with subscriber(nats_settings, namespace, durable, flaky):
        await bus.publish_lifecycle(event)

        async def handled() -> bool:
            state = await bus.consumer_state("LIFECYCLE", durable)
            return len(seen) >= 2 and state is not None and state.idle

        await until(handled)
        state = await bus.consumer_state("LIFECYCLE", durable)
        assert state is not None
        assert state.redelivered == 0
        assert seen == [event.id, event.id]
    await bus.delete_consumer("LIFECYCLE", durable)


async def test_a_handler_that_keeps_failing_has_its_event_terminated(
    bus: Bus, nats_settings: NatsSettings, caplog: pytest.LogCaptureFixture
) -> None:
    namespace, durable = f"acks{uuid.uuid4().hex[:8]}", f"acks_{uuid.uuid4().hex[:8]}"
    calls = 0

    async def broken(event: LifecycleEvent) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("always fails")

    async with subscriber(nats_settings, namespace, durable, broken, max_deliveries=2):
        await bus.publish_lifecycle(trigger_created(namespace, "t2"))

        async def terminated() -> bool:
            state = await bus.consumer_state("LIFECYCLE", durable)
            return calls >= 2 and state is not None and state.idle

        await until(terminated)
        # Terminated: JetStream holds nothing for it any more, pending or awaiting an ack.
        assert calls == 2
    assert any(
        "terminating a lifecycle event after its last delivery" in r.getMessage()
        for r in caplog.records
    )
    await bus.delete_consumer("LIFECYCLE", durable)


async def test_a_malformed_message_is_terminated_without_a_handler_call(
    bus: Bus, nats_settings: NatsSettings
) -> None:
    namespace, durable = f"acks{uuid.uuid4().hex[:8]}", f"acks_{uuid.uuid4().hex[:8]}"
    calls = 0

    async def handler(event: LifecycleEvent) -> None:
        nonlocal calls
        calls += 1

    async with subscriber(nats_settings, namespace, durable, handler):
        subject = f"lambdabus.lifecycle.trigger.created.{namespace}.bad"
        await bus.publish(subject, b'{"not": "a cloudevent"}')
        await bus.publish_lifecycle(trigger_created(namespace, "good"))

        async def done() -> bool:
            state = await bus.consumer_state("LIFECYCLE", durable)
            return calls >= 1 and state is not None and state.idle and state.delivered >= 2

        await until(done)
        state = await bus.consumer_state("LIFECYCLE", durable)
        assert state is not None
        assert state.delivered == 2
        assert calls == 1
    await bus.delete_consumer("LIFECYCLE", durable)
