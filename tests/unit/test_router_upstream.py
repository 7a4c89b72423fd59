"""The router's HTTP/1.1 client for instances: the pure rendering and parsing, then the client
against small asyncio servers on ephemeral ports that answer with scripted bytes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lambdabus_router.upstream import (
    ChunkedDecoder,
    ConnectFailed,
    Disconnected,
    InvalidResponse,
    NotRetried,
    Response,
    StaleConnection,
    Upstream,
    parse_response_head,
    render_request,
    resendable,
)

# -- rendering a request ----------------------------------------------------------------------


def test_a_request_carries_host_and_its_own_content_length() -> None:
    head, rest = render_request(
        "POST", "/ns/fn/x?q=1", "10.0.0.1:8000", [("X-A", "1"), ("X-A", "2")], b"body"
    )
    assert rest == b""
    assert head == (
        b"POST /ns/fn/x?q=1 HTTP/1.1\r\nHost: 10.0.0.1:8000\r\nX-A: 1\r\nX-A: 2\r\n"
        b"Content-Length: 4\r\n\r\nbody"
    )


def test_an_empty_body_gets_a_zero_length_only_where_the_method_expects_one() -> None:
    for method in ("GET", "HEAD", "OPTIONS", "TRACE"):
        head, _ = render_request(method, "/", "h", [], b"")
        assert b"Content-Length" not in head, method
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        head, _ = render_request(method, "/", "h", [], b"")
        assert head.endswith(b"\r\nContent-Length: 0\r\n\r\n"), method


def test_a_large_body_is_written_after_the_head() -> None:
    body = b"x" * (1024 * 1024)
    head, rest = render_request("PUT", "/", "h", [], body)
    assert head.endswith(b"Content-Length: 1048576\r\n\r\n")
    assert rest is body


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/a HTTP/1.1\r\nX-Evil: 1\r\n\r\nGET /b", []),
        ("/a b", []),
        ("/", [("X-A", "1\r\nX-Evil: 2")]),
        ("/", [("X-A", "1\nX-Evil: 2")]),
        ("/", [("X-A\r", "1")]),
    ],
)
def test_nothing_can_split_the_request_head(target: str, headers: list[tuple[str, str]]) -> None:
    with pytest.raises(ValueError, match="split the head"):
        render_request("GET", target, "h", headers, b"")


def test_header_values_keep_their_bytes() -> None:
    # aiohttp's server hands over non-ASCII header bytes as UTF-8 with surrogate escapes.
    value = b"caf\xc3\xa9 \xff".decode("utf-8", "surrogateescape")
    head, _ = render_request("GET", "/", "h", [("X-Name", value)], b"")
    assert b"X-Name: caf\xc3\xa9 \xff\r\n" in head


# -- parsing a response head ------------------------------------------------------------------


def _head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_a_sized_response() -> None:
    head = parse_response_head(
        _head(
            "HTTP/1.1 201 Created",
            "Content-Length: 5",
            "Set-Cookie: a=1",
            "set-cookie:b=2 ",
            "X-Empty:",
        )
    )
    assert head.status == 201
    assert head.reason == "Created"
    assert head.headers == [
        ("Content-Length", "5"),
        ("Set-Cookie", "a=1"),
        ("set-cookie", "b=2"),
        ("X-Empty", ""),
    ]
    assert head.length == 5
    assert not head.chunked
    assert head.keep_alive


def test_a_status_line_without_a_reason() -> None:
    head = parse_response_head(_head("HTTP/1.1 299", "Content-Length: 0"))
    assert (head.status, head.reason) == (299, "")


def test_connection_close_and_http10_keep_alive() -> None:
    assert not parse_response_head(_head("HTTP/1.1 200 OK", "Connection: close")).keep_alive
    assert not parse_response_head(
        _head("HTTP/1.1 200 OK", "Connection: Upgrade, Close", "Content-Length: 0")
    ).keep_alive
    assert not parse_response_head(_head("HTTP/1.0 200 OK", "Content-Length: 0")).keep_alive
    assert parse_response_head(
        _head("HTTP/1.0 200 OK", "Connection: keep-alive", "Content-Length: 0")
    ).keep_alive


def test_responses_without_a_body() -> None:
    for status in (204, 304):
        head = parse_response_head(_head(f"HTTP/1.1 {status} X", "Transfer-Encoding: chunked"))
        assert (head.length, head.chunked, head.keep_alive) == (0, False, True)
    head = parse_response_head(_head("HTTP/1.1 200 OK", "Content-Length: 99"), head_request=True)
    assert head.length == 0
    assert head.headers == [("Content-Length", "99")]


def test_chunked_framing() -> None:
    head = parse_response_head(_head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked"))
    assert (head.length, head.chunked, head.keep_alive) == (None, True, True)
    head = parse_response_head(
        _head("HTTP/1.1 200 OK", "Transfer-Encoding: gzip", "Transfer-Encoding: Chunked")
    )
    assert head.chunked
    # Both framings: Transfer-Encoding wins, and the connection is not trusted afterwards.
    head = parse_response_head(
        _head("HTTP/1.1 200 OK", "Transfer-Encoding: chunked", "Content-Length: 3")
    )
    assert (head.length, head.chunked, head.keep_alive) == (None, True, False)


def test_a_body_that_runs_until_the_connection_closes() -> None:
    for head in (
        parse_response_head(_head("HTTP/1.1 200 OK")),
        parse_response_head(_head("HTTP/1.1 200 OK", "Transfer-Encoding: gzip")),
    ):
        assert (head.length, head.chunked, head.keep_alive) == (None, False, False)


def test_repeated_content_lengths_must_agree() -> None:
    head = parse_response_head(
        _head("HTTP/1.1 200 OK", "Content-Length: 7, 7", "Content-Length: 7")
    )
    assert head.length == 7
    for lines in (
        ("Content-Length: 7", "Content-Length: 8"),
        ("Content-Length: 7, 8",),
        ("Content-Length: -1",),
        ("Content-Length: 0x10",),
        ("Content-Length: ",),
        ("Content-Length: \u0661",),
    ):
        with pytest.raises(InvalidResponse):
            parse_response_head(_head("HTTP/1.1 200 OK", *lines))


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\rX-B: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: \x00\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
    ],
)
def test_malformed_heads_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidResponse):
        parse_response_head(raw)


# -- decoding a chunked body ------------------------------------------------------------------

CHUNKED = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"


def test_a_chunked_body_at_once_and_byte_by_byte() -> None:
    decoder = ChunkedDecoder()
    assert b"".join(decoder.feed(CHUNKED + b"NEXT")) == b"hello, world"
    assert decoder.done
    assert decoder.rest == b"NEXT"

    decoder = ChunkedDecoder()
    out = []
    for i in range(len(CHUNKED)):
        assert not decoder.done
        out.extend(decoder.feed(CHUNKED[i : i + 1]))
    assert decoder.done
    assert decoder.rest == b""
    assert b"".join(out) == b"hello, world"


def test_chunk_sizes_are_hex_and_bounded() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"A\r\n0123456789\r\n0\r\n\r\n") == [b"0123456789"]
    assert decoder.done
    for bad in (b"\r\n", b"g\r\n", b"-1\r\n", b"0x5\r\n", b"1" * 17 + b"\r\n", b"5\r\nhelloXX"):
        with pytest.raises(InvalidResponse):
            ChunkedDecoder().feed(bad)
    with pytest.raises(InvalidResponse, match="too long"):
        ChunkedDecoder().feed(b"5" + b" " * 5000)


# -- the client against scripted instances ----------------------------------------------------

Script = Callable[["Instance", int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Instance:
    url: str = ""
    accepted: int = 0
    requests: list[bytes] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)


async def read_request(reader: asyncio.StreamReader, instance: Instance) -> bytes:
    """One request (head and Content-Length body); b"" at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    request = head + await reader.readexactly(length)
    instance.requests.append(request)
    return request


