"""The function runtime as the deployer runs it: real subprocesses, real HTTP.

Python instances run on the base interpreter (outside the workspace venv) with only the
runtime on PYTHONPATH, as in a user environment; that also proves it needs no third-party
package. Node instances run `node server.js` with the same flags.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import IO

import aiohttp
import pytest

from lambdabus_runtime import Response
from lambdabus_runtime.cli import UsageError, parse_args
from lambdabus_runtime.paths import node_server_path, runtime_pythonpath
from lambdabus_runtime.request import decode_data
from lambdabus_runtime.wire import CHUNKED, HttpError, body_length, encode_result, parse_head

PYTHON = getattr(sys, "_base_executable", sys.executable)
NODE = shutil.which("node")
FUNCTION = "team-a/echo"
PREFIX = "/team-a/echo"
MAX_BODY = 4096
CE_HEADERS = {
    "ce-specversion": "1.0",
    "ce-type": "com.example.order.created",
    "ce-source": "/shop",
    "ce-id": "42",
    "ce-time": "2026-01-02T03:04:05Z",
    "ce-tenant": "acme%20corp",
}

LUNA_MAIN = """
import asyncio
from lambdabus_runtime import Response


async def main(request):
    path = request.path
    if path == "/str":
        return "hello"
    if path == "/bytes":
        return b"\\x00\\x01"
    if path == "/none":
        return None
    if path == "/list":
        return [1, 2]
    if path == "/created":
        return Response({"ok": True}, status=201, headers={"X-Trace": "abc"})
    if path == "/html":
        return Response("<p>hi</p>", headers={"Content-Type": "text/html"})
    if path == "/boom":
        raise ValueError("bad input")
    if path == "/slow":
        await asyncio.sleep(30)
    if path == "/wait":
        print("started", flush=True)
        await asyncio.sleep(0.5)
        return "finished"
    if path == "/print":
        print("hello from the function")
        return None
    return {
        "method": request.method,
        "path": path,
        "query": request.query,
        "query_all": request.query_all,
        "json": request.json,
        "header": request.headers.get("X-Test"),
        "event": request.event,
    }
"""

KYMA_HANDLER = """
import asyncio
import threading
import time


{def_} main(event, context):
    request = event["extensions"]["request"]
    path = request.path
    if path == "/boom":
        raise RuntimeError("kaput")
    if path == "/slow":
        {sleep}
    if path == "/str":
        return "hello"
    data = event["data"]
    return {{
        "data": {{"bytes": data.hex()}} if isinstance(data, bytes) else data,
        "ce-type": event["ce-type"],
        "ce-source": event["ce-source"],
        "ce-id": event["ce-id"],
        "ce-time": event["ce-time"],
        "ce-specversion": event["ce-specversion"],
        "ce-priority": event.get("ce-priority"),
        "ce-urgent": event.get("ce-urgent"),
        "function-name": context["function-name"],
        "memory-limit": context["memory-limit"],
        "path": path,
        "query": request.query,
        "method": request.method,
        "main_thread": threading.current_thread() is threading.main_thread(),
    }}
