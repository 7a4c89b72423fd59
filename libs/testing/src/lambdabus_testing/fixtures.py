"""pytest fixtures: a real nats-server per test session (JetStream, temp store, ephemeral port,
no anonymous access: every platform user has its key) and a connected, declared `Bus` per test.

`nats_settings` connects as `admin` (tests act as several services at once); `nats_server`
gives any user's settings (`nats_server.settings("builder")`) for tests of the permissions.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from lambdabus_platform.bus import Bus
from lambdabus_platform.natsserver import NatsServer, run_nats_server
from lambdabus_platform.settings import NatsSettings


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server for the session, run on its own event loop in a thread so that every
    test's loop can use it."""
    store = tmp_path_factory.mktemp("nats")
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()
    box: dict[str, object] = {}

    async def _serve() -> None:
        try:
            async with run_nats_server(Path(store), log_path=Path(store) / "server.log") as server:
                box["server"] = server
                started.set()
                await stop.wait()
        except BaseException as exc:  # surfaced to the fixture below
            box["error"] = exc
            started.set()

    thread = threading.Thread(target=loop.run_until_complete, args=(_serve(),), daemon=True)
    thread.start()
    if not started.wait(30):
        raise RuntimeError("nats-server did not start within 30 s")
    if "error" in box:
        raise RuntimeError(f"nats-server failed: {box['error']}")
    server = box["server"]
    assert isinstance(server, NatsServer)
    yield server
    loop.call_soon_threadsafe(stop.set)
    thread.join(15)
    loop.close()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture
def nats_settings(nats_server: NatsServer) -> NatsSettings:
    """The test's own connection: the `admin` user, allowed everything."""
    return nats_server.settings()


@pytest.fixture
async def bus(nats_settings: NatsSettings) -> AsyncIterator[Bus]:
    async with Bus.connect(nats_settings, name="test") as connected:
        await connected.declare()
        yield connected
