"""Runtime log lines on their way to the LOGS stream, with flow control.

The NATS server stores a published line at a rate it cannot exceed (each write is synced to
disk). Lines published without waiting beyond that rate would queue inside the server without
bound, and every other JetStream request of the platform (state writes, lifecycle events, log
reads) would wait behind them. So at most `window` lines are in the server's hands without an
acknowledgement: lines go out as they come, and every `window`-th one waits for its ack, which
stands for those before it (the server handles one connection's messages in order). Lines that
come faster than the server stores them wait in a bounded queue; past it they are refused, and
the instance that wrote them says how many (`InstanceLog.flush_dropped`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator

from lambdabus_events.models import LogLine
from lambdabus_platform.bus import Bus
from lambdabus_platform.subjects import logs_subject

log = logging.getLogger("lambdabus.deployer.logship")


class LogShipper:
    def __init__(
        self, bus: Bus, *, window: int = 64, max_lines: int = 2_000, max_chars: int = 4 << 20
    ) -> None:
        self._bus = bus
        self._window = window
        self._max_lines = max_lines
        self._max_chars = max_chars
        self._queue: deque[LogLine] = deque()
        self._chars = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.lost = 0  # accepted, then not stored: NATS refused or did not answer

    def ship(self, line: LogLine) -> bool:
        """Queue a line; False when the queue is full and the line is dropped. A `system` line
        (the platform's own word on an instance: started, exited, lines dropped) has room
        beyond that: they are few and short, and they explain the rest."""
        size = len(line.line)
        if line.stream == "system":
            full = len(self._queue) >= 2 * self._max_lines
        else:
            full = len(self._queue) >= self._max_lines or self._chars + size > self._max_chars
        if full:
            return False
        self._queue.append(line)
        self._chars += size
        self._idle.clear()
        self._wake.set()
        return True

    async def publish(self, line: LogLine) -> bool:
        """`ship`, as the deployer's `LogSink`."""
        return self.ship(line)

    async def drain(self, timeout: float) -> None:
        """Wait (at most `timeout` seconds) until every queued line is sent."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def run(self) -> None:
        unacked = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                line = self._queue.popleft()
                self._chars -= len(line.line)
                subject = logs_subject("runtime", line.namespace, line.name)
                payload = line.model_dump_json().encode()
                try:
                    if unacked + 1 >= self._window:
                        unacked = 0
                        await self._bus.publish(subject, payload)
                    else:
                        unacked += 1
                        await self._bus.publish_nowait(subject, payload)
                except Exception as exc:
                    self._lose(exc)
            self._idle.set()

    def _lose(self, exc: Exception) -> None:
        self.lost += 1
        if self.lost in (1, 10, 100) or self.lost % 10_000 == 0:
            log.warning("runtime log lines lost", extra={"lost": self.lost, "error": repr(exc)})


@contextlib.asynccontextmanager
async def open_log_shipper(bus: Bus) -> AsyncIterator[LogShipper]:
    """A shipper for the deployer's lifetime; on the way out it sends what is queued (the last
    words of the instances stopped with the deployer) for a moment, then gives up."""
    shipper = LogShipper(bus)
    task = asyncio.create_task(shipper.run(), name="log shipper")
    try:
        yield shipper
    finally:
        await shipper.drain(2.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