"""

NODE_HANDLER = """
module.exports = {
  main: async (event, context) => {
    const request = event.extensions.request;
    const path = request.path;
    if (path === '/boom') throw new Error('kaput');
    if (path === '/slow') await new Promise((resolve) => setTimeout(resolve, 30000));
    if (path === '/wait') {
      console.log('started');
      await new Promise((resolve) => setTimeout(resolve, 500));
      return 'finished';
    }
    if (path === '/str') return 'hello';
    if (path === '/bytes') return Buffer.from([0, 1]);
    if (path === '/none') return null;
    if (path === '/created') return { statusCode: 201, headers: { 'X-Trace': 'abc' }, body: { ok: true } };
    const data = event.data;
    return {
      data: Buffer.isBuffer(data) ? { bytes: data.toString('hex') } : data,
      'ce-type': event['ce-type'],
      'ce-source': event['ce-source'],
      'ce-id': event['ce-id'],
      'ce-time': event['ce-time'],
      'ce-specversion': event['ce-specversion'],
      'ce-priority': event['ce-priority'] ?? null,
      'ce-urgent': event['ce-urgent'] ?? null,
      'function-name': context['function-name'],
      'memory-limit': context['memory-limit'],
      path,
      query: request.query,
      method: request.method,
    };
  },
};
"""


class Instance:
    """A running function instance, ready by its own word (the listening line)."""

    def __init__(
        self,
        command: list[str],
        stderr_path: Path,
        kind: str = "python",
        *,
        address_space: int | None = None,
    ) -> None:
        self.kind = kind
        self.stderr_path = stderr_path
        env = {**os.environ, "PYTHONPATH": runtime_pythonpath(), "MALLOC_ARENA_MAX": "2"}
        limit = (
            None if address_space is None else functools.partial(limit_address_space, address_space)
        )
        with stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, preexec_fn=limit
            )
        assert self.process.stdout is not None
        self.stdout: IO[str] = self.process.stdout
        line = self.stdout.readline()
        if not line:
            self.process.wait(10)
            raise AssertionError(f"exited {self.process.returncode}: {self.stderr()}")
        event = json.loads(line)
        assert event["event"] == "listening"
        assert line == f'{{"event": "listening", "port": {event["port"]}}}\n'
        self.port: int = event["port"]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(15)
        self.stdout.close()
        return code


def limit_address_space(limit: int) -> None:  # as the local deployer does, before exec
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def python_command(code: Path, entrypoint: str, *extra: str) -> list[str]:
    return [
        PYTHON,
        "-s",
        "-m",
        "lambdabus_runtime",
        "--code",
        str(code),
        "--entrypoint",
        entrypoint,
        "--port",
        "0",
        "--function",
        FUNCTION,
        *extra,
    ]


def node_command(code: Path, *extra: str) -> list[str]:
    assert NODE is not None
    return [
        NODE,
        node_server_path(),
        "--code",
        str(code),
        "--entrypoint",
        "handler.js",
        "--port",
        "0",
        "--function",
        FUNCTION,
        *extra,
    ]


def write_code(directory: Path, filename: str, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / filename).write_text(textwrap.dedent(source))
    return directory


FAST = ("--timeout", "0.3", "--max-body", str(MAX_BODY), "--memory", "128")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")


KYMA_VARIANTS = {
    "python-sync": ("def", "time.sleep(30)"),
    "python-async": ("async def", "await asyncio.sleep(30)"),
}


class Instances:
    """One shared instance per runtime kind, started on first use, stopped with the module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.running: dict[str, Instance] = {}

    def get(self, kind: str) -> Instance:
        if kind not in self.running:
            self.running[kind] = self._start(kind)
        return self.running[kind]

    def _start(self, kind: str) -> Instance:
        root = self.root / kind
        if kind == "luna":
            code = write_code(root / "code", "lambda_main.py", LUNA_MAIN)
            return Instance(python_command(code, "lambda_main.py", *FAST), root / "stderr")
        if kind == "node":
            code = write_code(root / "code", "handler.js", NODE_HANDLER)
            return Instance(node_command(code, *FAST), root / "stderr", kind)
        def_, sleep = KYMA_VARIANTS[kind]
        code = write_code(root / "code", "handler.py", KYMA_HANDLER.format(def_=def_, sleep=sleep))
        return Instance(python_command(code, "handler.py", *FAST), root / "stderr", kind)


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instances]:
    pool = Instances(tmp_path_factory.mktemp("instances"))
    yield pool
    codes = {kind: instance.stop() for kind, instance in pool.running.items()}
    assert codes == dict.fromkeys(codes, 0)


KYMA_KINDS = ["python-sync", "python-async", pytest.param("node", marks=needs_node)]


@pytest.fixture
def luna(instances: Instances) -> Instance:
    return instances.get("luna")


@pytest.fixture(params=KYMA_KINDS)
def kyma(request: pytest.FixtureRequest, instances: Instances) -> Instance:
    return instances.get(request.param)


@pytest.fixture(params=["luna", *KYMA_KINDS])
def instance(request: pytest.FixtureRequest, instances: Instances) -> Instance:
    """Every runtime: LUNA, Kyma in Python (sync and async) and Node."""
    return instances.get(request.param)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


# -- pure parts --------------------------------------------------------------------------


