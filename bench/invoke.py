"""What the router costs on the synchronous path: the same trivial function called directly and
through the router, measured in one run on loopback.

    uv run python bench/invoke.py [--requests 3000] [--seconds 5] [--concurrency 32]

It starts a real nats-server, one function instance (`python -m lambdabus_runtime` when the
runtime SDK can serve, else a minimal asyncio HTTP/1.1 server with the same start-up protocol:
the output says which), writes the function's record and `DeploymentState` into KV, runs the
router as its own process (`python -m lambdabus_router`), then measures latency (sequential,
one keep-alive connection) and throughput (concurrent clients for a fixed time), with the CPU
each process spent per request. A second table compares the router's balancing policies over
two fallback instances, one of them slow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import aiohttp

from lambdabus_events.models import DeploymentState, FunctionConfig, FunctionRecord, SourceRef
from lambdabus_platform.bus import Bus
from lambdabus_platform.natsserver import NatsServer, run_nats_server
from lambdabus_platform.registry import Registry
from lambdabus_platform.subjects import DEPLOYMENTS_BUCKET, FUNCTIONS_BUCKET
from lambdabus_testing.processes import ready_process

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_SRC = ROOT / "libs" / "runtime" / "src"
NAMESPACE, NAME = "bench", "hello"
FUNCTION_SOURCE = "async def main(request):\n    return {'ok': True}\n"


# -- the fallback instance: stdlib only, the runtime's start-up protocol ----------------------

_RESPONSE = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
)


class _Instance(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length bodies only: enough for a trivial function.
    `delay` seconds before each answer make a slow instance (for the balancing comparison)."""

    def __init__(self, delay: float = 0.0) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._delay = delay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self._buffer[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self._buffer) < end + 4 + length:
                return
            self._buffer = self._buffer[end + 4 + length :]
            if self._delay:
                asyncio.get_running_loop().call_later(self._delay, self._answer)
            else:
                self._transport.write(_RESPONSE)

    def _answer(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_RESPONSE)


async def _serve_fallback(delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Instance(delay), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(json.dumps({"event": "listening", "port": port}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


# -- processes ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def instance(code_dir: Path, force_fallback: bool) -> AsyncIterator[tuple[str, str, int]]:
    """(endpoint URL, what serves it, its pid)."""
    env = dict(os.environ)
    if not force_fallback and (RUNTIME_SRC / "lambdabus_runtime" / "__main__.py").exists():
        (code_dir / "lambda_main.py").write_text(FUNCTION_SOURCE)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(RUNTIME_SRC), env.get("PYTHONPATH")]))
        args = (
            sys.executable,
            "-m",
            "lambdabus_runtime",
            "--code",
            str(code_dir),
            "--entrypoint",
            "lambda_main.py",
            "--port",
            "0",
            "--function",
            f"{NAMESPACE}/{NAME}",
        )
        try:
            async with ready_process(*args, env=env, ready="listening", stream="stdout") as (
                p,
                rec,
            ):
                url = f"http://127.0.0.1:{rec['port']}"
                if await _answers(url):
                    yield url, "lambdabus_runtime (python -m lambdabus_runtime)", p.pid
                    return
                print("# the runtime SDK did not answer 200; using the fallback instance")
        except (RuntimeError, TimeoutError) as exc:
            print(f"# the runtime SDK could not serve ({str(exc).splitlines()[0]}); fallback")
    async with ready_process(
        sys.executable, __file__, "--fallback-instance", env=env, ready="listening", stream="stdout"
    ) as (p, rec):
        yield f"http://127.0.0.1:{rec['port']}", "fallback asyncio HTTP/1.1 server (bench)", p.pid


async def _answers(url: str) -> bool:
    async with aiohttp.ClientSession() as http, http.post(url + f"/{NAMESPACE}/{NAME}") as resp:
        await resp.read()
        return resp.status == 200


async def register(bus: Bus, name: str, endpoints: list[str]) -> None:
    now = datetime.now(UTC)
    record = FunctionRecord(
        namespace=NAMESPACE,
        name=name,
        uid=f"bench-{name}",
        generation=1,
        spec=FunctionConfig(),
        source=SourceRef(
            sha256="0" * 64,
            size=len(FUNCTION_SOURCE),
            kind="inline",
            entrypoint="lambda_main.py",
            files=1,
        ),
        created_at=now,
        updated_at=now,
    )
    await Registry(bus.kv(FUNCTIONS_BUCKET), FunctionRecord).put(NAMESPACE, name, record)
    state = DeploymentState(
        namespace=NAMESPACE,
        name=name,
        uid=f"bench-{name}",
        generation=1,
        phase="ready",
        replicas=len(endpoints),
        ready_replicas=len(endpoints),
        endpoints=endpoints,
        updated_at=now,
    )
    await Registry(bus.kv(DEPLOYMENTS_BUCKET), DeploymentState).put(NAMESPACE, name, state)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class RouterProcess:
    url: str
    pid: int


@contextlib.asynccontextmanager
async def router(
    nats: NatsServer, state_dir: Path, balance: str = "least_in_flight"
) -> AsyncIterator[RouterProcess]:
    env = dict(os.environ)
    env.update(nats.env("router"))
    env.update(
        LAMBDABUS_ROUTER_PORT="0",
        LAMBDABUS_ROUTER_LOG_LEVEL="INFO",  # the 'listening' line is at INFO; none per request
        LAMBDABUS_ROUTER_STATE_DIR=str(state_dir),
        LAMBDABUS_ROUTER_BALANCE=balance,
    )
    async with ready_process(
        sys.executable, "-m", "lambdabus_router", env=env, ready="listening", stream="stderr"
    ) as (proc, rec):
        yield RouterProcess(str(rec["url"]), proc.pid)


