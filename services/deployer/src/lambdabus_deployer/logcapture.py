"""Capture of an instance's stdout and stderr as runtime log lines.

The pipes are always read, whatever the function writes, so it never waits long on a full pipe
(at most `THROTTLE` seconds, while it writes more lines than it may). Lines longer than the
limit are cut (and say so); beyond the per-instance rate, or when the sink refuses them (the
log store is behind), the lines are counted, not published, and one `system` line a second says
how many were dropped and why. The last lines are kept in memory for the message of a crashed
instance.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal, Protocol

from lambdabus_deployer.backend import LogSink
from lambdabus_deployer.plan import DesiredRevision
from lambdabus_events.models import LogLine

CHUNK = 64 * 1024
# Seconds a pipe is left to fill between reads while its lines are dropped anyway (see `pump`).
THROTTLE = 0.05
TAIL_LINES = 50
TAIL_BYTES = 1024

Stream = Literal["stdout", "stderr", "system"]


class Readable(Protocol):
    """What `pump` reads: a pipe (`asyncio.StreamReader`) or a followed log file."""

    async def read(self, n: int = -1) -> bytes: ...


class LineBudget:
    """At most `rate` lines in each one-second window; the rest are counted as dropped."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._window = float("-inf")
        self._used = 0
        self.dropped = 0

    def take(self, now: float, lines: int = 1) -> int:
        """How many of `lines` may be published now (the first ones)."""
        if now - self._window >= 1.0:
            self._window, self._used = now, 0
        admitted = max(0, min(lines, self.rate - self._used))
        self._used += admitted
        self.dropped += lines - admitted
        return admitted

    def spent(self, now: float) -> bool:
        """Whether every further line of the current window is dropped."""
        return now - self._window < 1.0 and self._used >= self.rate

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped


_LISTENING = b'{"event": "listening"'


def split_listening(raw: bytes) -> tuple[bytes, int | str] | None:
    """The runtime's `{"event": "listening", "port": N}` (or `"socket": PATH`) announcement at
    the end of a line: (what came before it on that line, the port or the socket), else None.

    The announcement is one write, but a thread of the function may be printing at the same
    moment: `print` writes its text and its newline separately, so the announcement can land
    between them, after the function's unfinished line. That text is the function's output."""
    at = raw.rfind(_LISTENING)
    if at < 0:
        return None
    try:
        message = json.loads(raw[at:])
    except ValueError:
        return None
    if not isinstance(message, dict) or message.get("event") != "listening":
        return None
    socket = message.get("socket")
    if isinstance(socket, str) and socket.startswith("/"):
        return raw[:at], socket
    port = message.get("port")
    if not isinstance(port, int) or not 0 < port < 65536:
        return None
    return raw[:at], port


def listening_port(raw: bytes) -> int | str | None:
    """The port (or socket) of a line that is the runtime's listening announcement, else None."""
    found = split_listening(raw)
    return found[1] if found is not None and not found[0] else None


class InstanceLog:
    """The log of one instance (across its restarts): publishing, rate, tail."""

    def __init__(
        self,
        *,
        instance: str,
        revision: DesiredRevision,
        sink: LogSink,
        max_bytes: int,
        rate: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instance = instance
        self._rev = revision
        self._sink = sink
        self._max = max_bytes
        self._budget = LineBudget(rate)
        self._refused = 0  # lines the sink dropped: the log store was behind
        self._clock = clock
        self.tail: deque[bytes] = deque(maxlen=TAIL_LINES)

    def tail_text(self) -> list[str]:
        return [_decode(split_invocation(raw)[1]) for raw in self.tail]

    async def emit(self, stream: Stream, text: str, invocation: str | None = None) -> None:
        rev = self._rev
        line = LogLine(
            ts=datetime.now(UTC),
            kind="runtime",
            namespace=rev.namespace,
            name=rev.name,
            uid=rev.uid,
            generation=rev.generation,
            stream=stream,
            instance=self.instance,
            line=text,
            invocation=invocation,
        )
        if await self._sink(line) is False:
            self._refused += 1

    async def system(self, text: str) -> None:
        await self.emit("system", text)

    async def flush_dropped(self) -> None:
        dropped = self._budget.take_dropped()
        if dropped:
            await self.system(
                f"dropped {dropped} lines: more than {self._budget.rate} lines a second"
            )
        refused, self._refused = self._refused, 0
        if refused:
            await self.system(f"dropped {refused} lines: the log store is not keeping up")

    async def report_drops(self, interval: float = 1.0) -> None:
        """Say once a second how many lines were dropped; runs while the instance runs."""
        while True:
            await asyncio.sleep(interval)
            await self.flush_dropped()

    async def pump(
        self,
        reader: Readable,
        stream: Literal["stdout", "stderr"],
        listening: asyncio.Future[int | str] | None = None,
    ) -> None:
        """Read a pipe to its end, publishing its lines.

        Past the rate, reading a flood as it comes (a few lines per wake-up, to drop them)
        would cost the deployer a whole core: then the pipe is left to fill for `THROTTLE`
        seconds between reads, and the function's writes wait for at most that long."""
        partial = b""
        carried = 0  # bytes cut from the line in `partial`
        while chunk := await reader.read(CHUNK):
            data = partial + chunk
            lines = data.split(b"\n")
            rest = lines.pop()
            first_extra, carried = (carried, 0) if lines else (0, carried)
            if len(rest) > self._max:
                carried += len(rest) - self._max
                rest = rest[: self._max]
            partial = rest
            if lines:
                awaited = listening is not None and not listening.done() and b"listening" in data
                await self._lines(lines, stream, listening if awaited else None, first_extra)
            if len(chunk) < CHUNK and self._budget.spent(self._clock()):
                await asyncio.sleep(THROTTLE)
        if partial or carried:
            await self._lines([partial], stream, listening, carried)

    async def _lines(
        self,
        lines: list[bytes],
        stream: Literal["stdout", "stderr"],
        listening: asyncio.Future[int | str] | None,
        first_extra: int,
    ) -> None:
        if listening is not None and not listening.done():
            for index, raw in enumerate(lines):
                found = split_listening(raw)
                if found is not None:
                    before, port = found
                    listening.set_result(port)
                    if before:
                        lines[index] = before
                    else:
                        del lines[index]
                        if index == 0:
                            first_extra = 0
                    break
        if not lines:
            return
        self.tail.extend(raw[:TAIL_BYTES] for raw in lines[-TAIL_LINES:])
        admitted = self._budget.take(self._clock(), len(lines))
        for index in range(admitted):
            raw = lines[index]
            extra = (first_extra if index == 0 else 0) + max(0, len(raw) - self._max)
            invocation, raw = split_invocation(raw)
            text = _decode(raw[: self._max])
            if extra:
                text += f" … [truncated: {extra} more bytes; lines are cut at {self._max} bytes]"
            await self.emit(stream, text, invocation)


_MARK, _END = b"\x1e", b"\x1f"
_INVOCATION = re.compile(rb"^[A-Za-z0-9._:/@+=-]{1,128}$")


def split_invocation(raw: bytes) -> tuple[str | None, bytes]:
    """The invocation id the runtime put before a line (`\\x1e<id>\\x1f<line>`, see
    `lambdabus_runtime.capture`) and the line without it; (None, raw) for an untagged line."""
    if not raw.startswith(_MARK):
        return None, raw
    end = raw.find(_END, 1, 131)
    if end < 0 or _INVOCATION.fullmatch(raw[1:end]) is None:
        return None, raw
    return raw[1:end].decode("ascii"), raw[end + 1 :]


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").rstrip("\r")