def test_cli_parses_the_deployer_command_line() -> None:
    options = parse_args(
        ["--code", "/c", "--entrypoint=handler.py", "--function", "ns/fn", "--timeout", "2.5"]
    )
    assert (options.code, options.entrypoint, options.namespace, options.name) == (
        "/c",
        "handler.py",
        "ns",
        "fn",
    )
    assert (options.port, options.host, options.timeout, options.memory) == (
        0,
        "127.0.0.1",
        2.5,
        None,
    )
    assert options.max_body == 6 * 1024 * 1024


@pytest.mark.parametrize(
    "argv",
    [
        ["--code", "/c", "--entrypoint", "h.py"],
        ["--code", "/c", "--entrypoint", "h.py", "--function", "no-slash"],
        ["--code", "/c", "--entrypoint", "h.py", "--function", "a/b/c"],
        ["--code", "/c", "--entrypoint", "h.py", "--function", "a/b", "--port", "70000"],
        ["--code", "/c", "--entrypoint", "h.py", "--function", "a/b", "--timeout", "0"],
        ["--code", "/c", "--entrypoint", "h.py", "--function", "a/b", "--bogus", "1"],
        ["--code", "/c", "--entrypoint", "h.py", "--function"],
        ["--code", "/c", "--entrypoint", "h.py", "--function", "a/b", "--socket", "rel/sock"],
    ],
)
def test_cli_rejects_a_wrong_command_line(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_args(argv)


def test_parse_head_reads_request_line_and_headers() -> None:
    head = parse_head(b"\r\nPOST /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert head is not None
    assert (head.method, head.target, head.http10) == ("POST", "/a?b=1", False)
    assert head.headers == {"host": "x", "x-a": "1, 2"}
    assert parse_head(b"\r\n\r\n") is None


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1\nHost: x\r\n\r\n", 400),  # bare LF
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),  # space before the colon
        (b"GET / HTTP/1.1\r\nA: 1\r\n folded\r\n\r\n", 400),  # obsolete line folding
        (b"GET /  HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"G(T / HTTP/1.1\r\n\r\n", 400),
    ],
)
def test_parse_head_rejects_malformed_heads(head: bytes, status: int) -> None:
    with pytest.raises(HttpError) as caught:
        parse_head(head)
    assert caught.value.status == status


def test_body_length_refuses_ambiguous_framing() -> None:
    assert body_length({}) == 0
    assert body_length({"content-length": "12"}) == 12
    assert body_length({"content-length": "5, 5"}) == 5
    assert body_length({"transfer-encoding": "chunked"}) == CHUNKED
    for headers in (
        {"content-length": "5, 6"},
        {"content-length": "-1"},
        {"content-length": "²"},
        {"content-length": "3", "transfer-encoding": "chunked"},
    ):
        with pytest.raises(HttpError):
            body_length(headers)
    with pytest.raises(HttpError) as caught:
        body_length({"transfer-encoding": "gzip, chunked"})
    assert caught.value.status == 501


def test_encode_result_maps_return_values() -> None:
    assert encode_result({"a": 1}) == (200, "Content-Type: application/json\r\n", b'{"a":1}')
    assert encode_result("é")[2] == "é".encode()
    assert encode_result(None) == (204, "", b"")
    status, headers, body = encode_result(Response(b"x", status=202, headers=[("X-A", "1")]))
    assert (status, body) == (202, b"x")
    assert headers == "Content-Type: application/octet-stream\r\nX-A: 1\r\n"
    with pytest.raises(ValueError, match="invalid value"):
        encode_result(Response("x", headers={"X-A": "1\r\nInjected: yes"}))
    with pytest.raises(TypeError):
        encode_result({"when": object()})
    with pytest.raises(ValueError, match="status"):
        Response(status=99)


def test_decode_data_follows_the_content_type() -> None:
    assert decode_data(b'{"a":1}', "application/cloudevents+json") == {"a": 1}
    assert decode_data(b"hi", "text/plain") == "hi"
    assert decode_data(b"hi", "application/octet-stream") == b"hi"
    assert decode_data(b"\xff", None) == b"\xff"
    assert decode_data(b"", "application/json") is None
    assert decode_data(b'{"data": 5}', "application/x-www-form-urlencoded") == {"data": 5}
    assert decode_data(b"a=1&b=%7B", "application/x-www-form-urlencoded") == "a=1&b=%7B"


def test_importing_the_entry_module_does_not_import_asyncio() -> None:
    code = "import sys, lambdabus_runtime.__main__; print('asyncio' in sys.modules)"
    result = subprocess.run(
        [PYTHON, "-s", "-c", code],
        env={**os.environ, "PYTHONPATH": runtime_pythonpath()},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "False"


# -- LUNA style ----------------------------------------------------------------------------


async def test_luna_sees_json_query_path_headers_and_cloudevent(luna: Instance) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            luna.url(f"{PREFIX}/sub/path?x=1&x=2&y=%C3%A9"),
            json={"n": 1},
            headers={"X-Test": "yes", **CE_HEADERS},
        ) as response,
    ):
        assert response.status == 200
        assert response.content_type == "application/json"
        echoed = await response.json()
    assert echoed["method"] == "POST"
    assert echoed["path"] == "/sub/path"
    assert echoed["query"] == {"x": "1", "y": "é"}
    assert echoed["query_all"] == {"x": ["1", "2"], "y": ["é"]}
    assert echoed["json"] == {"n": 1}
    assert echoed["header"] == "yes"
    assert echoed["event"] == {
        "specversion": "1.0",
        "type": "com.example.order.created",
        "source": "/shop",
        "id": "42",
        "time": "2026-01-02T03:04:05Z",
        "tenant": "acme corp",
        "datacontenttype": "application/json",
        "data": {"n": 1},
    }


