"""The data plane's own HTTP/1.1 server: a raw asyncio protocol in front of aiohttp's.

Each connection starts here. A request on the common path — HTTP/1.1, a method with no special
framing, a plain `/{ns}/{name}[/...]` path of an existing function that needs no token, a
`Content-Length` body of at most `FAST_BODY_BYTES` — is parsed here and given to the router's
core (`Router.dispatch`) without aiohttp's request and response objects; its answer is written
as bytes. Anything else (HEAD, chunked or large bodies, `Expect`, `Upgrade`, HTTP/1.0, encoded or
dotted paths, protected or unknown functions, `/healthz`, `/metrics`, a malformed head) hands the
connection, with the bytes read so far, to aiohttp's protocol for the rest of its life: every
behaviour of the slow path stays aiohttp's.

Parsing is strict where leniency could desynchronise the connection or reach an instance with
what aiohttp's parser (llhttp) refuses (bare CR or LF, control bytes, raw non-ASCII in the
target, folded lines, a bad, repeated or overlong Content-Length, a head past `_MAX_HEAD`): such
a head goes to aiohttp, which refuses it. The read buffer is a `bytearray` and a head is parsed
once while its body comes in, so a request sent a byte at a time costs no quadratic copying.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import cast

from aiohttp.http_exceptions import HttpProcessingError

from lambdabus_router.proxy import Call, Reply, Router
from lambdabus_router.upstream import UpstreamError

log = logging.getLogger("lambdabus.router.front")

FAST_BODY_BYTES = 64 * 1024  # larger bodies take aiohttp's streaming reader
_MAX_HEAD = 8190  # aiohttp's own limit on a request line or header
# Control bytes other than HTAB (CR and LF are checked as pairs apart): llhttp refuses them in
# the target and in header values.
_CTL = bytes(c for c in range(32) if c not in b"\t\r\n") + b"\x7f"
_MAX_HEADERS = 128  # aiohttp's limit on the header lines of a request
_MAX_LENGTH_DIGITS = 18  # `int` refuses more than 4300 digits; any such length is too large
_PAUSE_BUFFER = 256 * 1024  # pipelined bytes waiting before reading pauses
_FAST_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_SLOW_HEADERS = frozenset({"transfer-encoding", "expect", "upgrade"})
_NO_BODY_STATUS = frozenset({204, 304})

ProtocolFactory = Callable[[], asyncio.Protocol]


class Front:
    """The protocol factory of the router's listening socket (`wrap` aiohttp's), and the set of
    its connections, for idle timeouts and shutdown."""

    def __init__(self, router: Router, *, keepalive: float = 75.0) -> None:
        self.router = router
        self.keepalive = keepalive
        # a larger body goes to aiohttp (which answers 413 past the router's limit)
        self.body_limit = min(FAST_BODY_BYTES, router.settings.max_body_bytes)
        self.fallback: ProtocolFactory | None = None
        self.connections: set[FrontConnection] = set()
        self._date = ""
        self._date_at = 0
        self._sweeper: asyncio.Task[None] | None = None

    def wrap(self, fallback: ProtocolFactory) -> ProtocolFactory:
        self.fallback = fallback
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return self._connection

    def _connection(self) -> asyncio.Protocol:
        return FrontConnection(self)

    def date(self) -> str:
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = formatdate(now, usegmt=True)
        return self._date

    async def _sweep(self) -> None:
        """Close connections idle for longer than `keepalive` (aiohttp's default: 75 s)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(1.0, self.keepalive / 4))
            oldest = loop.time() - self.keepalive
            for conn in [c for c in self.connections if not c.busy and c.idle_since < oldest]:
                conn.close()

    async def shutdown(self, timeout: float) -> None:
        """Close idle connections at once, and the others as they finish (within `timeout`)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self.connections):
            conn.closing = True
            if not conn.busy:
                conn.close()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(c.busy for c in self.connections):
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()


class FrontConnection(asyncio.Protocol):
    """One client connection while it stays on the fast path (one request at a time; pipelined
    requests wait in the buffer)."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.client: str | None = None
        self.busy = False
        self.closing = False
        self.idle_since = 0.0
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer known to hold no CRLF CRLF
        self._pending: tuple[Parsed, int, int] | None = None  # (head, its end, request size)
        self._eof = False
        self._handed = False
        self._lost = False
        self._reading_paused = False
        self._writing_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._answering = False  # the head of the current answer went out
        self._relaying = False  # a streamed answer is being relayed (by `_task`)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        # as aiohttp's `request.remote`
        if isinstance(peer, list | tuple):
            self.client = str(peer[0])
        elif peer is not None:
            self.client = str(peer)
        self.idle_since = asyncio.get_running_loop().time()
        self.front.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.front.connections.discard(self)
        self._wake_writer()
        self._abandon_relay()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self.busy:
            if len(self._buffer) > _PAUSE_BUFFER and not self._reading_paused:
                assert self.transport is not None
                self._reading_paused = True
                self.transport.pause_reading()
            return
        self._next()

    def eof_received(self) -> bool | None:
        self._eof = True
        if not self.busy:
            self.close()
        elif self._relaying:
            # As nginx's proxy: a caller that stopped sending in the midst of a streamed answer
            # is taken to be gone (else a silent stream would hold the instance until its
            # timeout; a closed socket shows only on the next write).
            self._abandon_relay()
            self.close()
        return True  # the answer in progress still goes out; then the connection closes

    def _abandon_relay(self) -> None:
        """Nobody reads the rest of the streamed answer: give up the instance's connection
        now, not at its next chunk or the function's timeout (`_relay` closes it and releases
        the counts as it is cancelled)."""
        if self._relaying and self._task is not None:
            self._task.cancel()

    # -- requests -------------------------------------------------------------------------------

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _next(self) -> None:
        """Take the next whole request from the buffer: serve it here, or hand off."""
        buf = self._buffer
        if not buf:
            return
        pending = self._pending
        if pending is not None:
            parsed, end, total = pending
            if len(buf) < total:
                return
            self._pending = None
            router = self.front.router
            if parsed[6] not in router.known or parsed[6] in router.protected:
                self._hand_off()  # changed while the body came in: checked anew there
                return
        else:
            end = buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
            if end < 0 or end > _MAX_HEAD:
                self._scanned = len(buf)
                if len(buf) > _MAX_HEAD or _bare_line_end(buf):
                    self._hand_off()  # aiohttp refuses it now, rather than at the idle timeout
                return
            self._scanned = 0
            head = _parse(bytes(buf[:end]), self.front.router, self.front.body_limit)
            if head is None:
                self._hand_off()
                return
            parsed = head
            total = end + 4 + parsed[4]
            if len(buf) < total:
                self._pending = (parsed, end, total)  # the rest of the body comes later
                return
        method, target, headers, host, _, close, fid, tag = parsed
        body = bytes(buf[end + 4 : total])
        del buf[:total]  # O(1) at the front of a bytearray
        self.busy = True
        router = self.front.router
        call = router.new_call(method, target, headers, self.client, host, tag, body)
        close = close or self.closing
        router.served_by_front += 1
        started = time.perf_counter()
        # Sent at once when nothing needs waiting (no task: the answer comes to `_answered`).
        if not router.start(
            call, fid, functools.partial(self._answered, call, fid, close, started)
        ):
            self._task = asyncio.get_running_loop().create_task(
                self._serve(call, fid, close, started)
            )

    def _answered(
        self, call: Call, fid: tuple[str, str], close: bool, started: float, reply: Reply
    ) -> None:
        router = self.front.router
        try:
            if reply.upstream is None:
                self._write(reply, call, close)
                router.observed(fid, reply, started)
            else:
                router.observed(fid, reply, started)
                self._task = asyncio.get_running_loop().create_task(
                    self._relay_and_finish(reply, call, close)
                )
                return
        except Exception:
            log.exception("unhandled error", extra={"path": call.target, "method": call.method})
            close = True
        self._finish(close)

    async def _relay_and_finish(self, reply: Reply, call: Call, close: bool) -> None:
        try:
            close = await self._relay(reply, call, close) or close
        except Exception:
            log.exception("unhandled error", extra={"path": call.target, "method": call.method})
            close = True
        self._finish(close)

    def _hand_off(self) -> None:
        """Give the connection (and what was read of it) to aiohttp for the rest of its life."""
        transport = self.transport
        fallback = self.front.fallback
        assert transport is not None
        assert fallback is not None
        self.front.connections.discard(self)
        self._handed = True
        self.front.router.handed_off += 1
        protocol = fallback()
        protocol.connection_made(transport)
        transport.set_protocol(protocol)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            protocol.data_received(data)

    async def _serve(self, call: Call, fid: tuple[str, str], close: bool, started: float) -> None:
        front = self.front
        try:
            reply = await front.router.dispatch(call, fid)
            if reply.upstream is None:
                self._write(reply, call, close)
                front.router.observed(fid, reply, started)
            else:
                front.router.observed(fid, reply, started)
                close = await self._relay(reply, call, close) or close
        except Exception:
            log.exception("unhandled error", extra={"path": call.target, "method": call.method})
            close = True
            if not self._answering:
                self._write(_internal_error(), call, close)
        self._finish(close)

    def _finish(self, close: bool) -> None:
        """The answer is out: close, or go on with the next request."""
        self.busy = self._answering = False
        self.idle_since = asyncio.get_running_loop().time()
        if close or self._lost:
            self.close()
            return
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._next()
        if self._eof and not self.busy and not self._handed:
            self.close()  # the caller sent all it will: no more requests can come

    def _head(self, reply: Reply, call: Call, framing: str, close: bool) -> str:
        lines = [f"HTTP/1.1 {reply.status} {reply.reason}\r\n"]
        dated = False
        for name, value in reply.headers:
            lines.append(f"{name}: {value}\r\n")
            if not dated and len(name) == 4 and name.lower() == "date":
                dated = True
        if not dated:
            lines.append(f"Date: {self.front.date()}\r\n")
        lines.append(f"X-Lambdabus-Invocation-Id: {call.invocation}\r\n")
        if call.revision:
            lines.append(f"X-Lambdabus-Revision: {call.revision}\r\n")
        lines.append(framing)
        if close:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        return "".join(lines)

    def _write(self, reply: Reply, call: Call, close: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = reply.body or b""
        status = reply.status
        if status in _NO_BODY_STATUS or status < 200:
            framing, body = "", b""
        else:
            framing = f"Content-Length: {len(body)}\r\n"
        head = self._head(reply, call, framing, close).encode("utf-8", "surrogateescape")
        self._answering = True
        transport.write(head + body if len(body) <= FAST_BODY_BYTES else head)
        if len(body) > FAST_BODY_BYTES:
            transport.write(body)

    async def _relay(self, reply: Reply, call: Call, close: bool) -> bool:
        """Relay a large or unsized answer as it arrives: sized as it came, else chunked.
        True when the connection must close (the answer broke off)."""
        upstream = reply.upstream
        assert upstream is not None
        transport = self.transport
        assert transport is not None
        self._relaying = True
        try:
            length = upstream.length
            chunked = length is None
            framing = (
                "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length}\r\n"
            )
            head = self._head(reply, call, framing, close)
            self._answering = True
            if not transport.is_closing():
                transport.write(head.encode("utf-8", "surrogateescape"))
            try:
                while chunk := await upstream.read():
                    if self._lost:
                        return True
                    if chunked:
                        transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                    else:
                        transport.write(chunk)
                    if self._writing_paused:
                        await self._drain()
                if chunked and not self._lost:
                    transport.write(b"0\r\n\r\n")
            except (UpstreamError, TimeoutError) as exc:
                # The status is sent already: cut the connection so the caller sees a truncated
                # body rather than a complete-looking one.
                log.warning("instance response broke off", extra={"error": repr(exc)})
                return True
            return False
        finally:
            self._relaying = False
            upstream.close()
            if reply.finish is not None:
                reply.finish()

    async def _drain(self) -> None:
        while self._writing_paused and not self._lost:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    def _wake_writer(self) -> None:
        waiter = self._drained
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


Parsed = tuple[str, str, list[tuple[str, str]], str, int, bool, tuple[str, str], str | None]


def _parse(raw: bytes, router: Router, body_limit: int) -> Parsed | None:
    """The request head (without its final CRLF CRLF) when the fast path takes it: (method,
    target, headers, host, body length, close, function, tag); None to hand off."""
    if len(raw.translate(None, _CTL)) != len(raw):  # (faster than a regular expression)
        return None
    text = raw.decode("utf-8", "surrogateescape")
    lines = text.split("\r\n")
    breaks = len(lines) - 1
    if breaks > _MAX_HEADERS:
        return None
    if text.count("\n") != breaks or text.count("\r") != breaks or not lines[0].isascii():
        return None
    if "\t" in lines[0]:  # llhttp refuses a tab in the request line too
        return None
    method, _, rest = lines[0].partition(" ")
    target, _, version = rest.partition(" ")
    if version != "HTTP/1.1" or method not in _FAST_METHODS or target[:1] != "/":
        return None
    path = target.partition("?")[0]
    if "%" in path or "/." in path or "//" in path or " " in target:
        return None
    parts = path.split("/", 3)
    if len(parts) < 3 or not parts[1] or not parts[2]:
        return None
    name, at, tag = parts[2].partition("@")
    fid = (parts[1], name)
    if fid not in router.known or fid in router.protected:
        return None
    headers: list[tuple[str, str]] = []
    length = -1
    host: str | None = None
    close = False
    for line in lines[1:]:
        key, colon, value = line.partition(":")
        if not colon or not key or key.strip(_TOKEN_CHARS):
            return None
        value = value.strip(" \t")
        lower = key.lower()
        if lower == "content-length":
            if (
                length >= 0
                or not value.isascii()
                or not value.isdigit()
                or len(value) > _MAX_LENGTH_DIGITS
            ):
                return None
            length = int(value)
            if length > body_limit:
                return None
        elif lower == "host":
            if host is not None:
                return None
            host = value
        elif lower == "connection":
            tokens = {t.strip(" \t") for t in value.lower().split(",")}
            if "upgrade" in tokens:
                return None
            close = close or "close" in tokens
        elif lower in _SLOW_HEADERS:
            return None
        headers.append((key, value))
    if host is None:
        return None
    return method, target, headers, host, max(length, 0), close, fid, tag if at else None


class QuietMalformed(logging.Filter):
    """aiohttp logs every request its parser refuses (400) as an error with a traceback. On a
    public port that is the caller's error, not the router's: such a record is kept as a DEBUG
    one (dropped unless the logger shows DEBUG), so hostile callers cannot fill the log.
    Installed on `aiohttp.server` by the router (`quiet_malformed`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_QUIET = QuietMalformed()


def quiet_malformed() -> None:
    """Install `QuietMalformed` on aiohttp's server logger (once)."""
    logging.getLogger("aiohttp.server").addFilter(_QUIET)


def _bare_line_end(buf: bytearray) -> bool:
    """Whether an incomplete head holds a CR or LF outside a CRLF (its end would never come);
    a CR last may be the first half of one."""
    crlf = buf.count(b"\r\n")
    return buf.count(b"\n") != crlf or buf.count(b"\r") - buf.endswith(b"\r") != crlf


def _internal_error() -> Reply:
    body = b'{"error": {"code": "internal", "message": "internal error; see the service log"}}'
    headers = [
        ("X-Lambdabus-Error", "internal"),
        ("Content-Type", "application/json; charset=utf-8"),
    ]
    return Reply(500, "Internal Server Error", headers, body)
