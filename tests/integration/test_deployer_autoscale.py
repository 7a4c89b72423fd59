"""The deployer leader's autoscaler against the session's nats-server and real instances: load
samples written as a router writes them scale a function up (panic past 2x capacity, never
above max), no request for idle_seconds scales it to zero, a wake request brings one back, and
each change is one `deployment.scaled` with from, to and reason. A new leader goes on from the
count the last one left."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from lambdabus_events.catalog import DeploymentScaled, DeploymentScaledData, parse_lifecycle
from lambdabus_events.models import DeploymentState, ScaleSpec
from lambdabus_platform.bus import Bus
from lambdabus_platform.load import LoadSample
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.subjects import FUNCTION_LOAD_BUCKET, lifecycle_filter, wake_subject
from tests.integration.test_deployer import PROBE, World, running_deployer


@pytest.fixture
async def world(tmp_path: Path, nats_settings: NatsSettings, bus: Bus) -> AsyncIterator[World]:
    async with aiohttp.ClientSession() as http:
        yield World(bus=bus, tmp=tmp_path, nats=nats_settings, http=http)


@contextlib.asynccontextmanager
async def load(world: World, name: str, concurrency: float) -> AsyncIterator[None]:
    """A router's samples for the function, every 0.2 s, for the block."""

    async def feed() -> None:
        while True:
            sample = LoadSample(concurrency=concurrency, requests=5, at=time.time(), period=0.2)
            await world.bus.kv(FUNCTION_LOAD_BUCKET).put(
                f"{world.ns}.{name}.rtest", sample.model_dump_json().encode()
            )
            await asyncio.sleep(0.2)

    task = asyncio.create_task(feed())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait({task})
        # As a router does once its load stopped: one zero sample.
        sample = LoadSample(concurrency=0, requests=0, at=time.time(), period=0.2)
        await world.bus.kv(FUNCTION_LOAD_BUCKET).put(
            f"{world.ns}.{name}.rtest", sample.model_dump_json().encode()
        )


async def scaled_events(
    world: World, name: str, until: Callable[[DeploymentScaledData], bool]
) -> list[DeploymentScaled]:
    """The function's deployment.scaled events from the start, up to the first `until` holds
    for."""
    events: list[DeploymentScaled] = []
    replay = world.bus.replay(
        "LIFECYCLE",
        lifecycle_filter("io.lambdabus.deployment.scaled", world.ns, name),
        deliver_all=True,
    )
    async with asyncio.timeout(20), contextlib.aclosing(replay) as messages:  # type: ignore[type-var]
        async for message in messages:
            event = parse_lifecycle(message.data)
            assert isinstance(event, DeploymentScaled)
            events.append(event)
            if until(event.data):
                return events
    raise AssertionError("the replay ended")


def serving(count: int) -> object:
    def check(state: DeploymentState | None) -> bool:
        return state is not None and state.replicas == count and len(state.endpoints) == count

    return check


@contextlib.asynccontextmanager
async def steps(budget: float) -> AsyncIterator[Callable[[str], None]]:
    """Name the test's steps as they start: a test over `budget` seconds fails saying which step
    it was in and how long each took (pytest-timeout's own failure names no step)."""
    began = time.monotonic()
    taken: list[tuple[str, float]] = [("start", 0.0)]
    try:
        async with asyncio.timeout(budget):
            yield lambda name: taken.append((name, time.monotonic() - began))
    except TimeoutError:
        said = ", ".join(f"{name} at {at:.1f} s" for name, at in taken)
        raise AssertionError(f"over {budget} s, in step {taken[-1][0]!r} ({said})") from None


async def test_load_scales_up_idle_scales_to_zero_and_a_wake_brings_one_back(world: World) -> None:
    settings = world.settings(
        autoscale_tick_seconds=0.2,
        autoscale_stable_window_seconds=6,
        autoscale_panic_window_seconds=1,
    )
    async with steps(50) as step, running_deployer(settings):
        # Under load from the start (3 instances' worth, 2.5x one's capacity): it starts with
        # `replicas` (1), and grows.
        step("create under load")
        async with load(world, "auto", 25.0):
            await world.create(
                "auto", PROBE, scale=ScaleSpec(min=0, max=3, target=10, idle_seconds=2)
            )
            step("up to 3")
            await world.wait_state("auto", serving(3))  # type: ignore[arg-type]
        # No request since: 0 instances after idle_seconds.
        step("down to 0")
        await world.wait_state("auto", serving(0))  # type: ignore[arg-type]
        step("scaled events")
        events = [e.data for e in await scaled_events(world, "auto", lambda d: d.to_replicas == 0)]
        # Up in panic (the 1 s panic window fills within a few ticks: 1 -> 2 -> 3 or 1 -> 3),
        # never above max, then down to 0 once idle.
        ups, down = events[:-1], events[-1]
        assert (ups[0].from_replicas, ups[0].reason) == (1, "Panic")
        assert max(e.to_replicas or 0 for e in ups) == 3
        assert all(e.to_replicas is not None and e.to_replicas <= 3 for e in ups)
        # (On a loaded machine the stable window can pass before idle_seconds does: a step
        # down to 1, Held, may come first.)
        assert (down.to_replicas, down.reason) == (0, "Idle"), [e.message for e in events]
        assert "no request for" in down.message
        # A router holding a request wakes it (and its request, in flight, keeps it awake).
        step("woken")
        started = time.monotonic()
        await world.bus.publish_nowait(wake_subject(world.ns, "auto"), b"")
        woken = (await scaled_events(world, "auto", lambda d: d.from_replicas == 0))[-1].data
        assert (woken.from_replicas, woken.to_replicas, woken.reason) == (0, 1, "Woken")
        step("serving 1")
        async with load(world, "auto", 1.0):
            state = await world.wait_state("auto", serving(1))  # type: ignore[arg-type]
        assert state is not None
        print(f"\nwoken: an endpoint {time.monotonic() - started:.2f} s after the wake request")
        step("called")
        assert await world.call(state.endpoints[0])
        step("the deployer stops")


async def test_a_new_leader_goes_on_from_the_count_the_last_one_left(world: World) -> None:
    settings = world.settings(autoscale_tick_seconds=0.2, autoscale_stable_window_seconds=60)
    async with running_deployer(settings):
        await world.create("kept", PROBE, scale=ScaleSpec(min=0, max=3, idle_seconds=600))
        await world.wait_state("kept", serving(1))  # type: ignore[arg-type]
        async with load(world, "kept", 30.0):
            await world.wait_state("kept", serving(3))  # type: ignore[arg-type]
    # A new deployer (the instances were stopped with the last one): it starts 3 again, not
    # the spec's replicas (1).
    async with running_deployer(settings):
        state = await world.wait_state("kept", lambda s: s is not None and len(s.endpoints) > 0)
        assert state is not None
        assert state.replicas == 3