@pytest.mark.parametrize(
    ("path", "seen"),
    [
        (PREFIX, "/"),
        (f"{PREFIX}/", "/"),
        ("/other/x", "/other/x"),
        (f"{PREFIX}x/y", f"{PREFIX}x/y"),
    ],
)
async def test_luna_path_has_the_function_prefix_cut(luna: Instance, path: str, seen: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(luna.url(path)) as response:
        echoed = await response.json()
    assert echoed["path"] == seen
    assert echoed["json"] is None
    assert echoed["event"] is None


async def test_luna_invalid_json_is_a_400(luna: Instance) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            luna.url("/x"), data=b"{nope", headers={"Content-Type": "application/json"}
        ) as response,
    ):
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_json"


async def test_healthz_is_answered_by_the_runtime(luna: Instance) -> None:
    async with aiohttp.ClientSession() as session, session.get(luna.url("/healthz")) as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("path", "status", "content_type", "body"),
    [
        ("/str", 200, "text/plain", b"hello"),
        ("/bytes", 200, "application/octet-stream", b"\x00\x01"),
        ("/list", 200, "application/json", b"[1,2]"),
        ("/none", 204, "application/octet-stream", b""),
        ("/created", 201, "application/json", b'{"ok":true}'),
        ("/html", 200, "text/html", b"<p>hi</p>"),
    ],
)
async def test_luna_return_values(
    luna: Instance, path: str, status: int, content_type: str, body: bytes
) -> None:
    async with aiohttp.ClientSession() as session, session.get(luna.url(path)) as response:
        assert response.status == status
        assert response.content_type == content_type
        assert await response.read() == body
        if path == "/created":
            assert response.headers["X-Trace"] == "abc"


async def test_luna_exception_is_a_500_with_the_traceback_on_stderr(luna: Instance) -> None:
    async with aiohttp.ClientSession() as session, session.get(luna.url("/boom")) as response:
        assert response.status == 500
        text = await response.text()
    assert json.loads(text) == {
        "error": {"code": "function_error", "message": "ValueError: bad input"}
    }
    assert "Traceback" not in text
    assert "lambda_main.py" not in text
    stderr = luna.stderr()
    assert "Traceback (most recent call last):" in stderr
    assert 'lambda_main.py", line' in stderr
    assert "ValueError: bad input" in stderr


async def test_luna_timeout_is_a_504(luna: Instance) -> None:
    async with aiohttp.ClientSession() as session, session.get(luna.url("/slow")) as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "function_timeout"
    assert "function_timeout: GET /slow" in luna.stderr()


