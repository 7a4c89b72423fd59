"""What the router costs on the synchronous path: the same trivial function called directly and
through the router, measured in one run on loopback.

    uv run python bench/invoke.py [--requests 3000] [--seconds 5] [--concurrency 32]
        [--transport unix|tcp] [--sandbox]

It starts a real nats-server, one function instance (`python -m lambdabus_runtime` when the
runtime SDK can serve, else a minimal asyncio HTTP/1.1 server with the same start-up protocol:
the output says which), writes the function's record and `DeploymentState` into KV, runs the
router as its own process (`python -m lambdabus_router`), then measures latency (sequential,
one keep-alive connection) and throughput (concurrent clients for a fixed time), with the CPU
each process spent per request. A second table compares the router's balancing policies over
two fallback instances, one of them slow.

The instance listens where the deployer's instances do: on a Unix socket (`--transport unix`,
the default; its endpoint is `unix:<path>`), or on a loopback port (`--transport tcp`, as
before instances got their own network namespace). "direct" is a client talking to the
instance on that same transport, the way the router does. `--sandbox` runs the runtime in the
real sandbox (bubblewrap as an unprivileged uid, its own network namespace, no network).
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

from lambdabus_events.models import (
    DeploymentState,
    FunctionConfig,
    FunctionRecord,
    FunctionRevisions,
    Revision,
    RevisionDeployment,
    ScaleSpec,
    SourceRef,
    TrafficTarget,
)
from lambdabus_platform.bus import Bus
from lambdabus_platform.natsserver import NatsServer, run_nats_server
from lambdabus_platform.registry import Registry
from lambdabus_platform.sandbox import detect_sandbox, launch
from lambdabus_platform.subjects import (
    DEPLOYMENTS_BUCKET,
    FUNCTIONS_BUCKET,
    REVISION_DEPLOYMENTS_BUCKET,
    REVISIONS_BUCKET,
)
from lambdabus_testing.endpoints import base_url, connector
from lambdabus_testing.processes import ready_process
from lambdabus_testing.sandboxed import runtime_command, runtime_spec

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


async def _serve_fallback(delay: float, socket: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    if socket is not None:
        server = await loop.create_unix_server(lambda: _Instance(delay), socket)
        sys.stdout.write(json.dumps({"event": "listening", "socket": socket}) + "\n")
    else:
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
async def instance(
    code_dir: Path, force_fallback: bool, transport: str = "unix", sandboxed: bool = False
) -> AsyncIterator[tuple[str, str, int]]:
    """(endpoint, what serves it, its pid)."""
    env = dict(os.environ)
    socket = code_dir.parent / "instance" / "sock"
    socket.parent.mkdir(mode=0o700, exist_ok=True)
    where = ["--socket", str(socket)] if transport == "unix" else ["--port", "0"]
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
            *where,
            "--function",
            f"{NAMESPACE}/{NAME}",
        )
        if sandboxed:
            async with sandboxed_runtime(code_dir, socket) as (endpoint, pid):
                yield endpoint, "lambdabus_runtime in the sandbox (bubblewrap)", pid
                return
        try:
            async with ready_process(*args, env=env, ready="listening", stream="stdout") as (
                p,
                rec,
            ):
                url = f"unix:{socket}" if transport == "unix" else f"http://127.0.0.1:{rec['port']}"
                if await _answers(url):
                    yield url, "lambdabus_runtime (python -m lambdabus_runtime)", p.pid
                    return
                print("# the runtime SDK did not answer 200; using the fallback instance")
        except (RuntimeError, TimeoutError) as exc:
            print(f"# the runtime SDK could not serve ({str(exc).splitlines()[0]}); fallback")
    async with ready_process(
        sys.executable,
        __file__,
        "--fallback-instance",
        "0",
        *([str(socket)] if transport == "unix" else []),
        env=env,
        ready="listening",
        stream="stdout",
    ) as (p, rec):
        url = f"unix:{socket}" if transport == "unix" else f"http://127.0.0.1:{rec['port']}"
        yield url, "fallback asyncio HTTP/1.1 server (bench)", p.pid


@contextlib.asynccontextmanager
async def sandboxed_runtime(code_dir: Path, socket: Path) -> AsyncIterator[tuple[str, int]]:
    """The runtime in the platform's sandbox, as the deployer starts it: (endpoint, its pid)."""
    sandbox = await detect_sandbox("bubblewrap")
    socket.parent.chmod(0o777)  # whichever uid the sandbox runs as may listen there
    spec = runtime_spec(code_dir, socket.parent, runtime_command(f"{NAMESPACE}/{NAME}"))
    handle = await launch(sandbox, spec, key=f"{NAMESPACE}/{NAME}")
    try:
        assert handle.process.stdout is not None
        line = await asyncio.wait_for(handle.process.stdout.readline(), 30)
        if b"listening" not in line:
            raise RuntimeError(f"the sandboxed runtime did not start: {line!r}")
        pids = handle.payload_pids()
        yield f"unix:{socket}", pids[0] if pids else handle.pid
    finally:
        handle.kill()
        await handle.process.wait()
        await handle.close()


