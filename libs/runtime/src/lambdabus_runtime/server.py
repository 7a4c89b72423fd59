"""The instance's HTTP server: one asyncio task per connection, calls into the function.

Async functions run on the loop, sync ones in a worker thread. A call past the timeout
gets 504 (an async one is cancelled; a thread cannot be, so it is left to finish, and
once such calls hold every worker thread, /healthz fails so that the instance is restarted).
SIGTERM stops accepting, closes idle connections, lets in-flight requests finish for up
to `DRAIN_GRACE` seconds and exits 0.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import inspect
import json
import os
import signal
import sys
import traceback
from typing import Any

from lambdabus_runtime import capture
from lambdabus_runtime.cli import Options
from lambdabus_runtime.entrypoint import Function, LoadError, load
from lambdabus_runtime.request import Event, Headers, InvalidJSONError, Request
from lambdabus_runtime.wire import (
    CHUNKED,
    MAX_HEAD,
    HttpError,
    body_length,
    encode_result,
    error_body,
    json_bytes,
    keeps_alive,
    parse_head,
    read_chunked,
    render_error,
    render_head,
)
from lambdabus_runtime.workers import NoWorkerError, WorkerPool

EXIT_IMPORT_ERROR = 3
EXIT_BIND_ERROR = 1

DRAIN_GRACE = 5.0  # seconds in-flight requests get after SIGTERM
IDLE_TIMEOUT = 300.0  # an idle keep-alive connection is closed after this long
SWEEP_INTERVAL = 30.0
LINGER = 2.0  # seconds spent dropping unread input after an error answer (see `_refuse`)
WRITE_HIGH_WATER = 256 * 1024
SYNC_WORKERS = 32

_HEALTH = (200, "Content-Type: application/json\r\n", json_bytes({"status": "ok"}))
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_JSON_HEADER = "Content-Type: application/json\r\n"
_COLD_START = "X-Lambdabus-Cold-Start: true\r\n"

# Leading traceback frames from these files are the runtime's, not the function's.
_INTERNAL_DIRS = tuple(
    os.path.dirname(module.__file__ or "") + os.sep
    for module in (sys.modules[__package__ or "lambdabus_runtime"], asyncio, concurrent.futures)
)


def log(message: str) -> None:
    sys.stderr.write(f"lambdabus-runtime: {message}\n")


def format_exception(exc: BaseException) -> str:
    """The traceback of an exception raised by the function, without the runtime's frames."""
    tb = exc.__traceback__
    while tb is not None and (
        tb.tb_frame.f_code.co_filename.startswith(_INTERNAL_DIRS)
        or tb.tb_frame.f_code.co_filename.startswith("<frozen importlib")
    ):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


