"""This router's share of every function's call statistics (`lambdabus_platform.callstats`),
written to the `function-metrics` KV bucket every `stats_publish_seconds` under
`<ns>.<function>.<router id>`, for the gateway to add up across replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from lambdabus_platform.bus import Kv
from lambdabus_platform.callstats import RouterStats, prune, record
from lambdabus_platform.subjects import function_key

log = logging.getLogger("lambdabus.router.stats")

FunctionId = tuple[str, str]


class CallStats:
    def __init__(
        self,
        kv: Kv,
        *,
        interval: float,
        router_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._kv = kv
        self._interval = interval
        self.router_id = router_id or f"r{uuid.uuid4().hex[:12]}"
        self._clock = clock
        self._stats: dict[FunctionId, RouterStats] = {}
        self._dirty: set[FunctionId] = set()

    def observe(self, fid: FunctionId, status: int, seconds: float, *, cold: bool) -> None:
        """Count one call of `fid` (on the request path: memory only)."""
        stats = self._stats.get(fid)
        if stats is None:
            stats = self._stats[fid] = RouterStats()
        record(stats, self._clock(), status, seconds, cold=cold)
        self._dirty.add(fid)

    def forget(self, fid: FunctionId) -> None:
        self._stats.pop(fid, None)
        self._dirty.discard(fid)

    async def publish(self) -> int:
        """Write the statistics of every function called since the last time; how many."""
        dirty, self._dirty = self._dirty, set()
        now = self._clock()
        for fid in dirty:
            stats = self._stats.get(fid)
            if stats is None:
                continue
            prune(stats, now)
            key = f"{function_key(*fid)}.{self.router_id}"
            try:
                await self._kv.put(key, stats.model_dump_json().encode())
            except Exception:
                self._dirty.add(fid)  # next time
                raise
        return len(dirty)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CallStats]:
        async def loop() -> None:
            while True:
                await asyncio.sleep(self._interval)
                try:
                    await self.publish()
                except Exception as exc:
                    log.warning("could not publish call statistics", extra={"error": str(exc)})

        task = asyncio.create_task(loop(), name="stats:publish")
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.wait({task})
            with contextlib.suppress(Exception):
                await self.publish()