async def _answers(endpoint: str) -> bool:
    async with (
        aiohttp.ClientSession(connector=connector(endpoint)) as http,
        http.post(base_url(endpoint) + f"/{NAMESPACE}/{NAME}") as resp,
    ):
        await resp.read()
        return resp.status == 200


async def register(bus: Bus, name: str, endpoints: list[str], *, revisions: bool = False) -> None:
    """The function's record and its `DeploymentState`. With `revisions`, the path a request
    takes is the full one: the function autoscales (`spec.scale`, so the router counts its
    arrivals and load for the autoscaler), has two revisions, and its route splits the traffic
    90/10 between them, the 10% under a tag (both revisions are served by `endpoints`)."""
    now = datetime.now(UTC)
    spec = FunctionConfig(scale=ScaleSpec(min=1, max=5)) if revisions else FunctionConfig()
    source = SourceRef(
        sha256="0" * 64,
        size=len(FUNCTION_SOURCE),
        kind="inline",
        entrypoint="lambda_main.py",
        files=1,
    )
    record = FunctionRecord(
        namespace=NAMESPACE,
        name=name,
        uid=f"bench-{name}",
        generation=2 if revisions else 1,
        spec=spec,
        source=source,
        created_at=now,
        updated_at=now,
    )
    await Registry(bus.kv(FUNCTIONS_BUCKET), FunctionRecord).put(NAMESPACE, name, record)
    latest = f"{name}-00002" if revisions else ""
    state = DeploymentState(
        namespace=NAMESPACE,
        name=name,
        uid=f"bench-{name}",
        generation=record.generation,
        phase="ready",
        replicas=len(endpoints),
        ready_replicas=len(endpoints),
        endpoints=endpoints,
        updated_at=now,
        revision=latest,
    )
    if revisions:
        first = f"{name}-00001"
        doc = FunctionRevisions(
            namespace=NAMESPACE,
            name=name,
            uid=record.uid,
            revisions=[
                Revision(name=first, generation=1, created=now, spec=spec, source=source),
                Revision(name=latest, generation=2, created=now, spec=spec, source=source),
            ],
            next_number=3,
            traffic=[
                TrafficTarget(revision=first, percent=90),
                TrafficTarget(latest=True, percent=10, tag="candidate"),
            ],
        )
        await bus.kv(REVISIONS_BUCKET).put(f"{NAMESPACE}.{name}", doc.model_dump_json().encode())
        pinned = RevisionDeployment(
            namespace=NAMESPACE,
            name=name,
            uid=record.uid,
            revision=first,
            generation=1,
            build_generation=1,
            artifact="bench",
            endpoints=endpoints,
            ready=True,
            updated_at=now,
        )
        await bus.kv(REVISION_DEPLOYMENTS_BUCKET).put(
            f"{NAMESPACE}.{name}.{first}", pinned.model_dump_json().encode()
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
    nats: NatsServer,
    state_dir: Path,
    balance: str = "least_in_flight",
    event_loop: str | None = None,
    fast_path: bool | None = None,
) -> AsyncIterator[RouterProcess]:
    env = dict(os.environ)
    env.update(nats.env("router"))
    env.update(
        LAMBDABUS_ROUTER_PORT="0",
        LAMBDABUS_ROUTER_LOG_LEVEL="INFO",  # the 'listening' line is at INFO; none per request
        LAMBDABUS_ROUTER_STATE_DIR=str(state_dir),
        LAMBDABUS_ROUTER_BALANCE=balance,
        LAMBDABUS_ROUTER_DELIVERIES="false",  # the synchronous path alone
    )
    if event_loop is not None:
        env["LAMBDABUS_ROUTER_EVENT_LOOP"] = event_loop
    if fast_path is not None:
        env["LAMBDABUS_ROUTER_FAST_PATH"] = "true" if fast_path else "false"
    async with ready_process(
        sys.executable, "-m", "lambdabus_router", env=env, ready="listening", stream="stderr"
    ) as (proc, rec):
        yield RouterProcess(str(rec["url"]), proc.pid)


