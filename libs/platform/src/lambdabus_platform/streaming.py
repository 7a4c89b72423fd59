"""Helpers for long-lived HTTP streams (SSE, NDJSON follow)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def with_keepalive(
    source: AsyncIterator[T], every: float, stopping: asyncio.Event
) -> AsyncIterator[T | None]:
    """Yield from `source`, and None whenever `every` seconds pass without an item; end when
    `stopping` is set, so that open streams never hold up a shutdown."""
    pending = asyncio.ensure_future(anext(source))
    stop = asyncio.ensure_future(stopping.wait())
    try:
        while True:
            done, _ = await asyncio.wait(
                {pending, stop}, timeout=every, return_when=asyncio.FIRST_COMPLETED
            )
            if stop in done:
                return
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(source))
    finally:
        pending.cancel()
        stop.cancel()