async def test_luna_print_reaches_stdout_line_by_line(luna: Instance) -> None:
    headers = {"X-Lambdabus-Invocation-Id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(luna.url("/print"), headers=headers) as response,
    ):
        assert response.status == 204
    line = await asyncio.to_thread(luna.stdout.readline)
    # tagged with the invocation's id (the deployer's log capture takes the tag off)
    assert line == "\x1e0f1e2d3c4b5a69788796a5b4c3d2e1f0\x1fhello from the function\n"


# -- Kyma/Kubeless style (Python sync, Python async, Node) ------------------------------------


async def test_kyma_event_and_context(kyma: Instance) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            kyma.url(f"{PREFIX}/orders?id=7"), json={"order": 7}, headers=CE_HEADERS
        ) as response,
    ):
        assert response.status == 200
        echoed = await response.json()
    assert echoed["data"] == {"order": 7}
    assert echoed["ce-type"] == "com.example.order.created"
    assert echoed["ce-source"] == "/shop"
    assert echoed["ce-id"] == "42"
    assert echoed["ce-time"] == "2026-01-02T03:04:05Z"
    assert echoed["ce-specversion"] == "1.0"
    assert echoed["function-name"] == "echo"
    assert echoed["memory-limit"] == "128Mi"
    assert echoed["path"] == "/orders"
    assert echoed["query"] == {"id": "7"}
    assert echoed["method"] == "POST"


async def test_kyma_data_follows_the_content_type(kyma: Instance) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            kyma.url("/"), data=b"hi", headers={"Content-Type": "text/plain"}
        ) as response:
            echoed = await response.json()
        assert echoed["data"] == "hi"
        assert echoed["ce-type"] == ""
        async with session.post(kyma.url("/"), data=b"\x00\xff") as response:
            assert (await response.json())["data"] == {"bytes": "00ff"}
        async with session.get(kyma.url("/")) as response:
            assert (await response.json())["data"] is None


