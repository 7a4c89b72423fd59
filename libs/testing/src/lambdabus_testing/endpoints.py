"""Talking HTTP to an instance endpoint as the deployer records it: `http://host:port` or
`unix:/abs/path` (an instance in its own network namespace, reached through its socket)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp

UNIX = "unix:"


def base_url(endpoint: str) -> str:
    """The URL to put paths after, for a session from `endpoint_session`."""
    return "http://localhost" if endpoint.startswith(UNIX) else endpoint.rstrip("/")


def connector(endpoint: str, *, limit: int = 100) -> aiohttp.BaseConnector:
    if endpoint.startswith(UNIX):
        return aiohttp.UnixConnector(path=endpoint.removeprefix(UNIX), limit=limit)
    return aiohttp.TCPConnector(limit=limit)


@contextlib.asynccontextmanager
async def endpoint_session(
    endpoint: str, *, limit: int = 100
) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """A client session that reaches `endpoint`, and the base URL to request."""
    async with aiohttp.ClientSession(connector=connector(endpoint, limit=limit)) as http:
        yield http, base_url(endpoint)
