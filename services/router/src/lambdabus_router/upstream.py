"""The router's HTTP/1.1 client for instances, on raw asyncio: keep-alive connections pooled per
endpoint; a sized response up to a limit is read whole, a larger or unsized one is streamed.

Rendering a request and parsing a response (`render_request`, `parse_response_head`,
`ChunkedDecoder`) are pure; one connection's `asyncio.Protocol`, one endpoint's pool and the
`Upstream` client owning the pools are the shell around them.

A request is sent to an instance a second time only when the instance provably did not read
it. A connection that could not be opened (`ConnectFailed`) carried nothing, so the router may
give the request to another instance. A pooled connection that closes before any byte of the
answer is ambiguous: the instance may have closed it idle as the request went out, or read the
request, run the function and died. Only a request that cannot change anything (GET, HEAD,
OPTIONS or TRACE, without a body) is retried on a fresh connection then; any other fails with
`NotRetried`, never runs twice. (The instances keep idle connections for 300 s and the router
for `keepalive_seconds`, 15 s by default, so an instance closing an idle one is the rare case.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType
from typing import NamedTuple, cast
from urllib.parse import urlsplit

log = logging.getLogger("lambdabus.router.upstream")

Headers = list[tuple[str, str]]

UNIX_ENDPOINT = "unix:"

MAX_HEAD = 64 * 1024
_MAX_CHUNK_LINE = 4096
# Bytes of a streamed body waiting for the caller before reading pauses (until it takes them).
_STREAM_HIGH_WATER = 256 * 1024
_ONE_WRITE = 64 * 1024  # a body up to this size goes out in the same write as the head
_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HEX_DIGITS = b"0123456789abcdefABCDEF"
# Methods whose empty body goes without `Content-Length: 0` (as aiohttp's client sends them).
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Requests that may be sent again after an ambiguous close: safe methods (RFC 9110 §9.2.1),
# and then only without a body.
_SAFE_METHODS = _BODYLESS_METHODS


def resendable(method: str, body: bytes) -> bool:
    """Whether a request may be sent again when the instance may have read it."""
    return method in _SAFE_METHODS and not body


class UpstreamError(Exception):
    """The exchange with an instance failed before its response was complete."""


class ConnectFailed(UpstreamError):
    """No connection could be opened (refused, unreachable, timed out): nothing of the request
    reached the instance, so another one may take it."""


class Disconnected(UpstreamError):
    """The instance closed the connection before its response was complete."""


class InvalidResponse(UpstreamError):
    """The instance answered something that is not HTTP/1.1."""


class StaleConnection(Disconnected):
    """A reused connection closed before any byte of the response: retried on a fresh one
    when the request is safe to send again."""


class NotRetried(Disconnected):
    """A reused connection closed before any byte of the response, after the request went out:
    the instance may have read and run it, so it is not sent again."""


# -- the pure part ----------------------------------------------------------------------------


class ResponseHead(NamedTuple):
    """A parsed response head. `length` is the body's size, None when it is chunked or runs
    until the connection closes; `keep_alive` says whether the connection may be reused."""

    status: int
    reason: str
    headers: Headers
    length: int | None
    chunked: bool
    keep_alive: bool


def render_request(
    method: str, target: str, host: str, headers: Headers, body: bytes
) -> tuple[bytes, bytes]:
    """The request head (with `Host` and `Content-Length` of its own) and the body to send
    after it; ValueError for a CR or LF that would split the head."""
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    expected = len(headers) + 3
    if body or method not in _BODYLESS_METHODS:
        lines.append(f"Content-Length: {len(body)}\r\n")
        expected += 1
    lines.append("\r\n")
    text = "".join(lines)
    if text.count("\n") != expected or text.count("\r") != expected or " " in target:
        raise ValueError("a CR, LF or space in the request line or a header would split the head")
    head = text.encode("utf-8", "surrogateescape")
    if body and len(body) <= _ONE_WRITE:
        return head + body, b""
    return head, body


def parse_response_head(raw: bytes, *, head_request: bool = False) -> ResponseHead:
    """Parse a status line and header fields ending with an empty line (`raw` ends with
    CRLF CRLF). Framing follows RFC 9112 §6.3; strict where leniency would desynchronise the
    connection (bare CR or LF, folded lines, a bad or conflicting Content-Length)."""
    text = raw.decode("utf-8", "surrogateescape")
    lines = text[:-4].split("\r\n")
    crlf = len(lines) + 1
    if text.count("\r") != crlf or text.count("\n") != crlf or "\x00" in text:
        raise InvalidResponse("bare CR, LF or NUL in the response head")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version == "HTTP/1.1":
        http10 = False
    elif version == "HTTP/1.0":
        http10 = True
    else:
        raise InvalidResponse(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
    if len(code) != 3 or not code.isascii() or not code.isdigit():
        raise InvalidResponse(f"malformed status line: {lines[0][:100]!r}")
    status = int(code)
    headers: Headers = []
    lengths: list[str] = []
    encoding: str | None = None
    connection = ""
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name.strip(_TOKEN_CHARS):
            raise InvalidResponse(f"malformed header line {line[:100]!r}")
        value = value.strip(" \t")
        headers.append((name, value))
        lower = name.lower()
        if lower == "content-length":
            lengths.append(value)
        elif lower == "transfer-encoding":
            encoding = value if encoding is None else f"{encoding}, {value}"
        elif lower == "connection":
            connection = f"{connection},{value}"
    tokens = {t.strip(" \t") for t in connection.lower().split(",")} if connection else set()
    keep_alive = "keep-alive" in tokens if http10 else "close" not in tokens

    if head_request or status < 200 or status == 204 or status == 304:
        return ResponseHead(status, reason, headers, 0, False, keep_alive)
    if encoding is not None:
        # Transfer-Encoding overrides Content-Length; a body not ending in `chunked` runs until
        # the connection closes. Either way, a response that sent both cannot be trusted with
        # the connection afterwards.
        chunked = encoding.rpartition(",")[2].strip(" \t").lower() == "chunked"
        reuse = keep_alive and chunked and not lengths
        return ResponseHead(status, reason, headers, None, chunked, reuse)
    if lengths:
        values = {v.strip(" \t") for value in lengths for v in value.split(",")}
        length = values.pop()
        if values or not (length.isascii() and length.isdigit()) or len(length) > 18:
            raise InvalidResponse("invalid Content-Length")
        return ResponseHead(status, reason, headers, int(length), False, keep_alive)
    return ResponseHead(status, reason, headers, None, False, False)


class ChunkedDecoder:
    """Decodes a chunked body as it arrives: `feed` bytes, get body bytes back. Once `done`
    (the last chunk and any trailers are in, trailers discarded), `rest` holds what followed."""

    _SIZE, _DATA, _DATA_END, _TRAILER = range(4)

    __slots__ = ("_buffer", "_remaining", "_state", "_trailers", "done", "rest")

    def __init__(self) -> None:
        self._buffer = b""
        self._state = self._SIZE
        self._remaining = 0
        self._trailers = 0
        self.done = False
        self.rest = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            self.rest += data
            return []
        buf = self._buffer + data if self._buffer else data
        pos = 0
        end = len(buf)
        out: list[bytes] = []
        while pos < end:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, end - pos)
                out.append(buf[pos : pos + take] if take < end or pos else buf)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = self._DATA_END
            elif state == self._DATA_END:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise InvalidResponse("a chunk does not end with CRLF")
                pos += 2
                self._state = self._SIZE
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > _MAX_CHUNK_LINE:
                        raise InvalidResponse("a chunk size or trailer line is too long")
                    break
                line = buf[pos:eol]
                pos = eol + 2
                if state == self._SIZE:
                    size_text = line.split(b";", 1)[0].strip(b" \t")
                    if not size_text or len(size_text) > 16 or size_text.strip(_HEX_DIGITS):
                        raise InvalidResponse("malformed chunk size")
                    self._remaining = int(size_text, 16)
                    self._state = self._DATA if self._remaining else self._TRAILER
                elif line:
                    self._trailers += len(line)
                    if self._trailers > MAX_HEAD:
                        raise InvalidResponse("the trailers are too large")
                else:
                    self.done = True
                    self.rest = buf[pos:]
                    pos = end
        self._buffer = buf[pos:] if pos < end else b""
        return out


# -- one connection ---------------------------------------------------------------------------


class Callback:
    """A waiter that hands the answer (or the error) on at once, where a future would call
    its callbacks in the next event-loop turn."""

    __slots__ = ("_answered", "_done")

    def __init__(self, answered: Callable[[Response | None, BaseException | None], None]) -> None:
        self._answered = answered
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, response: Response) -> None:
        self._call(response, None)

    def set_exception(self, error: BaseException) -> None:
        self._call(None, error)

    def _call(self, response: Response | None, error: BaseException | None) -> None:
        self._done = True
        try:
            self._answered(response, error)
        except Exception:  # not the connection's problem: it goes on
            log.exception("an answer's callback failed")


class Response:
    """An instance's answer. `body` is the whole body when it was read in one piece (sized,
    up to the caller's limit); otherwise it is None and `read` gives the body as it comes."""

    __slots__ = ("_stream", "body", "headers", "length", "reason", "status")

    def __init__(self, head: ResponseHead, body: bytes | None, stream: _Body | None) -> None:
        self.status = head.status
        self.reason = head.reason
        self.headers = head.headers
        self.length = head.length
        self.body = body
        self._stream = stream

    async def read(self) -> bytes:
        """The next bytes of the body (a body read whole comes in one piece); b"" at its end.
        Raises `UpstreamError` or TimeoutError when a streamed body breaks off."""
        if self._stream is None:
            body, self.body = self.body or b"", b""
            return body
        return await self._stream.read()

    def close(self) -> None:
        """Give up on the rest of a streamed body (the connection is closed, not reused)."""
        if self._stream is not None:
            self._stream.abandon()


