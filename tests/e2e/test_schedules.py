"""Schedules across replicas: two routers (`python -m lambdabus_router`, each its own process)
against one nats-server fire an `@every 2s` schedule; over 10 s every tick reaches the function
exactly once. Then both routers stop for a while and one starts again: the ticks missed in
between fire once (the newest of them), not once per miss."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web

from lambdabus_events.models import (
    DeliveryPolicy,
    DeploymentState,
    FunctionConfig,
    FunctionRecord,
    ScheduleRecord,
    SourceRef,
)
from lambdabus_platform.bus import Bus
from lambdabus_platform.natsserver import NatsServer
from lambdabus_platform.registry import Registry
from lambdabus_platform.subjects import DEPLOYMENTS_BUCKET, FUNCTIONS_BUCKET, SCHEDULES_BUCKET
from tests.e2e.test_delivery_crash import RouterProcess

WINDOW = 10.0


@dataclass
class Ticks:
    url: str = ""
    times: list[datetime] = field(default_factory=list)
    ids: Counter[str] = field(default_factory=Counter)
    headers: list[dict[str, str]] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def until(self, count: int, timeout: float) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(self.times) >= count), timeout)


@contextlib.asynccontextmanager
async def tick_sink() -> AsyncIterator[Ticks]:
    ticks = Ticks()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        async with ticks.changed:
            ticks.headers.append(dict(request.headers))
            ticks.ids[request.headers["ce-id"]] += 1
            ticks.times.append(datetime.fromisoformat(request.headers["ce-time"]))
            ticks.changed.notify_all()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    ticks.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield ticks
    finally:
        await runner.cleanup()


async def register(bus: Bus, namespace: str, endpoint: str) -> None:
    now = datetime.now(UTC)
    function = FunctionRecord(
        namespace=namespace,
        name="cron",
        uid="uid-cron",
        generation=1,
        spec=FunctionConfig(),
        source=SourceRef(
            sha256="0" * 64, size=1, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=now,
        updated_at=now,
    )
    await Registry(bus.kv(FUNCTIONS_BUCKET), FunctionRecord).put(namespace, "cron", function)
    state = DeploymentState(
        namespace=namespace,
        name="cron",
        uid="uid-cron",
        generation=1,
        phase="ready",
        replicas=1,
        ready_replicas=1,
        endpoints=[endpoint],
        updated_at=now,
    )
    await Registry(bus.kv(DEPLOYMENTS_BUCKET), DeploymentState).put(namespace, "cron", state)
    schedule = ScheduleRecord(
        namespace=namespace,
        name="every-2s",
        uid=str(uuid.uuid4()),
        function="cron",
        cron="@every 2s",
        timezone="UTC",
        data={"job": "tick"},
        delivery=DeliveryPolicy(retries=5, backoff_delay=0.2, timeout=2),
        created_at=now,
    )
    await Registry(bus.kv(SCHEDULES_BUCKET), ScheduleRecord).put(namespace, "every-2s", schedule)


@pytest.mark.e2e
@pytest.mark.timeout(150)
async def test_every_2s_fires_each_tick_once_with_two_routers(
    nats_server: NatsServer, bus: Bus
) -> None:
    namespace = f"s{uuid.uuid4().hex[:10]}"
    routers = [RouterProcess(nats_server), RouterProcess(nats_server)]
    async with tick_sink() as sink:
        await asyncio.gather(*(r.start() for r in routers))
        try:
            await register(bus, namespace, sink.url)
            await sink.until(1, 30)
            first = len(sink.times)
            await asyncio.sleep(WINDOW)  # the window observed; the routers fire meanwhile
            window = sink.times[first - 1 :]

            # Exactly once per tick: consecutive even seconds, none twice, none skipped.
            assert len(window) >= WINDOW / 2 - 1, window
            assert len(set(window)) == len(window), f"a tick was delivered twice: {window}"
            steps = {b - a for a, b in itertools.pairwise(window)}
            assert steps == {timedelta(seconds=2)}, window
            assert all(t.second % 2 == 0 and t.microsecond == 0 for t in window)
            assert set(sink.ids.values()) == {1}
            one = sink.headers[0]
            assert one["ce-type"] == "io.lambdabus.schedule.fired"
            assert one["ce-subject"] == f"{namespace}/every-2s"
            assert one["ce-time"].endswith("Z")

            # Downtime: no router for > 3 ticks; the one that comes back fires the newest
            # missed tick once, then goes on with the next ones. A tick fired just before the
            # stop may reach the sink only after the restart (it is in the stream: delivered at
            # least once): the ticks due after the stop are the ones to look at.
            await asyncio.gather(*(r.stop() for r in routers))
            stopped = datetime.now(UTC)
            await asyncio.sleep(7)
            restarting = datetime.now(UTC)
            await routers[0].start()

            def due_after_the_stop() -> list[datetime]:
                return [t for t in sink.times if t > stopped]

            async with sink.changed:
                await asyncio.wait_for(
                    sink.changed.wait_for(lambda: len(due_after_the_stop()) >= 2), 30
                )
            after = due_after_the_stop()
            # misses not replayed: the first is the newest tick due by the restart
            assert after[0] >= restarting - timedelta(seconds=2), (stopped, restarting, after)
            assert after[1] - after[0] <= timedelta(seconds=2), after
            assert len(set(sink.times)) == len(sink.times), sink.times
            assert set(sink.ids.values()) == {1}
        finally:
            await asyncio.gather(*(r.stop() for r in routers))
    print(
        f"\n@every 2s, two routers, {WINDOW:.0f} s: {len(window)} ticks delivered, each once; "
        f"after {restarting - stopped} without a router: one catch-up tick at {after[0]:%H:%M:%S}"
    )
