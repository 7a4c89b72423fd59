"""The logs service over real NATS: lines published onto LOGS and lifecycle events onto
LIFECYCLE, queried through request/reply against the service run in-process."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest

from lambdabus_events.catalog import (
    DeploymentData,
    DeploymentReady,
    FunctionCreated,
    FunctionCreatedData,
    FunctionDeleted,
    FunctionDeletedData,
    FunctionSpecSummary,
    lifecycle_event,
)
from lambdabus_events.models import (
    FunctionConfig,
    LogKind,
    LogLine,
    LogQuery,
    LogQueryResult,
    SourceRef,
)
from lambdabus_logs.__main__ import make_setup
from lambdabus_logs.settings import LogsSettings
from lambdabus_platform.bus import Bus
from lambdabus_platform.service import serve
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.subjects import LOGS_QUERY_SUBJECT, logs_subject


@dataclass
class RunningLogs:
    url: str
    bus: Bus
    namespace: str

    async def line(self, name: str, text: str, kind: LogKind = "runtime") -> None:
        line = LogLine(
            ts=datetime.now(UTC),
            kind=kind,
            namespace=self.namespace,
            name=name,
            uid=f"uid-{name}",
            generation=1,
            stream="stdout",
            line=text,
        )
        await self.bus.publish(
            logs_subject(kind, self.namespace, name), line.model_dump_json().encode()
        )

    async def query(self, name: str, **fields: Any) -> LogQueryResult:
        raw = await self.ask({"namespace": self.namespace, "name": name, **fields})
        assert "error" not in raw, raw
        return LogQueryResult.model_validate(raw)

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        reply = await self.bus.request(LOGS_QUERY_SUBJECT, json.dumps(request).encode())
        decoded: dict[str, Any] = json.loads(reply)
        return decoded


@pytest.fixture
async def logs(nats_settings: NatsSettings, bus: Bus) -> AsyncIterator[RunningLogs]:
    settings = LogsSettings(port=0, nats=nats_settings)
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve("logs", settings, make_setup(settings), stop=stop, on_ready=ready.set_result)
    )
    waiters: set[asyncio.Future[Any]] = {task, ready}
    done, _ = await asyncio.wait(waiters, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    try:
        yield RunningLogs(await asyncio.wait_for(ready, 1), bus, f"l{uuid.uuid4().hex[:10]}")
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


def texts(result: LogQueryResult) -> list[str]:
    return [line.line for line in result.lines]


async def test_tail_returns_the_last_lines_in_order(logs: RunningLogs) -> None:
    for i in range(5):
        await logs.line("fn", f"run {i}")
        await logs.line("other", f"noise {i}")
    await logs.line("fn", "build 0", kind="build")

    result = await logs.query("fn", kind="runtime", tail=2)
    assert texts(result) == ["run 3", "run 4"]
    assert not result.truncated
    assert result.events == []

    assert texts(await logs.query("fn", kind="runtime")) == [f"run {i}" for i in range(5)]
    assert texts(await logs.query("fn", kind="build", tail=10)) == ["build 0"]
    assert texts(await logs.query("fn", kind="runtime", tail=0)) == []
    assert texts(await logs.query("never-logged", kind="runtime", tail=3)) == []


async def test_tail_finds_sparse_lines_in_a_busy_stream(logs: RunningLogs) -> None:
    """The last lines of a quiet function behind many lines of a busy one."""
    for i in range(4):
        await logs.line("quiet", f"quiet {i}")
        await asyncio.gather(*(logs.line("busy", f"busy {i}.{j}") for j in range(150)))
    result = await logs.query("quiet", kind="runtime", tail=3)
    assert texts(result) == ["quiet 1", "quiet 2", "quiet 3"]
    busy = await logs.query("busy", kind="runtime", tail=2)
    assert len(busy.lines) == 2
    assert busy.lines[-1].line.startswith("busy 3.")


async def test_since_returns_the_lines_stored_from_then(logs: RunningLogs) -> None:
    await logs.line("fn", "before 0")
    await logs.line("fn", "before 1")
    since = datetime.now(UTC)
    await logs.line("fn", "after 0")
    await logs.line("fn", "after 1")
    await logs.line("fn", "after 2")

    result = await logs.query("fn", kind="runtime", since=since.isoformat())
    assert texts(result) == ["after 0", "after 1", "after 2"]
    both = await logs.query("fn", kind="runtime", since=since.isoformat(), tail=2)
    assert texts(both) == ["after 1", "after 2"]
    wide = await logs.query("fn", kind="runtime", since=since.isoformat(), tail=50)
    assert texts(wide) == ["after 0", "after 1", "after 2"]


async def test_limit_truncates_and_says_so(logs: RunningLogs) -> None:
    for i in range(5):
        await logs.line("fn", f"line {i}")
    first = await logs.query("fn", kind="runtime", limit=3)
    assert texts(first) == ["line 0", "line 1", "line 2"]
    assert first.truncated
    last = await logs.query("fn", kind="runtime", tail=5, limit=3)
    assert texts(last) == ["line 2", "line 3", "line 4"]
    assert last.truncated
    exact = await logs.query("fn", kind="runtime", limit=5)
    assert not exact.truncated


async def test_lifecycle_is_the_audit_history_of_one_function(logs: RunningLogs) -> None:
    ns = logs.namespace
    source = SourceRef(
        sha256="a" * 64, size=10, kind="inline", entrypoint="lambda_main.py", files=1
    )
    for name in ("audited", "bystander"):
        await logs.bus.publish_lifecycle(
            lifecycle_event(
                FunctionCreated,
                FunctionCreatedData(
                    namespace=ns,
                    name=name,
                    uid=f"u-{name}",
                    generation=1,
                    spec=FunctionSpecSummary.of(FunctionConfig(), salt=""),
                    source=source,
                ),
                service="gateway",
                subject=f"{ns}/{name}",
                key=f"u-{name}:1",
            )
        )
    await logs.bus.publish_lifecycle(
        lifecycle_event(
            DeploymentReady,
            DeploymentData(
                namespace=ns,
                name="audited",
                uid="u-audited",
                generation=1,
                replicas=1,
                ready_replicas=1,
            ),
            service="deployer",
            subject=f"{ns}/audited",
            key="u-audited:1:ready",
        )
    )
    await logs.bus.publish_lifecycle(
        lifecycle_event(
            FunctionDeleted,
            FunctionDeletedData(namespace=ns, name="audited", uid="u-audited", generation=1),
            service="gateway",
            subject=f"{ns}/audited",
            key="u-audited:deleted",
        )
    )
    await logs.line("audited", "a runtime line is not an audit event")

    result = await logs.query("audited", kind="lifecycle")
    assert [e["type"] for e in result.events] == [
        "io.lambdabus.function.created",
        "io.lambdabus.deployment.ready",
        "io.lambdabus.function.deleted",
    ]
    assert {e["subject"] for e in result.events} == {f"{ns}/audited"}
    assert result.lines == []
    tail = await logs.query("audited", kind="lifecycle", tail=1)
    assert [e["type"] for e in tail.events] == ["io.lambdabus.function.deleted"]
    # The runtime log of the deleted function is still readable.
    assert texts(await logs.query("audited", kind="runtime")) == [
        "a runtime line is not an audit event"
    ]


@pytest.mark.parametrize(
    "request_body",
    [
        {"namespace": "Bad", "name": "fn", "kind": "runtime"},
        {"namespace": "ns", "name": "fn", "kind": "stdout"},
        {"namespace": "ns", "name": "fn", "kind": "runtime", "tail": -1},
        {"namespace": "ns", "name": "fn", "kind": "runtime", "limit": 10_001},
        {"namespace": "ns", "name": "fn", "kind": "runtime", "since": "2024-01-01T00:00:00"},
        {"namespace": "ns", "name": "fn", "kind": "runtime", "extra": 1},
        {"namespace": "ns.x", "name": "*", "kind": "runtime"},
    ],
)
async def test_a_bad_query_gets_an_error_reply(
    logs: RunningLogs, request_body: dict[str, Any]
) -> None:
    reply = await logs.ask(request_body)
    assert reply["error"]["code"] == "invalid_request"
    assert reply["error"]["message"]


async def test_malformed_stored_lines_are_left_out(logs: RunningLogs) -> None:
    await logs.line("fn", "good 0")
    await logs.bus.publish(logs_subject("runtime", logs.namespace, "fn"), b"not json")
    await logs.line("fn", "good 1")
    assert texts(await logs.query("fn", kind="runtime")) == ["good 0", "good 1"]


async def test_queries_and_lines_are_counted(logs: RunningLogs) -> None:
    await logs.line("fn", "counted")
    await logs.query("fn", kind="runtime", tail=5)
    async with aiohttp.ClientSession() as http, http.get(logs.url + "/metrics") as response:
        text = await response.text()
    assert 'lambdabus_logs_queries_total{kind="runtime",outcome="ok"} 1.0' in text
    assert 'lambdabus_logs_lines_returned_total{kind="runtime"} 1.0' in text


def test_query_model_round_trips() -> None:
    query = LogQuery(namespace="ns", name="fn", kind="build", tail=3)
    assert LogQuery.model_validate_json(query.model_dump_json()) == query