def describe(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class _Connection:
    __slots__ = ("busy", "since", "task", "writer")

    def __init__(self, writer: asyncio.StreamWriter, task: asyncio.Task[None], now: float) -> None:
        self.writer = writer
        self.task = task
        self.busy = False
        self.since = now


class Server:
    """Serves one loaded function; `handle` is the `asyncio.start_server` callback."""

    def __init__(self, function: Function, options: Options) -> None:
        self.function = function
        self.timeout = options.timeout
        self.max_body = options.max_body
        self.prefix = f"/{options.namespace}/{options.name}"
        self.context: dict[str, Any] = {
            "function-name": options.name,
            "namespace": options.namespace,
            "timeout": options.timeout,
            "runtime": options.runtime,
            "memory-limit": f"{options.memory}Mi" if options.memory else None,
        }
        self.draining = False
        self._answered = False
        self._connections: set[_Connection] = set()
        self._pool = WorkerPool(SYNC_WORKERS)

    # -- connections ---------------------------------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(writer, task, asyncio.get_running_loop().time())
        self._connections.add(connection)
        try:
            await self._serve(connection, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:
            log(f"internal error, connection closed:\n{format_exception(exc)}")
        finally:
            self._connections.discard(connection)
            writer.close()

    async def _serve(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        loop = asyncio.get_running_loop()
        transport = writer.transport
        peer = writer.get_extra_info("peername")
        client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        while True:
            connection.busy = False
            connection.since = loop.time()
            try:
                raw_head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            except asyncio.LimitOverrunError:
                error = HttpError(431, "headers_too_large", f"the head exceeds {MAX_HEAD} bytes")
                await self._refuse(error, reader, writer)
                return
            if transport.is_closing():  # closed while idle: draining or swept
                return
            connection.busy = True
            try:
                head = parse_head(raw_head)
                if head is None:
                    continue
                length = body_length(head.headers)
                keep_alive = keeps_alive(head)
                if length > self.max_body:
                    raise HttpError(
                        413, "body_too_large", f"the body exceeds {self.max_body} bytes"
                    )
                if length and "expect" in head.headers:
                    self._expect(head.headers["expect"], writer)
                if length == CHUNKED:
                    body = await read_chunked(reader, self.max_body)
                elif length:
                    body = await reader.readexactly(length)
                else:
                    body = b""
            except HttpError as error:
                await self._refuse(error, reader, writer)
                return

            if head.target == "/healthz" and head.method in ("GET", "HEAD"):
                status, header_lines, payload = self.health()
            else:
                request = Request(
                    head.method,
                    head.target,
                    Headers(head.headers, head.raw),
                    body,
                    self.prefix,
                    client,
                )
                status, header_lines, payload = await self.respond(request)

            keep_alive = keep_alive and not self.draining
            response_head = render_head(
                status, header_lines, len(payload), keep_alive=keep_alive, http10=head.http10
            )
            if head.method == "HEAD" or status == 204 or status == 304:
                writer.write(response_head)
            elif len(payload) < 16384:
                writer.write(response_head + payload)
            else:
                writer.write(response_head)
                writer.write(payload)
            if not keep_alive:
                await writer.drain()
                return
            if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
                await writer.drain()

    @staticmethod
    def _expect(expect: str, writer: asyncio.StreamWriter) -> None:
        if expect.lower() != "100-continue":
            raise HttpError(417, "expectation_failed", f"unsupported Expect: {expect!r}")
        writer.write(_CONTINUE)

    @staticmethod
    async def _refuse(
        error: HttpError, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer with an error and close without a reset (a lingering close).

        The client may still be sending the rest of its request: closing with unread data
        would reset the connection and could destroy our answer before it is read. So send
        the answer, shut down our side, and drop what arrives until EOF (or `LINGER`).
        """
        writer.write(render_error(error))
        if writer.can_write_eof():
            writer.write_eof()
        try:
            async with asyncio.timeout(LINGER):
                while await reader.read(65536):
                    pass
        except (TimeoutError, ConnectionError):
            pass

    # -- calling the function ------------------------------------------------------------

    async def respond(self, request: Request) -> tuple[int, str, bytes]:
        """Call the function and encode its answer, or the error that stands for it; what it
        writes meanwhile is tagged with the invocation's id (`capture`)."""
        with capture.invocation(capture.invocation_id(request.headers)):
            status, header_lines, payload = await self._respond(request)
        if not self._answered:  # the instance's first call: the router counts a cold start
            self._answered = True
            header_lines += _COLD_START
        return status, header_lines, payload

    async def _respond(self, request: Request) -> tuple[int, str, bytes]:
        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline:
                result = await self.call(request)
            if deadline.expired():  # the function swallowed its cancellation
                return self._timed_out(request)
            return encode_result(result)
        except InvalidJSONError as exc:
            return 400, _JSON_HEADER, error_body("invalid_json", str(exc))
        except NoWorkerError as exc:
            log(str(exc))
            return 503, _JSON_HEADER, error_body("no_worker", str(exc))
        except Exception as exc:
            if deadline.expired():
                return self._timed_out(request)
            return self._failed(request, exc)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return self._failed(request, exc)

    async def call(self, request: Request) -> Any:
        function = self.function
        if function.style == "luna":
            if function.is_async:
                return await function.main(request)
            result = await self.in_thread(function.main, request)
        else:
            event = Event.from_request(request)
            context = dict(self.context)
            if function.is_async:
                return await function.main(event, context)
            result = await self.in_thread(function.main, event, context)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def in_thread(self, fn: Any, *args: Any) -> Any:
        # The thread runs in this invocation's context: its output is tagged with its id.
        job = self._pool.submit(contextvars.copy_context().run, fn, *args)
        try:
            return await asyncio.wrap_future(job)
        except asyncio.CancelledError:  # timed out, or the instance stops
            was_stuck = self._pool.stuck
            self._pool.abandon(job)
            if self._pool.stuck and not was_stuck:
                log(
                    f"all {self._pool.size} worker threads are held by calls that timed out "
                    "and still run; no call can run any more: /healthz fails, so that the "
                    "instance is restarted"
                )
            raise

    def health(self) -> tuple[int, str, bytes]:
        """/healthz: 503 once hung sync calls hold every worker thread (see `WorkerPool`)."""
        if not self._pool.stuck:
            return _HEALTH
        message = f"all {self._pool.size} worker threads are held by calls that timed out"
        return 503, _JSON_HEADER, json_bytes({"status": "stuck", "message": message})

    def _timed_out(self, request: Request) -> tuple[int, str, bytes]:
        message = f"the function did not finish within {self.timeout:g} s"
        note = "" if self.function.is_async else " (its thread cannot be stopped and runs on)"
        log(f"function_timeout: {request.method} {request.path}: {message}{note}")
        return 504, _JSON_HEADER, error_body("function_timeout", message)

    def _failed(self, request: Request, exc: BaseException) -> tuple[int, str, bytes]:
        sys.stderr.write(format_exception(exc))
        return 500, _JSON_HEADER, error_body("function_error", describe(exc))

    # -- lifetime ------------------------------------------------------------------------

    async def sweep_idle(self) -> None:
        """Close keep-alive connections idle for longer than `IDLE_TIMEOUT`."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            limit = loop.time() - IDLE_TIMEOUT
            for connection in list(self._connections):
                if not connection.busy and connection.since < limit:
                    connection.writer.close()

    async def drain(self, grace: float) -> None:
        """Close idle connections, give busy ones `grace` seconds, then cut them."""
        self.draining = True
        for connection in list(self._connections):
            if not connection.busy:
                connection.writer.close()
        tasks = [connection.task for connection in self._connections]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                log(f"{len(pending)} request(s) still running after {grace:g} s; cut off")
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)


async def serve(options: Options) -> int:
    """Load the function and serve it until SIGTERM; the exit code."""
    try:
        function = load(options.code, options.entrypoint, options.handler)
    except LoadError as exc:
        log(str(exc))
        return EXIT_IMPORT_ERROR
    except (Exception, SystemExit) as exc:
        sys.stderr.write(format_exception(exc))
        log(f"importing {options.entrypoint} failed: {describe(exc)}")
        return EXIT_IMPORT_ERROR

    capture.install()
    server = Server(function, options)
    where = options.socket or f"{options.host}:{options.port}"
    try:
        if options.socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(options.socket)  # left by a previous run of this instance
            listener = await asyncio.start_unix_server(
                server.handle, options.socket, limit=MAX_HEAD, backlog=1024
            )
            os.chmod(options.socket, 0o600)
        else:
            listener = await asyncio.start_server(
                server.handle, options.host, options.port, limit=MAX_HEAD, backlog=1024
            )
    except OSError as exc:
        log(f"cannot listen on {where}: {exc}")
        return EXIT_BIND_ERROR
    if options.socket:
        announcement = f'{{"event": "listening", "socket": {json.dumps(options.socket)}}}'
    else:
        port = listener.sockets[0].getsockname()[1]
        announcement = f'{{"event": "listening", "port": {port}}}'
    sys.stdout.write(announcement + "\n")
    sys.stdout.flush()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sweeper = asyncio.create_task(server.sweep_idle())
    try:
        await stop.wait()
    finally:
        listener.close()
        sweeper.cancel()
        await server.drain(DRAIN_GRACE)
        await listener.wait_closed()
    return 0


def run(options: Options) -> int:
    """Serve until SIGTERM and return the exit code."""
    return asyncio.run(serve(options))
