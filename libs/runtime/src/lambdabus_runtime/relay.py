"""Runtime `custom`: start the function's own program with `PORT` set, wait until it answers
`GET /healthz` with 200, then relay the instance's socket to `127.0.0.1:$PORT` (Kubeless's
custom runtime contract; inside the sandbox that is its own network namespace's loopback).

The relay reads only each request's head: it cuts the leading `/<ns>/<name>` from the path, as
the other runtimes do, and copies the body by its Content-Length (a chunked request body is
copied through to the end of the connection). Responses are copied as they come, byte for byte,
so the program's status, headers, streaming and keep-alive reach the router unchanged. The
program's stdout and stderr are the instance's (its log lines). When the program exits, the
instance exits with its status; SIGTERM is passed on to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from lambdabus_runtime.cli import Options

EXIT_START = 3
_HEAD_LIMIT = 64 * 1024
_CHUNK = 64 * 1024
_HEALTH_POLL = 0.05
# What the runtime's own Python needs, not the program: left out of the program's environment.
_OURS = ("PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")


def free_port() -> int:
    """A port nobody listens on now, on 127.0.0.1 (in the sandbox: its own loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rewrite_target(target: bytes, prefix: bytes) -> bytes:
    """The request target without the function's `/<ns>/<name>` prefix. Pure."""
    if target.startswith(prefix) and target[len(prefix) : len(prefix) + 1] in (b"", b"/", b"?"):
        rest = target[len(prefix) :]
        return rest if rest.startswith(b"/") else b"/" + rest
    return target


def body_framing(head: bytes) -> tuple[int, bool]:
    """(Content-Length, chunked) of a request head. Pure."""
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip() or b"0")
        elif key == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    return length, chunked


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int | None) -> None:
    """Copy `n` bytes (None: to the end) from reader to writer."""
    left = n
    while left is None or left > 0:
        data = await reader.read(_CHUNK if left is None else min(_CHUNK, left))
        if not data:
            return
        writer.write(data)
        await writer.drain()
        if left is not None:
            left -= len(data)


class Relay:
    def __init__(self, port: int, prefix: str) -> None:
        self.port = port
        self.prefix = prefix.encode()

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            client_w.write(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            await _close(client_w)
            return
        responses = asyncio.create_task(self._responses(up_r, client_w))
        try:
            await self._requests(client_r, up_w)
        except (OSError, ValueError, asyncio.LimitOverrunError):
            pass
        finally:
            if up_w.can_write_eof():
                with contextlib.suppress(OSError):
                    up_w.write_eof()
            await responses
            await _close(up_w)
            await _close(client_w)

    async def _requests(self, client_r: asyncio.StreamReader, up_w: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await client_r.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            line, sep, rest = head.partition(b"\r\n")
            method, target, version = line.split(b" ", 2)
            up_w.write(b" ".join((method, rewrite_target(target, self.prefix), version)))
            up_w.write(sep + rest)
            length, chunked = body_framing(head)
            if chunked:
                await up_w.drain()
                await _copy(client_r, up_w, None)
                return
            await _copy(client_r, up_w, length) if length else await up_w.drain()

    async def _responses(self, up_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            await _copy(up_r, client_w, None)
        except OSError:
            pass
        finally:
            if client_w.can_write_eof():
                with contextlib.suppress(OSError):
                    client_w.write_eof()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _healthy(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
    except (OSError, TimeoutError):
        return False
    finally:
        await _close(writer)
    parts = status.split()
    return len(parts) >= 2 and parts[1] == b"200"


async def serve(options: Options) -> int:
    command = options.command
    if not command:
        sys.stderr.write("lambdabus-runtime: --runtime custom needs --command\n")
        return EXIT_START
    program = os.path.abspath(os.path.join(options.code, command[0]))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in _OURS}
    env["PORT"] = str(port)
    try:
        process = await asyncio.create_subprocess_exec(
            program, *command[1:], cwd=options.code, env=env, stdin=asyncio.subprocess.DEVNULL
        )
    except OSError as exc:
        sys.stderr.write(f"lambdabus-runtime: cannot start {command[0]}: {exc.strerror}\n")
        return EXIT_START
    exited = asyncio.ensure_future(process.wait())
    while not await _healthy(port):
        if exited.done():
            sys.stderr.write(
                f"lambdabus-runtime: {command[0]} exited with {process.returncode} before it "
                f"answered GET /healthz on $PORT ({port})\n"
            )
            return process.returncode or EXIT_START
        await asyncio.sleep(_HEALTH_POLL)
    relay = Relay(port, f"/{options.namespace}/{options.name}")
    if options.socket:
        server = await asyncio.start_unix_server(relay.handle, path=options.socket)
        listening: dict[str, object] = {"event": "listening", "socket": options.socket}
    else:
        server = await asyncio.start_server(relay.handle, options.host, options.port)
        listening = {"event": "listening", "port": server.sockets[0].getsockname()[1]}
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    sys.stdout.write(json.dumps(listening) + "\n")
    sys.stdout.flush()
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
    server.close()
    if exited.done():
        sys.stderr.write(f"lambdabus-runtime: {command[0]} exited with {process.returncode}\n")
        return process.returncode or 1
    stopping.cancel()
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(exited), options.timeout)
    except TimeoutError:
        process.kill()
        await exited
    return 0


def run(options: Options) -> int:
    return asyncio.run(serve(options))
