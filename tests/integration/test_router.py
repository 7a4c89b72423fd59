"""The router's synchronous path over real HTTP: a router served in-process against the
session's nats-server, and small aiohttp servers on ephemeral ports standing in for instances."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import socket
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from lambdabus_events.models import (
    FunctionConfig,
    FunctionRecord,
    InstanceStarting,
    ScaleSpec,
    SourceRef,
)
from lambdabus_platform.bus import Bus
from lambdabus_platform.registry import Registry
from lambdabus_platform.service import serve
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.subjects import DEPLOYMENTS_BUCKET, FUNCTIONS_BUCKET, starting_subject
from lambdabus_router.__main__ import client_max_size, make_setup
from lambdabus_router.calls import Caller, NoReadyInstance
from lambdabus_router.proxy import Router
from lambdabus_router.settings import RouterSettings
from lambdabus_router.upstream import Upstream
from tests.integration.routing import deploy_endpoints

LIMIT = 4096


@dataclass
class Backend:
    name: str
    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set at each request


@contextlib.asynccontextmanager
async def backend(name: str) -> AsyncIterator[Backend]:
    """An "instance": echoes what it got; `/…/sleep` waits until released."""
    me = Backend(name)

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = {
            "method": request.method,
            "path": request.raw_path,
            "headers": list(request.headers.items()),
            "body": body,
        }
        me.seen.append(seen)
        me.arrived.set()
        if request.path.endswith("/stream"):
            stream = web.StreamResponse(status=200, headers={"X-Backend": name})
            await stream.prepare(request)
            for i in range(3):
                await stream.write(f"chunk {i};".encode())
            await stream.write_eof()
            return stream
        if request.path.endswith("/spoof"):  # a function posing as the router
            return web.Response(
                headers={
                    "X-Lambdabus-Invocation-Id": "forged",
                    "X-Lambdabus-Revision": "forged",
                    "X-Backend": name,
                }
            )
        if request.path.endswith("/latehang"):
            await asyncio.sleep(0.3)  # then as /hang
        if request.path.endswith("hang"):  # a streamed answer that stalls after one chunk
            stream = web.StreamResponse(status=200)
            await stream.prepare(request)
            if request.path.endswith("/latehang"):
                await stream.drain()  # the head alone, as an event stream's
            else:
                await stream.write(b"first;")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(me.release.wait(), 20)
            return stream
        if request.path.endswith("/gzip"):
            packed = gzip.compress(b"squeezed " * 100)
            return web.Response(
                body=packed, headers={"Content-Encoding": "gzip", "X-Backend": name}
            )
        if request.path.endswith("/sleep"):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(me.release.wait(), 10)
        response = web.Response(status=201, body=b"from " + name.encode() + b": " + body)
        response.headers["X-Backend"] = name
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        response.headers["Keep-Alive"] = "timeout=99"
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    me.url = f"http://127.0.0.1:{port}"
    try:
        yield me
    finally:
        me.release.set()
        await runner.cleanup()


def closed_port_url() -> str:
    """A loopback URL nobody listens on: a port the kernel gave us, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class RunningRouter:
    url: str
    http: aiohttp.ClientSession
    router: Router
    bus: Bus
    namespace: str

    async def add_function(
        self, name: str, endpoints: list[str] | None, *, timeout: float = 30.0, **spec: Any
    ) -> None:
        """A function record, and (unless `endpoints` is None) its deployment state."""
        now = datetime.now(UTC)
        record = FunctionRecord(
            namespace=self.namespace,
            name=name,
            uid=f"uid-{name}",
            generation=1,
            spec=FunctionConfig(timeout=timeout, **spec),
            source=SourceRef(
                sha256="0" * 64, size=1, kind="inline", entrypoint="lambda_main.py", files=1
            ),
            created_at=now,
            updated_at=now,
        )
        await Registry(self.bus.kv(FUNCTIONS_BUCKET), FunctionRecord).put(
            self.namespace, name, record
        )
        if endpoints is not None:
            await self.deploy(name, endpoints, timeout=timeout)
        fid = (self.namespace, name)
        await asyncio.wait_for(
            self.router.until(lambda r: fid in r.known and (endpoints is None or fid in r.table)),
            5,
        )

    async def deploy(self, name: str, endpoints: list[str], *, timeout: float = 30.0) -> None:
        await deploy_endpoints(
            self.bus, self.router, self.namespace, name, endpoints, timeout=timeout
        )


