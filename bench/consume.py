"""The router's event consumer, both ways: its hand-written JetStream pull client
(`lambdabus_router.consumer.ConsumerLoop` over `Bus.pull`) against a FastStream pull subscriber
with the same concurrency (`max_workers`) and explicit acks, draining the same stored events in
one run. Only the consuming differs: the handler acks each message after `--work-ms` of
simulated delivery (an awaited sleep, as the HTTP call to the function would be).

    uv run python bench/consume.py [--events 20000] [--concurrency 64] [--work-ms 0 1]

It prints messages/s and the CPU this process spent per message (the consumer's own cost: the
server and the function are the same for both).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from nats.js import api

from lambdabus_platform.bus import Bus, PulledMessage
from lambdabus_platform.natsserver import run_nats_server
from lambdabus_platform.service import broker_security
from lambdabus_platform.settings import NatsSettings
from lambdabus_router.consumer import ConsumerLoop

SUBJECT = "lambdabus.events.t.bench-consume"


class Counter:
    def __init__(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.done = asyncio.Event()

    def tick(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.done.set()


async def fill(bus: Bus, count: int) -> None:
    window = asyncio.Semaphore(512)
    payload = b'{"specversion":"1.0","id":"x","source":"/b","type":"bench-consume"}' + b" " * 300

    async def one(n: int) -> None:
        async with window:
            await bus.publish_grouped("EVENTS", SUBJECT, payload, msg_id=f"c{n}")

    await asyncio.gather(*(one(n) for n in range(count)))


async def handwritten(bus: Bus, count: int, concurrency: int, work: float) -> tuple[float, float]:
    counter = Counter(count)

    async def handle(message: PulledMessage) -> None:
        if work:
            await asyncio.sleep(work)
        await message.ack()
        counter.tick()

    async def ensure() -> None:
        await bus.ensure_consumer(
            "EVENTS",
            "bench_hw",
            filter_subjects=[SUBJECT],
            ack_wait=30,
            max_ack_pending=concurrency * 4,
        )

    loop = ConsumerLoop(bus, "EVENTS", "bench_hw", handle, limit=concurrency, ensure=ensure)
    return await _timed(counter, loop.start, lambda: loop.stop(5))


async def faststream(
    settings: NatsSettings, count: int, concurrency: int, work: float
) -> tuple[float, float]:
    counter = Counter(count)
    # No logger: FastStream would log two lines per message (the router logs none).
    broker = NatsBroker(settings.url, security=broker_security(settings), logger=None)
    sub = broker.subscriber(
        SUBJECT,
        stream=JStream("EVENTS", declare=False),
        durable="bench_fs",
        pull_sub=PullSub(batch_size=concurrency, timeout=1.0),
        max_workers=concurrency,
        ack_policy=AckPolicy.MANUAL,
        config=api.ConsumerConfig(ack_wait=30, max_ack_pending=concurrency * 4),
    )

    async def handle(msg: NatsMessage) -> None:
        if work:
            await asyncio.sleep(work)
        await msg.ack()
        counter.tick()

    sub(handle)

    async def start() -> None:
        await broker.start()

    return await _timed(counter, start, broker.stop)


async def _timed(
    counter: Counter,
    start: Callable[[], Awaitable[None] | None],
    stop: Callable[[], Awaitable[None]],
) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    started = start()
    if started is not None:
        await started
    await asyncio.wait_for(counter.done.wait(), 300)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    await stop()
    return counter.count / wall, cpu / counter.count * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--work-ms", type=float, nargs="+", default=[0.0, 1.0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            run_nats_server(Path(tmp)) as server,
            Bus.connect(server.settings(), name="bench") as bus,
        ):
            await bus.declare(object_bucket=None)
            await fill(bus, args.events)
            print(
                f"# {args.events} stored events drained by one consumer, concurrency"
                f" {args.concurrency}, each acked after the simulated work"
            )
            print(f"{'work ms':<9}{'consumer':<14}{'msgs/s':>10}{'CPU us/msg':>12}")
            for work_ms in args.work_ms:
                for name in ("hand-written", "faststream"):
                    # Each run reads the stream from its start through a consumer of its own.
                    durable = "bench_hw" if name == "hand-written" else "bench_fs"
                    await bus.delete_consumer("EVENTS", durable)
                    if name == "hand-written":
                        rate, cpu = await handwritten(
                            bus, args.events, args.concurrency, work_ms / 1000
                        )
                    else:
                        rate, cpu = await faststream(
                            server.settings(), args.events, args.concurrency, work_ms / 1000
                        )
                    print(f"{work_ms:<9g}{name:<14}{rate:>10.0f}{cpu:>12.0f}")


if __name__ == "__main__":
    asyncio.run(main())
