"""A gateway served in-process over real HTTP on an ephemeral port, against the session's
nats-server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from lambdabus_gateway.__main__ import make_setup
from lambdabus_gateway.settings import GatewaySettings
from lambdabus_platform.bus import Bus
from lambdabus_platform.service import serve
from lambdabus_platform.settings import NatsSettings, SecretsSettings
from lambdabus_platform.subjects import TOKENS_BUCKET
from lambdabus_platform.tokenstore import TokenStore

# One secrets key for every gateway of the session (they share the session's nats-server).
SESSION_SECRETS_KEY = base64.b64encode(secrets.token_bytes(32)).decode()


def secrets_settings() -> SecretsSettings:
    return SecretsSettings(key=SESSION_SECRETS_KEY)  # type: ignore[arg-type]


@dataclass
class RunningGateway:
    url: str
    http: aiohttp.ClientSession
    bus: Bus
    settings: GatewaySettings
    token: str  # an admin token for every namespace; `http` sends it


async def admin_token(bus: Bus, name: str = "test-admin") -> str:
    """A new admin token for every namespace, stored in the `tokens` bucket."""
    minted = await TokenStore(bus.kv(TOKENS_BUCKET)).create(name, "admin", ["*"])
    return minted.token


@contextlib.asynccontextmanager
async def running_gateway(settings: GatewaySettings, bus: Bus) -> AsyncIterator[RunningGateway]:
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task: asyncio.Future[None] = asyncio.create_task(
        serve(
            "gateway",
            settings,
            make_setup(settings),
            client_max_size=settings.max_upload_bytes + 1024**2,
            stop=stop,
            on_ready=ready.set_result,
        )
    )
    waiters: set[asyncio.Future[Any]] = {task, ready}
    done, _ = await asyncio.wait(waiters, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises what stopped it
    url = await asyncio.wait_for(ready, 1)
    token = await admin_token(bus)
    try:
        async with aiohttp.ClientSession(
            base_url=url, headers={"Authorization": f"Bearer {token}"}
        ) as http:
            yield RunningGateway(url, http, bus, settings, token)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@pytest.fixture
async def gateway(nats_settings: NatsSettings, bus: Bus) -> AsyncIterator[RunningGateway]:
    settings = GatewaySettings(port=0, nats=nats_settings, secrets=secrets_settings())
    async with running_gateway(settings, bus) as gw:
        yield gw
