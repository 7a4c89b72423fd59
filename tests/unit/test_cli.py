"""The `lambdabus` CLI and its client against a small fake of the gateway's HTTP API on an
ephemeral port, plus the pure parts: archive packaging, rendering, deploy progress and the SSE
and NDJSON parsers."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import BodyPartReader, web
from aiohttp.test_utils import TestServer

from lambdabus_client.cli import main
from lambdabus_client.client import Invocation, NDJSONDecoder, ServerSentEvent, SSEDecoder
from lambdabus_client.commands.common import (
    format_age,
    parse_env,
    parse_headers,
    parse_since,
    render_table,
)
from lambdabus_client.commands.deploy import Progress, deploy_progress, follow_since, unseen
from lambdabus_client.commands.events import build_event, event_detail, summarize_event
from lambdabus_client.commands.invoke import (
    invocation_lines,
    next_poll,
    platform_error,
    render_body,
)
from lambdabus_client.commands.logs import format_log_line
from lambdabus_client.commands.triggers import format_delivery, format_filter
from lambdabus_client.packaging import PackagingError, load_archive, zip_directory

JsonObject = dict[str, Any]
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
ROUTER_URL = "http://127.0.0.1:8081"


# -- a fake gateway ------------------------------------------------------------------------------


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    spec: JsonObject | None = None
    archive: bytes | None = None
    archive_filename: str | None = None
    archive_content_type: str | None = None
    dependencies: bytes | None = None
    query_items: list[tuple[str, str]] = field(default_factory=list)


Answer = Callable[[bytes], web.Response]


def _echo(body: bytes) -> web.Response:
    return web.json_response({"got": json.loads(body) if body else None})


@dataclass
class FakeGateway:
    """The gateway routes the CLI uses, answering canned JSON and recording every request."""

    url: str = ""
    functions: dict[tuple[str, str], JsonObject] = field(default_factory=dict)
    archives: dict[tuple[str, str], bytes] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    lifecycle_body: bytes = b""
    # The lifecycle stream holds its events back until the build logs were sent, and/or stays
    # open after them (with keepalive comments) until the client leaves.
    lifecycle_after_logs: bool = False
    lifecycle_stays_open: bool = False
    log_lines: list[JsonObject] = field(default_factory=list)
    follow_log_lines: list[JsonObject] | None = None  # what a follow sends; default log_lines
    follow_stays_open: bool = False
    history_items: list[JsonObject] = field(default_factory=list)
    invoke_answer: Answer = _echo
    logs_sent: asyncio.Event = field(default_factory=asyncio.Event)
    events: list[JsonObject] = field(default_factory=list)
    triggers: dict[tuple[str, str], JsonObject] = field(default_factory=dict)
    deadletters: list[JsonObject] = field(default_factory=list)
    # The statuses an asynchronous invocation goes through, one per status read.
    invocation_statuses: list[JsonObject] = field(default_factory=list)

    def add(
        self, namespace: str, name: str, *, runtime: str = "python3.11", age_s: int = 90
    ) -> None:
        created = (datetime.now(UTC) - timedelta(seconds=age_s)).isoformat()
        self.functions[namespace, name] = _record(namespace, name, 1, runtime, created)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record_request])
        base = "/v1/namespaces/{ns}/functions"
        app.router.add_post(base, self._create)
        app.router.add_get(base, self._list)
        app.router.add_get(base + "/{name}", self._get)
        app.router.add_put(base + "/{name}", self._replace)
        app.router.add_delete(base + "/{name}", self._delete)
        app.router.add_get(base + "/{name}/status", self._status)
        app.router.add_post(base + "/{name}/invoke", self._invoke)
        app.router.add_get(base + "/{name}/logs", self._logs)
        app.router.add_get(base + "/{name}/build/logs", self._logs)
        app.router.add_get(base + "/{name}/history", self._history)
        app.router.add_get("/v1/info", self._info)
        app.router.add_get("/v1/lifecycle", self._lifecycle)
        app.router.add_post("/v1/events", self._publish)
        namespace = "/v1/namespaces/{ns}"
        app.router.add_post(namespace + "/triggers", self._create_trigger)
        app.router.add_get(namespace + "/triggers", self._list_triggers)
        app.router.add_delete(namespace + "/triggers/{name}", self._delete_trigger)
        app.router.add_get(namespace + "/deadletters", self._list_deadletters)
        app.router.add_post(namespace + "/deadletters/{id}/redrive", self._redrive)
        app.router.add_get(namespace + "/invocations/{id}", self._invocation)
        return app

    @web.middleware
    async def _record_request(self, request: web.Request, handler: Any) -> web.StreamResponse:
        recorded = Recorded(
            request.method,
            request.path,
            dict(request.query),
            headers=dict(request.headers),
            query_items=list(request.query.items()),
        )
        if request.content_type != "multipart/form-data":
            recorded.body = await request.read()
        else:
            reader = await request.multipart()
            async for part in reader:
                assert isinstance(part, BodyPartReader)
                if part.name == "spec":
                    recorded.spec = json.loads(await part.text())
                elif part.name == "archive":
                    recorded.archive = bytes(await part.read())
                    recorded.archive_filename = part.filename
                    recorded.archive_content_type = part.headers.get("Content-Type")
                elif part.name == "dependencies":
                    recorded.dependencies = bytes(await part.read())
        self.requests.append(recorded)
        response: web.StreamResponse = await handler(request)
        return response

    async def _create(self, request: web.Request) -> web.Response:
        spec = self.requests[-1].spec or {}
        key = (request.match_info["ns"], spec["name"])
        if key in self.functions:
            return _error(409, "already_exists", f"function {key[0]}/{key[1]} already exists")
        record = _record(*key, 1, spec.get("runtime", "python3.11"), NOW.isoformat())
        self.functions[key] = record
        self.archives[key] = self.requests[-1].archive or b""
        return web.json_response(record, status=202, headers={"ETag": '"1"'})

    async def _replace(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        if key not in self.functions:
            return _error(404, "not_found", f"function {key[0]}/{key[1]} does not exist")
        old = self.functions[key]
        archive = self.requests[-1].archive or b""
        if self.archives.get(key) == archive:
            return web.json_response(old, status=200)  # nothing changed: same generation
        self.archives[key] = archive
        record = _record(*key, old["generation"] + 1, old["spec"]["runtime"], old["created_at"])
        self.functions[key] = record
        return web.json_response(record, status=202)

    async def _get(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        if key not in self.functions:
            return _error(404, "function_not_found", f"function {key[0]}/{key[1]} does not exist")
        return web.json_response(self.functions[key])

    async def _list(self, request: web.Request) -> web.Response:
        namespace = request.match_info["ns"]
        items = [record for (ns, _), record in self.functions.items() if ns == namespace]
        return web.json_response({"items": items})

    async def _status(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        if key not in self.functions:
            return _error(404, "not_found", f"function {key[0]}/{key[1]} does not exist")
        return web.json_response(_status(*key, self.functions[key]["generation"]))

    async def _delete(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        if key not in self.functions:
            return _error(404, "not_found", f"function {key[0]}/{key[1]} does not exist")
        return web.json_response(self.functions.pop(key), status=202)

    async def _lifecycle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.lifecycle_after_logs:
            await self.logs_sent.wait()
        await _write_in_pieces(response, self.lifecycle_body)
        if self.lifecycle_stays_open:
            await _keep_open(response, b": keepalive\n\n")
        else:
            await response.write_eof()
        return response

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        follow = request.query.get("follow") == "1"
        lines = self.log_lines
        if follow and self.follow_log_lines is not None:
            lines = self.follow_log_lines
        if "tail" in request.query:
            lines = lines[-int(request.query["tail"]) :]
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        if follow:
            body = body.replace(b"\n", b"\n\n", 1)  # a keepalive among the lines
        await _write_in_pieces(response, body)
        self.logs_sent.set()
        if follow and self.follow_stays_open:
            await _keep_open(response, b"\n")
        else:
            await response.write_eof()
        return response

    async def _invoke(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        if key not in self.functions:
            return _error(404, "function_not_found", f"function {key[0]}/{key[1]} does not exist")
        if request.headers.get("Prefer") == "respond-async":
            return web.json_response(
                {"invocation_id": INVOCATION_ID, "status": "queued"},
                status=202,
                headers={"Location": f"/v1/namespaces/{key[0]}/invocations/{INVOCATION_ID}"},
            )
        return self.invoke_answer(self.requests[-1].body)

    async def _publish(self, request: web.Request) -> web.Response:
        if request.content_type != "application/cloudevents+json":
            return _error(400, "unsupported_content_type", "not a structured CloudEvent")
        event = json.loads(self.requests[-1].body)
        seen = any((e["source"], e["id"]) == (event["source"], event["id"]) for e in self.events)
        if not seen:
            self.events.append(event)
        return web.json_response(
            {"accepted": 1, "ids": [event["id"]], "duplicates": int(seen)}, status=202
        )

    async def _create_trigger(self, request: web.Request) -> web.Response:
        spec = json.loads(self.requests[-1].body)
        namespace = request.match_info["ns"]
        if (namespace, spec["function"]) not in self.functions:
            return _error(404, "function_not_found", f"function {spec['function']} does not exist")
        key = (namespace, spec["name"])
        if key in self.triggers:
            return _error(409, "trigger_exists", f"trigger {key[0]}/{key[1]} already exists")
        self.triggers[key] = _trigger(namespace, spec)
        return web.json_response(self.triggers[key], status=201)

    async def _list_triggers(self, request: web.Request) -> web.Response:
        namespace = request.match_info["ns"]
        items = [t for (ns, _), t in sorted(self.triggers.items()) if ns == namespace]
        return web.json_response({"items": items})

    async def _delete_trigger(self, request: web.Request) -> web.Response:
        key = (request.match_info["ns"], request.match_info["name"])
        if key not in self.triggers:
            return _error(404, "trigger_not_found", f"trigger {key[0]}/{key[1]} does not exist")
        return web.json_response(self.triggers.pop(key), status=202)

    async def _list_deadletters(self, request: web.Request) -> web.Response:
        trigger = request.query.get("trigger")
        after = int(request.query.get("after", "0"))
        limit = int(request.query.get("limit", "100"))
        items = [
            d
            for d in self.deadletters
            if (trigger is None or d["trigger"] == trigger) and int(d["id"]) > after
        ][:limit]
        more = items[-1]["id"] if len(items) == limit else None
        return web.json_response({"items": items, "next": more})

    async def _redrive(self, request: web.Request) -> web.Response:
        for letter in self.deadletters:
            if letter["id"] == request.match_info["id"]:
                self.deadletters.remove(letter)
                return web.json_response({**letter, "redriven": True}, status=202)
        return _error(404, "deadletter_not_found", f"no dead letter {request.match_info['id']}")

    async def _invocation(self, request: web.Request) -> web.Response:
        if request.match_info["id"] != INVOCATION_ID or not self.invocation_statuses:
            return _error(404, "invocation_not_found", "no such invocation")
        record = self.invocation_statuses[0]
        if len(self.invocation_statuses) > 1:
            self.invocation_statuses.pop(0)
        return web.json_response(record)

    async def _history(self, request: web.Request) -> web.Response:
        return web.json_response({"items": self.history_items, "truncated": False})

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response({"router_url": ROUTER_URL, "version": "0.1.0"})


async def _write_in_pieces(response: web.StreamResponse, body: bytes) -> None:
    # Written in small pieces so events, lines and even characters straddle chunks.
    for start in range(0, len(body), 7):
        await response.write(body[start : start + 7])


async def _keep_open(response: web.StreamResponse, keepalive: bytes) -> None:
    """Keep a stream open as a follow does, until the client goes away."""
    try:
        while True:
            await response.write(keepalive)
            await asyncio.sleep(0.02)
    except ConnectionResetError:
        pass


def _record(namespace: str, name: str, generation: int, runtime: str, created: str) -> JsonObject:
    return {
        "namespace": namespace,
        "name": name,
        "uid": f"uid-{name}",
        "generation": generation,
        "spec": {
            "runtime": runtime,
            "env": {},
            "replicas": 1,
            "timeout": 30.0,
            "memory": 256,
            "description": "",
        },
        "source": {
            "sha256": f"{generation:x}" * 64,
            "size": 123,
            "kind": "archive",
            "entrypoint": "lambda_main.py",
            "files": 2,
        },
        "created_at": created,
        "updated_at": created,
    }


INVOCATION_ID = "0123456789abcdef0123456789abcdef"


def _trigger(namespace: str, spec: JsonObject) -> JsonObject:
    delivery = {
        "retries": 3,
        "backoff": "exponential",
        "backoff_delay": 1.0,
        "timeout": 30.0,
        "max_in_flight": 64,
        **spec.get("delivery", {}),
    }
    return {
        "namespace": namespace,
        "name": spec["name"],
        "uid": f"uid-{spec['name']}",
        "function": spec["function"],
        "filter": spec.get("filter", {}),
        "delivery": delivery,
        "created_at": (datetime.now(UTC) - timedelta(seconds=150)).isoformat(),
    }


def _dead_letter(number: int, trigger: str, event_type: str, age_s: int = 30) -> JsonObject:
    moment = (datetime.now(UTC) - timedelta(seconds=age_s)).isoformat()
    return {
        "id": str(number),
        "namespace": "default",
        "trigger": trigger,
        "trigger_uid": f"uid-{trigger}",
        "function": "orders",
        "event": {"specversion": "1.0", "id": f"e{number}", "source": "/s", "type": event_type},
        "reason": "http_status_500",
        "message": "",
        "attempts": 4,
        "last_status": 500,
        "first_attempt_at": moment,
        "deadlettered_at": moment,
    }


def _invocation(status: str, **fields: Any) -> JsonObject:
    return {
        "namespace": "default",
        "function": "hello",
        "id": INVOCATION_ID,
        "status": status,
        "attempts": 0,
        "result": None,
        "result_status": None,
        "result_content_type": None,
        "error": None,
        "callback_url": None,
        "created_at": NOW.isoformat(),
        "updated_at": NOW.isoformat(),
    } | fields


def _status(namespace: str, name: str, generation: int) -> JsonObject:
    condition = {"status": "True", "last_transition_time": NOW.isoformat()}
    return {
        "namespace": namespace,
        "name": name,
        "generation": generation,
        "image_status": "completed",
        "status": "running",
        "conditions": [
            {**condition, "type": "ConfigurationReady", "reason": "Valid", "message": ""},
            {**condition, "type": "BuildReady", "reason": "BuildSucceeded", "message": "built"},
            {**condition, "type": "Running", "reason": "Ready", "message": "1/1 replicas ready"},
        ],
        "replicas": 1,
        "ready_replicas": 1,
        "message": "",
    }


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}},
        status=status,
        headers={"X-Lambdabus-Error": code},
    )


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    fake = FakeGateway()
    async with TestServer(fake.app()) as server:
        fake.url = f"http://{server.host}:{server.port}"
        yield fake


async def run_cli(*args: str) -> int:
    """`main` calls asyncio.run, so it runs on a thread of its own beside the server's loop."""
    return await asyncio.to_thread(main, list(args))