@pytest.fixture
async def router(nats_settings: NatsSettings, bus: Bus) -> AsyncIterator[RunningRouter]:
    settings = RouterSettings(
        port=0, nats=nats_settings, max_body_bytes=LIMIT, timeout_margin_seconds=0.1
    )
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    got: asyncio.Future[Router] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(
            "router",
            settings,
            make_setup(settings, on_router=got.set_result),
            client_max_size=client_max_size(settings),
            stop=stop,
            on_ready=ready.set_result,
        )
    )
    waiters: set[asyncio.Future[Any]] = {task, ready}
    done, _ = await asyncio.wait(waiters, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    url = await asyncio.wait_for(ready, 1)
    try:
        async with aiohttp.ClientSession(base_url=url) as http:
            yield RunningRouter(url, http, got.result(), bus, f"r{uuid.uuid4().hex[:10]}")
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def error_code(response: aiohttp.ClientResponse) -> str:
    body = await response.json()
    return str(body["error"]["code"])


async def test_forwards_the_request_as_it_came_and_spreads_load(router: RunningRouter) -> None:
    async with backend("a") as a, backend("b") as b:
        await router.add_function("echo", [a.url, b.url])
        ns = router.namespace
        path = f"/{ns}/echo/some/deep/path%20x?q=1&q=2&sp=a%2Fb"
        async with router.http.patch(
            URL(path, encoded=True),
            data=b"\x00binary body\xff",
            headers={
                "X-Custom": "kept",
                "Content-Type": "application/x-thing",
                "Keep-Alive": "timeout=5",
                "Proxy-Authorization": "secret",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "dropped",
                "X-Forwarded-For": "203.0.113.9",
            },
        ) as response:
            assert response.status == 201
            body = await response.read()
            assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
            assert "Keep-Alive" not in response.headers
            backend_name = response.headers["X-Backend"]
        assert body == f"from {backend_name}: ".encode() + b"\x00binary body\xff"
        (seen,) = (a.seen if backend_name == "a" else b.seen)[-1:]
        assert seen["method"] == "PATCH"
        assert seen["path"] == path
        assert seen["body"] == b"\x00binary body\xff"
        headers = dict(seen["headers"])
        assert headers["X-Custom"] == "kept"
        assert headers["Content-Type"] == "application/x-thing"
        for hop in ("Keep-Alive", "Proxy-Authorization", "X-Hop"):
            assert hop not in headers
        assert headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
        assert headers["X-Forwarded-Host"] == router.url.removeprefix("http://")
        assert headers["X-Forwarded-Proto"] == "http"
        assert "User-Agent" in headers  # the caller's, relayed; nothing added of the router's
        assert headers["User-Agent"].startswith("Python/")

        for _ in range(10):
            async with router.http.get(f"/{ns}/echo") as response:
                assert response.status == 201
        assert {s["path"] for s in a.seen + b.seen} >= {f"/{ns}/echo"}
        assert len(a.seen) >= 4
        assert len(b.seen) >= 4


async def test_unknown_function_is_404_and_a_bad_name_400(router: RunningRouter) -> None:
    async with router.http.get(f"/{router.namespace}/nope/x") as response:
        assert response.status == 404
        assert await error_code(response) == "function_not_found"
    for bad in ("/Upper/fn", "/ns/under_score", f"/ns/{'a' * 64}", "/ns/x.y"):
        async with router.http.post(bad, data=b"x") as response:
            assert response.status == 400, bad
            assert await error_code(response) == "invalid_name"


async def test_known_function_without_a_ready_instance_is_503(router: RunningRouter) -> None:
    await router.add_function("cold", None)
    await router.add_function("empty", [])
    for name in ("cold", "empty"):
        async with router.http.get(f"/{router.namespace}/{name}") as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "1"
            assert await error_code(response) == "no_ready_instance"


async def test_body_over_the_limit_is_413(router: RunningRouter) -> None:
    async with backend("a") as a:
        await router.add_function("big", [a.url])
        url = f"/{router.namespace}/big"
        async with router.http.post(url, data=b"x" * (LIMIT + 1)) as response:
            assert response.status == 413
            assert await error_code(response) == "payload_too_large"

        async def chunked(total: int) -> AsyncIterator[bytes]:
            for _ in range(total // 1024):
                yield b"y" * 1024

        async with router.http.post(url, data=chunked(LIMIT + 2048)) as response:
            assert response.status == 413
            assert await error_code(response) == "payload_too_large"
        async with router.http.post(url, data=chunked(LIMIT)) as response:
            assert response.status == 201
            assert await response.read() == b"from a: " + b"y" * LIMIT
        assert len(a.seen) == 1


async def test_a_function_past_its_timeout_is_504(router: RunningRouter) -> None:
    async with backend("slow") as slow:
        await router.add_function("slow", [slow.url], timeout=0.2)
        started = asyncio.get_running_loop().time()
        async with router.http.post(f"/{router.namespace}/slow/sleep", data=b"x") as response:
            assert response.status == 504
            assert await error_code(response) == "function_timeout"
        assert asyncio.get_running_loop().time() - started < 5
        assert len(slow.seen) == 1


async def test_an_endpoint_removed_from_kv_gets_no_more_traffic(router: RunningRouter) -> None:
    async with backend("a") as a, backend("b") as b:
        await router.add_function("shift", [a.url, b.url])
        url = f"/{router.namespace}/shift"
        for _ in range(6):
            async with router.http.get(url) as response:
                assert response.status == 201
        assert a.seen
        assert b.seen
        await router.deploy("shift", [b.url])
        before = len(a.seen)
        for _ in range(6):
            async with router.http.get(url) as response:
                assert response.headers["X-Backend"] == "b"
        assert len(a.seen) == before

        await router.bus.kv(DEPLOYMENTS_BUCKET).delete(f"{router.namespace}.shift")
        fid = (router.namespace, "shift")
        await asyncio.wait_for(router.router.until(lambda r: fid not in r.table), 5)
        async with router.http.get(url) as response:
            assert response.status == 503


async def test_a_refused_connection_goes_to_the_other_endpoint(router: RunningRouter) -> None:
    dead = closed_port_url()
    async with backend("b") as b:
        await router.add_function("flaky", [dead, b.url])
        for _ in range(6):
            async with router.http.post(f"/{router.namespace}/flaky", data=b"once") as response:
                assert response.status == 201
                assert response.headers["X-Backend"] == "b"
        assert len(b.seen) == 6
    await router.add_function("dead", [dead])
    async with router.http.get(f"/{router.namespace}/dead") as response:
        assert response.status == 502
        assert await error_code(response) == "bad_gateway"


@contextlib.asynccontextmanager
async def reads_then_drops() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An instance-like server: answers the first request on a connection, then reads the next
    one whole (its body included) and drops the connection without answering."""
    bodies: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for answered in (True, False):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                bodies.append(await reader.readexactly(length))
                if answered:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", bodies


async def test_a_body_the_instance_read_is_never_sent_again(router: RunningRouter) -> None:
    async with reads_then_drops() as (url, bodies):
        await router.add_function("once", [url])
        path = f"/{router.namespace}/once"
        async with router.http.post(path, data=b"first") as response:
            assert (response.status, await response.read()) == (200, b"ok")
        # The router's pooled connection now carries the second call, which the instance reads
        # and drops: it may have run it, so it is neither resent nor given to another instance.
        async with router.http.post(path, data=b"charge the card") as response:
            assert response.status == 502
            assert await error_code(response) == "instance_disconnected"
        assert bodies == [b"first", b"charge the card"]
        async with router.http.post(path, data=b"third") as response:  # a fresh connection
            assert response.status == 200
        assert bodies[-1] == b"third"


async def test_a_safe_request_is_sent_again_when_the_pooled_connection_was_dropped(
    router: RunningRouter,
) -> None:
    async with reads_then_drops() as (url, bodies):
        await router.add_function("again", [url])
        path = f"/{router.namespace}/again"
        async with router.http.get(path) as response:
            assert (response.status, await response.read()) == (200, b"ok")
        served = router.router.served_by_front
        # Read and dropped on the pooled connection: a GET without a body changes nothing, so
        # it goes again on a fresh connection, which answers.
        async with router.http.get(path) as response:
            assert (response.status, await response.read()) == (200, b"ok")
        assert len(bodies) == 3
        assert router.router.served_by_front == served + 1


@contextlib.asynccontextmanager
async def counting_backend() -> AsyncIterator[tuple[str, list[int]]]:
    """An instance that takes 0.2 s per request and records how many it had in flight."""
    seen: list[int] = []
    now = [0]

    async def slow(request: web.Request) -> web.Response:
        now[0] += 1
        seen.append(now[0])
        try:
            await asyncio.sleep(0.2)
        finally:
            now[0] -= 1
        return web.Response(text="done")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


async def test_requests_over_the_per_instance_concurrency_wait_for_a_slot(
    router: RunningRouter,
) -> None:
    async with counting_backend() as (one, seen_one), counting_backend() as (two, seen_two):
        await router.add_function("one-at-a-time", [one, two], concurrency=1)

        async def call() -> int:
            async with router.http.post(f"/{router.namespace}/one-at-a-time") as response:
                return response.status

        loop = asyncio.get_running_loop()
        started = loop.time()
        statuses = await asyncio.gather(*(call() for _ in range(6)))
        took = loop.time() - started
    assert statuses == [200] * 6
    assert max(seen_one) == 1
    assert max(seen_two) == 1  # never two at once on an instance: the others waited
    assert len(seen_one) + len(seen_two) == 6
    assert took >= 0.55  # 6 requests, 2 instances, 1 at a time, 0.2 s each


async def test_a_function_at_zero_is_woken_and_its_held_request_goes_on(
    router: RunningRouter,
) -> None:
    woken: list[tuple[str, str]] = []
    async with backend("late") as late:

        async def wake(fid: tuple[str, str]) -> None:
            woken.append(fid)
            if len(woken) == 1:  # the "deployer" starts an instance a little later
                asyncio.get_running_loop().call_later(
                    0.3, lambda: asyncio.ensure_future(router.deploy("sleepy", [late.url]))
                )

        router.router.wake = wake
        await router.add_function("sleepy", None, scale=ScaleSpec(min=0, max=2))
        fid = (router.namespace, "sleepy")
        # An event delivery finding no instance wakes it too (and waits: no attempt).
        caller = Caller(
            router.router, Upstream(pool_size=1, connect_timeout=1, keepalive=1), body_limit=LIMIT
        )
        with pytest.raises(NoReadyInstance):
            await caller.call(fid, "POST", "/", [], b"", timeout=1)
        assert woken == [fid]
        woken.clear()
        async with router.http.post(f"/{router.namespace}/sleepy", data=b"held") as response:
            assert response.status == 201
            assert await response.read() == b"from late: held"
        assert woken
        assert set(woken) == {fid}


@contextlib.asynccontextmanager
async def unix_instance(path: Path, name: str) -> AsyncIterator[None]:
    """An "instance" listening on a unix socket, as a sandboxed runtime does."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(
            status=201, body=b"from " + name.encode() + b": " + await request.read()
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        yield
    finally:
        await runner.cleanup()


async def announce(router: RunningRouter, name: str, endpoint: str, *, uid: str = "") -> None:
    notice = InstanceStarting(
        namespace=router.namespace,
        name=name,
        uid=uid or f"uid-{name}",
        revision=f"{name}-00002",
        endpoint=endpoint,
    )
    subject = starting_subject(router.namespace, name)
    await router.bus.publish_nowait(subject, notice.model_dump_json().encode())


@pytest.mark.parametrize("concurrency", [0, 1])
async def test_a_held_request_goes_to_the_announced_instance_once_it_listens(
    router: RunningRouter, tmp_path: Path, concurrency: int
) -> None:
    """The deployer announces where a pre-started runtime it specialises will listen; the
    held request goes there the moment it accepts, though no state ever says it is ready
    (also under a per-instance concurrency limit, which counts the announced instance)."""
    socket_path = tmp_path / "fn.sock"
    listening: list[asyncio.Future[None]] = []
    async with contextlib.AsyncExitStack() as instance:

        async def listen_later() -> None:
            await asyncio.sleep(0.3)  # the runtime loads the function meanwhile
            await instance.enter_async_context(unix_instance(socket_path, "announced"))

        async def wake(fid: tuple[str, str]) -> None:
            if not listening:
                await announce(router, "announced", f"unix:{socket_path}")
                listening.append(asyncio.ensure_future(listen_later()))

        scale = ScaleSpec(min=0, max=2)
        await router.add_function("announced", [], timeout=3, scale=scale, concurrency=concurrency)
        fid = (router.namespace, "announced")
        router.router.settings.cold_start_timeout_seconds = 5
        router.router.wake = wake
        async with router.http.post(f"/{router.namespace}/announced", data=b"held") as response:
            assert response.status == 201
            assert await response.read() == b"from announced: held"
            assert response.headers["X-Lambdabus-Revision"] == "announced-00002"
        await listening[0]
    assert router.router.table[fid].endpoints == []  # the state never said so
    assert fid not in router.router.starting  # nothing held: forgotten


async def held_call_with_a_notice(
    router: RunningRouter, name: str, endpoint: str, *, uid: str = "", state_after: float
) -> tuple[bytes, int]:
    """Call `name`, at zero: its first wake announces `endpoint` (as `uid`), and the state
    names an instance `state_after` seconds later. The answer's body and the wakes seen."""
    woken: list[tuple[str, str]] = []
    async with backend("stated") as stated:

        async def wake(fid: tuple[str, str]) -> None:
            woken.append(fid)
            if len(woken) == 1:
                await announce(router, name, endpoint, uid=uid)
                asyncio.get_running_loop().call_later(
                    state_after, lambda: asyncio.ensure_future(router.deploy(name, [stated.url]))
                )

        await router.add_function(name, [], scale=ScaleSpec(min=0, max=2))
        router.router.wake = wake
        async with router.http.post(f"/{router.namespace}/{name}", data=b"held") as response:
            assert response.status == 201
            return await response.read(), len(woken)


async def test_an_announced_instance_of_another_uid_is_not_where_the_request_goes(
    router: RunningRouter, tmp_path: Path
) -> None:
    """A notice of another function of that name (deleted and made again: another uid) is
    ignored, though its runtime listens: the request waits for the state."""
    other = tmp_path / "other.sock"
    async with unix_instance(other, "other"):
        body, _ = await held_call_with_a_notice(
            router, "foreign", f"unix:{other}", uid="uid-old", state_after=0.3
        )
    assert body == b"from stated: held"


async def test_an_announced_instance_that_never_listens_leaves_the_request_to_the_state(
    router: RunningRouter, tmp_path: Path
) -> None:
    """A notice whose runtime never accepts (it failed to load, or its specialisation
    failed) is given up after the wake interval; the request goes where the state says."""
    router.router.settings.wake_repeat_seconds = 0.2
    never = f"unix:{tmp_path / 'never.sock'}"
    body, wakes = await held_call_with_a_notice(router, "never", never, state_after=0.7)
    assert body == b"from stated: held"
    assert wakes >= 3  # woken again after the notice was given up, as before it


async def test_requests_past_the_hold_bound_are_503_with_retry_after(
    router: RunningRouter,
) -> None:
    router.router.settings.cold_queue_max_requests = 2
    router.router.settings.cold_start_timeout_seconds = 0.5
    router.router.wake = None
    await router.add_function("never", None, scale=ScaleSpec(min=0, max=2))

    async def call() -> tuple[int, str, str | None]:
        async with router.http.get(f"/{router.namespace}/never") as response:
            return response.status, await error_code(response), response.headers.get("Retry-After")

    answers = await asyncio.gather(*(call() for _ in range(5)))
    assert (
        sorted(a[:2] for a in answers)
        == [(503, "cold_queue_full")] * 3 + [(503, "no_ready_instance")] * 2
    )
    assert all(a[2] for a in answers)


async def test_invocations_are_counted_by_function_and_status(router: RunningRouter) -> None:
    async with backend("a") as a:
        await router.add_function("counted", [a.url])
        for _ in range(3):
            async with router.http.get(f"/{router.namespace}/counted") as response:
                assert response.status == 201
    async with router.http.get("/metrics") as response:
        text = await response.text()
    ns = router.namespace
    assert (
        f'lambdabus_router_invocations_total{{function="counted",namespace="{ns}",status="201"}} 3.0'
        in text
    )
    assert (
        f'lambdabus_router_invocation_duration_seconds_count{{function="counted",namespace="{ns}"}} 3.0'
        in text
    )


async def test_responses_are_relayed_as_they_came(router: RunningRouter) -> None:
    """An unsized (chunked) response is streamed through; a compressed one is not unpacked."""
    async with backend("a") as a:
        await router.add_function("relay", [a.url])
        async with router.http.get(f"/{router.namespace}/relay/stream") as response:
            assert response.status == 200
            assert await response.read() == b"chunk 0;chunk 1;chunk 2;"
        async with (
            aiohttp.ClientSession(base_url=router.url, auto_decompress=False) as raw,
            raw.get(f"/{router.namespace}/relay/gzip") as response,
        ):
            assert response.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(await response.read()) == b"squeezed " * 100
        async with router.http.head(f"/{router.namespace}/relay/x") as response:
            assert response.status == 201
            assert response.headers["X-Backend"] == "a"


async def test_every_invocation_has_an_id_the_function_sees_and_the_caller_reads(
    router: RunningRouter,
) -> None:
    async with backend("a") as a:
        await router.add_function("ided", [a.url])
        ns = router.namespace
        ids = []
        for _ in range(3):
            # a caller's own id is not taken: the router's replaces it
            spoof = {"X-Lambdabus-Invocation-Id": "chosen-by-the-caller"}
            async with router.http.post(f"/{ns}/ided", data=b"x", headers=spoof) as response:
                assert response.status == 201
                ids.append(response.headers["X-Lambdabus-Invocation-Id"])
        seen = [dict(s["headers"])["X-Lambdabus-Invocation-Id"] for s in a.seen[-3:]]
        assert seen == ids
        assert len(set(ids)) == 3
        assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
        async with router.http.get(f"/{ns}/nope") as response:  # refused ones have one too
            assert response.status == 404
            assert len(response.headers["X-Lambdabus-Invocation-Id"]) == 32


async def raw_exchange(url: str, data: bytes, responses: int) -> list[bytes]:
    """Send `data` as is on one connection; read `responses` answers (sized bodies only)."""
    host, _, port = url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        answers = []
        for _ in range(responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            answers.append(head + await reader.readexactly(length))
        return answers
    finally:
        writer.close()


async def test_plain_calls_take_the_fast_path_with_the_same_headers_both_ways(
    router: RunningRouter,
) -> None:
    async with backend("a") as a:
        await router.add_function("fast", [a.url])
        r = router.router
        served, handed = r.served_by_front, r.handed_off
        async with router.http.post(
            f"/{router.namespace}/fast/x?q=1",
            data=b"payload",
            headers={
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "dropped",
                "Proxy-Authorization": "secret",
                "X-Forwarded-For": "203.0.113.9",
                "X-Lambdabus-Invocation-Id": "chosen-by-the-caller",
            },
        ) as response:
            assert response.status == 201
            assert await response.read() == b"from a: payload"
            assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
            assert "Keep-Alive" not in response.headers
            assert response.headers["Date"]
            invocation = response.headers["X-Lambdabus-Invocation-Id"]
        assert (r.served_by_front, r.handed_off) == (served + 1, handed)
        seen = a.seen[-1]
        assert seen["path"] == f"/{router.namespace}/fast/x?q=1"
        headers = dict(seen["headers"])
        assert headers["X-Custom"] == "kept"
        for hop in ("X-Hop", "Proxy-Authorization", "Keep-Alive"):
            assert hop not in headers
        assert headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
        assert headers["X-Forwarded-Host"] == router.url.removeprefix("http://")
        assert headers["X-Forwarded-Proto"] == "http"
        assert headers["X-Lambdabus-Invocation-Id"] == invocation != "chosen-by-the-caller"
        # Each of these goes to aiohttp on a connection of its own, and is answered the same.
        async with router.http.head(f"/{router.namespace}/fast/x") as response:
            assert response.status == 201
        async with router.http.get(f"/{router.namespace}/fast/%78") as response:
            assert response.status == 201
        async with router.http.get(f"/{router.namespace}/nope") as response:
            assert response.status == 404
            assert len(response.headers["X-Lambdabus-Invocation-Id"]) == 32
        async with router.http.get("/healthz") as response:
            assert response.status == 200
        assert r.handed_off >= handed + 1
        assert r.served_by_front == served + 1


async def test_the_fast_path_serves_pipelined_requests_in_order_and_hands_off_midway(
    router: RunningRouter,
) -> None:
    async with backend("a") as a:
        await router.add_function("piped", [a.url])
        ns = router.namespace
        host = router.url.removeprefix("http://")
        first = f"POST /{ns}/piped/1 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\none"
        second = f"POST /{ns}/piped/2 HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\ntwo"
        # HTTP/1.0: not the fast path's; aiohttp takes the connection from there on
        third = f"GET /{ns}/piped/3 HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n"
        answers = await raw_exchange(router.url, (first + second + third).encode(), 3)
        assert answers[0].startswith(b"HTTP/1.1 201 ")
        assert answers[0].endswith(b"from a: one")
        assert answers[1].endswith(b"from a: two")
        assert answers[2].startswith(b"HTTP/1.0 201 ")  # from aiohttp
        assert [s["path"] for s in a.seen[-3:]] == [f"/{ns}/piped/{i}" for i in (1, 2, 3)]
        # A body that comes in pieces is waited for; a head with a bare LF goes to aiohttp,
        # which refuses it.
        host_, _, port = host.partition(":")
        reader, writer = await asyncio.open_connection(host_, int(port))
        try:
            writer.write(
                f"PUT /{ns}/piped HTTP/1.1\r\nHost: {host}\r\nContent-Length: 6\r\n\r\nab".encode()
            )
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"cdef")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 201 ")
        finally:
            writer.close()
        assert a.seen[-1]["body"] == b"abcdef"
        (bad,) = await raw_exchange(
            router.url, f"GET /{ns}/piped HTTP/1.1\nHost: {host}\r\n\r\n".encode(), 1
        )
        assert bad.split(b"\r\n")[0].endswith(b" 400 Bad Request")


async def test_the_fast_path_closes_when_asked_and_answers_errors_as_the_platform_does(
    router: RunningRouter,
) -> None:
    await router.add_function("starting", None)
    ns = router.namespace
    host = router.url.removeprefix("http://")
    request = f"GET /{ns}/starting HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    (answer,) = await raw_exchange(router.url, request.encode(), 1)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert "Connection: close" in lines
    assert "X-Lambdabus-Error: no_ready_instance" in lines
    assert "Retry-After: 1" in lines
    assert b'"code": "no_ready_instance"' in body


async def test_requests_in_flight_are_counted_per_revision_on_both_paths(
    router: RunningRouter,
) -> None:
    """The fast path (`Router.start`) and the coroutine path (here: per-instance
    `concurrency`) both count a request against the revision it went to, until it is
    answered: the load samples' per-revision part."""
    async with backend("a") as a:
        ns = router.namespace
        for name, spec in (("quick", {}), ("limited", {"concurrency": 1})):
            await router.add_function(name, None, **spec)
            await deploy_endpoints(
                router.bus, router.router, ns, name, [a.url], revision=f"{name}-00001"
            )
            key = ((ns, name), f"{name}-00001")
            a.release.clear()
            a.arrived.clear()
            call = asyncio.create_task(router.http.get(f"/{ns}/{name}/sleep"))
            await asyncio.wait_for(a.arrived.wait(), 5)  # the instance has it: in flight
            assert router.router.revision_in_flight.get(key) == 1
            a.release.set()
            async with await call as response:
                assert response.status == 201
                assert response.headers["X-Lambdabus-Revision"] == f"{name}-00001"
            assert key not in router.router.revision_in_flight


async def test_the_fast_path_hands_aiohttp_what_its_parser_refuses(router: RunningRouter) -> None:
    """Hostile heads the fast path must not serve: aiohttp (llhttp) refuses each with 400 and
    the instance never sees them (control bytes or raw non-ASCII in the target or a header
    value, a Content-Length of more digits than `int` takes, a head past the head bound that
    came in one read)."""
    async with backend("a") as a:
        await router.add_function("strict", [a.url])
        ns = router.namespace
        host = router.url.removeprefix("http://").encode()
        start = f"POST /{ns}/strict".encode()
        hostile = [
            start + b"/a\x01b HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
            start + b"/a\x7fb HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
            start + b"/a\tb HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
            start + b"/\xc3\xa9 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
            start + b" HTTP/1.1\r\nHost: " + host + b"\r\nX-A: a\x0bb\r\n\r\n",
            start + b" HTTP/1.1\r\nHost: " + host + b"\r\nX-A: a\x1bb\r\n\r\n",
            start
            + b" HTTP/1.1\r\nHost: "
            + host
            + b"\r\nContent-Length: "
            + b"9" * 5000
            + b"\r\n\r\n",
            start + b" HTTP/1.1\r\nHost: " + host + b"\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
        ]
        # (the instance here is aiohttp too, and would refuse them as well: what counts is
        # that the router's own parser never took them)
        served = router.router.served_by_front
        for request in hostile:
            (answer,) = await raw_exchange(router.url, request, 1)
            assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request"), request[:60]
            assert router.router.served_by_front == served, request[:60]
        assert a.seen == []


async def test_a_body_in_many_pieces_is_parsed_once(
    router: RunningRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head of a request whose body is still coming is parsed once, not at every piece
    (a body sent a byte at a time must not cost a parse and a copy of the buffer each)."""
    from lambdabus_router import front

    calls: list[int] = []
    parse = front._parse

    def counting(*args: Any) -> Any:
        calls.append(1)
        return parse(*args)

    monkeypatch.setattr(front, "_parse", counting)
    async with backend("a") as a:
        await router.add_function("drip", [a.url])
        host = router.url.removeprefix("http://")
        host_, _, port = host.partition(":")
        reader, writer = await asyncio.open_connection(host_, int(port))
        body = b"x" * 40
        try:
            writer.write(
                f"PUT /{router.namespace}/drip HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            for i in range(0, len(body), 2):
                await writer.drain()
                await asyncio.sleep(0.005)
                writer.write(body[i : i + 2])
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 201 ")
        finally:
            writer.close()
        assert a.seen[-1]["body"] == body
        assert len(calls) == 1


async def test_the_fast_path_closes_after_the_answer_once_the_caller_sent_eof(
    router: RunningRouter,
) -> None:
    """A caller that half-closed its side gets its answer, then the connection ends (it is not
    held open until the keep-alive timeout)."""
    async with backend("a") as a:
        await router.add_function("halfclose", [a.url])
        host = router.url.removeprefix("http://")
        host_, _, port = host.partition(":")
        reader, writer = await asyncio.open_connection(host_, int(port))
        try:
            writer.write(
                f"GET /{router.namespace}/halfclose HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            )
            await writer.drain()
            writer.write_eof()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 201 ")
            rest = await asyncio.wait_for(reader.read(), 10)  # EOF, not the 75 s keep-alive
            assert rest.endswith(b"from a: ")
        finally:
            writer.close()


async def test_the_fast_path_never_frames_an_ambiguous_request(router: RunningRouter) -> None:
    """Smuggling attempts (RFC 9112 §6.3): each head the fast path could frame otherwise than
    aiohttp goes to aiohttp, which refuses it; none reaches the instance."""
    async with backend("a") as a:
        await router.add_function("framing", [a.url])
        host = router.url.removeprefix("http://")
        start = f"POST /{router.namespace}/framing HTTP/1.1\r\nHost: {host}\r\n"
        hostile = [
            "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
            "Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            "Content-Length: +3\r\n\r\nabc",
            "Content-Length: -1\r\n\r\n",
            "Content-Length: 0x3\r\n\r\nabc",
            "Content-Length : 3\r\n\r\nabc",
            "Content-Length:\r\n\r\n",
            "X-A: a\r\n folded\r\nContent-Length: 3\r\n\r\nabc",
            "Content-Length: 3\nX-A: b\r\n\r\nabc",
            "Content-Length: 3\rX-A: b\r\n\r\nabc",
            "X A: b\r\n\r\n",
            "Content-Length: 3\r\n\r\nabcGET /x HTTP/1.1\r\nHost: a\nContent-Length: 1\r\n\r\n",
        ]
        served = router.router.served_by_front
        for i, rest in enumerate(hostile):
            answers = await raw_exchange(router.url, (start + rest).encode(), 1 + (i == 12))
            assert answers[-1].split(b"\r\n")[0].endswith(b" 400 Bad Request"), rest
        # only the first request of the last one was plain
        assert router.router.served_by_front == served + 1
        assert [s["body"] for s in a.seen] == [b"abc"]


async def test_a_stalled_streamed_answer_is_dropped_when_the_caller_goes(
    router: RunningRouter,
) -> None:
    """The caller of a streamed answer goes away while the instance is silent: the router gives
    up the instance's connection at once, not at the next chunk or the function's timeout."""
    async with backend("a") as a:
        await router.add_function("stall", [a.url], timeout=60)
        host = router.url.removeprefix("http://")
        host_, _, port = host.partition(":")
        reader, writer = await asyncio.open_connection(host_, int(port))
        writer.write(
            f"GET /{router.namespace}/stall/hang HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert b"Transfer-Encoding: chunked" in head
        assert b"first;" in await asyncio.wait_for(reader.readuntil(b"first;\r\n"), 10)
        in_flight = router.router.in_flight
        assert sum(in_flight.values()) == 1
        writer.close()
        deadline = asyncio.get_running_loop().time() + 5
        while sum(in_flight.values()):
            assert asyncio.get_running_loop().time() < deadline, "the instance is still held"
            await asyncio.sleep(0.02)
        assert not a.release.is_set()  # the instance is still stalled


async def test_a_function_cannot_forge_the_routers_answer_headers(router: RunningRouter) -> None:
    """The invocation id and the revision on an answer are the router's, on either path: a
    function's own are replaced, never sent beside them."""
    async with backend("a") as a:
        await router.add_function("forger", [a.url])
        host = router.url.removeprefix("http://")
        for version in ("1.1", "1.0"):  # the fast path, then aiohttp's
            request = f"GET /{router.namespace}/forger/spoof HTTP/{version}\r\nHost: {host}\r\n\r\n"
            (answer,) = await raw_exchange(router.url, request.encode(), 1)
            lines = answer.partition(b"\r\n\r\n")[0].decode().split("\r\n")
            ids = [ln for ln in lines if ln.lower().startswith("x-lambdabus-invocation-id:")]
            revisions = [ln for ln in lines if ln.lower().startswith("x-lambdabus-revision:")]
            assert len(ids) == 1, (version, lines)
            assert "forged" not in ids[0], (version, lines)
            # (no revision here: the router sends none, and passes on none of the function's)
            assert revisions == [], (version, lines)
            assert "X-Backend: a" in lines


async def test_a_head_with_more_headers_than_aiohttp_takes_goes_to_aiohttp(
    router: RunningRouter,
) -> None:
    """aiohttp refuses more than 128 header lines; the fast path does not serve such a head
    either (nor forward its headers to the instance)."""
    async with backend("a") as a:
        await router.add_function("many", [a.url])
        host = router.url.removeprefix("http://")
        fields = "".join(f"X-{i}: v\r\n" for i in range(200))
        request = f"GET /{router.namespace}/many HTTP/1.1\r\nHost: {host}\r\n{fields}\r\n"
        served = router.router.served_by_front
        (answer,) = await raw_exchange(router.url, request.encode(), 1)
        assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request")
        assert router.router.served_by_front == served
        assert a.seen == []


async def test_a_streamed_answer_to_a_caller_gone_before_it_began_is_dropped(
    router: RunningRouter,
) -> None:
    """The caller closed its connection while the instance was still working: the streamed
    answer that comes later is not relayed into the void (nor held while the instance stalls)."""
    async with backend("a") as a:
        await router.add_function("late", [a.url], timeout=60)
        host = router.url.removeprefix("http://")
        host_, _, port = host.partition(":")
        _, writer = await asyncio.open_connection(host_, int(port))
        writer.write(
            f"GET /{router.namespace}/late/latehang HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()
        await asyncio.wait_for(a.arrived.wait(), 10)
        in_flight = router.router.in_flight
        deadline = asyncio.get_running_loop().time() + 5
        while sum(in_flight.values()) or not a.seen:
            assert asyncio.get_running_loop().time() < deadline, "the instance is still held"
            await asyncio.sleep(0.02)
        assert not a.release.is_set()  # the instance is still stalled


async def test_no_spelling_of_a_protected_functions_path_reaches_it_without_a_token(
    router: RunningRouter,
) -> None:
    """Dot segments, doubled or encoded slashes, percent-encoded names, case, a tag: whichever
    server takes the request, a protected function's instance never sees a call without a
    token (the fast path serves a function by the very name it checked)."""
    async with backend("secret") as secret, backend("open") as open_:
        await router.add_function("secret", [secret.url], invoke_auth="token")
        await router.add_function("open", [open_.url])
        ns = router.namespace
        host = router.url.removeprefix("http://")
        targets = [
            f"/{ns}/secret",
            f"/{ns}/secret/x",
            f"/{ns}/secret@latest",
            f"/{ns}/open/../secret",
            f"/{ns}/open/%2e%2e/secret",
            f"/{ns}/./secret",
            f"/{ns}//secret",
            f"//{ns}/secret",
            f"/{ns}/%73ecret",
            f"/{ns}/secret%2Fx",
            f"/{ns}/SECRET",
            f"/{ns.upper()}/secret",
            f"/{ns}/secret?x=/../open",
            f"/{ns}/secret#frag",
            f"http://{host}/{ns}/secret",
        ]
        for target in targets:
            request = f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"
            (answer,) = await raw_exchange(router.url, request.encode(), 1)
            assert b"from secret" not in answer, target
            if not answer.endswith(b"from open: "):  # `open` is open: reaching it is fine
                assert answer.split(b"\r\n")[0].split(b" ")[1] in (b"400", b"401", b"404"), target
        assert secret.seen == []


async def test_a_head_ended_by_bare_line_feeds_is_refused_at_once(router: RunningRouter) -> None:
    """A head whose lines end in a bare LF (or CR) never holds a CRLF CRLF: it goes to aiohttp
    at once, which refuses it, rather than waiting for more bytes until the keep-alive timeout."""
    async with backend("a") as a:
        await router.add_function("lf", [a.url])
        host = router.url.removeprefix("http://")
        for request in (
            f"GET /{router.namespace}/lf HTTP/1.1\nHost: {host}\n\n",
            f"GET /{router.namespace}/lf HTTP/1.1\rHost: {host}\r\r",
        ):
            (answer,) = await raw_exchange(router.url, request.encode(), 1)
            assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request"), request
        assert a.seen == []


async def test_huge_declared_bodies_and_endless_heads_are_never_buffered(
    router: RunningRouter,
) -> None:
    """A Content-Length past the fast path's bound goes to aiohttp, which refuses it (413)
    before any body; a head that never ends is refused once past the head bound."""
    async with backend("a") as a:
        await router.add_function("huge", [a.url])
        host = router.url.removeprefix("http://")
        start = f"POST /{router.namespace}/huge HTTP/1.1\r\nHost: {host}\r\n"
        (answer,) = await raw_exchange(
            router.url, f"{start}Content-Length: {10**15}\r\n\r\nabc".encode(), 1
        )
        assert answer.split(b"\r\n")[0].endswith(b" 413 Request Entity Too Large")
        host_, _, port = host.partition(":")
        reader, writer = await asyncio.open_connection(host_, int(port))
        try:
            writer.write(start.encode())
            for _ in range(200):  # 20 KiB of header lines, no end (aiohttp takes 128 lines)
                writer.write(b"X-Pad: " + b"p" * 93 + b"\r\n")
                await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.split(b"\r\n")[0].endswith(
                (b" 400 Bad Request", b" 431 Request Header Fields Too Large")
            ), head
        except (ConnectionResetError, BrokenPipeError):
            pass  # refused and closed before all of it was written: as good
        finally:
            writer.close()
        assert a.seen == []


async def test_malformed_requests_log_no_error(
    router: RunningRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller's malformed request is the caller's error: on the public port it must not put
    an error (with a traceback) in the router's log for every attempt."""
    await router.add_function("quiet", None)
    host = router.url.removeprefix("http://")
    caplog.set_level(logging.INFO)
    for request in (
        f"GET /{router.namespace}/quiet HTTP/1.1\nHost: {host}\n\n",
        f"GET /{router.namespace}/qu\x01iet HTTP/1.1\r\nHost: {host}\r\n\r\n",
        f"GET / HTTP/1.1\r\nHost: {host}\r\nX-A: " + "a" * 9000 + "\r\n\r\n",
    ):
        (answer,) = await raw_exchange(router.url, request.encode(), 1)
        assert answer.split(b"\r\n")[0].endswith(b" 400 Bad Request")
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [r.getMessage() for r in loud]


async def test_a_function_protected_while_a_body_comes_in_is_not_served_without_a_token(
    router: RunningRouter,
) -> None:
    """The head came while the function needed no token; before its body was all in, the
    function became protected: the request is checked again (401), not served as begun."""
    async with backend("a") as a:
        await router.add_function("turning", [a.url])
        host = router.url.removeprefix("http://")
        host_, _, port = host.partition(":")
        reader, writer = await asyncio.open_connection(host_, int(port))
        try:
            writer.write(
                f"POST /{router.namespace}/turning HTTP/1.1\r\nHost: {host}\r\n"
                "Content-Length: 6\r\n\r\nabc".encode()
            )
            await writer.drain()
            await router.add_function("turning", [a.url], invoke_auth="token")
            fid = (router.namespace, "turning")
            await asyncio.wait_for(router.router.until(lambda r: fid in r.protected), 5)
            writer.write(b"def")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.split(b"\r\n")[0].endswith(b" 401 Unauthorized"), head
        finally:
            writer.close()
        assert a.seen == []
