"""Event delivery: publish → delivered throughput, and end-to-end latency at a fixed rate, with
a raw JetStream publish → consume measured in the same run as the baseline.

    uv run python bench/events.py [--events 20000] [--rate 1000] [--seconds 5] [--fast-fsync]

It starts a real nats-server (with `sync_interval: always`, as the platform runs it, unless
`--fast-fsync`), a trivial function instance (a stdlib asyncio HTTP/1.1 server answering 200,
counting events and noting each one's latency from the `sent` extension the publisher stamps
with CLOCK_MONOTONIC, which every process on the machine shares), and the router as its own
process (`python -m lambdabus_router`). The function, its deployment and one trigger go into
KV; events go straight onto EVENTS, with `Nats-Msg-Id` as the gateway sets it: for the router,
through the gateway's own publish path (`bus.publish_grouped("EVENTS", ...)`, the group commit:
concurrent events stored as one atomic batch, one fsync, each acked once stored); for the
baseline, one plain JetStream publish per event (`bus.publish`), the way events were stored
before the group commit (`--publish plain` uses that for the router too).

- throughput: N events published as fast as JetStream acknowledges them (a window of
  concurrent publishes), timed from the first publish to the last delivery;
- latency: events published at a fixed rate for a few seconds, each one's time from its
  publish to its arrival at the function.

The baseline does the same with a pull consumer in this process that acks each message and one
plain JetStream publish per event: what NATS and the publisher cost without the router, HTTP and
the group commit. The `router/base` column is the ratio of the two, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp

from lambdabus_events.models import (
    DeliveryPolicy,
    DeploymentState,
    FunctionConfig,
    FunctionRecord,
    SourceRef,
    TriggerRecord,
)
from lambdabus_platform.bus import Bus
from lambdabus_platform.natsserver import NatsServer, run_nats_server
from lambdabus_platform.registry import Registry
from lambdabus_platform.subjects import (
    DEPLOYMENTS_BUCKET,
    FUNCTIONS_BUCKET,
    TRIGGERS_BUCKET,
    event_dedup_id,
    event_subject,
    trigger_consumer,
)
from lambdabus_testing.processes import ready_process

NAMESPACE, FUNCTION, TRIGGER = "bench", "sink", "all-orders"
EVENT_TYPE = "com.example.order.created"
WINDOW = 256  # publishes awaiting their ack at once


# -- the function instance: stdlib only ---------------------------------------------------------

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class _Sink(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length bodies. `POST /` counts an event and notes its
    latency (now minus its `ce-sent`, in ns); `GET /stats` answers the counts and latencies,
    and `GET /reset` forgets them."""

    ids: set[bytes] = set()
    received = 0
    latencies: list[int] = []

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._buffer[:end].split(b"\r\n")
            length, sent, event_id = 0, 0, b""
            for line in head[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"ce-sent":
                    sent = int(value)
                elif name == b"ce-id":
                    event_id = value.strip()
            if len(self._buffer) < end + 4 + length:
                return
            self._buffer = self._buffer[end + 4 + length :]
            target = head[0].split(b" ")[1]
            if target == b"/stats":
                body = json.dumps(
                    {
                        "received": _Sink.received,
                        "unique": len(_Sink.ids),
                        "latencies_ns": _Sink.latencies,
                    }
                ).encode()
                self._transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                )
                continue
            if target == b"/reset":
                _Sink.ids, _Sink.received, _Sink.latencies = set(), 0, []
            else:
                _Sink.received += 1
                _Sink.ids.add(event_id)
                if sent:
                    _Sink.latencies.append(time.monotonic_ns() - sent)
            self._transport.write(_OK)


