"""The runtimes with Kubeless handlers: `--handler`, the Kubeless event keys, Node's
`extensions.response`, and the FUNC_TIMEOUT / FUNC_MEMFILE_MAX / REQ_MB_LIMIT knobs read from the
function's env. Real subprocesses, real HTTP."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lambdabus_runtime.paths import node_server_path, runtime_pythonpath
from tests.unit.test_runtime import PYTHON

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed")
RFC3339_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

PY_EVENT = """
import time

def foo(event, context):
    return {k: v for k, v in event.items() if k != "extensions"} | {
        "context": context, "has_request": "request" in event["extensions"]}

def slow(event, context):
    time.sleep(5)
"""

NODE_CODE = """
module.exports = {
  helloGet: require('./helloget').foo,
  show: (event, context) => {
    const { extensions, ...rest } = event;
    return { ...rest, context, has_request: 'request' in extensions };
  },
  bad: (event) => {
    if (event.extensions.request.query.id === undefined) {
      const res = event.extensions.response;
      res.status(400);
      return;
    }
    return '42';
  },
  custom: (event) => {
    event.extensions.response.status(201).set('x-kind', 'kubeless');
    return { made: true };
  },
};
"""


@contextmanager
def instance(
    tmp_path: Path, command: list[str], env: dict[str, str] | None = None
) -> Iterator[str]:
    env_file = tmp_path / "env.json"
    env_file.write_text(json.dumps(env or {}))
    with (tmp_path / "stderr").open("w") as stderr:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={
                **os.environ,
                "PYTHONPATH": runtime_pythonpath(),
                "LAMBDABUS_ENV_FILE": str(env_file),
            },
        )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, (tmp_path / "stderr").read_text()
        yield f"http://127.0.0.1:{json.loads(line)['port']}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)
        if process.stdout is not None:
            process.stdout.close()


def python(code: Path, entrypoint: str, handler: str, *extra: str) -> list[str]:
    return [
        PYTHON,
        "-s",
        "-m",
        "lambdabus_runtime",
        "--code",
        str(code),
        "--entrypoint",
        entrypoint,
        "--function",
        "ns/fn",
        "--handler",
        handler,
        "--memory",
        "128",
        *extra,
    ]


def node(code: Path, entrypoint: str, handler: str, *extra: str) -> list[str]:
    assert NODE is not None
    return [
        NODE,
        node_server_path(),
        "--code",
        str(code),
        "--entrypoint",
        entrypoint,
        "--function",
        "ns/fn",
        "--handler",
        handler,
        "--memory",
        "128",
        *extra,
    ]


def call(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        url, data=body, headers=headers or {}, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, raw, got = error.code, error.read(), dict(error.headers)
    try:
        return status, {k.lower(): v for k, v in got.items()}, json.loads(raw)
    except ValueError:
        return status, {k.lower(): v for k, v in got.items()}, raw.decode()


def write(directory: Path, name: str, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(textwrap.dedent(source))
    return directory


def check_kubeless_event(event: dict[str, Any]) -> None:
    assert RFC3339_Z.match(event["event-time"]), event
    assert event["event-type"] == "application/json"
    assert event["event-namespace"] == "http.lambdabus"
    assert len(event["event-id"]) == 36
    assert event["data"] == {"a": 1}
    assert event["has_request"] is True
    assert event["context"]["function-name"] == "fn"
    assert event["context"]["memory-limit"] == "128Mi"


def test_python_handler_gets_the_kubeless_event(tmp_path: Path) -> None:
    code = write(tmp_path / "code", "helloget.py", PY_EVENT)
    with instance(tmp_path, python(code, "helloget.py", "foo")) as url:
        status, _, event = call(url, b'{"a": 1}', {"Content-Type": "application/json"})
        assert status == 200, event
        check_kubeless_event(event)
        assert event["context"]["runtime"] == "python3.11"
        # Kubeless's own headers win; a CloudEvent's attributes come next
        _, _, sent = call(
            url,
            b'{"a": 1}',
            {
                "Content-Type": "application/json",
                "event-id": "abc",
                "event-type": "t",
                "event-time": "2026-01-02T03:04:05Z",
                "event-namespace": "cli.kubeless.io",
            },
        )
        assert [sent[k] for k in ("event-id", "event-type", "event-time", "event-namespace")] == [
            "abc",
            "t",
            "2026-01-02T03:04:05Z",
            "cli.kubeless.io",
        ]
        _, _, ce = call(
            url,
            b"{}",
            {
                "Content-Type": "application/json",
                "ce-id": "9",
                "ce-type": "order",
                "ce-source": "/shop",
                "ce-time": "2026-01-02T05:04:05+02:00",
            },
        )
        assert [ce[k] for k in ("event-id", "event-type", "event-time", "event-namespace")] == [
            "9",
            "order",
            "2026-01-02T03:04:05.000Z",
            "/shop",
        ]


def test_python_dotted_module_below_the_root(tmp_path: Path) -> None:
    code = write(tmp_path / "code", "pkg/__init__.py", "")
    write(code, "pkg/helper.py", "WORD = 'nested'\n")
    write(
        code, "pkg/mod.py", "from .helper import WORD\n\ndef fn(event, context):\n    return WORD\n"
    )
    with instance(tmp_path, python(code, "pkg/mod.py", "fn")) as url:
        assert call(url)[::2] == (200, "nested")


def test_python_missing_handler_says_what_the_module_has(tmp_path: Path) -> None:
    code = write(tmp_path / "code", "helloget.py", PY_EVENT)
    done = subprocess.run(
        python(code, "helloget.py", "bar"),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": runtime_pythonpath()},
        timeout=30,
    )
    assert done.returncode == 3
    assert "helloget.py defines no bar function; its functions: foo, slow" in done.stderr


def test_python_func_timeout_and_memfile_max_from_the_env(tmp_path: Path) -> None:
    code = write(tmp_path / "code", "helloget.py", PY_EVENT)
    env = {"FUNC_TIMEOUT": "1", "FUNC_MEMFILE_MAX": "100"}
    with instance(tmp_path, python(code, "helloget.py", "slow", "--timeout", "30"), env) as url:
        started = time.monotonic()
        status, _, body = call(url)
        assert status == 504, body
        assert time.monotonic() - started < 3
        assert call(url, b"x" * 101)[0] == 413
    bad = subprocess.run(
        python(code, "helloget.py", "foo"),
        capture_output=True,
        text=True,
        timeout=30,
        env={
            **os.environ,
            "PYTHONPATH": runtime_pythonpath(),
            "LAMBDABUS_ENV_FILE": str(tmp_path / "bad.json"),
        },
    )
    assert bad.returncode != 0


@needs_node
def test_node_handler_reexported_and_the_kubeless_event(tmp_path: Path) -> None:
    code = write(tmp_path / "code", "index.js", NODE_CODE)
    write(code, "helloget.js", "module.exports = { foo: () => 'hello world!' };\n")
    (tmp_path / "a").mkdir()
    with instance(tmp_path / "a", node(code, "index.js", "helloGet")) as url:
        assert call(url)[::2] == (200, "hello world!")
    (tmp_path / "b").mkdir()
    with instance(tmp_path / "b", node(code, "index.js", "show")) as url:
        status, _, event = call(url, b'{"a": 1}', {"Content-Type": "application/json"})
        assert status == 200, event
        check_kubeless_event(event)
        assert event["context"]["runtime"] == "nodejs20"


@needs_node
def test_node_extensions_response_sets_status_and_headers(tmp_path: Path) -> None:
    code = write(tmp_path / "code", "index.js", NODE_CODE)
    write(code, "helloget.js", "module.exports = { foo: () => 'hello world!' };\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    with instance(tmp_path / "b", node(code, "index.js", "bad")) as url:
        assert call(url)[0] == 400  # Kyma's example of a custom 400
        status, headers, body = call(url + "/?id=1")
        assert (status, headers["content-type"], body) == (200, "text/plain; charset=utf-8", 42)
    with instance(tmp_path / "c", node(code, "index.js", "custom")) as url:
        status, headers, body = call(url)
        assert (status, headers["x-kind"], body) == (201, "kubeless", {"made": True})


@needs_node
def test_node_missing_export_names_the_exports(tmp_path: Path) -> None:
    code = write(tmp_path / "code", "index.js", NODE_CODE)
    write(code, "helloget.js", "module.exports = { foo: () => 'hello world!' };\n")
    done = subprocess.run(
        node(code, "index.js", "nope"), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 3
    assert (
        "index.js exports no nope function; it exports: helloGet, show, bad, custom" in done.stderr
    )


@needs_node
def test_node_req_mb_limit_and_func_timeout_from_the_env(tmp_path: Path) -> None:
    code = write(
        tmp_path / "code",
        "index.js",
        NODE_CODE + "\nmodule.exports.slow = () => new Promise(() => {});\n",
    )
    write(code, "helloget.js", "module.exports = { foo: () => 'hello world!' };\n")
    env = {"REQ_MB_LIMIT": "1", "FUNC_TIMEOUT": "1"}
    with instance(tmp_path, node(code, "index.js", "slow", "--timeout", "30"), env) as url:
        assert call(url, b"x" * (1024 * 1024 + 1))[0] == 413
        started = time.monotonic()
        assert call(url, b"small")[0] == 504
        assert time.monotonic() - started < 3