@contextlib.asynccontextmanager
async def fallback_instance(delay: float) -> AsyncIterator[str]:
    async with ready_process(
        sys.executable,
        __file__,
        "--fallback-instance",
        str(delay),
        env=dict(os.environ),
        ready="listening",
        stream="stdout",
    ) as (_, rec):
        yield f"http://127.0.0.1:{rec['port']}"


# -- measurements ---------------------------------------------------------------------------


async def latency(url: str, requests: int, warmup: int) -> list[float]:
    """Seconds per request, one at a time over one keep-alive connection."""
    connector = aiohttp.TCPConnector(limit=1)
    samples: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as http:
        for i in range(warmup + requests):
            started = time.perf_counter()
            async with http.post(url, data=b'{"n": 1}') as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status}")
            if i >= warmup:
                samples.append(time.perf_counter() - started)
    return samples


async def throughput(url: str, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    """(completed requests per second, seconds per request) with `concurrency` clients, each
    sending its next request when the last one is answered, for `seconds`."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    samples: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as http:
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            while (started := time.perf_counter()) < deadline:
                async with http.post(url, data=b'{"n": 1}') as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"{url} answered {resp.status}")
                samples.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(samples) / elapsed, samples


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def balancing(nats: NatsServer, state_dir: Path, seconds: float) -> list[str]:
    """Round-robin against least-in-flight over the two instances of `mixed` (one answering
    at once, one after 10 ms), with 8 concurrent clients: rows of the second table."""
    rows = []
    for policy in ("round_robin", "least_in_flight"):
        async with router(nats, state_dir / policy, policy) as proc:
            url = f"{proc.url}/{NAMESPACE}/mixed/invoke"
            await throughput(url, 0.5, 8)
            rate, samples = await throughput(url, seconds, 8)
            p50, p99 = quantile(samples, 0.5) * 1000, quantile(samples, 0.99) * 1000
            rows.append(f"{policy:<28}{rate:>10.0f}{p50:>10.3f}{p99:>10.3f}")
    return rows


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000, help="sequential requests")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--fallback", action="store_true", help="skip the runtime SDK")
    parser.add_argument("--no-balancing", action="store_true", help="skip the second table")
    args = parser.parse_args()
    warmup = max(100, args.requests // 10)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        code = root / "code"
        code.mkdir()
        async with (
            run_nats_server(root / "nats") as nats_server,
            Bus.connect(nats_server.settings(), name="bench") as bus,
            instance(code, args.fallback) as (endpoint, served_by, instance_pid),
        ):
            await bus.declare(object_bucket=None)
            await register(bus, NAME, [endpoint])
            balance_rows: list[str] = []
            if not args.no_balancing:
                async with fallback_instance(0.0) as fast, fallback_instance(0.010) as slow:
                    await register(bus, "mixed", [fast, slow])
                    balance_rows = await balancing(nats_server, root, 2.0)
            async with router(nats_server, root / "router") as proc:
                path = f"/{NAMESPACE}/{NAME}/invoke"
                direct, routed = endpoint + path, proc.url + path
                lat_direct = await latency(direct, args.requests, warmup)
                lat_routed = await latency(routed, args.requests, warmup)
                pids = {"client": os.getpid(), "router": proc.pid, "instance": instance_pid}
                cpu: dict[str, dict[str, float]] = {}
                rates: dict[str, float] = {}
                for label, url in (("direct", direct), ("router", routed)):
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    rates[label], _ = await throughput(url, args.seconds, args.concurrency)
                    served = rates[label] * args.seconds
                    cpu[label] = {
                        name: (cpu_seconds(pid) - before[name]) / served * 1e6
                        for name, pid in pids.items()
                    }

    ms = 1000.0
    rows = [
        (
            "p50 latency (ms)",
            statistics.median(lat_direct) * ms,
            statistics.median(lat_routed) * ms,
        ),
        ("p99 latency (ms)", quantile(lat_direct, 0.99) * ms, quantile(lat_routed, 0.99) * ms),
        (f"throughput c={args.concurrency} (req/s)", rates["direct"], rates["router"]),
    ]
    print(f"# instance: {served_by}")
    print(
        f"# {os.cpu_count()} cpus shared by client, router and instance;"
        f" load average before the run: {load_before:.2f}"
    )
    print(
        f"# latency: {args.requests} sequential requests on one keep-alive connection"
        f" (after {warmup} warm-up); throughput: {args.concurrency} clients for {args.seconds:g} s"
    )
    print(f"{'':<28}{'direct':>10}{'router':>10}{'router/direct':>15}{'added':>10}")
    for label, d, r in rows:
        added = f"{r - d:+.3f}" if "latency" in label else ""
        print(f"{label:<28}{d:>10.3f}{r:>10.3f}{r / d:>15.2f}{added:>10}")
    for label in ("direct", "router"):
        spent = ", ".join(f"{name} {us:.0f}" for name, us in cpu[label].items() if us > 0)
        print(f"# CPU per request at c={args.concurrency}, {label}: {spent} (us)")
    if balance_rows:
        print()
        print("# balancing: two fallback instances, one answering at once, one after 10 ms;")
        print("# 8 clients for 2 s through the router")
        print(f"{'policy':<28}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
        for row in balance_rows:
            print(row)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fallback-instance"]:
        asyncio.run(_serve_fallback(float(sys.argv[2]) if len(sys.argv) > 2 else 0.0))
    else:
        asyncio.run(main())