@pytest.fixture
def function_dir(tmp_path: Path) -> Path:
    source = tmp_path / "hello"
    (source / "lib").mkdir(parents=True)
    (source / "lambda_main.py").write_text("async def main(request):\n    return {}\n")
    (source / "lib" / "util.py").write_text("X = 1\n")
    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "lambda_main.cpython-311.pyc").write_bytes(b"\0")
    return source


# -- CLI against the fake gateway -------------------------------------------------------------


async def test_deploy_directory_uploads_zip_and_spec(
    gateway: FakeGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_cli(
        "--url", gateway.url, "deploy", str(function_dir), "--name", "hello",
        "--env", "GREETING=hi", "--env", "URL=a=b", "--no-wait",
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    exists, upload = gateway.requests[:2]
    assert (exists.method, exists.path) == ("GET", "/v1/namespaces/default/functions/hello")
    assert (upload.method, upload.path) == ("POST", "/v1/namespaces/default/functions")
    expected = {"name": "hello", "env": {"GREETING": "hi", "URL": "a=b"}, "runtime": "python3.11"}
    assert upload.spec == expected
    assert out.startswith("runtime python3.11 (no handler.js or package.json; --runtime chooses)\n")
    assert upload.archive_filename == "function.zip"
    assert upload.archive_content_type == "application/zip"
    assert upload.archive is not None
    with zipfile.ZipFile(io.BytesIO(upload.archive)) as archive:
        assert archive.namelist() == ["lambda_main.py", "lib/util.py"]
        assert archive.read("lib/util.py") == b"X = 1\n"
    assert "Created default/hello: generation 1, sha256 111111111111" in out
    assert "entrypoint lambda_main.py" in out
    assert "Image: completed  Status: running" in out
    assert [r.path for r in gateway.requests] == [
        "/v1/namespaces/default/functions/hello",
        "/v1/namespaces/default/functions",
        "/v1/namespaces/default/functions/hello/status",
    ]  # --no-wait follows neither events nor logs


async def test_deploy_a_kubeless_file_with_handler_dependencies_and_labels(
    gateway: FakeGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "hello.js"
    source.write_text("module.exports = { foo: () => 'hello world!' };\n")
    deps = tmp_path / "package.json"
    deps.write_text('{"dependencies": {}}')

    code = await run_cli(
        "--url", gateway.url, "deploy", str(source), "--name", "hello",
        "--handler", "helloget.foo", "--dependencies", str(deps),
        "--label", "tier=web", "--label", "app.kubernetes.io/name=hello", "--no-wait",
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    upload = gateway.requests[1]
    assert upload.spec == {
        "name": "hello",
        "handler": "helloget.foo",
        "labels": {"tier": "web", "app.kubernetes.io/name": "hello"},
        "runtime": "nodejs20",
    }
    assert out.startswith("runtime nodejs20 (found hello.js and no .py file; --runtime chooses)")
    assert (upload.archive, upload.archive_filename) == (source.read_bytes(), "hello.js")
    assert upload.archive_content_type == "application/octet-stream"
    assert upload.dependencies == deps.read_bytes()

    missing = await run_cli(
        "--url", gateway.url, "deploy", str(source), "--name", "hello",
        "--dependencies", str(tmp_path / "nope.txt"), "--no-wait",
    )  # fmt: skip
    assert missing == 2
    assert "--dependencies" in capsys.readouterr().err


async def test_ls_filters_by_label(gateway: FakeGateway) -> None:
    code = await run_cli(
        "--url", gateway.url, "ls", "--label", "tier=web", "--label", "team", "-o", "json"
    )
    assert code == 0
    assert gateway.requests[0].path == "/v1/namespaces/default/functions"
    assert gateway.requests[0].query_items == [("label", "tier=web"), ("label", "team")]


def test_source_names_of_tars_zips_and_single_files(tmp_path: Path) -> None:
    import tarfile

    from lambdabus_client.packaging import source_names

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("./index.js", "./lib/x.js"):
            info = tarfile.TarInfo(name)
            tar.addfile(info, io.BytesIO(b""))
    assert source_names(buffer.getvalue(), "f.tgz") == {"index.js"}
    assert source_names(b"def foo(): pass\n", "helloget.py") == {"helloget.py"}
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("helloget.js", "")
        zf.writestr("lib/a.py", "")
    assert source_names(zipped.getvalue(), "x.zip") == {"helloget.js"}


async def test_deploy_of_an_existing_function_replaces_it_with_put(
    gateway: FakeGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add("prod", "hello")

    code = await run_cli(
        "deploy", str(function_dir), "--name", "hello", "-n", "prod", "--url", gateway.url,
        "--replicas", "2", "--timeout", "5", "--memory", "1Gi", "--no-wait",
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    current, create, replace = gateway.requests[:3]
    assert (current.method, create.method, replace.method) == ("GET", "POST", "PUT")
    assert replace.path == "/v1/namespaces/prod/functions/hello"
    # The settings not given again are kept (runtime, env, description).
    expected_spec = {
        "runtime": "python3.11",
        "env": {},
        "description": "",
        "name": "hello",
        "replicas": 2,
        "timeout": 5.0,
        "memory": "1Gi",
    }
    assert replace.spec == expected_spec
    assert replace.archive == create.archive
    assert "Updated prod/hello: generation 2" in out


async def test_deploy_of_a_zip_sends_it_as_is(
    gateway: FakeGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "fn.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("handler.py", "def main(event, context):\n    return {}\n")

    code = await run_cli(
        "--url", gateway.url, "deploy", str(archive), "--name", "zipped", "--no-wait"
    )  # fmt: skip

    assert code == 0
    assert gateway.requests[1].archive == archive.read_bytes()


async def test_ls_renders_an_aligned_table(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add("default", "hello", age_s=90)
    gateway.add("default", "a-much-longer-name", runtime="nodejs20", age_s=3 * 3600 + 5)
    gateway.add("other", "elsewhere")

    code = await run_cli("--url", gateway.url, "ls")

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "NAME                RUNTIME     GEN  IMAGE      STATUS   AGE",
        "a-much-longer-name  nodejs20    1    completed  running  3h",
        "hello               python3.11  1    completed  running  1m",
    ]
    status_paths = {r.path for r in gateway.requests if r.path.endswith("/status")}
    assert status_paths == {
        "/v1/namespaces/default/functions/hello/status",
        "/v1/namespaces/default/functions/a-much-longer-name/status",
    }


async def test_ls_of_an_empty_namespace_says_so(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_cli("--url", gateway.url, "ls", "--namespace", "empty")

    assert code == 0
    assert capsys.readouterr().out == "No functions in namespace empty.\n"


async def test_ls_json_prints_records_with_their_status(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add("default", "hello")

    code = await run_cli("--url", gateway.url, "--output", "json", "ls")

    assert code == 0
    (item,) = json.loads(capsys.readouterr().out)["items"]
    assert item["name"] == "hello"
    assert item["status"]["image_status"] == "completed"


async def test_status_shows_image_status_lambda_status_and_conditions(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add("default", "hello")

    code = await run_cli("--url", gateway.url, "status", "hello")

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert "Image:       completed" in out
    assert "Status:      running (1/1 replicas ready)" in out
    table = out.split("\n\n", 1)[1].splitlines()
    assert table == [
        "TYPE                STATUS  REASON          MESSAGE",
        "ConfigurationReady  True    Valid",
        "BuildReady          True    BuildSucceeded  built",
        "Running             True    Ready           1/1 replicas ready",
    ]


async def test_rm_deletes(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    gateway.add("default", "hello")

    code = await run_cli("--url", gateway.url, "rm", "hello")

    assert code == 0
    assert gateway.requests[-1].method == "DELETE"
    assert ("default", "hello") not in gateway.functions
    assert capsys.readouterr().out == "Deleting default/hello.\n"


async def test_an_error_answer_exits_1_with_one_line_on_stderr(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_cli("--url", gateway.url, "rm", "missing")

    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err == "error: not_found: function default/missing does not exist\n"


async def test_an_unreachable_gateway_exits_1_and_says_what_to_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"

    code = await run_cli("--url", url, "ls")

    _, err = capsys.readouterr()
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith(f"error: unreachable: the gateway at {url} is not reachable")
    assert "lambdabus up" in err


def test_a_usage_error_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["deploy", "somewhere"])

    _, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("error: usage: the following arguments are required: --name")


def test_a_missing_source_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["deploy", str(tmp_path / "nope"), "--name", "hello"])

    assert code == 2
    assert capsys.readouterr().err == f"error: invalid_source: {tmp_path / 'nope'} does not exist\n"


async def test_events_prints_one_line_per_lifecycle_event(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    succeeded = {
        "specversion": "1.0",
        "id": "e1",
        "type": "io.lambdabus.build.succeeded",
        "source": "/lambdabus/builder",
        "subject": "default/hello",
        "time": "2024-05-01T12:00:03.250000+00:00",
        "data": {"generation": 2, "duration_seconds": 1.25, "dependencies_cached": True},
    }
    failed = {
        **succeeded,
        "id": "e2",
        "type": "io.lambdabus.build.failed",
        "time": "2024-05-01T12:00:04Z",
        "data": {"generation": 3, "reason": "SyntaxError", "message": "line 1"},
    }
    multi_line = "\n".join(f"data: {line}" for line in json.dumps(failed, indent=1).splitlines())
    gateway.lifecycle_body = (
        f": keepalive\n\nid: e1\nevent: lifecycle\ndata: {json.dumps(succeeded)}\n\n"
        f": another comment\r\nid: e2\r\n{multi_line}\r\n\r\n"
    ).encode()

    code = await run_cli(
        "--url", gateway.url, "events", "--function", "hello", "--type", "build.succeeded",
        "--since", "2024-05-01T12:00:00+00:00",
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "2024-05-01T12:00:03Z  build.succeeded  default/hello  "
        "generation 2, built in 1.2s, dependencies cached",
        "2024-05-01T12:00:04Z  build.failed  default/hello  generation 3 (SyntaxError: line 1)",
    ]
    assert gateway.requests[0].query == {
        "namespace": "default",
        "function": "hello",
        "type": "io.lambdabus.build.succeeded",
        "since": "2024-05-01T12:00:00Z",
    }


def _event(kind: str, generation: int = 1, name: str = "hello", **data: Any) -> JsonObject:
    return {
        "specversion": "1.0",
        "id": f"{kind}-{generation}",
        "type": f"io.lambdabus.{kind}",
        "source": "/lambdabus/builder",
        "subject": f"default/{name}",
        "time": "2024-05-01T12:00:03.250000+00:00",
        "data": {"namespace": "default", "name": name, "uid": f"uid-{name}", **data}
        | {"generation": generation},
    }


def _sse(*events: JsonObject) -> bytes:
    return b"".join(f"event: lifecycle\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def _log(
    line: str,
    *,
    kind: str = "runtime",
    stream: str = "stdout",
    instance: str | None = "hello-7f9c",
    generation: int = 1,
    ts: str = "2024-05-01T12:00:03.250123Z",
) -> JsonObject:
    return {
        "ts": ts,
        "kind": kind,
        "namespace": "default",
        "name": "hello",
        "uid": "uid-hello",
        "generation": generation,
        "stream": stream,
        "instance": None if kind == "build" else instance,
        "line": line,
    }


def _paths(gateway: FakeGateway) -> list[str]:
    return [request.path for request in gateway.requests]


async def test_deploy_waits_showing_build_logs_and_transitions_until_ready(
    gateway: FakeGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.log_lines = [
        _log("an older build", kind="build", generation=0),
        _log("Collecting humanize", kind="build"),
        _log("Successfully installed humanize-4.9.0", kind="build", stream="stderr"),
    ]
    gateway.follow_stays_open = True
    gateway.lifecycle_after_logs = True
    gateway.lifecycle_body = _sse(
        _event("function.created"),
        _event("build.queued", runtime="python3.11"),
        _event("build.queued", name="other"),
        _event("build.started", runtime="python3.11"),
        _event("build.succeeded", duration_seconds=1.234, dependencies_cached=True),
        _event("deployment.started", replicas=1, ready_replicas=0),
        _event("deployment.ready", replicas=1, ready_replicas=1),
        _event("deployment.failed", reason="NeverSeen"),  # after the end: not read
    )

    code = await run_cli(
        "--url", gateway.url, "deploy", str(function_dir), "--name", "hello", "--runtime", "python3.11"
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("Created default/hello: generation 1")
    transitions = [line for line in lines[1:] if not line.startswith("  \u2502 ")]
    assert transitions == [
        "build queued",
        "build started",
        "build succeeded in 1.2s (dependencies cached)",
        "deployment started (0/1 replicas ready)",
        f"ready: {ROUTER_URL}/default/hello",
    ]
    build_lines = [line for line in lines if line.startswith("  \u2502 ")]
    assert build_lines == [
        "  \u2502 Collecting humanize",
        "  \u2502 Successfully installed humanize-4.9.0",
    ]
    assert lines[-1] == f"ready: {ROUTER_URL}/default/hello"
    by_path = {request.path: request for request in gateway.requests}
    assert _paths(gateway)[:3] == [
        "/v1/namespaces/default/functions/hello",
        "/v1/info",
        "/v1/namespaces/default/functions",
    ]
    assert set(_paths(gateway)[3:]) == {
        "/v1/lifecycle",
        "/v1/namespaces/default/functions/hello/build/logs",
    }
    assert len(gateway.requests) == 5
    since = "2024-05-01T11:59:58Z"  # a moment before the record's updated_at
    assert by_path["/v1/lifecycle"].query == {
        "namespace": "default",
        "function": "hello",
        "since": since,
    }
    assert by_path["/v1/namespaces/default/functions/hello/build/logs"].query == {
        "since": since,
        "follow": "1",
    }


async def test_deploy_of_a_failing_build_exits_1_with_the_reason_and_the_last_lines(
    gateway: FakeGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _log("Compiling lambda_main.py", kind="build")
    rest = [
        _log('  File "lambda_main.py", line 1', kind="build", stream="stderr"),
        _log("SyntaxError: invalid syntax", kind="build", stream="stderr"),
    ]
    gateway.log_lines = [first, *rest]
    gateway.follow_log_lines = [first]  # the rest had not been streamed yet
    gateway.follow_stays_open = True
    gateway.lifecycle_after_logs = True
    gateway.lifecycle_body = _sse(
        _event("build.queued"),
        _event("build.started"),
        _event("build.failed", reason="SyntaxError", message="lambda_main.py line 1"),
    )

    code = await run_cli(
        "--url", gateway.url, "deploy", str(function_dir), "--name", "hello", "--runtime", "python3.11"
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert code == 1
    lines = out.splitlines()
    # The streamed line came while the build ran; the rest from the tail, once, after it failed.
    assert sorted(lines[1:4]) == ["  \u2502 Compiling lambda_main.py", "build queued",
                                  "build started"]  # fmt: skip
    assert lines[4:] == [
        '  \u2502   File "lambda_main.py", line 1',
        "  \u2502 SyntaxError: invalid syntax",
    ]
    assert err == "build failed: SyntaxError: lambda_main.py line 1\n"
    (tail,) = [r for r in gateway.requests if r.path.endswith("/build/logs") and "tail" in r.query]
    assert tail.query == {"since": "2024-05-01T11:59:58Z", "tail": "20"}


async def test_deploy_of_a_failing_deployment_exits_1(
    gateway: FakeGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.lifecycle_body = _sse(
        _event("build.succeeded"),
        _event("deployment.started", replicas=1, ready_replicas=0),
        _event("deployment.failed", replicas=1, ready_replicas=0, reason="CrashLoop",
               message="exited with status 1"),
    )  # fmt: skip

    code = await run_cli(
        "--url", gateway.url, "deploy", str(function_dir), "--name", "hello", "--runtime", "python3.11"
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert code == 1
    assert "deployment started (0/1 replicas ready)" in out
    assert err == "deployment failed: CrashLoop: exited with status 1\n"


async def test_deploy_that_is_not_ready_in_time_exits_1_with_a_timeout(
    gateway: FakeGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.lifecycle_body = _sse(_event("build.queued"))
    gateway.lifecycle_stays_open = True

    code = await run_cli(
        "--url", gateway.url, "deploy", str(function_dir), "--name", "hello",
        "--wait-timeout", "0.3",
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert code == 1
    assert "build queued" in out
    assert err.count("\n") == 1
    assert err.startswith("error: timeout: default/hello generation 1 was not ready after 0.3 s")


async def test_deploy_of_an_unchanged_function_says_so_and_does_not_wait(
    gateway: FakeGateway, function_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_cli("--url", gateway.url, "deploy", str(function_dir), "--name", "hello",
                         "--no-wait") == 0  # fmt: skip
    capsys.readouterr()
    gateway.requests.clear()

    code = await run_cli(
        "--url", gateway.url, "deploy", str(function_dir), "--name", "hello", "--runtime", "python3.11"
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.startswith("Unchanged default/hello: generation 1")
    assert out.rstrip().endswith("(nothing changed, nothing to deploy)")
    assert "/v1/lifecycle" not in _paths(gateway)


async def test_invoke_sends_json_and_pretty_prints_the_answer(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add("default", "hello")

    code = await run_cli(
        "--url", gateway.url, "invoke", "hello", "--data", '{"who": "w\u00f6rld"}',
        "--header", "X-Trace: abc:1",
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert json.loads(out) == {"got": {"who": "w\u00f6rld"}}
    assert out == json.dumps({"got": {"who": "w\u00f6rld"}}, indent=2, ensure_ascii=False) + "\n"
    sent = gateway.requests[-1]
    assert sent.path == "/v1/namespaces/default/functions/hello/invoke"
    assert sent.body == '{"who": "w\u00f6rld"}'.encode()
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["X-Trace"] == "abc:1"


async def test_invoke_with_a_data_file_sends_its_bytes(
    gateway: FakeGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add("default", "hello")
    gateway.invoke_answer = lambda body: web.Response(body=body[::-1], content_type="text/plain")
    payload = tmp_path / "in.txt"
    payload.write_text("hello there")

    code = await run_cli("--url", gateway.url, "invoke", "hello", "--data-file", str(payload))

    assert code == 0
    assert capsys.readouterr().out == "ereht olleh\n"
    assert gateway.requests[-1].headers["Content-Type"] == "text/plain; charset=utf-8"


async def test_invoke_of_a_failing_function_prints_its_body_and_exits_1(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add("default", "hello")
    gateway.invoke_answer = lambda body: web.Response(status=500, text="boom\n")

    code = await run_cli("--url", gateway.url, "invoke", "hello")

    out, err = capsys.readouterr()
    assert code == 1
    assert out == "boom\n"
    assert err == "error: function_error: default/hello answered 500\n"
    assert gateway.requests[-1].body == b""


async def test_invoke_platform_error_is_one_line(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add("default", "hello")

    def busy(body: bytes) -> web.Response:
        error = {"error": {"code": "no_ready_instance", "message": "hello is starting"}}
        return web.json_response(
            error,
            status=503,
            headers={"Retry-After": "2", "X-Lambdabus-Error": "no_ready_instance"},
        )

    gateway.invoke_answer = busy

    code = await run_cli("--url", gateway.url, "invoke", "hello")
    missing = await run_cli("--url", gateway.url, "invoke", "nope")

    out, err = capsys.readouterr()
    assert (code, missing, out) == (1, 1, "")
    assert err.splitlines() == [
        "error: no_ready_instance: hello is starting (retry after 2 s)",
        "error: function_not_found: function default/nope does not exist",
    ]


async def test_invoke_refuses_data_that_is_not_json(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_cli("--url", gateway.url, "invoke", "hello", "--data", "{nope")

    assert code == 2
    assert capsys.readouterr().err.startswith("error: usage: --data is not valid JSON")
    assert gateway.requests == []


async def test_logs_prints_one_line_per_log_line(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add("default", "hello")
    gateway.log_lines = [
        _log("caf\u00e9 ready on :8080"),  # a 2-byte character straddles a chunk boundary
        _log("Traceback (most recent call last):", stream="stderr"),
        _log("instance started", stream="system", instance=None),
    ]

    code = await run_cli(
        "--url", gateway.url, "logs", "hello", "--tail", "5", "--since", "2024-05-01T12:00:00Z"
    )

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "12:00:03.250 hello-7f9c caf\u00e9 ready on :8080",
        "12:00:03.250 hello-7f9c [stderr] Traceback (most recent call last):",
        "12:00:03.250 - [system] instance started",
    ]
    _exists, request = gateway.requests  # the function GET first: function_not_found
    assert request.path == "/v1/namespaces/default/functions/hello/logs"
    assert request.query == {"tail": "5", "since": "2024-05-01T12:00:00Z"}


async def test_logs_build_follow_json_prints_the_raw_objects(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add("default", "hello")
    gateway.log_lines = [_log("step 1", kind="build"), _log("step 2", kind="build")]

    code = await run_cli("--url", gateway.url, "-o", "json", "logs", "hello", "--build", "-f")

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert [json.loads(line) for line in out.splitlines()] == gateway.log_lines
    _exists, request = gateway.requests  # the function GET first: function_not_found
    assert request.path == "/v1/namespaces/default/functions/hello/build/logs"
    assert request.query == {"follow": "1"}


async def test_history_renders_a_table(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.history_items = [
        {
            **_event("function.created"),
            "time": "2024-05-01T12:00:00Z",
            "actorid": "00112233aabbccdd",
            "actorname": "ci",
        },
        {**_event("function.updated", 2, changes=["source"]), "time": "2024-05-01T12:01:00Z"},
        {**_event("build.failed", 2, reason="SyntaxError", message="line 1")},
    ]

    code = await run_cli("--url", gateway.url, "history", "hello")

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "TIME                  TYPE              GEN  ACTOR                  DETAIL",
        "2024-05-01T12:00:00Z  function.created  1    ci (00112233aabbccdd)",
        "2024-05-01T12:01:00Z  function.updated  2    -                      source chan\u2026",
        "2024-05-01T12:00:03Z  build.failed      2    -                      SyntaxError\u2026",
    ]
    # a removed function (no record) still shows its history
    assert [r.path for r in gateway.requests] == [
        "/v1/namespaces/default/functions/hello",
        "/v1/namespaces/default/functions/hello/history",
    ]


# -- events, triggers, dead letters, asynchronous invocations -----------------------------------


async def test_publish_sends_a_structured_event(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run_cli(
        "--url", gateway.url, "publish", "--type", "com.example.order.created",
        "--source", "/shop", "--id", "42", "--subject", "orders/42",
        "--data", '{"total": 5}', "--ext", "region=eu", "--ext", "trace=a=b",
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out == "Published event 42 (com.example.order.created).\n"
    request = gateway.requests[-1]
    assert (request.method, request.path) == ("POST", "/v1/events")
    assert request.headers["Content-Type"] == "application/cloudevents+json"
    assert json.loads(request.body) == {
        "specversion": "1.0",
        "id": "42",
        "source": "/shop",
        "type": "com.example.order.created",
        "subject": "orders/42",
        "region": "eu",
        "trace": "a=b",
        "data": {"total": 5},
        "datacontenttype": "application/json",
    }


async def test_publish_gives_a_new_id_and_says_when_an_event_was_stored_already(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    first = await run_cli("--url", gateway.url, "publish", "--type", "t", "--source", "/s")
    event_id = gateway.events[0]["id"]
    again = await run_cli(
        "--url", gateway.url, "publish", "--type", "t", "--source", "/s", "--id", event_id
    )

    out = capsys.readouterr().out.splitlines()
    assert (first, again) == (0, 0)
    assert str(uuid.UUID(event_id)) == event_id
    assert "data" not in gateway.events[0]
    assert out == [
        f"Published event {event_id} (t).",
        f"Already stored: event {event_id} from /s (same source and id); not stored again.",
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "{nope"], "--data is not valid JSON"),
        (["--ext", "novalue"], "--ext 'novalue' is not KEY=VALUE"),
        (["--ext", "type=x"], "would replace the event's own 'type'"),
    ],
)
def test_publish_usage_errors(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--url", "http://127.0.0.1:1", "publish", "--type", "t", "--source", "/s", *extra])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: usage: ")
    assert message in err


async def test_triggers_create_ls_rm(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add("default", "orders")

    created = await run_cli(
        "--url", gateway.url, "triggers", "create", "on-order", "--function", "orders",
        "--filter", "type=com.example.order.*", "--filter", "source=/shop",
        "--retries", "5", "--backoff", "linear", "--backoff-delay", "0.5",
        "--timeout", "10", "--max-in-flight", "8",
    )  # fmt: skip
    plain = await run_cli(
        "triggers", "create", "all", "--function", "orders", "--url", gateway.url
    )  # fmt: skip
    listed = await run_cli("--url", gateway.url, "triggers", "ls")
    removed = await run_cli("--url", gateway.url, "triggers", "rm", "all")

    out, err = capsys.readouterr()
    assert (created, plain, listed, removed, err) == (0, 0, 0, 0, "")
    spec = json.loads(gateway.requests[0].body)
    assert spec == {
        "name": "on-order",
        "function": "orders",
        "filter": {"type": "com.example.order.*", "source": "/shop"},
        "delivery": {
            "retries": 5,
            "backoff": "linear",
            "backoff_delay": 0.5,
            "timeout": 10.0,
            "max_in_flight": 8,
        },
    }
    assert json.loads(gateway.requests[1].body) == {
        "name": "all",
        "function": "orders",
        "filter": {},
    }
    assert out.splitlines() == [
        "Created trigger default/on-order: type=com.example.order.*,source=/shop -> function "
        "orders (5 retries, linear from 0.5s, timeout 10s).",
        "Created trigger default/all: * -> function orders (3 retries, exponential from 1s, "
        "timeout 30s).",
        *render_table(
            ["NAME", "FUNCTION", "FILTER", "DELIVERY", "AGE"],
            [
                ["all", "orders", "*", "3 retries, exponential from 1s, timeout 30s", "2m"],
                [
                    "on-order",
                    "orders",
                    "type=com.example.order.*,source=/shop",
                    "5 retries, linear from 0.5s, timeout 10s",
                    "2m",
                ],
            ],
        ).splitlines(),
        "Deleting trigger default/all.",
    ]
    assert gateway.requests[-1].method == "DELETE"
    assert gateway.requests[-1].path == "/v1/namespaces/default/triggers/all"
    assert list(gateway.triggers) == [("default", "on-order")]


async def test_triggers_errors_and_empty_listing(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = await run_cli(
        "--url", gateway.url, "triggers", "create", "t", "--function", "nope"
    )  # fmt: skip
    bad_filter = await run_cli(
        "--url", gateway.url, "triggers", "create", "t", "--function", "f", "--filter", "type"
    )  # fmt: skip
    empty = await run_cli("--url", gateway.url, "triggers", "ls", "-n", "quiet")

    out, err = capsys.readouterr()
    assert (missing, bad_filter, empty) == (1, 2, 0)
    assert err.splitlines() == [
        "error: function_not_found: function nope does not exist",
        "error: usage: --filter 'type' is not KEY=VALUE",
    ]
    assert out == "No triggers in namespace quiet.\n"


async def test_deadletters_ls_and_redrive(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.deadletters = [
        _dead_letter(3, "orders", "com.example.order.created", age_s=120),
        _dead_letter(7, "audit", "com.example.audit", age_s=5),
    ]

    listed = await run_cli("--url", gateway.url, "deadletters", "ls")
    paged = await run_cli(
        "--url", gateway.url, "deadletters", "ls", "--trigger", "orders", "--limit", "1"
    )  # fmt: skip
    redriven = await run_cli("--url", gateway.url, "deadletters", "redrive", "3")
    missing = await run_cli("--url", gateway.url, "deadletters", "redrive", "3")
    empty = await run_cli("--url", gateway.url, "deadletters", "ls", "--trigger", "orders")

    out, err = capsys.readouterr()
    assert (listed, paged, redriven, missing, empty) == (0, 0, 0, 1, 0)
    assert out.splitlines() == [
        "ID  TRIGGER  TYPE                       EVENT  REASON           ATTEMPTS  AGE",
        "3   orders   com.example.order.created  e3     http_status_500  4         2m",
        "7   audit    com.example.audit          e7     http_status_500  4         5s",
        "ID  TRIGGER  TYPE                       EVENT  REASON           ATTEMPTS  AGE",
        "3   orders   com.example.order.created  e3     http_status_500  4         2m",
        "More: lambdabus deadletters ls --after 3",
        "Redriven dead letter 3: event e3 (com.example.order.created) sent to trigger orders "
        "again.",
        "No dead letters for trigger orders in namespace default.",
    ]
    assert err == "error: deadletter_not_found: no dead letter 3\n"
    assert gateway.requests[1].query == {"trigger": "orders", "limit": "1"}
    assert gateway.requests[2].path == "/v1/namespaces/default/deadletters/3/redrive"


async def test_invoke_async_prints_the_invocation_id(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.add("default", "hello")

    code = await run_cli(
        "--url", gateway.url, "invoke", "hello", "--async", "--data", '{"a": 1}',
        "--callback-url", "https://example.com/cb", "--header", "X-Trace: t1",
    )  # fmt: skip

    out, err = capsys.readouterr()
    assert (code, err, out) == (0, "", f"{INVOCATION_ID}\n")
    request = gateway.requests[-1]
    assert request.body == b'{"a": 1}'
    assert request.headers["Prefer"] == "respond-async"
    assert request.headers["X-Callback-Url"] == "https://example.com/cb"
    assert request.headers["X-Trace"] == "t1"
    assert request.headers["Content-Type"] == "application/json"


async def test_invocation_wait_polls_until_it_finished(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.invocation_statuses = [
        _invocation("queued"),
        _invocation("running", attempts=1),
        _invocation("succeeded", attempts=1, result={"answer": 42}, result_status=200),
    ]

    code = await run_cli("--url", gateway.url, "invocation", INVOCATION_ID, "--wait")

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"Invocation:  {INVOCATION_ID}",
        "Function:    default/hello",
        "Status:      succeeded",
        "Attempts:    1",
        "HTTP status: 200",
        "Result:",
        "  {",
        '    "answer": 42',
        "  }",
    ]
    assert [r.path for r in gateway.requests] == [
        f"/v1/namespaces/default/invocations/{INVOCATION_ID}"
    ] * 3


async def test_invocation_without_wait_and_a_failed_one(
    gateway: FakeGateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.invocation_statuses = [_invocation("queued")]
    queued = await run_cli("--url", gateway.url, "invocation", INVOCATION_ID)
    gateway.invocation_statuses = [_invocation("failed", attempts=4, error="http_status_500")]
    failed = await run_cli("--url", gateway.url, "invocation", INVOCATION_ID, "--wait")
    unknown = await run_cli("--url", gateway.url, "invocation", "nope")

    out, err = capsys.readouterr()
    assert (queued, failed, unknown) == (0, 1, 1)
    assert "Status:      queued" in out
    assert "Status:      failed" in out
    assert "Error:       http_status_500" in out
    assert err.splitlines() == [
        "error: invocation_failed: http_status_500",
        "error: invocation_not_found: no such invocation",
    ]


def test_callback_url_needs_async(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--url", "http://127.0.0.1:1", "invoke", "fn", "--callback-url", "http://x"])

    assert code == 2
    assert capsys.readouterr().err == "error: usage: --callback-url needs --async\n"


def test_build_event_and_trigger_rendering() -> None:
    event = build_event(type="t", source="/s", id="1", extensions={"ext": "v"})

    assert event == {"specversion": "1.0", "id": "1", "source": "/s", "type": "t", "ext": "v"}
    assert format_filter({}) == "*"
    assert format_filter({"type": "a.*", "subject": "x"}) == "type=a.*,subject=x"
    assert format_delivery(
        {"retries": 1, "backoff": "linear", "backoff_delay": 2, "timeout": 5}
    ) == ("1 retry, linear from 2s, timeout 5s")
    assert format_delivery(None) == "3 retries, exponential from 1s, timeout 30s"


def test_invocation_lines_show_text_results_as_they_are() -> None:
    lines = invocation_lines(_invocation("succeeded", result="line one\nline two"))

    assert lines[-3:] == ["Result:", "  line one", "  line two"]
    assert "Error" not in "\n".join(lines)


def test_next_poll_grows_to_two_seconds() -> None:
    delays = [0.2]
    for _ in range(8):
        delays.append(next_poll(delays[-1]))

    assert delays[1] == pytest.approx(0.3)
    assert delays == sorted(delays)
    assert delays[-1] == 2.0


# -- pure helpers ------------------------------------------------------------------------------


def test_render_table_aligns_columns_without_trailing_space() -> None:
    table = render_table(["A", "LONGER"], [["xyz", ""], ["", "1"]])

    assert table.splitlines() == ["A    LONGER", "xyz", "     1"]


def test_render_table_with_no_rows_is_the_header() -> None:
    assert render_table(["NAME", "AGE"], []) == "NAME  AGE"


def test_render_table_refuses_ragged_rows() -> None:
    with pytest.raises(ValueError, match="expected 2"):
        render_table(["A", "B"], [["only one"]])


@pytest.mark.parametrize(
    ("seconds", "age"), [(0, "0s"), (59, "59s"), (60, "1m"), (7200, "2h"), (3 * 86400, "3d")]
)
def test_format_age(seconds: int, age: str) -> None:
    assert format_age((NOW - timedelta(seconds=seconds)).isoformat(), NOW) == age


def test_format_age_of_nonsense_is_a_dash() -> None:
    assert format_age("yesterday", NOW) == "-"
    assert format_age(None, NOW) == "-"


def test_parse_since_accepts_durations_and_rfc3339() -> None:
    assert parse_since("10m", NOW) == "2024-05-01T11:50:00Z"
    assert parse_since("2024-05-01T14:00:00+02:00", NOW) == "2024-05-01T12:00:00Z"


def test_parse_env_splits_on_the_first_equals_sign() -> None:
    assert parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}


def test_summarize_deployment_event() -> None:
    event = {
        "type": "io.lambdabus.deployment.failed",
        "data": {"generation": 4, "replicas": 2, "ready_replicas": 0, "reason": "CrashLoop"},
    }

    assert summarize_event(event) == "generation 4, 0/2 ready (CrashLoop)"


def _progress(event: JsonObject, generation: int = 2) -> Progress:
    return deploy_progress(event, "uid-hello", generation, url="http://r/default/hello")


def test_deploy_progress_follows_the_build_and_ends_when_ready() -> None:
    assert _progress(_event("build.queued", 2)) == Progress("build queued")
    assert _progress(_event("build.succeeded", 2, duration_seconds=3.04)) == Progress(
        "build succeeded in 3.0s"
    )
    assert _progress(_event("deployment.scaled", 3, replicas=2, ready_replicas=1)) == Progress(
        "deployment scaled (1/2 replicas ready)"
    )
    assert _progress(_event("deployment.ready", 2)) == Progress("ready: http://r/default/hello",
                                                                done=True)  # fmt: skip


def test_deploy_progress_ignores_older_generations_and_other_functions() -> None:
    assert _progress(_event("deployment.ready", 1)) == Progress()
    assert _progress(_event("deployment.ready", 2, name="other")) == Progress()
    assert _progress({"type": "io.lambdabus.deployment.ready", "data": None}) == Progress()


def test_deploy_progress_of_failures_ends_with_exit_1() -> None:
    build = _progress(_event("build.failed", 2, reason="DependencyError", message="no\nsuch pkg"))
    deployment = _progress(_event("deployment.failed", 2, reason="CrashLoop"))
    deleted = _progress(_event("function.deleted", 2))

    assert build == Progress(
        "build failed: DependencyError: no such pkg", done=True, exit_code=1, show_build_tail=True
    )
    assert deployment == Progress("deployment failed: CrashLoop", done=True, exit_code=1)
    assert (deleted.done, deleted.exit_code) == (True, 1)


def test_deploy_progress_of_a_config_only_update_says_there_is_no_build() -> None:
    assert _progress(_event("function.updated", 2, changes=["config"])) == Progress(
        "configuration changed, no build needed"
    )
    assert _progress(_event("function.updated", 2, changes=["source", "config"])) == Progress()


def test_follow_since_is_a_moment_before_the_earlier_clock() -> None:
    record = {"updated_at": "2024-05-01T12:00:00+00:00"}

    assert follow_since(record, NOW + timedelta(minutes=5)) == "2024-05-01T11:59:58Z"
    assert follow_since(record, NOW - timedelta(minutes=5)) == "2024-05-01T11:54:58Z"
    assert follow_since({}, NOW) == "2024-05-01T11:59:58Z"


def test_unseen_keeps_log_lines_not_printed_yet() -> None:
    shown, fresh = _log("a"), _log("b")

    assert unseen([shown, fresh], {tuple(shown[k] for k in ("ts", "stream", "instance", "line"))})\
        == [fresh]  # fmt: skip


def test_format_log_line_of_a_build_line() -> None:
    line = _log("pip install", kind="build", stream="stderr", ts="2024-05-01T14:00:00.5+02:00")

    assert format_log_line(line) == "12:00:00.500 build [stderr] pip install"


def test_event_detail_leaves_out_the_generation() -> None:
    event = _event("deployment.failed", 4, replicas=2, ready_replicas=0, reason="CrashLoop")

    assert event_detail(event) == "0/2 ready, CrashLoop"
    assert summarize_event(event) == "generation 4, 0/2 ready (CrashLoop)"


def test_parse_headers_splits_on_the_first_colon() -> None:
    assert parse_headers(["X-A: 1", "X-Url:http://x"]) == {"X-A": "1", "X-Url": "http://x"}


def test_render_body_pretty_prints_json_and_keeps_the_rest() -> None:
    assert render_body(b'{"a":[1]}', "application/problem+json; charset=utf-8") == (
        '{\n  "a": [\n    1\n  ]\n}\n'
    )
    assert render_body(b"{not json", "application/json") == "{not json"
    assert render_body(b"\xff\x00", "application/octet-stream") == b"\xff\x00"


def test_platform_error_needs_the_marker_the_error_shape_and_an_error_status() -> None:
    shape = json.dumps({"error": {"code": "function_timeout", "message": "took 30 s"}}).encode()
    marked = {"X-Lambdabus-Error": "function_timeout"}

    assert platform_error(Invocation(504, marked, shape)) == ("function_timeout", "took 30 s")
    assert platform_error(Invocation(200, marked, shape)) is None
    assert platform_error(Invocation(500, marked, b'{"error": "mine"}')) is None
    # the function's own answer in the same shape is the function's, not the platform's
    assert platform_error(Invocation(504, {}, shape)) is None


# -- the NDJSON parser -------------------------------------------------------------------------


def test_ndjson_handles_any_chunking_and_skips_blank_lines() -> None:
    stream = b'{"line": "caf\xc3\xa9"}\n\n{"line": "two"}\r\n\n{"line": "three"}'
    expected = [{"line": "caf\u00e9"}, {"line": "two"}, {"line": "three"}]

    for size in (1, 2, 3, 5, len(stream)):
        decoder = NDJSONDecoder()
        chunks = [stream[start : start + size] for start in range(0, len(stream), size)]
        entries = [entry for chunk in chunks for entry in decoder.feed(chunk)]
        assert [*entries, *decoder.close()] == expected, size


# -- the SSE parser ----------------------------------------------------------------------------


def _feed_all(decoder: SSEDecoder, chunks: list[bytes]) -> list[ServerSentEvent]:
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def test_sse_joins_multi_line_data_and_skips_comments() -> None:
    stream = b": hello\n\ndata: first\ndata:second\n: mid-event comment\ndata:  third\n\n"

    events = _feed_all(SSEDecoder(), [stream])

    assert events == [ServerSentEvent(data="first\nsecond\n third")]


def test_sse_dispatches_only_on_a_blank_line_and_keeps_event_and_id() -> None:
    decoder = SSEDecoder()

    assert decoder.feed(b"id: 7\nevent: lifecycle\ndata: x\n") == []
    assert decoder.feed(b"\ndata: y\n\n") == [
        ServerSentEvent(data="x", event="lifecycle", id="7"),
        ServerSentEvent(data="y", event="message", id="7"),
    ]


def test_sse_handles_any_chunking_and_line_ending() -> None:
    stream = "data: caf\u00e9\r\n\r\ndata: two\r\rdata: three\n\nevent: empty\n\n".encode()
    expected = [ServerSentEvent(data="caf\u00e9"), ServerSentEvent("two"), ServerSentEvent("three")]

    for size in (1, 2, 3, 5, len(stream)):
        chunks = [stream[start : start + size] for start in range(0, len(stream), size)]
        assert _feed_all(SSEDecoder(), chunks) == expected, size


def test_sse_drops_an_unterminated_event_at_the_end() -> None:
    assert SSEDecoder().feed(b"data: incomplete\n") == []


# -- packaging ---------------------------------------------------------------------------------


def test_zip_directory_is_deterministic(function_dir: Path) -> None:
    first = zip_directory(function_dir)
    os.utime(function_dir / "lambda_main.py", (1_000_000_000, 1_000_000_000))

    assert zip_directory(function_dir) == first
    with zipfile.ZipFile(io.BytesIO(first)) as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}


def test_zip_directory_skips_caches_vcs_and_bytecode(function_dir: Path) -> None:
    for skipped in (".git/HEAD", "node_modules/x/index.js", ".venv/bin/python", "lib/util.pyc"):
        (function_dir / skipped).parent.mkdir(parents=True, exist_ok=True)
        (function_dir / skipped).write_text("skip me")
    (function_dir / "node_modules.txt").write_text("kept: only the directory name is skipped")

    with zipfile.ZipFile(io.BytesIO(zip_directory(function_dir))) as archive:
        names = archive.namelist()

    assert names == ["lambda_main.py", "lib/util.py", "node_modules.txt"]


def test_zip_directory_keeps_executable_bits(function_dir: Path) -> None:
    (function_dir / "run.sh").write_text("#!/bin/sh\n")
    (function_dir / "run.sh").chmod(0o755)

    with zipfile.ZipFile(io.BytesIO(zip_directory(function_dir))) as archive:
        modes = {info.filename: (info.external_attr >> 16) & 0o777 for info in archive.infolist()}

    assert modes["run.sh"] == 0o755
    assert modes["lambda_main.py"] == 0o644


def test_zip_directory_skips_symlinks_out_of_the_tree(function_dir: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not upload")
    (function_dir / "leak.txt").symlink_to(secret)
    (function_dir / "outside").symlink_to(tmp_path)
    (function_dir / "dangling").symlink_to(function_dir / "nowhere")
    (function_dir / "alias.py").symlink_to(function_dir / "lib" / "util.py")
    warnings: list[str] = []

    data = zip_directory(function_dir, warn=warnings.append)

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.namelist() == ["alias.py", "lambda_main.py", "lib/util.py"]
        assert archive.read("alias.py") == b"X = 1\n"
    assert len(warnings) == 3
    assert any("leak.txt" in warning and "outside" in warning for warning in warnings)


def test_zip_directory_refuses_an_empty_tree(tmp_path: Path) -> None:
    (tmp_path / "__pycache__").mkdir()

    with pytest.raises(PackagingError, match="no files"):
        zip_directory(tmp_path)


def test_load_archive_sends_files_as_they_are_and_refuses_what_is_no_file(
    tmp_path: Path,
) -> None:
    archive = tmp_path / "fn.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("handler.js", "exports.main = () => ({})\n")
    single = tmp_path / "helloget.py"
    single.write_text("def foo(event, context):\n    return 'hello world'\n")

    assert load_archive(archive) == archive.read_bytes()
    # Kubeless's --from-file: one source file goes as it is; the gateway names it
    assert load_archive(single) == single.read_bytes()
    with pytest.raises(PackagingError, match="does not exist"):
        load_archive(tmp_path / "missing.py")


# -- tables, deploy decisions, init, progress ---------------------------------------------------


def test_render_table_fits_80_columns_cutting_the_last_column_first() -> None:
    from lambdabus_client.commands.common import render_table as table

    rows = [["hello", "x" * 100]]
    lines = table(["NAME", "MESSAGE"], rows).splitlines()
    assert max(map(len, lines)) == 80
    assert lines[1].endswith("x\u2026")
    assert table(["A", "B"], [["1", "2"]]) == "A  B\n1  2"  # a narrow table is left alone


def test_fit_widths_gives_from_the_named_columns_then_the_widest() -> None:
    from lambdabus_client.commands.common import fit_widths

    assert fit_widths([20, 30, 40], 80) == [20, 30, 26]  # the last column gives first
    assert fit_widths([50, 50, 12], 80) == [32, 32, 12]
    assert fit_widths([20, 60, 40], 80, shrink_first=(1,)) == [20, 16, 40]
    assert fit_widths([7] * 20, 80) == [6] * 20  # cannot fit: never below 6


def test_detect_runtime_merged_spec_and_noise() -> None:
    from lambdabus_client.commands.deploy import detect_runtime, is_noise, merged_spec

    assert detect_runtime({"handler.js"}) == ("nodejs20", "found handler.js")
    assert detect_runtime({"package.json", "index.js"})[0] == "nodejs20"
    assert detect_runtime({"lambda_main.py", "requirements.txt"})[0] == "python3.11"
    assert detect_runtime({"index.js", "helloget.js"})[0] == "nodejs20"
    assert detect_runtime({"index.js", "helper.py"})[0] == "python3.11"
    current = {"spec": {"env": {"A": "1"}, "replicas": 2, "runtime": "python3.11"}}
    given = {"name": "f", "replicas": 3}
    assert merged_spec(current, given, replace=False) == {
        "env": {"A": "1"},
        "replicas": 3,
        "runtime": "python3.11",
        "name": "f",
    }
    assert merged_spec(current, given, replace=True) == given
    assert merged_spec(None, given, replace=False) == given
    assert is_noise("Activate with: source .venv/bin/activate")
    assert not is_noise("Installed 1 package in 3ms")


@pytest.mark.parametrize(
    ("runtime", "style", "entry", "deps"),
    [
        ("python3.11", "luna", "lambda_main.py", "requirements.txt"),
        ("python3.11", "kyma", "handler.py", "requirements.txt"),
        ("nodejs20", "luna", "handler.js", "package.json"),
    ],
)
def test_scaffold_writes_code_a_dependency_file_and_a_readme(
    runtime: str, style: str, entry: str, deps: str
) -> None:
    from lambdabus_client.commands.init import scaffold

    files = scaffold("hello", runtime, style)
    assert set(files) == {entry, deps, "README.md"}
    assert "Hello from hello!" in files[entry]
    if entry.endswith(".py"):
        compile(files[entry], entry, "exec")
    else:
        assert json.loads(files[deps])["dependencies"] == {}


def test_init_refuses_a_non_empty_directory_and_a_bad_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    assert main(["init", "taken", "--runtime", "python3.11", "--dir", str(tmp_path / "taken")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["init", "Bad", "--runtime", "python3.11"]) == 2
    assert main(["init", "ok", "--runtime", "nodejs20", "--style", "kyma",
                 "--dir", str(tmp_path / "ok")]) == 2  # fmt: skip
    assert not (tmp_path / "ok").exists()


def test_completion_fish_and_zsh_name_every_command() -> None:
    from lambdabus_client.cli import build_parser
    from lambdabus_client.commands.completion import command_tree, completion_script

    tree = command_tree(build_parser())
    assert {"deploy", "describe", "update", "init", "triggers"} <= set(tree)
    assert tree["triggers"].actions.keys() == {"ls", "create", "rm"}
    fish = completion_script("fish", tree)
    assert "complete -c lambdabus -n __fish_use_subcommand -a deploy" in fish
    assert "-l name" in fish
    assert completion_script("zsh", tree).startswith("autoload -U +X bashcompinit")


def test_an_unexpected_error_is_one_line_and_status_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lambdabus_client.cli as cli_module

    def broken(arguments: list[str]) -> int:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(cli_module, "_main", broken)
    assert main(["ls"]) == 1
    assert capsys.readouterr().err == "error: internal: RuntimeError: boom second line\n"
