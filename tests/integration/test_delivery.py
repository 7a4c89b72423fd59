"""Event-trigger delivery and asynchronous invocations over a real nats-server and real HTTP:
the router served in-process, aiohttp servers on ephemeral ports as functions. Triggers are
written to the `triggers` bucket and events published straight onto EVENTS (the documented
producer path), so these tests need no gateway."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from lambdabus_events.models import (
    DeadLetter,
    DeliveryPolicy,
    FunctionConfig,
    FunctionRecord,
    InvocationRecord,
    InvocationRequest,
    SourceRef,
    TriggerRecord,
)
from lambdabus_platform.bus import Bus, ConsumerState
from lambdabus_platform.registry import Registry
from lambdabus_platform.service import serve
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.subjects import (
    FUNCTIONS_BUCKET,
    INVOCATIONS_BUCKET,
    TRIGGERS_BUCKET,
    dlq_subject,
    event_dedup_id,
    event_subject,
    invocation_key,
    invoke_subject,
    lifecycle_subject,
    redrive_subject,
    trigger_consumer,
)
from lambdabus_router.__main__ import client_max_size, make_setup
from lambdabus_router.dispatch import Dispatch
from lambdabus_router.proxy import Router
from lambdabus_router.settings import RouterSettings
from tests.integration.routing import deploy_endpoints

WAIT = 15.0
FAST = DeliveryPolicy(retries=2, backoff_delay=0.05, timeout=5.0, max_in_flight=8)

Answer = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


@dataclass
class Hit:
    at: float
    headers: dict[str, str]
    body: bytes


@dataclass
class Function:
    """A function's one instance: answers with `answer(request, n)` (n: 1 for the first
    request) and records every request."""

    name: str
    answer: Answer
    url: str = ""
    hits: list[Hit] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def until(self, predicate: Callable[[list[Hit]], bool], timeout: float = WAIT) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: predicate(self.hits)), timeout)

    def ids(self) -> list[str]:
        return [h.headers.get("ce-id", "") for h in self.hits]


async def ok(request: web.Request, n: int) -> web.StreamResponse:
    return web.Response(status=200, text="ok")


def status(code: int, **headers: str) -> Answer:
    async def answer(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=code, text=f"answer {code}", headers=headers)

    return answer


@contextlib.asynccontextmanager
async def function_server(name: str, answer: Answer = ok) -> AsyncIterator[Function]:
    me = Function(name, answer)
    loop = asyncio.get_running_loop()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        async with me.changed:
            me.hits.append(Hit(loop.time(), headers, body))
            n = len(me.hits)
            me.changed.notify_all()
        return await me.answer(request, n)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    me.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield me
    finally:
        await runner.cleanup()


@dataclass
class Platform:
    bus: Bus
    router: Router
    dispatch: Dispatch
    namespace: str

    async def add_function(self, name: str, endpoints: list[str] | None) -> None:
        now = datetime.now(UTC)
        record = FunctionRecord(
            namespace=self.namespace,
            name=name,
            uid=f"uid-{name}",
            generation=1,
            spec=FunctionConfig(),
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
            await self.deploy(name, endpoints)

    async def deploy(self, name: str, endpoints: list[str]) -> None:
        await deploy_endpoints(self.bus, self.router, self.namespace, name, endpoints)

    async def trigger(
        self,
        name: str,
        function: str,
        filter: dict[str, str],
        delivery: DeliveryPolicy = FAST,
    ) -> TriggerRecord:
        record = TriggerRecord(
            namespace=self.namespace,
            name=name,
            uid=str(uuid.uuid4()),
            function=function,
            filter=filter,
            delivery=delivery,
            created_at=datetime.now(UTC),
        )
        await Registry(self.bus.kv(TRIGGERS_BUCKET), TriggerRecord).put(
            self.namespace, name, record
        )
        key = f"{self.namespace}.{name}"
        await asyncio.wait_for(
            self.dispatch.triggers.until(
                lambda t: key in t.deliveries and t.deliveries[key].record.uid == record.uid
            ),
            5,
        )
        return record

    async def publish(
        self,
        event_type: str,
        *,
        source: str = "/shop",
        event_id: str | None = None,
        data: Any = None,
        **extensions: str | int | bool,
    ) -> dict[str, Any]:
        event: dict[str, Any] = {
            "specversion": "1.0",
            "id": event_id or uuid.uuid4().hex,
            "source": source,
            "type": event_type,
            "time": datetime.now(UTC).isoformat(),
            "datacontenttype": "application/json",
            "data": data if data is not None else {"n": 1},
            **extensions,
        }
        await self.bus.publish(
            event_subject(event_type),
            json.dumps(event).encode(),
            msg_id=event_dedup_id(event["source"], event["id"]),
        )
        return event

    async def state(self, trigger: TriggerRecord) -> ConsumerState:
        delivery = self.dispatch.triggers.deliveries[f"{trigger.namespace}.{trigger.name}"]
        await asyncio.wait_for(delivery.declared.wait(), 5)  # declared as its loop starts
        found = await self.bus.consumer_state("EVENTS", delivery.consumer)
        assert found is not None
        return found

    async def settled(self, trigger: TriggerRecord) -> None:
        await self.state(trigger)
        await settled(self.bus, trigger)

    async def first(self, stream: str, subject: str, timeout: float = WAIT) -> bytes:
        """The first message stored on `subject` (waiting for it)."""

        async def read() -> bytes:
            async for message in self.bus.replay(stream, subject, deliver_all=True):
                return message.data
            raise AssertionError("replay ended")

        return await asyncio.wait_for(read(), timeout)

    async def count(self, stream: str, subject: str) -> int:
        return await self.bus.count(stream, subject)


@dataclass
class RunningRouter:
    router: Router
    dispatch: Dispatch
    stop: asyncio.Event
    task: asyncio.Task[None]


@contextlib.asynccontextmanager
async def running_router(nats_settings: NatsSettings) -> AsyncIterator[RunningRouter]:
    settings = RouterSettings(
        port=0,
        nats=nats_settings,
        pull_expires_seconds=1.0,
        wait_seconds=0.2,
        shutdown_grace_seconds=2.0,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[str] = loop.create_future()
    got_router: asyncio.Future[Router] = loop.create_future()
    got_dispatch: asyncio.Future[Dispatch] = loop.create_future()
    task = asyncio.create_task(
        serve(
            "router",
            settings,
            make_setup(
                settings,
                on_router=got_router.set_result,
                on_dispatch=got_dispatch.set_result,
            ),
            client_max_size=client_max_size(settings),
            stop=stop,
            on_ready=ready.set_result,
        )
    )
    waiters: set[asyncio.Future[Any]] = {task, ready}
    done, _ = await asyncio.wait(waiters, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    await asyncio.wait_for(ready, 1)
    try:
        yield RunningRouter(got_router.result(), got_dispatch.result(), stop, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def settled(bus: Bus, trigger: TriggerRecord) -> None:
    """Wait until the server says the trigger's consumer has nothing left to deliver or
    acknowledge (acks are not acknowledged back, so the server is asked a few times)."""
    name = trigger_consumer(trigger.namespace, trigger.name, trigger.uid)
    state = None
    for _ in range(int(WAIT / 0.05)):
        state = await bus.consumer_state("EVENTS", name)
        if state is not None and state.idle:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{trigger.name}: still {state}")


@pytest.fixture
async def platform(nats_settings: NatsSettings, bus: Bus) -> AsyncIterator[Platform]:
    namespace = f"d{uuid.uuid4().hex[:10]}"
    async with running_router(nats_settings) as running:
        try:
            yield Platform(bus, running.router, running.dispatch, namespace)
        finally:
            # No trigger of this test outlives it (nor its consumer, deleted by the router).
            triggers = bus.kv(TRIGGERS_BUCKET)
            for entry in await triggers.values(f"{namespace}.*"):
                await triggers.delete(entry.key)


# -- retries and dead letters ---------------------------------------------------------------------


async def test_a_function_that_always_fails_gets_1_plus_r_attempts_then_one_dead_letter(
    platform: Platform,
) -> None:
    async with function_server("fails", status(500)) as fn:
        await platform.add_function("fails", [fn.url])
        trigger = await platform.trigger("on-fail", "fails", {"type": "com.example.fail"})
        event = await platform.publish("com.example.fail")

        raw = await platform.first("DLQ", dlq_subject(platform.namespace, "on-fail"))
        letter = DeadLetter.model_validate_json(raw)
        await platform.settled(trigger)

        assert len(fn.hits) == 3  # 1 + retries
        assert letter.reason == "http_status_500"
        assert letter.attempts == 3
        assert letter.last_status == 500
        assert letter.trigger_uid == trigger.uid
        assert letter.event["id"] == event["id"]
        assert letter.first_attempt_at is not None
        assert await platform.count("DLQ", dlq_subject(platform.namespace, "on-fail")) == 1
        lifecycle = lifecycle_subject(
            "io.lambdabus.delivery.deadlettered", platform.namespace, "fails"
        )
        assert await platform.count("LIFECYCLE", lifecycle) == 1
        announced = json.loads(await platform.first("LIFECYCLE", lifecycle))
        assert announced["data"]["event_id"] == event["id"]
        assert announced["data"]["attempts"] == 3
        # The back-off grows: the second retry waited longer than the first.
        gaps = [b.at - a.at for a, b in zip(fn.hits, fn.hits[1:], strict=False)]
        assert gaps[0] >= 0.05
        assert gaps[1] >= 0.1


async def test_429_with_retry_after_is_retried_no_sooner(platform: Platform) -> None:
    async def busy_once(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=204)

    async with function_server("busy", busy_once) as fn:
        await platform.add_function("busy", [fn.url])
        trigger = await platform.trigger("on-busy", "busy", {"type": "com.example.busy"})
        await platform.publish("com.example.busy")
        await fn.until(lambda hits: len(hits) == 2)
        await platform.settled(trigger)
        assert fn.hits[1].at - fn.hits[0].at >= 1.0
        assert len(fn.hits) == 2
        assert await platform.count("DLQ", dlq_subject(platform.namespace, "on-busy")) == 0


async def test_400_is_one_attempt_then_dead_lettered(platform: Platform) -> None:
    async with function_server("rejects", status(400)) as fn:
        await platform.add_function("rejects", [fn.url])
        trigger = await platform.trigger(
            "on-reject",
            "rejects",
            {"type": "com.example.bad"},
            FAST.model_copy(update={"retries": 5}),
        )
        await platform.publish("com.example.bad")
        raw = await platform.first("DLQ", dlq_subject(platform.namespace, "on-reject"))
        await platform.settled(trigger)
        letter = DeadLetter.model_validate_json(raw)
        assert len(fn.hits) == 1
        assert letter.reason == "http_status_400"
        assert letter.attempts == 1


async def test_an_invalid_event_on_the_stream_is_dead_lettered(platform: Platform) -> None:
    async with function_server("never") as fn:
        await platform.add_function("never", [fn.url])
        trigger = await platform.trigger("on-junk", "never", {"type": "com.example.junk"})
        await platform.bus.publish(event_subject("com.example.junk"), b'{"type": "no id"}')
        raw = await platform.first("DLQ", dlq_subject(platform.namespace, "on-junk"))
        await platform.settled(trigger)
        assert DeadLetter.model_validate_json(raw).reason == "invalid_event"
        assert fn.hits == []


# -- what is delivered where -----------------------------------------------------------------------


async def test_binary_mode_and_once_per_source_and_id(platform: Platform) -> None:
    async with function_server("orders") as fn:
        await platform.add_function("orders", [fn.url])
        trigger = await platform.trigger(
            "on-order", "orders", {"type": "com.example.order.created"}
        )
        first = await platform.publish(
            "com.example.order.created",
            event_id="42",
            data={"total": 3},
            subject="orders/42",
            tenant="acme corp%",
        )
        await platform.publish("com.example.order.created", event_id="42", data={"total": 4})
        marker = await platform.publish("com.example.order.created", event_id="43")
        await fn.until(lambda hits: marker["id"] in [h.headers.get("ce-id") for h in hits])
        await platform.settled(trigger)
        assert sorted(fn.ids()) == ["42", "43"]
        hit = next(h for h in fn.hits if h.headers["ce-id"] == "42")
        assert hit.headers["ce-source"] == "/shop"
        assert hit.headers["ce-type"] == "com.example.order.created"
        assert hit.headers["ce-specversion"] == "1.0"
        assert hit.headers["ce-time"] == first["time"]
        assert hit.headers["ce-subject"] == "orders/42"
        assert hit.headers["ce-tenant"] == "acme%20corp%25"  # percent-encoded, as the binding says
        assert hit.headers["content-type"] == "application/json"
        assert json.loads(hit.body) == {"total": 3}


async def test_integer_and_boolean_extensions_arrive_typed_in_structured_mode(
    platform: Platform,
) -> None:
    """Binary mode's headers are strings: an event with an integer or boolean extension is
    delivered in structured mode, so the function reads 5 and true, not "5" and "true"."""
    async with function_server("typed") as fn:
        await platform.add_function("typed", [fn.url])
        trigger = await platform.trigger("on-typed", "typed", {"type": "com.example.typed"})
        sent = await platform.publish(
            "com.example.typed", event_id="7", data={"total": 3}, priority=5, urgent=True
        )
        await fn.until(lambda hits: len(hits) == 1)
        await platform.settled(trigger)
        [hit] = fn.hits
        assert hit.headers["content-type"] == "application/cloudevents+json"
        assert not any(name.lower().startswith("ce-") for name in hit.headers)
        assert json.loads(hit.body) == sent


async def test_fan_out_and_filters(platform: Platform) -> None:
    names = ("exact", "prefix", "other", "source", "tenant")
    async with contextlib.AsyncExitStack() as stack:
        fns = {n: await stack.enter_async_context(function_server(n)) for n in names}
        for n, fn in fns.items():
            await platform.add_function(n, [fn.url])
        triggers = {
            "exact": await platform.trigger(
                "t-exact", "exact", {"type": "com.example.order.created"}
            ),
            "prefix": await platform.trigger("t-prefix", "prefix", {"type": "com.example.ord*"}),
            "other": await platform.trigger(
                "t-other", "other", {"type": "com.example.invoice.paid"}
            ),
            "source": await platform.trigger("t-source", "source", {"source": "/shop/eu/*"}),
            "tenant": await platform.trigger(
                "t-tenant", "tenant", {"type": "com.example.*", "tenant": "acme"}
            ),
        }
        first = await platform.publish(
            "com.example.order.created", source="/shop/eu/berlin", tenant="acme"
        )
        second = await platform.publish(
            "com.example.order.created", source="/shop/us/nyc", tenant="globex"
        )
        for trigger in triggers.values():
            await platform.settled(trigger)
        assert sorted(fns["exact"].ids()) == sorted([first["id"], second["id"]])
        assert sorted(fns["prefix"].ids()) == sorted([first["id"], second["id"]])
        assert fns["other"].ids() == []
        assert fns["source"].ids() == [first["id"]]
        assert fns["tenant"].ids() == [first["id"]]
        # The non-matching trigger's consumer never even saw it: its subject filter held it off.
        assert (await platform.state(triggers["other"])).delivered == 0


async def test_events_wait_for_a_ready_instance(platform: Platform) -> None:
    async with function_server("cold") as fn:
        await platform.add_function("cold", None)
        trigger = await platform.trigger("on-cold", "cold", {"type": "com.example.cold"})
        event = await platform.publish("com.example.cold")
        state = await platform.state(trigger)
        await asyncio.sleep(0.5)  # the delivery would have happened by now, had it been tried
        state = await platform.state(trigger)
        assert fn.hits == []
        assert state.pending + state.ack_pending == 1
        await platform.deploy("cold", [fn.url])
        await fn.until(lambda hits: len(hits) == 1)
        await platform.settled(trigger)
        assert fn.ids() == [event["id"]]


async def test_a_reply_is_published_and_delivered_to_the_next_trigger(platform: Platform) -> None:
    async def step_one(request: web.Request, n: int) -> web.StreamResponse:
        incoming = await request.json()
        return web.json_response(
            {"doubled": incoming["n"] * 2},
            headers={
                "ce-specversion": "1.0",
                "ce-id": f"reply-{request.headers['ce-id']}",
                "ce-source": "/functions/step-one",
                "ce-type": "com.example.step.two",
            },
        )

    async with function_server("one", step_one) as one, function_server("two") as two:
        await platform.add_function("one", [one.url])
        await platform.add_function("two", [two.url])
        await platform.trigger("first-step", "one", {"type": "com.example.step.one"})
        await platform.trigger("second-step", "two", {"type": "com.example.step.two"})
        event = await platform.publish("com.example.step.one", data={"n": 21})
        await two.until(lambda hits: len(hits) == 1)
        hit = two.hits[0]
        assert hit.headers["ce-id"] == f"reply-{event['id']}"
        assert hit.headers["ce-source"] == "/functions/step-one"
        assert json.loads(hit.body) == {"doubled": 42}


async def test_a_redriven_event_goes_to_its_trigger_only(platform: Platform) -> None:
    async with function_server("a") as a, function_server("b") as b:
        await platform.add_function("a", [a.url])
        await platform.add_function("b", [b.url])
        ta = await platform.trigger("ta", "a", {"type": "com.example.redrive"})
        tb = await platform.trigger("tb", "b", {"type": "com.example.redrive"})
        event = {
            "specversion": "1.0",
            "id": "again",
            "source": "/shop",
            "type": "com.example.redrive",
            "data": {"x": 1},
        }
        await platform.bus.publish(
            redrive_subject(platform.namespace, "ta"), json.dumps(event).encode()
        )
        await a.until(lambda hits: len(hits) == 1)
        await platform.settled(ta)
        await platform.settled(tb)
        assert a.ids() == ["again"]
        assert b.hits == []


async def test_a_deleted_trigger_leaves_no_consumer(platform: Platform) -> None:
    async with function_server("gone") as fn:
        await platform.add_function("gone", [fn.url])
        trigger = await platform.trigger("doomed", "gone", {"type": "com.example.gone"})
        name = trigger_consumer(trigger.namespace, trigger.name, trigger.uid)
        await platform.state(trigger)
        await platform.bus.kv(TRIGGERS_BUCKET).delete(f"{platform.namespace}.doomed")
        key = f"{platform.namespace}.doomed"
        await asyncio.wait_for(
            platform.dispatch.triggers.until(lambda t: key not in t.deliveries), 5
        )
        assert not await platform.bus.consumer_exists("EVENTS", name)


async def test_a_consumer_without_its_trigger_is_swept(platform: Platform) -> None:
    orphan = trigger_consumer(platform.namespace, "vanished", str(uuid.uuid4()))
    await platform.bus.ensure_consumer(
        "EVENTS",
        orphan,
        filter_subjects=[event_subject("com.example.vanished")],
        ack_wait=30,
        max_ack_pending=1,
    )
    deleted = await platform.dispatch.triggers.sweep()
    assert orphan in deleted
    assert not await platform.bus.consumer_exists("EVENTS", orphan)


# -- asynchronous invocations ----------------------------------------------------------------------


async def test_an_async_invocation_succeeds_and_calls_back(platform: Platform) -> None:
    async def compute(request: web.Request, n: int) -> web.StreamResponse:
        body = await request.json()
        return web.json_response(
            {"sum": sum(body["numbers"]), "query": request.query_string, "path": request.path}
        )

    async with function_server("adder", compute) as fn, function_server("hook") as hook:
        await platform.add_function("adder", [fn.url])
        invocation_id = uuid.uuid4().hex
        now = datetime.now(UTC)
        callback = f"{hook.url}/done"
        record = InvocationRecord(
            namespace=platform.namespace,
            function="adder",
            id=invocation_id,
            status="queued",
            callback_url=callback,
            created_at=now,
            updated_at=now,
        )
        key = invocation_key(platform.namespace, invocation_id)
        kv = platform.bus.kv(INVOCATIONS_BUCKET)
        await kv.create(key, record.model_dump_json().encode())
        request = InvocationRequest(
            namespace=platform.namespace,
            function="adder",
            id=invocation_id,
            path="/sum",
            query="x=1",
            headers={"Content-Type": "application/json", "X-Custom": "kept"},
            body_base64=base64.b64encode(b'{"numbers": [1, 2, 3]}').decode(),
            callback_url=callback,
            delivery=FAST,
        )
        await platform.bus.publish(
            invoke_subject(platform.namespace, "adder"),
            request.model_dump_json().encode(),
            msg_id=invocation_id,
        )
        await hook.until(lambda hits: len(hits) == 1)
        called_back = InvocationRecord.model_validate_json(hook.hits[0].body)
        entry = await kv.get(key)
        assert entry is not None
        stored = InvocationRecord.model_validate_json(entry.value)
        for final in (called_back, stored):
            assert final.status == "succeeded"
            assert final.attempts == 1
            assert final.result == {"sum": 6, "query": "x=1", "path": "/sum"}
            assert final.result_status == 200
            assert final.result_content_type is not None
            assert final.result_content_type.startswith("application/json")
            assert final.error is None
        assert fn.hits[0].headers["x-custom"] == "kept"
        assert fn.hits[0].headers["x-lambdabus-invocation-id"] == invocation_id


async def test_an_async_invocation_that_keeps_failing_is_failed(platform: Platform) -> None:
    async with function_server("broken", status(503)) as fn:
        await platform.add_function("broken", [fn.url])
        invocation_id = uuid.uuid4().hex
        now = datetime.now(UTC)
        key = invocation_key(platform.namespace, invocation_id)
        kv = platform.bus.kv(INVOCATIONS_BUCKET)
        record = InvocationRecord(
            namespace=platform.namespace,
            function="broken",
            id=invocation_id,
            status="queued",
            created_at=now,
            updated_at=now,
        )
        await kv.create(key, record.model_dump_json().encode())
        request = InvocationRequest(
            namespace=platform.namespace,
            function="broken",
            id=invocation_id,
            delivery=DeliveryPolicy(retries=1, backoff_delay=0.05, timeout=5),
        )
        await platform.bus.publish(
            invoke_subject(platform.namespace, "broken"),
            request.model_dump_json().encode(),
            msg_id=invocation_id,
        )
        async with asyncio.timeout(WAIT):
            async for entry in kv.watch(key):
                current = InvocationRecord.model_validate_json(entry.value)
                if current.status == "failed":
                    break
        assert current.attempts == 2
        assert current.result_status == 503
        assert current.error is not None
        assert "gave up after 2 attempts" in current.error
        assert len(fn.hits) == 2


# -- stopping ----------------------------------------------------------------------------------------


async def test_sigterm_lets_deliveries_in_flight_finish(
    nats_settings: NatsSettings, bus: Bus
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request, n: int) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=200)

    namespace = f"s{uuid.uuid4().hex[:10]}"
    async with function_server("slow", slow) as fn, running_router(nats_settings) as running:
        platform = Platform(bus, running.router, running.dispatch, namespace)
        await platform.add_function("slow", [fn.url])
        trigger = await platform.trigger("on-slow", "slow", {"type": "com.example.slow"})
        await platform.publish("com.example.slow")
        await fn.until(lambda hits: len(hits) == 1)
        running.stop.set()  # what SIGTERM does
        await asyncio.sleep(0.3)  # the router is stopping, the delivery still in flight
        assert not running.task.done()
        release.set()
        await asyncio.wait_for(running.task, 10)
        await settled(bus, trigger)  # acknowledged before the router stopped
        assert len(fn.hits) == 1
        await bus.kv(TRIGGERS_BUCKET).delete(f"{namespace}.on-slow")