_NGINX_CONF = """worker_processes 1;
master_process off;
daemon off;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream instance {{ server {upstream}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://instance;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@contextlib.asynccontextmanager
async def nginx_proxy(endpoint: str, state_dir: Path) -> AsyncIterator[RouterProcess]:
    """nginx as a plain reverse proxy to the same instance (one worker, keep-alive upstream
    connections): the cost of one proxy hop in C on this machine, for comparison."""
    import shutil
    import socket as sockets

    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise RuntimeError("nginx is not installed (apt-get install nginx-light)")
    state_dir.mkdir(parents=True, exist_ok=True)
    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    upstream = (
        f"unix:{endpoint.removeprefix('unix:')}"
        if endpoint.startswith("unix:")
        else endpoint.removeprefix("http://")
    )
    conf = state_dir / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(dir=state_dir, upstream=upstream, port=port))
    proc = await asyncio.create_subprocess_exec(
        binary,
        "-p",
        str(state_dir),
        "-c",
        str(conf),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        yield RouterProcess(f"http://127.0.0.1:{port}", proc.pid)
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


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


async def latency(endpoint: str, path: str, requests: int, warmup: int) -> list[float]:
    """Seconds per request, one at a time over one keep-alive connection."""
    url = base_url(endpoint) + path
    samples: list[float] = []
    async with aiohttp.ClientSession(connector=connector(endpoint, limit=1)) as http:
        for i in range(warmup + requests):
            started = time.perf_counter()
            async with http.post(url, data=b'{"n": 1}') as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status}")
            if i >= warmup:
                samples.append(time.perf_counter() - started)
    return samples


async def throughput(
    endpoint: str, path: str, seconds: float, concurrency: int
) -> tuple[float, list[float]]:
    """(completed requests per second, seconds per request) with `concurrency` clients, each
    sending its next request when the last one is answered, for `seconds`."""
    url = base_url(endpoint) + path
    samples: list[float] = []
    async with aiohttp.ClientSession(connector=connector(endpoint, limit=concurrency)) as http:
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
            path = f"/{NAMESPACE}/mixed/invoke"
            await throughput(proc.url, path, 0.5, 8)
            rate, samples = await throughput(proc.url, path, seconds, 8)
            p50, p99 = quantile(samples, 0.5) * 1000, quantile(samples, 0.99) * 1000
            rows.append(f"{policy:<28}{rate:>10.0f}{p50:>10.3f}{p99:>10.3f}")
    return rows


async def compare_transports(requests: int, concurrency: int) -> None:
    """The same router in front of two instances of the same runtime, one on a loopback port
    and one on a Unix socket, measured in alternating blocks so that load from anything else
    on the machine falls on both alike."""
    blocks, per_block = 8, max(100, requests // 8)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for side in ("tcp", "unix"):
            (root / side / "code").mkdir(parents=True)
        async with (
            run_nats_server(root / "nats") as nats_server,
            Bus.connect(nats_server.settings(), name="bench") as bus,
            instance(root / "tcp" / "code", False, "tcp") as (tcp, _, _),
            instance(root / "unix" / "code", False, "unix") as (unix, _, _),
        ):
            await bus.declare(object_bucket=None)
            await register(bus, "over-tcp", [tcp])
            await register(bus, "over-unix", [unix])
            latencies: dict[str, list[float]] = {}
            rates: dict[str, list[float]] = {}
            async with router(nats_server, root / "router") as proc:
                targets = {
                    "direct, TCP": (tcp, f"/{NAMESPACE}/{NAME}/invoke"),
                    "direct, Unix socket": (unix, f"/{NAMESPACE}/{NAME}/invoke"),
                    "router -> TCP": (proc.url, f"/{NAMESPACE}/over-tcp/invoke"),
                    "router -> Unix socket": (proc.url, f"/{NAMESPACE}/over-unix/invoke"),
                }
                for _ in range(blocks):
                    for label, (endpoint, path) in targets.items():
                        samples = await latency(endpoint, path, per_block, 50)
                        latencies.setdefault(label, []).extend(samples)
                        rate, _ = await throughput(endpoint, path, 1.0, concurrency)
                        rates.setdefault(label, []).append(rate)
    print(
        f"# {blocks} alternating blocks of {per_block} sequential requests and 1 s at c={concurrency}"
    )
    print(f"{'':<28}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}")
    for label, samples in latencies.items():
        p50, p99 = quantile(samples, 0.5) * 1000, quantile(samples, 0.99) * 1000
        print(f"{label:<28}{p50:>10.3f}{p99:>10.3f}{statistics.median(rates[label]):>10.0f}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000, help="sequential requests")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--fallback", action="store_true", help="skip the runtime SDK")
    parser.add_argument("--no-balancing", action="store_true", help="skip the second table")
    parser.add_argument(
        "--transport",
        choices=("unix", "tcp"),
        default="unix",
        help="where the instance listens (the deployer's instances: a Unix socket)",
    )
    parser.add_argument(
        "--sandbox", action="store_true", help="run the instance in the sandbox (needs bwrap)"
    )
    parser.add_argument(
        "--routers",
        default="aiohttp/asyncio,front/asyncio,front/uvloop",
        help="router variants to measure side by side, one process each: SERVER/LOOP, SERVER "
        "`aiohttp` (LAMBDABUS_ROUTER_FAST_PATH=false) or `front` (the router's own HTTP/1.1 "
        "protocol), LOOP `asyncio` or `uvloop` (LAMBDABUS_ROUTER_EVENT_LOOP); `nginx` (if "
        "installed): nginx as a plain reverse proxy, the cost of a hop in C for comparison",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating rounds over direct and every router (each gets requests/rounds "
        "sequential requests and seconds/rounds of throughput per round)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="a function without revisions, traffic split or autoscaling (the short path)",
    )
    parser.add_argument(
        "--compare-transports",
        action="store_true",
        help="only compare router -> instance over TCP and over a Unix socket, in one run",
    )
    args = parser.parse_args()
    if args.compare_transports:
        await compare_transports(args.requests, args.concurrency)
        return
    variants = [v for v in args.routers.split(",") if v]
    rounds = max(1, args.rounds)
    per_round = max(100, args.requests // rounds)
    seconds = args.seconds / rounds
    warmup = max(100, args.requests // 10)
    load_before = os.getloadavg()[0]
    samples: dict[str, list[float]] = {}
    served: dict[str, float] = {}
    elapsed: dict[str, float] = {}
    cpu: dict[str, dict[str, float]] = {}
    cpu_sequential: dict[str, dict[str, float]] = {}
    revisions_seen: dict[str, int] = {}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        code = root / "code"
        code.mkdir()
        async with (
            run_nats_server(root / "nats") as nats_server,
            Bus.connect(nats_server.settings(), name="bench") as bus,
            instance(code, args.fallback, args.transport, args.sandbox) as (
                endpoint,
                served_by,
                instance_pid,
            ),
            contextlib.AsyncExitStack() as stack,
        ):
            await bus.declare(object_bucket=None)
            await register(bus, NAME, [endpoint], revisions=not args.plain)
            balance_rows: list[str] = []
            if not args.no_balancing:
                async with fallback_instance(0.0) as fast, fallback_instance(0.010) as slow:
                    await register(bus, "mixed", [fast, slow])
                    balance_rows = await balancing(nats_server, root, 2.0)
            path = f"/{NAMESPACE}/{NAME}/invoke"
            targets: dict[str, tuple[str, int | None]] = {"direct": (endpoint, None)}
            for variant in variants:
                server, _, loop = variant.partition("/")
                if server == "nginx":
                    proc = await stack.enter_async_context(nginx_proxy(endpoint, root / "nginx"))
                    targets[variant] = (proc.url, proc.pid)
                    continue
                proc = await stack.enter_async_context(
                    router(
                        nats_server,
                        root / f"router-{server}-{loop}",
                        event_loop=loop or None,
                        fast_path=server != "aiohttp",
                    )
                )
                targets[variant] = (proc.url, proc.pid)
                # warm up: the router has the route (it answers 200 with a revision)
                revisions_seen[variant] = await _revision_header(proc.url, path)
            for url, _ in targets.values():
                await latency(url, path, warmup, 0)
            for _ in range(rounds):
                for label, (url, router_pid) in targets.items():
                    pids = {"client": os.getpid(), "instance": instance_pid}
                    if router_pid is not None:
                        pids["router"] = router_pid
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    samples.setdefault(label, []).extend(await latency(url, path, per_round, 20))
                    spent = cpu_sequential.setdefault(label, {})
                    for name, pid in pids.items():
                        spent[name] = spent.get(name, 0.0) + cpu_seconds(pid) - before[name]
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    started = time.perf_counter()
                    rate, _ = await throughput(url, path, seconds, args.concurrency)
                    took = time.perf_counter() - started
                    served[label] = served.get(label, 0.0) + rate * took
                    elapsed[label] = elapsed.get(label, 0.0) + took
                    spent = cpu.setdefault(label, {})
                    for name, pid in pids.items():
                        spent[name] = spent.get(name, 0.0) + cpu_seconds(pid) - before[name]

    ms = 1000.0
    labels = list(targets)
    rates = {label: served[label] / elapsed[label] for label in labels}
    print(f"# instance: {served_by}; direct and the router reach it at {endpoint}")
    what = (
        "a plain function (no revisions, traffic or scale)"
        if args.plain
        else "the function autoscales (scale min 1, max 5) and its route splits 90/10 between "
        "two revisions"
    )
    print(f"# through the router: {what}")
    print(
        f"# {os.cpu_count()} cpus shared by client, router and instance;"
        f" load average before the run: {load_before:.2f}"
    )
    print(
        f"# {rounds} alternating rounds; latency: {per_round * rounds} sequential requests on one"
        f" keep-alive connection per target; throughput: {args.concurrency} clients,"
        f" {seconds * rounds:g} s per target"
    )
    header = f"{'':<26}{'direct':>10}"
    for label in labels[1:]:
        header += f"{label:>17}{'/direct':>8}"
    print(header)
    rows: list[tuple[str, dict[str, float]]] = [
        ("p50 latency (ms)", {k: statistics.median(v) * ms for k, v in samples.items()}),
        ("p99 latency (ms)", {k: quantile(v, 0.99) * ms for k, v in samples.items()}),
        (f"throughput c={args.concurrency} (req/s)", rates),
    ]
    for row_name, values in rows:
        line = f"{row_name:<26}{values['direct']:>10.3f}"
        for label in labels[1:]:
            line += f"{values[label]:>17.3f}{values[label] / values['direct']:>8.2f}"
        print(line)
    for label in labels:
        used_line = ", ".join(
            f"{who} {used / served[label] * 1e6:.0f}" for who, used in cpu[label].items()
        )
        print(f"# CPU per request at c={args.concurrency}, {label}: {used_line} (us)")
    for label in labels:
        count = (20 + per_round) * rounds
        used_line = ", ".join(
            f"{who} {used / count * 1e6:.0f}" for who, used in cpu_sequential[label].items()
        )
        print(f"# CPU per request one at a time, {label}: {used_line} (us)")
    for variant, seen in revisions_seen.items():
        print(f"# router {variant}: of 100 calls, {seen} carried X-Lambdabus-Revision")
    if balance_rows:
        print()
        print("# balancing: two fallback instances, one answering at once, one after 10 ms;")
        print("# 8 clients for 2 s through the router")
        print(f"{'policy':<28}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
        for row in balance_rows:
            print(row)


async def _revision_header(url: str, path: str) -> int:
    """How many of 100 calls through the router carried `X-Lambdabus-Revision` (all should)."""
    seen = 0
    async with aiohttp.ClientSession(connector=connector(url, limit=1)) as http:
        for _ in range(100):
            async with http.post(base_url(url) + path, data=b"{}") as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"the router answered {resp.status}: {await resp.text()}")
                seen += "X-Lambdabus-Revision" in resp.headers
    return seen


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fallback-instance"]:
        asyncio.run(
            _serve_fallback(
                float(sys.argv[2]) if len(sys.argv) > 2 else 0.0,
                sys.argv[3] if len(sys.argv) > 3 else None,
            )
        )
    else:
        asyncio.run(main())
