"""At least once, nothing lost: the router runs as its own process (`python -m lambdabus_router`)
and is killed with SIGKILL three times while 2,000 events are published to one trigger; once it
is back, every event has reached the function. Duplicates are expected (an event delivered
and not yet acknowledged when the router died comes again) and are printed, not failed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from aiohttp import web

from lambdabus_events.models import (
    DeliveryPolicy,
    DeploymentState,
    FunctionConfig,
    FunctionRecord,
    SourceRef,
    TriggerRecord,
)
from lambdabus_platform.bus import Bus
from lambdabus_platform.natsserver import NatsServer
from lambdabus_platform.registry import Registry
from lambdabus_platform.subjects import (
    DEPLOYMENTS_BUCKET,
    FUNCTIONS_BUCKET,
    TRIGGERS_BUCKET,
    event_dedup_id,
    event_subject,
)

EVENTS = 2000
KILLS = 3
EVENT_TYPE = "com.example.crash.test"


@dataclass
class Sink:
    url: str = ""
    seen: Counter[str] = field(default_factory=Counter)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def until_unique(self, count: int, timeout: float) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(self.seen) >= count), timeout)


@contextlib.asynccontextmanager
async def sink_server() -> AsyncIterator[Sink]:
    sink = Sink()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        async with sink.changed:
            sink.seen[request.headers["ce-id"]] += 1
            sink.changed.notify_all()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sink.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield sink
    finally:
        await runner.cleanup()


class RouterProcess:
    """`python -m lambdabus_router`, started again after each kill; ready by its own word
    (the `listening` log line)."""

    def __init__(self, nats: NatsServer) -> None:
        self.env = {
            **os.environ,
            **nats.env("router"),  # the router's own least-privilege user
            "LAMBDABUS_ROUTER_PORT": "0",
            "LAMBDABUS_ROUTER_LOG_LEVEL": "INFO",
            # A delivery the killed router left unacknowledged comes back after its ack wait:
            # the trigger's timeout (2 s) plus this margin.
            "LAMBDABUS_ROUTER_ACK_WAIT_MARGIN_SECONDS": "1",
            "LAMBDABUS_ROUTER_PULL_EXPIRES_SECONDS": "1",
        }
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lambdabus_router",
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stderr is not None
        stderr = self.proc.stderr
        tail: list[bytes] = []

        async def listening() -> None:
            while line := await stderr.readline():
                tail.append(line)
                with contextlib.suppress(ValueError):
                    if json.loads(line).get("event") == "listening":
                        return
            raise RuntimeError("the router exited:\n" + b"".join(tail[-20:]).decode())

        await asyncio.wait_for(listening(), 30)

        async def drain() -> None:
            while await stderr.readline():
                pass

        self._drain = asyncio.create_task(drain())

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no chance to ack, nak or flush anything
        await self.proc.wait()
        await self._stop_drain()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._stop_drain()

    async def _stop_drain(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
            await asyncio.gather(self._drain, return_exceptions=True)
            self._drain = None


async def register(bus: Bus, namespace: str, endpoint: str) -> None:
    now = datetime.now(UTC)
    function = FunctionRecord(
        namespace=namespace,
        name="sink",
        uid="uid-sink",
        generation=1,
        spec=FunctionConfig(),
        source=SourceRef(
            sha256="0" * 64, size=1, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=now,
        updated_at=now,
    )
    await Registry(bus.kv(FUNCTIONS_BUCKET), FunctionRecord).put(namespace, "sink", function)
    state = DeploymentState(
        namespace=namespace,
        name="sink",
        uid="uid-sink",
        generation=1,
        phase="ready",
        replicas=1,
        ready_replicas=1,
        endpoints=[endpoint],
        updated_at=now,
    )
    await Registry(bus.kv(DEPLOYMENTS_BUCKET), DeploymentState).put(namespace, "sink", state)
    trigger = TriggerRecord(
        namespace=namespace,
        name="crash",
        uid=str(uuid.uuid4()),
        function="sink",
        filter={"type": EVENT_TYPE, "source": f"/{namespace}"},
        # Enough retries that redeliveries after kills are never taken for failures.
        delivery=DeliveryPolicy(retries=20, backoff_delay=0.1, timeout=2, max_in_flight=64),
        created_at=now,
    )
    await Registry(bus.kv(TRIGGERS_BUCKET), TriggerRecord).put(namespace, "crash", trigger)


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_sigkill_three_times_loses_no_event(nats_server: NatsServer, bus: Bus) -> None:
    namespace = f"c{uuid.uuid4().hex[:10]}"
    source = f"/{namespace}"
    router = RouterProcess(nats_server)
    async with sink_server() as sink:
        await register(bus, namespace, sink.url)
        await router.start()
        try:

            async def publish() -> None:
                for n in range(EVENTS):
                    event = {
                        "specversion": "1.0",
                        "id": str(n),
                        "source": source,
                        "type": EVENT_TYPE,
                        "data": {"n": n},
                    }
                    await bus.publish(
                        event_subject(EVENT_TYPE),
                        json.dumps(event).encode(),
                        msg_id=event_dedup_id(source, str(n)),
                    )
                    if n % 50 == 49:
                        await asyncio.sleep(0.1)  # spread the publishing over the kills

            publisher = asyncio.create_task(publish())
            for kill in range(1, KILLS + 1):
                await sink.until_unique(kill * EVENTS // (KILLS + 1), 60)
                await router.kill()
                await router.start()
            await publisher
            await sink.until_unique(EVENTS, 60)
        finally:
            await router.stop()
    delivered = len(sink.seen)
    duplicates = sum(sink.seen.values()) - delivered
    print(
        f"\n{EVENTS} events, router SIGKILLed {KILLS} times: {delivered} delivered "
        f"({EVENTS - delivered} lost), {duplicates} duplicate deliveries"
    )
    assert set(sink.seen) == {str(n) for n in range(EVENTS)}