async def _serve_sink() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(json.dumps({"event": "listening", "port": port}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


# -- processes ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the platform's records ----------------------------------------------------------------------


async def register(bus: Bus, endpoint: str, max_in_flight: int) -> TriggerRecord:
    now = datetime.now(UTC)
    record = FunctionRecord(
        namespace=NAMESPACE,
        name=FUNCTION,
        uid="bench-sink",
        generation=1,
        spec=FunctionConfig(),
        source=SourceRef(
            sha256="0" * 64, size=1, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=now,
        updated_at=now,
    )
    await Registry(bus.kv(FUNCTIONS_BUCKET), FunctionRecord).put(NAMESPACE, FUNCTION, record)
    state = DeploymentState(
        namespace=NAMESPACE,
        name=FUNCTION,
        uid="bench-sink",
        generation=1,
        phase="ready",
        replicas=1,
        ready_replicas=1,
        endpoints=[endpoint],
        updated_at=now,
    )
    await Registry(bus.kv(DEPLOYMENTS_BUCKET), DeploymentState).put(NAMESPACE, FUNCTION, state)
    trigger = TriggerRecord(
        namespace=NAMESPACE,
        name=TRIGGER,
        uid=str(uuid.uuid4()),
        function=FUNCTION,
        filter={"type": EVENT_TYPE},
        delivery=DeliveryPolicy(max_in_flight=max_in_flight),
        created_at=now,
    )
    await Registry(bus.kv(TRIGGERS_BUCKET), TriggerRecord).put(NAMESPACE, TRIGGER, trigger)
    return trigger


def event(n: int, run: str) -> tuple[bytes, str]:
    event_id = f"{run}-{n}"
    body = {
        "specversion": "1.0",
        "id": event_id,
        "source": "/bench",
        "type": EVENT_TYPE,
        "time": datetime.now(UTC).isoformat(),
        "sent": str(time.monotonic_ns()),
        "datacontenttype": "application/json",
        "data": {"n": n},
    }
    return json.dumps(body).encode(), event_dedup_id("/bench", event_id)


Publish = Callable[[Bus, str, bytes, str], Coroutine[Any, Any, object]]


async def plain(bus: Bus, subject: str, payload: bytes, msg_id: str) -> object:
    """One JetStream publish, its own ack (and fsync)."""
    return await bus.publish(subject, payload, msg_id=msg_id)


async def grouped(bus: Bus, subject: str, payload: bytes, msg_id: str) -> object:
    """The gateway's path: the EVENTS group commit."""
    return await bus.publish_grouped("EVENTS", subject, payload, msg_id=msg_id)


PUBLISH: dict[str, Publish] = {"plain": plain, "grouped": grouped}


async def publish_burst(bus: Bus, count: int, run: str, publish: Publish = plain) -> float:
    """Publish `count` events, at most WINDOW awaiting their ack; seconds it took."""
    subject = event_subject(EVENT_TYPE)
    window = asyncio.Semaphore(WINDOW)

    async def one(n: int) -> None:
        try:
            payload, msg_id = event(n, run)
            await publish(bus, subject, payload, msg_id)
        finally:
            window.release()

    started = time.perf_counter()
    tasks = []
    for n in range(count):
        await window.acquire()
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - started


async def publish_at_rate(
    bus: Bus, rate: float, seconds: float, run: str, publish: Publish = plain
) -> int:
    """Publish `rate` events per second for `seconds` (each on its own schedule, not waiting
    for the previous ack); how many were published."""
    subject = event_subject(EVENT_TYPE)
    count = int(rate * seconds)
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks: list[asyncio.Task[object]] = []
    for n in range(count):
        delay = start + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        payload, msg_id = event(n, run)
        tasks.append(asyncio.create_task(publish(bus, subject, payload, msg_id)))
    await asyncio.gather(*tasks)
    return count


# -- measurements ---------------------------------------------------------------------------------


class Sink:
    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http

    async def stats(self) -> dict[str, object]:
        async with self.http.get(self.url + "/stats") as response:
            return cast(dict[str, object], await response.json(content_type=None))

    async def reset(self) -> None:
        async with self.http.get(self.url + "/reset") as response:
            await response.read()

    async def until(self, count: int, timeout: float) -> float:
        """Wait until `count` distinct events arrived; the perf_counter time it happened
        (to 20 ms)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            stats = await self.stats()
            if cast(int, stats["unique"]) >= count:
                return time.perf_counter()
            await asyncio.sleep(0.02)
        raise TimeoutError(f"only {(await self.stats())['unique']} of {count} events arrived")


class Baseline:
    """A pull consumer of this process that acks each message and notes its latency."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.received = 0
        self.latencies: list[int] = []
        self.arrived = asyncio.Event()
        self.target = 0
        self.since = datetime.now(UTC)

    async def run(self, name: str) -> None:
        """Consume every event stored since this baseline was made."""
        await self.bus.ensure_consumer(
            "EVENTS",
            name,
            filter_subjects=[event_subject(EVENT_TYPE)],
            ack_wait=30,
            max_ack_pending=1024,
            start_time=self.since,
        )
        async with self.bus.pull("EVENTS", name) as pull:
            while True:
                for message in await pull.fetch(256, timeout=1.0):
                    sent = json.loads(message.data)["sent"]
                    self.latencies.append(time.monotonic_ns() - int(sent))
                    await message.ack()
                    self.received += 1
                    if self.received >= self.target:
                        self.arrived.set()

    def reset(self, target: int) -> None:
        self.received, self.latencies, self.target = 0, [], target
        self.arrived.clear()


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def deploy(bus: Bus, endpoints: list[str]) -> None:
    state = DeploymentState(
        namespace=NAMESPACE,
        name=FUNCTION,
        uid="bench-sink",
        generation=1,
        phase="ready" if endpoints else "started",
        replicas=1,
        ready_replicas=len(endpoints),
        endpoints=endpoints,
        updated_at=datetime.now(UTC),
    )
    await Registry(bus.kv(DEPLOYMENTS_BUCKET), DeploymentState).put(NAMESPACE, FUNCTION, state)


async def run_baseline(bus: Bus, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    baseline = Baseline(bus)
    # drain: a backlog stored first, then consumed
    baseline.reset(args.events)
    out["publish/s"] = args.events / await publish_burst(bus, args.events, "b-backlog")
    consumer = asyncio.create_task(baseline.run("bench_baseline"))
    try:
        started = time.perf_counter()
        await asyncio.wait_for(baseline.arrived.wait(), 120)
        out["drain/s"] = args.events / (time.perf_counter() - started)
        # end to end: published while consumed
        baseline.reset(args.events)
        started = time.perf_counter()
        await publish_burst(bus, args.events, "b-burst")
        await asyncio.wait_for(baseline.arrived.wait(), 120)
        out["delivered/s"] = args.events / (time.perf_counter() - started)
        baseline.reset(int(args.rate))
        await publish_at_rate(bus, args.rate, 1.0, "b-rate-warm-up")
        await asyncio.wait_for(baseline.arrived.wait(), 60)
        baseline.reset(int(args.rate * args.seconds))
        await publish_at_rate(bus, args.rate, args.seconds, "b-rate")
        await asyncio.wait_for(baseline.arrived.wait(), 60)
        ms = [ns / 1e6 for ns in baseline.latencies]
        out["p50 ms"] = statistics.median(ms)
        out["p99 ms"] = quantile(ms, 0.99)
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await bus.delete_consumer("EVENTS", "bench_baseline")
    return out


async def run_router(
    bus: Bus, server: NatsServer, root: Path, http: aiohttp.ClientSession, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, float], int]:
    out: dict[str, float] = {}
    env = dict(os.environ)
    async with ready_process(sys.executable, __file__, "--sink", env=env, stream="stdout") as (
        sink_proc,
        sink_rec,
    ):
        endpoint = f"http://127.0.0.1:{sink_rec['port']}"
        sink = Sink(endpoint, http)
        trigger = await register(bus, endpoint, args.max_in_flight)
        await deploy(bus, [])  # no ready instance yet: events wait in the stream
        env.update(server.env("router"))
        env.update(
            LAMBDABUS_ROUTER_PORT="0",
            LAMBDABUS_ROUTER_LOG_LEVEL="INFO",
            LAMBDABUS_ROUTER_STATE_DIR=str(root / "router"),
        )
        command = [sys.executable, "-m", "lambdabus_router"]
        if args.profile_router:
            command[1:1] = ["-m", "cProfile", "-o", args.profile_router]
        async with ready_process(*command, env=env, stream="stderr") as (router_proc, _):
            name = trigger_consumer(NAMESPACE, TRIGGER, trigger.uid)
            for _ in range(200):
                if await bus.consumer_exists("EVENTS", name):
                    break
                await asyncio.sleep(0.05)
            pids = {
                "router": router_proc.pid,
                "function": sink_proc.pid,
                "nats": server.process.pid,
            }
            # drain: a backlog stored while the function had no ready instance
            publish = PUBLISH[args.publish]
            out["publish/s"] = args.events / await publish_burst(
                bus, args.events, "r-backlog", publish
            )
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            started = time.perf_counter()
            await deploy(bus, [endpoint])
            done = await sink.until(args.events, 120)
            out["drain/s"] = args.events / (done - started)
            cpu = {k: (cpu_seconds(p) - before[k]) / args.events * 1e6 for k, p in pids.items()}
            # end to end: published while delivered
            await sink.reset()
            started = time.perf_counter()
            await publish_burst(bus, args.events, "r-burst", publish)
            done = await sink.until(args.events, 120)
            out["delivered/s"] = args.events / (done - started)
            stats = await sink.stats()
            duplicates = cast(int, stats["received"]) - cast(int, stats["unique"])
            # latency at a fixed rate
            await sink.reset()
            await publish_at_rate(bus, args.rate, 1.0, "r-rate-warm-up", publish)
            await sink.until(int(args.rate), 60)
            await sink.reset()
            expected = int(args.rate * args.seconds)
            await publish_at_rate(bus, args.rate, args.seconds, "r-rate", publish)
            await sink.until(expected, 60)
            stats = await sink.stats()
            ms = [ns / 1e6 for ns in cast(list[int], stats["latencies_ns"])]
            out["p50 ms"] = statistics.median(ms)
            out["p99 ms"] = quantile(ms, 0.99)
    return out, cpu, duplicates


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000, help="events of each burst")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s of the latency run")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the latency run")
    parser.add_argument(
        "--fast-fsync",
        action="store_true",
        help="nats-server's default fsync (every 2 min) instead of `sync_interval: always`",
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=64, help="the trigger's max_in_flight (default 64)"
    )
    parser.add_argument(
        "--publish",
        choices=sorted(PUBLISH),
        default="grouped",
        help="how the router's events are published: the gateway's group commit (default)"
        " or one JetStream publish each",
    )
    parser.add_argument("--profile-router", metavar="PATH", help="cProfile the router into PATH")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        async with (
            run_nats_server(root / "nats", sync_always=not args.fast_fsync) as server,
            Bus.connect(server.settings(), name="bench") as bus,
            aiohttp.ClientSession() as http,
        ):
            await bus.declare(object_bucket=None)
            await publish_burst(bus, 1000, "warm-up")
            baseline = await run_baseline(bus, args)
            router, cpu, duplicates = await run_router(bus, server, root, http, args)

    print(
        f"# {os.cpu_count()} cpus shared by nats-server, router, function and publisher;"
        f" load average before the run: {load_before:.2f};"
        f" JetStream fsync: {'every 2 min (server default)' if args.fast_fsync else 'always'}"
    )
    print(
        f"# drain: {args.events} events stored first, then delivered (router: the function had"
        f" no ready instance, then got one); trigger max_in_flight {args.max_in_flight};"
    )
    print(
        f"# delivered/s: {args.events} events published (window {WINDOW}) while delivered,"
        f" first publish to last delivery; latency: {args.rate:g} events/s for"
        f" {args.seconds:g} s (after 1 s of warm-up), publish to arrival"
    )
    print(
        f"# publish: baseline one JetStream publish per event; router {args.publish}"
        f" ({'group commit: atomic batches' if args.publish == 'grouped' else 'the same'})"
    )
    print(f"{'':<16}{'baseline':>12}{'router':>12}{'router/base':>14}")
    for metric in ("publish/s", "drain/s", "delivered/s", "p50 ms", "p99 ms"):
        b, r = baseline[metric], router[metric]
        print(f"{metric:<16}{b:>12.1f}{r:>12.1f}{r / b:>14.2f}")
    spent = ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
    print(f"# CPU per event while draining through the router: {spent} (us)")
    print(f"# duplicates delivered in the burst: {duplicates}")
    print("# targets: >= 5000 delivered/s; p99 <= 50 ms at 1000 events/s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--sink"]:
        asyncio.run(_serve_sink())
    else:
        asyncio.run(main())