async def test_kyma_decodes_what_curl_d_sends_like_luna(kyma: Instance) -> None:
    """`curl -d '{"data": 5}'` sends application/x-www-form-urlencoded: a body that is JSON is
    `data` parsed, as LUNA's `request.json` reads it; a real form stays text."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    async with aiohttp.ClientSession() as session:
        async with session.post(kyma.url("/"), data=b'{"data": 5}', headers=form) as response:
            assert (await response.json())["data"] == {"data": 5}
        async with session.post(kyma.url("/"), data=b"a=1&b=2", headers=form) as response:
            assert (await response.json())["data"] == "a=1&b=2"


STRUCTURED_EVENT = {
    "specversion": "1.0",
    "id": "7",
    "source": "/shop",
    "type": "com.example.typed",
    "datacontenttype": "application/json",
    "priority": 5,
    "urgent": True,
    "data": {"total": 3},
}


async def test_kyma_reads_a_structured_event_with_typed_extensions(kyma: Instance) -> None:
    """The router delivers an event with integer or boolean extensions in structured mode."""
    body = json.dumps(STRUCTURED_EVENT).encode()
    headers = {"Content-Type": "application/cloudevents+json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(kyma.url("/"), data=body, headers=headers) as response,
    ):
        echoed = await response.json()
    assert echoed["data"] == {"total": 3}
    assert (echoed["ce-id"], echoed["ce-type"], echoed["ce-specversion"]) == (
        "7",
        "com.example.typed",
        "1.0",
    )
    assert (echoed["ce-priority"], echoed["ce-urgent"]) == (5, True)


async def test_luna_reads_a_structured_event_with_typed_extensions(luna: Instance) -> None:
    body = json.dumps(STRUCTURED_EVENT).encode()
    headers = {"Content-Type": "application/cloudevents+json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(luna.url("/"), data=body, headers=headers) as response,
    ):
        echoed = await response.json()
    event = echoed["event"]
    assert event == STRUCTURED_EVENT  # the same keys as a binary-mode event's, typed


async def test_kyma_sync_handler_runs_in_a_worker_thread(kyma: Instance) -> None:
    async with aiohttp.ClientSession() as session, session.get(kyma.url("/")) as response:
        main_thread = (await response.json()).get("main_thread")
    expected = {"python-sync": False, "python-async": True}
    assert main_thread == expected.get(kyma.kind)


async def test_kyma_exception_is_a_500_with_the_traceback_on_stderr(kyma: Instance) -> None:
    async with aiohttp.ClientSession() as session, session.get(kyma.url("/boom")) as response:
        assert response.status == 500
        text = await response.text()
    assert json.loads(text)["error"]["code"] == "function_error"
    assert json.loads(text)["error"]["message"] in ("RuntimeError: kaput", "Error: kaput")
    assert "handler." not in text
    stderr = kyma.stderr()
    assert "kaput" in stderr
    assert "handler.py" in stderr or "handler.js" in stderr


async def test_kyma_timeout_is_a_504(kyma: Instance) -> None:
    async with aiohttp.ClientSession() as session, session.get(kyma.url("/slow")) as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "function_timeout"
        # The instance still serves while a timed-out call runs on.
        async with session.get(kyma.url("/str")) as again:
            assert await again.text() == "hello"


async def test_kyma_returns_text(kyma: Instance) -> None:
    async with aiohttp.ClientSession() as session, session.get(kyma.url("/str")) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        assert await response.text() == "hello"


# -- HTTP/1.1 details, for every runtime -------------------------------------------------------


async def test_keep_alive_serves_100_sequential_requests_on_one_connection(
    instance: Instance,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", instance.port)
    try:
        for i in range(100):
            writer.write(f"GET /str?i={i} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, headers, body = await read_response(reader)
            assert (status, body) == (200, b"hello")
            assert headers.get("connection", "keep-alive").lower() == "keep-alive"
        # Pipelined: three requests in one write, answered in order.
        writer.write(
            b"GET /str HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /str HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        bodies = [(await read_response(reader))[2] for _ in range(3)]
        assert bodies == [b"hello", b'{"status":"ok"}', b"hello"]
        assert await reader.read() == b""  # closed after Connection: close
    finally:
        writer.close()
        await writer.wait_closed()


async def test_chunked_request_body(instance: Instance) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for part in (b'{"order":', b" [1, 2]", b"}"):
            yield part

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            instance.url("/"), data=chunks(), headers={"Content-Type": "application/json"}
        ) as response,
    ):
        assert response.status == 200
        echoed = await response.json()
    assert echoed.get("json", echoed.get("data")) == {"order": [1, 2]}


async def test_body_over_max_body_is_a_413(instance: Instance) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 2048

    async with aiohttp.ClientSession() as session:
        async with session.post(instance.url("/"), data=b"x" * (MAX_BODY + 1)) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "body_too_large"
        async with session.post(instance.url("/"), data=chunks()) as response:
            assert response.status == 413
        async with session.post(instance.url("/str"), data=b"x" * MAX_BODY) as response:
            assert response.status == 200


async def test_oversized_and_malformed_heads_are_refused(instance: Instance) -> None:
    for request, status in (
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", instance.port)
        try:
            writer.write(request)
            assert (await read_response(reader))[0] == status
        finally:
            writer.close()
            await writer.wait_closed()


async def test_expect_100_continue(luna: Instance) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", luna.port)
    try:
        writer.write(
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 8\r\nExpect: 100-continue\r\n\r\n"
        )
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b'{"n": 2}')
        status, _, body = await read_response(reader)
        assert status == 200
        assert json.loads(body)["json"] == {"n": 2}
    finally:
        writer.close()
        await writer.wait_closed()


async def test_concurrent_sync_calls_fit_the_deployers_memory_limit(tmp_path: Path) -> None:
    """The deployer caps an instance's address space at its memory; every thread stack
    reserves some, so the worker threads must not fail the calls (8 MiB stacks would)."""
    source = "import time\n\ndef main(event, context):\n    time.sleep(0.2)\n    return 'ok'\n"
    code = write_code(tmp_path / "code", "handler.py", source)
    command = python_command(code, "handler.py", "--memory", "128")
    instance = Instance(command, tmp_path / "stderr", address_space=128 * 1024 * 1024)
    try:
        async with aiohttp.ClientSession() as session:

            async def call() -> int:
                async with session.get(instance.url("/")) as response:
                    return response.status

            statuses = await asyncio.gather(*(call() for _ in range(24)))
        assert statuses == [200] * 24, instance.stderr()
    finally:
        assert instance.stop() == 0


# -- process lifetime --------------------------------------------------------------------------


async def test_sigterm_finishes_in_flight_requests_and_exits_0(tmp_path: Path, kind: str) -> None:
    if kind == "node":
        code = write_code(tmp_path / "code", "handler.js", NODE_HANDLER)
        instance = Instance(node_command(code), tmp_path / "stderr", "node")
    else:
        code = write_code(tmp_path / "code", "lambda_main.py", LUNA_MAIN)
        instance = Instance(python_command(code, "lambda_main.py"), tmp_path / "stderr")
    try:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", instance.port)
        idle_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(idle_reader))[0] == 200
        async with aiohttp.ClientSession() as session:

            async def call() -> tuple[int, str, str]:
                async with session.get(instance.url("/wait")) as response:
                    return response.status, await response.text(), response.headers["Connection"]

            in_flight = asyncio.create_task(call())
            started = await asyncio.to_thread(instance.stdout.readline)
            assert started.rpartition("\x1f")[2] == "started\n"  # after its invocation tag
            instance.process.send_signal(signal.SIGTERM)
            assert await in_flight == (200, "finished", "close")
        assert await idle_reader.read() == b""  # the idle keep-alive connection was closed
        idle_writer.close()
        await idle_writer.wait_closed()
        assert await asyncio.to_thread(instance.process.wait, 10) == 0
    finally:
        instance.stop()


@pytest.fixture(params=["python", pytest.param("node", marks=needs_node)])
def kind(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.mark.parametrize(
    ("filename", "source", "message"),
    [
        (
            "lambda_main.py",
            "import json\nraise RuntimeError('broken at import')\n",
            "broken at import",
        ),
        ("handler.py", "x = 1\n", "defines no main function"),
        ("handler.js", "throw new Error('broken at import');\n", "broken at import"),
    ],
)
def test_import_time_crash_exits_3_with_the_traceback_on_stderr(
    tmp_path: Path, filename: str, source: str, message: str
) -> None:
    code = write_code(tmp_path / "code", filename, source)
    if filename.endswith(".js"):
        if NODE is None:
            pytest.skip("node is not installed")
        command = node_command(code)
    else:
        command = python_command(code, filename)
    result = subprocess.run(
        command,
        env={**os.environ, "PYTHONPATH": runtime_pythonpath()},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 3
    assert result.stdout == ""
    assert message in result.stderr
    if "broken" in message:
        assert str(code / filename) in result.stderr  # the user's frame is in the traceback


ENV_PROBE = {
    "handler.py": """
        import os
        SEEN_AT_IMPORT = os.environ.get("GREETING")
        def main(event, context):
            return {"import": SEEN_AT_IMPORT, "call": os.environ.get("GREETING"),
                    "file_var": os.environ.get("LAMBDABUS_ENV_FILE")}
        """,
    "handler.js": """
        const seenAtImport = process.env.GREETING || null;
        module.exports = { main: async () => ({ import: seenAtImport,
            call: process.env.GREETING || null, file_var: process.env.LAMBDABUS_ENV_FILE || null }) };
        """,
}


@pytest.mark.parametrize("entrypoint", ["handler.py", "handler.js"])
async def test_on_a_unix_socket_with_the_env_from_a_file(tmp_path: Path, entrypoint: str) -> None:
    """How the sandboxed deployer runs it: it listens on --socket (mode 0600) and says so; the
    function's env comes from LAMBDABUS_ENV_FILE and is there before the code is imported."""
    code = write_code(tmp_path / "code", entrypoint, ENV_PROBE[entrypoint])
    env_file = tmp_path / "env.json"
    env_file.write_text(json.dumps({"GREETING": "from the file"}))
    socket_path = tmp_path / "sock"
    if entrypoint.endswith(".js"):
        if NODE is None:
            pytest.skip("node is not installed")
        command = node_command(code)
    else:
        command = python_command(code, entrypoint)
    at = command.index("--port")
    command[at : at + 2] = ["--socket", str(socket_path)]
    env = {**os.environ, "PYTHONPATH": runtime_pythonpath(), "LAMBDABUS_ENV_FILE": str(env_file)}
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, env=env
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.decode() == f'{{"event": "listening", "socket": "{socket_path}"}}\n'
        assert socket_path.stat().st_mode & 0o777 == 0o600
        connector = aiohttp.UnixConnector(path=str(socket_path))
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.post(f"http://localhost/{FUNCTION}/", json={}) as response,
        ):
            assert response.status == 200
            seen = await response.json()
    finally:
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 15) == 0
    assert seen == {"import": "from the file", "call": "from the file", "file_var": None}


