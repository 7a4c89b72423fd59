"""The loop that reads one durable consumer: fetch, hand each message to a handler task, at
most `limit` at a time; stop fetching on request and let the tasks in flight finish.

Used by every trigger (one consumer each) and by the asynchronous invocations. A handler that
raises gets its message sent back after a second (nak), so a bug never loses an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from lambdabus_platform.bus import Bus, PulledMessage
from lambdabus_platform.errors import LambdabusError, NotFound

log = logging.getLogger("lambdabus.router.consumer")

Handler = Callable[[PulledMessage], Awaitable[None]]

_RETRY_SECONDS = 1.0


def cancelled() -> bool:
    """Whether the running task was asked to stop. nats-py swallows a CancelledError that
    arrives while it flushes a publish, so loops that publish check this too."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class ConsumerLoop:
    """Reads `stream`/`name` and runs `handle` on each message.

    `ensure` declares the consumer (called first, and again when it turns out missing).
    `ready`/`until_ready`, when given, pause fetching while `ready()` is False: messages stay
    stored, undelivered, until the handler can do something with them.
    """

    def __init__(
        self,
        bus: Bus,
        stream: str,
        name: str,
        handle: Handler,
        *,
        limit: int,
        ensure: Callable[[], Awaitable[None]],
        expires: float = 5.0,
        ready: Callable[[], bool] | None = None,
        until_ready: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self._bus = bus
        self._stream = stream
        self._handle = handle
        self._limit = limit
        self._ensure = ensure
        self._expires = expires
        self._ready = ready
        self._until_ready = until_ready
        self._tasks: set[asyncio.Task[None]] = set()
        self._freed = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name=f"consumer:{self.name}")

    def stop_fetching(self) -> None:
        self._stopped = True
        if self._runner is not None:
            self._runner.cancel()

    def _stopping(self) -> bool:
        return self._stopped or cancelled()

    async def stop(self, grace: float) -> None:
        """Stop fetching, give the handlers in flight `grace` seconds, then cancel the rest
        (their messages go back to the stream)."""
        self.stop_fetching()
        runner, self._runner = self._runner, None
        if runner is not None:
            # `wait`, not `await runner`: a cancellation of the caller must not be mistaken
            # for the runner's own, and swallowed.
            await asyncio.wait({runner}, timeout=self._expires + 1)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        left = set(self._tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)

    async def _run(self) -> None:
        delay = _RETRY_SECONDS
        while not self._stopping():
            try:
                await self._ensure()
                async with self._bus.pull(self._stream, self.name, expires=self._expires) as pull:
                    delay = _RETRY_SECONDS
                    while not self._stopping():
                        if self._ready is not None and not self._ready():
                            # Whatever open requests still bring is handed on (the handler
                            # sends it back for later); then wait for readiness.
                            for message in pull.take_queued():
                                self._spawn(message)
                            await self._wait_ready()
                            continue
                        while len(self._tasks) >= self._limit:
                            self._freed.clear()
                            await self._freed.wait()
                        try:
                            batch = await pull.fetch(
                                self._limit - len(self._tasks), timeout=self._expires
                            )
                        except NotFound:
                            log.info(
                                "consumer missing; declaring it again",
                                extra={"consumer": self.name},
                            )
                            break
                        for message in batch:
                            self._spawn(message)
                if self._stopping():
                    return
            except asyncio.CancelledError:
                raise
            except (LambdabusError, OSError) as exc:
                log.warning(
                    "consumer loop failed; retrying",
                    extra={"consumer": self.name, "error": str(exc), "retry_in": delay},
                )
            except Exception:
                log.exception("consumer loop failed; retrying", extra={"consumer": self.name})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _wait_ready(self) -> None:
        if self._until_ready is None:
            await asyncio.sleep(self._expires)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._until_ready(), self._expires)

    def _spawn(self, message: PulledMessage) -> None:
        task = asyncio.create_task(self._one(message))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._freed.set()

    async def _one(self, message: PulledMessage) -> None:
        try:
            await self._handle(message)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await message.nak()
            raise
        except Exception:
            log.exception(
                "handling a message failed; it comes again",
                extra={"consumer": self.name, "stream_seq": message.stream_seq},
            )
            with contextlib.suppress(Exception):
                await message.nak(_RETRY_SECONDS)
