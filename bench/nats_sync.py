"""What `sync_interval: always` costs: acknowledged JetStream publishes per second with an fsync
before every ack, against the server default (fsync every 2 minutes), measured in one run.

    uv run python bench/nats_sync.py [--messages N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from lambdabus_platform.bus import Bus
from lambdabus_platform.natsserver import run_nats_server


async def measure(sync_always: bool, messages: int, concurrency: int) -> tuple[float, float]:
    """(acked publishes per second, p50 latency in ms)."""
    with tempfile.TemporaryDirectory() as store:
        async with (
            run_nats_server(Path(store), sync_always=sync_always) as server,
            Bus.connect(server.settings(), name="bench") as bus,
        ):
            await bus.declare(object_bucket=None)
            payload = b"x" * 512
            latencies: list[float] = []
            queue = iter(range(messages))

            async def worker() -> None:
                for i in queue:
                    started = time.perf_counter()
                    await bus.publish(f"lambdabus.events.bench.s{i % 8}", payload, msg_id=f"m{i}")
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
    return messages / elapsed, statistics.median(latencies) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    print(f"{'mode':<28}{'concurrency':>12}{'msgs/s':>10}{'p50 ms':>9}{'ratio':>8}")
    for concurrency in (1, 32):
        base_rate, base_p50 = await measure(False, args.messages, concurrency)
        rate, p50 = await measure(True, args.messages, concurrency)
        print(
            f"{'default (fsync every 2 min)':<28}{concurrency:>12}{base_rate:>10.0f}{base_p50:>9.2f}{1.0:>8.2f}"
        )
        print(
            f"{'sync_interval: always':<28}{concurrency:>12}{rate:>10.0f}{p50:>9.2f}{rate / base_rate:>8.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