def test_an_unreadable_env_file_stops_the_runtime_before_the_code_loads(tmp_path: Path) -> None:
    code = write_code(tmp_path / "code", "handler.py", ENV_PROBE["handler.py"])
    (tmp_path / "env.json").write_text('["not", "an", "object"]')
    for path, message in (
        (tmp_path / "gone.json", "cannot read"),
        (tmp_path / "env.json", "not an object"),
    ):
        result = subprocess.run(
            python_command(code, "handler.py"),
            env={**os.environ, "PYTHONPATH": runtime_pythonpath(), "LAMBDABUS_ENV_FILE": str(path)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 4
        assert message in result.stderr


def test_runtime_paths() -> None:
    assert Path(runtime_pythonpath(), "lambdabus_runtime", "__init__.py").is_file()
    assert Path(node_server_path()).is_file()


# -- per-invocation output ----------------------------------------------------------------

PRINTER = """
import time


def main(event, context):
    k = event["data"]["k"]
    for i in range(100):
        # several writes per print (the parts, the spaces, the newline): threads interleave them
        print("call", k, "line", i, "x" * 40)
        if i % 10 == 0:
            time.sleep(0.001)
    print("no newline at the end", end="")
    return {"k": k}
"""


NODE_PRINTER = """
module.exports = {
  main: async (event) => {
    const k = event.data.k;
    for (let i = 0; i < 100; i++) {
      // a line in three writes, with other calls running in between
      process.stdout.write(`call ${k} `);
      await new Promise((resolve) => setImmediate(resolve));
      process.stdout.write(`line ${i} `);
      console.log('x'.repeat(40));
    }
    process.stdout.write('no newline at the end');
    return { k };
  },
};
"""


@pytest.mark.parametrize("kind", ["python", pytest.param("node", marks=needs_node)])
async def test_20_concurrent_invocations_print_2000_intact_lines_each_tagged(
    tmp_path: Path, kind: str
) -> None:
    if kind == "node":
        code = write_code(tmp_path / "code", "handler.js", NODE_PRINTER)
        command = node_command(code, "--timeout", "30")
    else:
        code = write_code(tmp_path / "code", "handler.py", PRINTER)
        command = python_command(code, "handler.py", "--timeout", "30")
    instance = Instance(command, tmp_path / "stderr", kind)
    try:
        ids = {k: f"{k:02d}" + os.urandom(15).hex() for k in range(20)}

        async def call(session: aiohttp.ClientSession, k: int) -> None:
            headers = {"X-Lambdabus-Invocation-Id": ids[k]}
            async with session.post(instance.url("/"), json={"k": k}, headers=headers) as resp:
                assert resp.status == 200, await resp.text()

        # read as the deployer does, while the calls run (120 KB would fill the pipe)
        reading = asyncio.get_running_loop().run_in_executor(
            None, lambda: [instance.stdout.readline() for _ in range(2020)]
        )
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(call(session, k) for k in range(20)))
        lines = await asyncio.wait_for(reading, 30)
    finally:
        assert instance.stop() == 0
    seen: dict[str, set[int]] = {ids[k]: set() for k in ids}
    tails: list[str] = []
    for line in lines:
        assert line.startswith("\x1e"), repr(line)
        assert line.endswith("\n"), repr(line)
        invocation, sep, text = line[1:-1].partition("\x1f")
        assert sep, repr(line)
        k = next(k for k, v in ids.items() if v == invocation)
        if text == "no newline at the end":
            tails.append(invocation)
            continue
        words = text.split(" ")
        assert words[:3] == ["call", str(k), "line"], repr(line)  # never another call's text
        assert words[4:] == ["x" * 40], repr(line)
        seen[invocation].add(int(words[3]))
    assert all(numbers == set(range(100)) for numbers in seen.values())
    assert sorted(tails) == sorted(ids.values())