@contextlib.asynccontextmanager
async def instance(script: Script, *, unix: str | None = None) -> AsyncIterator[Instance]:
    """A server running `script(me, n, reader, writer)` for its n-th connection (from 0), on
    a loopback port, or on the Unix socket `unix`."""
    me = Instance()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = me.accepted
        me.accepted += 1
        me.open_now += 1
        me.most_open = max(me.most_open, me.open_now)
        try:
            await script(me, n, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            me.open_now -= 1
            writer.close()

    if unix is not None:
        server = await asyncio.start_unix_server(handle, unix)
        me.url = f"unix:{unix}"
    else:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        me.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield me


def answering(*responses: bytes, then_eof: bool = False) -> Script:
    """Answer each request on a connection with the next of `responses` (the last repeats);
    after the answers, note whether the client closed the connection."""

    async def script(
        me: Instance, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        i = 0
        while await read_request(reader, me):
            writer.write(responses[min(i, len(responses) - 1)])
            i += 1
        if then_eof:
            me.closed_by_client.set()

    return script


@contextlib.asynccontextmanager
async def client(
    *, pool_size: int = 8, connect_timeout: float = 2.0, keepalive: float = 15.0
) -> AsyncIterator[Upstream]:
    async with Upstream(
        pool_size=pool_size, connect_timeout=connect_timeout, keepalive=keepalive
    ) as upstream:
        yield upstream


async def call(
    upstream: Upstream,
    url: str,
    method: str = "POST",
    body: bytes = b"ping",
    *,
    timeout: float = 5.0,
    limit: int = 1024,
) -> Response:
    return await upstream.request(
        url, method, "/ns/fn", [("X-Test", "1")], body, timeout=timeout, buffer_limit=limit
    )


async def read_all(response: Response) -> bytes:
    parts = []
    while chunk := await response.read():
        parts.append(chunk)
    return b"".join(parts)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello"


async def test_a_sized_answer_is_read_whole_over_one_kept_connection() -> None:
    async with instance(answering(OK)) as me, client() as upstream:
        for _ in range(3):
            response = await call(upstream, me.url)
            assert (response.status, response.reason, response.body) == (200, "OK", b"hello")
            assert response.headers == [("Content-Length", "5"), ("X-A", "1")]
        assert me.accepted == 1
        assert upstream.connections(me.url) == (1, 1)
    assert me.requests[0] == (
        b"POST /ns/fn HTTP/1.1\r\nHost: "
        + me.url.removeprefix("http://").encode()
        + b"\r\nX-Test: 1\r\nContent-Length: 4\r\n\r\nping"
    )


async def test_a_unix_endpoint_is_reached_through_its_socket_over_one_kept_connection(
    tmp_path: Path,
) -> None:
    socket = tmp_path / "sock"
    async with instance(answering(OK), unix=str(socket)) as me, client() as upstream:
        for _ in range(3):
            response = await call(upstream, me.url)
            assert (response.status, response.body) == (200, b"hello")
        assert me.accepted == 1
        assert upstream.connections(me.url) == (1, 1)
    assert me.requests[0].startswith(b"POST /ns/fn HTTP/1.1\r\nHost: localhost\r\n")


async def test_a_unix_endpoint_without_a_listener_or_with_a_relative_path_fails_to_connect(
    tmp_path: Path,
) -> None:
    async with client() as upstream:
        with pytest.raises(ConnectFailed, match="cannot connect"):
            await call(upstream, f"unix:{tmp_path / 'gone'}")
        with pytest.raises(ConnectFailed, match="not an absolute"):
            await call(upstream, "unix:relative/sock")


async def test_an_endpoint_path_prefixes_the_target() -> None:
    async with instance(answering(OK)) as me, client() as upstream:
        await call(upstream, me.url + "/base/")
    assert me.requests[0].startswith(b"POST /base/ns/fn HTTP/1.1\r\n")


async def test_chunked_large_and_unsized_answers_are_streamed() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED
    large = b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"z" * 2000
    async with instance(answering(chunked, large)) as me, client() as upstream:
        response = await call(upstream, me.url)
        assert (response.body, response.length) == (None, None)
        assert await read_all(response) == b"hello, world"
        response = await call(upstream, me.url)
        assert (response.body, response.length) == (None, 2000)
        assert await read_all(response) == b"z" * 2000
        assert me.accepted == 1

    async def until_close(
        me: Instance, n: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await read_request(reader, me)
        w.write(b"HTTP/1.1 200 OK\r\n\r\nall of")
        await w.drain()
        w.write(b" it")

    async with instance(until_close) as me, client() as upstream:
        response = await call(upstream, me.url)
        assert await read_all(response) == b"all of it"
        assert await call(upstream, me.url) is not None
        assert me.accepted == 2


async def test_answers_without_a_body_leave_the_connection_ready() -> None:
    head_answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    no_content = b"HTTP/1.1 204 No Content\r\n\r\n"
    not_modified = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"
    async with (
        instance(answering(head_answer, no_content, not_modified, OK)) as me,
        client() as upstream,
    ):
        response = await call(upstream, me.url, "HEAD", b"")
        assert (response.status, response.body) == (200, b"")
        assert ("Content-Length", "5") in response.headers
        response = await call(upstream, me.url)
        assert (response.status, response.body) == (204, b"")
        response = await call(upstream, me.url, "GET", b"")
        assert (response.status, response.body) == (304, b"")
        assert (await call(upstream, me.url)).body == b"hello"
        assert me.accepted == 1


async def test_interim_answers_are_skipped() -> None:
    early = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK
    async with instance(answering(early)) as me, client() as upstream:
        response = await call(upstream, me.url)
        assert (response.status, response.body) == (200, b"hello")


async def test_connection_close_is_honoured() -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
    async with instance(answering(closing, then_eof=True)) as me, client() as upstream:
        assert (await call(upstream, me.url)).body == b"hello"
        await asyncio.wait_for(me.closed_by_client.wait(), 5)
        assert (await call(upstream, me.url)).body == b"hello"
        assert me.accepted == 2


def closes_the_second_request_unanswered() -> Script:
    """Answer the first request; read the second on the same connection and drop it (an idle
    close racing the request, or an instance that read it and died); answer on later ones."""

    async def script(
        me: Instance, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader, me)
        writer.write(OK)
        if n == 0:
            await read_request(reader, me)
            return
        while await read_request(reader, me):
            writer.write(OK)

    return script


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "TRACE"])
async def test_a_safe_request_on_a_pooled_connection_closed_meanwhile_is_resent(
    method: str,
) -> None:
    async with instance(closes_the_second_request_unanswered()) as me, client() as upstream:
        assert (await call(upstream, me.url)).body == b"hello"
        response = await call(upstream, me.url, method, b"")
        assert response.status == 200
        assert me.accepted == 2
        assert [r.split(b" ", 1)[0].decode() for r in me.requests] == ["POST", method, method]


@pytest.mark.parametrize(
    ("method", "body"), [("POST", b"charge the card"), ("PUT", b""), ("DELETE", b""), ("GET", b"x")]
)
async def test_a_request_the_instance_may_have_read_is_never_sent_again(
    method: str, body: bytes
) -> None:
    async with instance(closes_the_second_request_unanswered()) as me, client() as upstream:
        assert (await call(upstream, me.url)).body == b"hello"
        with pytest.raises(NotRetried):
            await call(upstream, me.url, method, body)
        assert me.accepted == 1
        assert len(me.requests) == 2  # the instance read it once, and only once
        assert me.requests[1].endswith(body)


def test_only_safe_bodyless_requests_are_resendable() -> None:
    assert resendable("GET", b"")
    assert resendable("HEAD", b"")
    assert not resendable("GET", b"a body")
    assert not resendable("POST", b"")
    assert not resendable("PATCH", b"")


async def test_a_fresh_connection_closed_without_an_answer_is_not_retried() -> None:
    async def script(
        me: Instance, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader, me)

    async with instance(script) as me, client() as upstream:
        with pytest.raises(Disconnected):
            await call(upstream, me.url)
        assert me.accepted == 1


async def test_an_answer_broken_off_is_not_retried() -> None:
    async def script(
        me: Instance, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader, me)
        writer.write(OK)
        await read_request(reader, me)
        writer.write(OK[:-2])

    async with instance(script) as me, client() as upstream:
        await call(upstream, me.url)
        with pytest.raises(Disconnected):
            await call(upstream, me.url)
        assert me.accepted == 1


async def test_a_stream_broken_off_raises_on_read() -> None:
    async def script(
        me: Instance, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader, me)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")

    async with instance(script) as me, client() as upstream:
        response = await call(upstream, me.url)
        assert await response.read() == b"hello"
        with pytest.raises(Disconnected):
            await response.read()


async def test_an_invalid_answer_is_an_error_and_the_connection_dropped() -> None:
    async with (
        instance(answering(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", then_eof=True)) as me,
        client() as upstream,
    ):
        with pytest.raises(InvalidResponse):
            await call(upstream, me.url)
        await asyncio.wait_for(me.closed_by_client.wait(), 5)


async def test_unasked_bytes_and_trailing_garbage_drop_the_connection() -> None:
    async with instance(answering(OK + b"extra", then_eof=True)) as me, client() as upstream:
        assert (await call(upstream, me.url)).body == b"hello"
        await asyncio.wait_for(me.closed_by_client.wait(), 5)
        assert upstream.connections(me.url) == (0, 0)


async def test_past_the_deadline_is_a_timeout_and_the_connection_is_dropped() -> None:
    async def script(
        me: Instance, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader, me)
        await reader.read()  # never answers; returns when the client closes
        me.closed_by_client.set()

    async with instance(script) as me, client() as upstream:
        with pytest.raises(TimeoutError):
            await call(upstream, me.url, timeout=0.05)
        await asyncio.wait_for(me.closed_by_client.wait(), 5)


async def test_a_refused_connection_is_connect_failed() -> None:
    async with instance(answering(OK)) as me:
        url = me.url
    async with client() as upstream:
        with pytest.raises(ConnectFailed):
            await call(upstream, url)
        assert upstream.connections(url) == (0, 0)


async def test_the_pool_bounds_open_connections_per_endpoint() -> None:
    gate, two_in = asyncio.Event(), asyncio.Event()

    async def script(
        me: Instance, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while await read_request(reader, me):
            if len(me.requests) == 2:
                two_in.set()
            await gate.wait()
            writer.write(OK)

    async with instance(script) as me, client(pool_size=2) as upstream:
        calls = [asyncio.create_task(call(upstream, me.url)) for _ in range(6)]
        await asyncio.wait_for(two_in.wait(), 5)
        assert upstream.connections(me.url) == (2, 0)
        gate.set()
        answers = await asyncio.gather(*calls)
        assert [a.body for a in answers] == [b"hello"] * 6
        assert me.most_open == 2
        assert upstream.connections(me.url) == (2, 2)


async def test_waiting_for_room_counts_against_the_deadline() -> None:
    async def script(
        me: Instance, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader, me)
        await reader.read()

    async with instance(script) as me, client(pool_size=1) as upstream:
        first = asyncio.create_task(call(upstream, me.url, timeout=5))
        with pytest.raises(TimeoutError):
            await call(upstream, me.url, timeout=0.05)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        assert me.accepted == 1


async def test_idle_connections_close_after_the_keepalive_time() -> None:
    async with instance(answering(OK, then_eof=True)) as me, client(keepalive=0.05) as upstream:
        await call(upstream, me.url)
        await asyncio.wait_for(me.closed_by_client.wait(), 5)


async def test_an_abandoned_stream_closes_its_connection() -> None:
    async def script(
        me: Instance, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader, me)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await reader.read()
        me.closed_by_client.set()

    async with instance(script) as me, client() as upstream:
        response = await call(upstream, me.url)
        assert await response.read() == b"hello"
        response.close()
        await asyncio.wait_for(me.closed_by_client.wait(), 5)


async def test_a_slow_reader_holds_back_a_large_stream() -> None:
    size = 32 * 1024 * 1024
    sent = asyncio.Event()

    async def script(
        me: Instance, n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await read_request(reader, me)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"y" * size)
        await writer.drain()
        sent.set()

    async with instance(script) as me, client() as upstream:
        response = await call(upstream, me.url, limit=0)
        for _ in range(200):  # loop turns enough to read it all, were reading not paused
            await asyncio.sleep(0)
        assert not sent.is_set()
        first = await response.read()
        assert len(first) <= 1024 * 1024
        assert len(first) + len(await read_all(response)) == size
        assert sent.is_set()


async def test_start_sends_on_an_idle_connection_and_hands_the_answer_on_at_once() -> None:
    answers: list[tuple[Response | None, BaseException | None]] = []
    got = asyncio.Event()

    def answered(response: Response | None, error: BaseException | None) -> None:
        answers.append((response, error))
        got.set()

    async with instance(answering(OK)) as me, client() as upstream:
        # No connection yet: nothing is sent, the caller takes the coroutine path.
        assert not upstream.start(
            me.url, "POST", "/ns/fn", [], b"x", timeout=5, buffer_limit=1024, answered=answered
        )
        assert (await call(upstream, me.url)).body == b"hello"
        assert upstream.start(
            me.url, "POST", "/ns/fn", [], b"x", timeout=5, buffer_limit=1024, answered=answered
        )
        # The one connection is busy now: another start finds none idle.
        assert not upstream.start(
            me.url, "POST", "/ns/fn", [], b"y", timeout=5, buffer_limit=1024, answered=answered
        )
        await asyncio.wait_for(got.wait(), 5)
        ((response, error),) = answers
        assert error is None
        assert response is not None
        assert (response.status, response.body) == (200, b"hello")
        assert me.accepted == 1
        assert upstream.connections(me.url) == (1, 1)  # back in the pool


async def test_start_hands_on_a_stale_connection_and_a_failing_callback_is_contained() -> None:
    errors: list[BaseException | None] = []
    got = asyncio.Event()

    def answered(response: Response | None, error: BaseException | None) -> None:
        errors.append(error)
        got.set()
        raise RuntimeError("a bug in the caller")  # logged; the client goes on

    async with instance(closes_the_second_request_unanswered()) as me, client() as upstream:
        assert (await call(upstream, me.url)).body == b"hello"
        assert upstream.start(
            me.url, "GET", "/ns/fn", [], b"", timeout=5, buffer_limit=1024, answered=answered
        )
        await asyncio.wait_for(got.wait(), 5)
        assert len(errors) == 1
        assert isinstance(errors[0], StaleConnection)
        assert (await call(upstream, me.url)).body == b"hello"  # a fresh connection serves