class _Body:
    """The streamed body of a response: fed by the connection, read by the caller."""

    __slots__ = ("_chunks", "_error", "_size", "_waiter", "eof", "owner")

    def __init__(self, owner: _Connection) -> None:
        self.owner: _Connection | None = owner
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.eof = False

    def feed(self, chunk: bytes) -> bool:
        """Queue `chunk`; True when the caller has fallen behind (stop reading)."""
        self._chunks.append(chunk)
        self._size += len(chunk)
        self._wake()
        return self._size > _STREAM_HIGH_WATER

    def end(self, error: BaseException | None = None) -> None:
        self.owner = None
        self.eof = True
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if self.owner is not None:
            self.owner.resume()
        return data

    def abandon(self) -> None:
        if self.owner is not None:
            self.owner.abort()
        self._chunks.clear()
        self.eof = True


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an instance, carrying one exchange at a time."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._loop = pool.loop
        self._paused = False
        self._reset()

    def _reset(self) -> None:
        self._busy = False
        self._waiter: asyncio.Future[Response] | Callback | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head_request = False
        self._limit = 0
        self._received = False
        self._buffer = b""
        self._head: ResponseHead | None = None
        self._remaining = 0
        self._parts: list[bytes] = []
        self._decoder: ChunkedDecoder | None = None
        self._body: _Body | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's are not subclasses of asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        if not self._busy:
            return
        head = self._head
        if head is not None and head.length is None and not head.chunked:
            self._complete(reusable=False)  # the body ran until the close
            return
        if not self._received and self.reused:
            error: UpstreamError = StaleConnection(
                "the pooled connection was closed by the instance"
            )
        else:
            error = Disconnected("the instance closed the connection mid-response")
        self._fail(error, abort=False)

    def eof_received(self) -> bool | None:
        return None  # close our side too: connection_lost follows

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self.abort()
            return
        self._received = True
        try:
            if self._head is None:
                rest = self._read_head(data)
                if rest is None:
                    return
                data = rest
            self._read_body(data)
        except UpstreamError as exc:
            self._fail(exc)

    # -- one exchange -------------------------------------------------------------------

    def send(
        self, head: bytes, body: bytes, *, head_request: bool, limit: int, deadline: float
    ) -> asyncio.Future[Response]:
        """Write a request; the future gets its response (whole, or its head when streamed)."""
        waiter: asyncio.Future[Response] = self._loop.create_future()
        self.start(
            head, body, head_request=head_request, limit=limit, deadline=deadline, waiter=waiter
        )
        return waiter

    def start(
        self,
        head: bytes,
        body: bytes,
        *,
        head_request: bool,
        limit: int,
        deadline: float,
        waiter: asyncio.Future[Response] | Callback,
    ) -> None:
        """Write a request; `waiter` gets its response (whole, or its head when streamed)."""
        assert self.transport is not None
        assert not self._busy
        self._busy = True
        self._head_request = head_request
        self._limit = limit
        self._waiter = waiter
        self._timer = self._loop.call_at(deadline, self._expire)
        self.transport.write(head)
        if body:
            self.transport.write(body)

    def _read_head(self, data: bytes) -> bytes | None:
        """Parse the head once it is all in; the bytes after it, or None while it is not
        (or when the response ended with it)."""
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HEAD:
                    raise InvalidResponse(f"the response head exceeds {MAX_HEAD} bytes")
                self._buffer = data
                return None
            head = parse_response_head(data[: end + 4], head_request=self._head_request)
            data = data[end + 4 :]
            if head.status >= 200:
                break
            if head.status == 101:
                raise InvalidResponse("the instance switched protocols unasked")
            # 1xx: informational, the real answer follows.
        self._head = head
        if head.length is not None and head.length <= self._limit:
            self._remaining = head.length
            if not head.length:
                self._complete(reusable=not data)
                return None
            return data
        self._body = _Body(self)
        if head.chunked:
            self._decoder = ChunkedDecoder()
        else:
            self._remaining = -1 if head.length is None else head.length
        waiter = self._waiter
        self._waiter = None
        assert waiter is not None
        if not waiter.done():
            waiter.set_result(Response(head, None, self._body))
        return data

    def _read_body(self, data: bytes) -> None:
        if not data:
            return
        body = self._body
        if body is None:  # read whole
            take = min(self._remaining, len(data))
            self._parts.append(data if take == len(data) else data[:take])
            self._remaining -= take
            if not self._remaining:
                self._complete(reusable=take == len(data))
            return
        behind = False
        decoder = self._decoder
        if decoder is not None:
            for piece in decoder.feed(data):
                behind = body.feed(piece)
            if decoder.done:
                self._complete(reusable=not decoder.rest)
                return
        elif self._remaining < 0:  # until the connection closes
            behind = body.feed(data)
        else:
            take = min(self._remaining, len(data))
            behind = body.feed(data if take == len(data) else data[:take])
            self._remaining -= take
            if not self._remaining:
                self._complete(reusable=take == len(data))
                return
        if behind and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _complete(self, *, reusable: bool) -> None:
        """The response is in: hand it over, and the connection back to the pool (or close
        it)."""
        head, waiter, body, parts = self._head, self._waiter, self._body, self._parts
        assert head is not None
        if self._timer is not None:
            self._timer.cancel()
        self._reset()
        if reusable and head.keep_alive and not self.closed:
            self.pool.release(self)
        elif not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()
        if body is not None:
            body.end()
        elif waiter is not None and not waiter.done():
            payload = parts[0] if len(parts) == 1 else b"".join(parts)
            waiter.set_result(Response(head, payload, None))

    def _fail(self, error: BaseException, *, abort: bool = True) -> None:
        waiter, body = self._waiter, self._body
        if self._timer is not None:
            self._timer.cancel()
        self._reset()
        if abort:
            self.abort()
        if body is not None:
            body.end(error)
        elif waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _expire(self) -> None:
        self._timer = None
        self._fail(TimeoutError())

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        """Drop the connection at once (an exchange in progress fails with `Disconnected`)."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def cancel(self, waiter: asyncio.Future[Response] | Callback) -> None:
        """The caller gave up on `waiter`: if that exchange is still in progress, drop it (the
        connection may have gone back to the pool and on to another exchange meanwhile)."""
        if self._waiter is waiter:
            self._fail(Disconnected("the exchange was cancelled"))


# -- one endpoint's pool ----------------------------------------------------------------------


def unix_path(endpoint: str) -> str | None:
    """The socket file of a `unix:/abs/path` endpoint; None for any other endpoint."""
    path = endpoint.removeprefix(UNIX_ENDPOINT)
    return path if path != endpoint and path.startswith("/") else None


class _Pool:
    """The connections to one endpoint: idle ones reused last-in first-out, at most `size`
    open (0: unbounded); a request beyond that waits for one to come back."""

    def __init__(self, endpoint: str, upstream: Upstream) -> None:
        self.socket: str | None = None
        self.host, self.port, self.prefix = "", 0, ""
        if endpoint.startswith(UNIX_ENDPOINT):
            # An instance in its own network namespace, reached through its socket file.
            path = unix_path(endpoint)
            if path is None:
                raise ConnectFailed(f"not an absolute unix: endpoint: {endpoint!r}")
            self.socket, self.authority = path, "localhost"
        else:
            parts = urlsplit(endpoint)
            if parts.scheme != "http" or not parts.hostname:
                raise ConnectFailed(f"not an http:// or unix: endpoint: {endpoint!r}")
            self.host = parts.hostname
            self.port = parts.port or 80
            self.authority = parts.netloc.rpartition("@")[2]
            self.prefix = parts.path.rstrip("/")
        self.name = self.socket or self.authority
        self.loop = upstream.loop
        self.size = upstream.pool_size
        self.connect_timeout = upstream.connect_timeout
        self.keepalive = upstream.keepalive
        self.idle: list[_Connection] = []
        self.connections: set[_Connection] = set()
        self.opening = 0
        # Requests waiting for room, first come first served; `_woken` of them were told of
        # some and have not looked yet, so newcomers do not take it from them.
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._woken = 0

    @property
    def unused(self) -> bool:
        return not self.connections and not self.opening and not self._waiters

    def quick(self) -> _Connection | None:
        """An idle connection at once, when no request is waiting for one."""
        if self._waiters or self._woken:
            return None
        return self.take_idle()

    async def acquire(self, deadline: float, *, fresh: bool = False) -> _Connection:
        """An idle connection (unless `fresh`), else a new one once the pool has room."""
        woken = False
        while True:
            if woken or not (self._waiters or self._woken):
                if not fresh:
                    conn = self.take_idle()
                    if conn is not None:
                        return conn
                if not self.size or len(self.connections) + self.opening < self.size:
                    return await self._connect(deadline)
            waiter = self.loop.create_future()
            if woken:
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._woken -= 1
                    self._wake()  # pass on a wake-up this request can no longer use
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise
            self._woken -= 1
            woken = True

    def take_idle(self) -> _Connection | None:
        idle = self.idle
        if not idle:
            return None
        oldest = self.loop.time() - self.keepalive
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if (
                not conn.closed
                and conn.idle_since > oldest
                and transport is not None
                and not transport.is_closing()
            ):
                return conn
            conn.abort()
        return None

    async def _connect(self, deadline: float) -> _Connection:
        self.opening += 1
        connect_by = self.loop.time() + self.connect_timeout
        try:
            async with asyncio.timeout_at(min(deadline, connect_by)):
                if self.socket is not None:
                    _, conn = await self.loop.create_unix_connection(
                        lambda: _Connection(self), self.socket
                    )
                else:
                    _, conn = await self.loop.create_connection(
                        lambda: _Connection(self), self.host, self.port
                    )
        except BaseException as exc:
            self.opening -= 1
            self._wake()  # the room this attempt held is free again
            if isinstance(exc, TimeoutError) and connect_by <= deadline:
                raise ConnectFailed(
                    f"no connection to {self.name} within {self.connect_timeout:g} s"
                ) from None
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                raise ConnectFailed(f"cannot connect to {self.name}: {exc}") from exc
            raise
        self.opening -= 1
        if conn.closed:  # closed before we got it
            self._wake()
            raise ConnectFailed(f"{self.name} closed the connection at once")
        self.connections.add(conn)
        return conn

    def release(self, conn: _Connection) -> None:
        conn.reused = True
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        self._wake()

    def discard(self, conn: _Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            with contextlib.suppress(ValueError):
                self.idle.remove(conn)
            self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._woken += 1
                return

    def close_idle(self, idle_since: float) -> None:
        """Close the connections idle since before `idle_since`."""
        for conn in [c for c in self.idle if c.idle_since < idle_since]:
            conn.abort()

    def close(self) -> None:
        for conn in list(self.connections):
            conn.abort()


# -- the client -------------------------------------------------------------------------------


class Upstream:
    """The router's client for instances: one pool per endpoint, idle connections closed after
    `keepalive` seconds. Use it as an async context manager."""

    def __init__(self, *, pool_size: int, connect_timeout: float, keepalive: float) -> None:
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.loop = asyncio.get_running_loop()
        self._pools: dict[str, _Pool] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Upstream:
        self._sweeper = asyncio.create_task(self._sweep())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    async def request(
        self,
        endpoint: str,
        method: str,
        target: str,
        headers: Headers,
        body: bytes,
        *,
        timeout: float,
        buffer_limit: int,
    ) -> Response:
        """Send a request to `endpoint` (`http://host:port[/prefix]` or `unix:/abs/path`) and wait for the answer
        (its head only, when the body is to be streamed) within `timeout` seconds.

        Raises `ConnectFailed` when no connection could be opened, TimeoutError past the
        deadline, and another `UpstreamError` when the exchange broke.
        """
        pool = self._pools.get(endpoint)
        if pool is None:
            pool = self._pools[endpoint] = _Pool(endpoint, self)
        deadline = self.loop.time() + timeout
        head, rest = render_request(method, pool.prefix + target, pool.authority, headers, body)
        head_request = method == "HEAD"
        conn = pool.quick() or await pool.acquire(deadline)
        try:
            return await _exchange(conn, head, rest, head_request, buffer_limit, deadline)
        except StaleConnection as exc:
            if not resendable(method, body):
                raise NotRetried(
                    "the instance closed the connection after the request went out, before "
                    "answering; it may have run it, so it was not sent again"
                ) from exc
            log.debug("pooled connection was closed by the instance; retrying on a fresh one")
        # Only a reused connection goes stale, so this is retried once at most.
        conn = await pool.acquire(deadline, fresh=True)
        return await _exchange(conn, head, rest, head_request, buffer_limit, deadline)

    def start(
        self,
        endpoint: str,
        method: str,
        target: str,
        headers: Headers,
        body: bytes,
        *,
        timeout: float,
        buffer_limit: int,
        answered: Callable[[Response | None, BaseException | None], None],
    ) -> bool:
        """`request` without a coroutine, when an idle pooled connection to `endpoint` is at
        hand: the request is written now and `answered` gets the answer or the error as soon
        as the connection has it (in the same event-loop turn). False when there is no idle
        connection (nothing was sent: use `request`). A `StaleConnection` error says the
        pooled connection closed before any byte of the answer: the caller sends the request
        again (`request`) only when `resendable`. ValueError as `request`."""
        pool = self._pools.get(endpoint)
        if pool is None:
            return False
        head, rest = render_request(method, pool.prefix + target, pool.authority, headers, body)
        conn = pool.quick()
        if conn is None:
            return False
        conn.start(
            head,
            rest,
            head_request=method == "HEAD",
            limit=buffer_limit,
            deadline=self.loop.time() + timeout,
            waiter=Callback(answered),
        )
        return True

    def connections(self, endpoint: str) -> tuple[int, int]:
        """(open, idle) connections to `endpoint`: for tests and tools."""
        pool = self._pools.get(endpoint)
        return (len(pool.connections), len(pool.idle)) if pool is not None else (0, 0)

    async def _sweep(self) -> None:
        interval = max(0.05, min(self.keepalive / 2, 5.0))
        while True:
            await asyncio.sleep(interval)
            oldest = self.loop.time() - self.keepalive
            for endpoint, pool in list(self._pools.items()):
                pool.close_idle(oldest)
                if pool.unused:
                    del self._pools[endpoint]


async def _exchange(
    conn: _Connection, head: bytes, body: bytes, head_request: bool, limit: int, deadline: float
) -> Response:
    waiter = conn.send(head, body, head_request=head_request, limit=limit, deadline=deadline)
    try:
        return await waiter
    except asyncio.CancelledError:
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            waiter.result().close()  # a streamed answer nobody will read
        else:
            conn.cancel(waiter)
        raise
