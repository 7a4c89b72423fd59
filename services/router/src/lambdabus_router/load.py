"""This router's load samples for the autoscaler (`lambdabus_platform.load`): requests in flight
per function (and per revision) sampled every `load_sample_seconds`, written every `load_publish_seconds` to the
`function-load` bucket under `<ns>.<fn>.<router id>`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable

from lambdabus_platform.bus import Kv
from lambdabus_platform.load import FunctionId, LoadWindow
from lambdabus_platform.subjects import function_key

log = logging.getLogger("lambdabus.router.load")


class LoadReporter:
    def __init__(
        self,
        kv: Kv,
        in_flight: Callable[[], Iterable[tuple[FunctionId, int]]],
        *,
        by_revision: Callable[[], Iterable[tuple[tuple[FunctionId, str], int]]] | None = None,
        sample: float,
        publish: float,
        router_id: str | None = None,
    ) -> None:
        self._kv = kv
        self._in_flight = in_flight
        self._by_revision = by_revision
        self._sample = sample
        self._publish = publish
        self.router_id = router_id or f"r{uuid.uuid4().hex[:12]}"
        self.window = LoadWindow()

    def arrived(self, fid: FunctionId) -> None:
        """A request for `fid` arrived (on the request path: one dict increment)."""
        self.window.arrived(fid)

    async def publish(self) -> int:
        samples = self.window.take(time.time(), self._publish)
        for fid, sample in samples.items():
            key = f"{function_key(*fid)}.{self.router_id}"
            await self._kv.put(key, sample.model_dump_json().encode())
        return len(samples)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LoadReporter]:
        async def loop() -> None:
            loop = asyncio.get_running_loop()
            next_publish = loop.time() + self._publish
            failing = False
            while True:
                await asyncio.sleep(self._sample)
                by_revision = self._by_revision() if self._by_revision is not None else ()
                self.window.sample(self._in_flight(), by_revision)
                if loop.time() < next_publish:
                    continue
                next_publish += self._publish
                try:
                    await self.publish()
                    failing = False
                except Exception as exc:
                    if not failing:
                        log.warning("could not publish load samples", extra={"error": str(exc)})
                    failing = True

        task = asyncio.create_task(loop(), name="load:publish")
        try:
            yield self
        finally:
            task.cancel()
            await asyncio.wait({task})
