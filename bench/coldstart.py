"""Cold starts through the whole platform: from 0 instances to the first response, measured at
the client, for a Python function without dependencies, one with a cached dependency (humanize,
from the offline wheelhouse), and a Node function (ms, from the offline npm cache); next to
spawning a fresh sandboxed runtime in the same run (bubblewrap + interpreter + runtime import +
function load + first answer, nothing of the platform around it).

    uv run python bench/coldstart.py [--cold-starts 50] [--functions 4]
        [--kinds python,python-deps,nodejs] [--pool-size N] [--cpu 100m] [--together]

It starts `lambdabus up --ephemeral-ports` (offline builds: run `make fixtures` first), deploys
`--functions` functions of each kind with `scale: {"min": 0, "max": 1, "idle_seconds": 1}`,
and then, one kind after another (`--together`: all kinds at once, each one's cold starts
among the others' scale-downs and refills), round robin, calls each of that kind's functions
once it is back at 0 instances, through the router:
the router holds the request, wakes the function (`lambdabus.wake.<ns>.<fn>`), and answers once
an instance is ready. Only responses that say `X-Lambdabus-Cold-Start: true` count. Prints
p50/p90/p99 per kind and the ratio to the bare sandbox spawn; asserts nothing about time.
`--pool-size` sets LAMBDABUS_DEPLOYER_POOL_SIZE (0: no pre-started runtimes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambdabus_platform.sandbox import detect_sandbox, launch
from lambdabus_testing.sandboxed import first_answer, runtime_command, runtime_spec

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
NPM_CACHE = ROOT / ".cache" / "npm"
NS = "default"
SCALE = {"min": 0, "max": 1, "target": 10, "idle_seconds": 1}

SOURCES: dict[str, dict[str, Any]] = {
    "python": {
        "files": {"lambda_main.py": "async def main(request):\n    return {'ok': True}\n"},
    },
    "python-deps": {
        "files": {
            "lambda_main.py": (
                "import humanize\n\nasync def main(request):\n"
                "    return {'ok': True, 'size': humanize.naturalsize(1024)}\n"
            ),
            "requirements.txt": "humanize\n",
        },
    },
    "nodejs": {
        "runtime": "nodejs20",
        "files": {
            "handler.js": (
                "const ms = require('ms');\n"
                "exports.main = async function (event, context) {\n"
                "  return { ok: true, ms: ms('1s') };\n};\n"
            ),
            "package.json": json.dumps(
                {
                    "name": "cold",
                    "version": "1.0.0",
                    "private": True,
                    "dependencies": {"ms": "2.1.3"},
                }
            ),
        },
    },
}
OFFLINE_ENV = {
    "LAMBDABUS_BUILDER_NO_INDEX": "true",
    "LAMBDABUS_BUILDER_FIND_LINKS": json.dumps([str(WHEELHOUSE)]),
    "LAMBDABUS_BUILDER_NPM_CACHE": str(NPM_CACHE),
    "LAMBDABUS_BUILDER_NPM_OFFLINE": "true",
    "LAMBDABUS_DEPLOYER_DRAIN_SECONDS": "0",
}


@dataclass
class Platform:
    process: subprocess.Popen[str]
    urls: dict[str, str] = field(default_factory=dict)
    token: str = ""


@contextmanager
def platform_up(data_dir: Path, env: dict[str, str]) -> Iterator[Platform]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lambdabus_client",
            "up",
            "--ephemeral-ports",
            "--data-dir",
            str(data_dir),
        ],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    platform = Platform(process)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            words = line.split()
            if len(words) == 2 and words[1].startswith("http"):
                platform.urls[words[0]] = words[1]
            if line.startswith("lambdabus is up"):
                break
        else:
            raise RuntimeError("lambdabus up ended before it was up")
        platform.token = (data_dir / "admin.token").read_text().strip()
        yield platform
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def http(
    method: str, url: str, body: Any = None, token: str = "", timeout: float = 60
) -> tuple[int, Any, dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            raw, status, head = resp.read(), resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, head = exc.read(), exc.code, dict(exc.headers)
    try:
        return status, json.loads(raw) if raw else None, head
    except ValueError:
        return status, raw.decode(errors="replace"), head


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(label: str, values: list[float], base: float | None) -> str:
    ms = [v * 1000 for v in values]
    p50 = statistics.median(ms)
    ratio = f"  {p50 / base:5.2f}x spawn" if base else ""
    return (
        f"{label:<28} n={len(ms):<4} p50 {p50:7.1f} ms  p90 {percentile(ms, 0.9):7.1f} ms  "
        f"p99 {percentile(ms, 0.99):7.1f} ms  max {max(ms):7.1f} ms{ratio}"
    )


# -- a fresh sandboxed runtime, nothing of the platform around it ----------------------------


async def spawn_once(code_dir: Path, socket_dir: Path) -> float:
    """bubblewrap + the runtime (as the deployer starts it, no network) until its first
    answer to a call: seconds."""
    sandbox = await detect_sandbox("bubblewrap")
    sock = socket_dir / "sock"
    sock.unlink(missing_ok=True)
    spec = runtime_spec(code_dir, socket_dir, runtime_command(f"{NS}/spawn"))
    started = time.perf_counter()
    handle = await launch(sandbox, spec, key=f"{NS}/spawn", stdout=asyncio.subprocess.PIPE)
    try:
        assert handle.process.stdout is not None
        line = await asyncio.wait_for(handle.process.stdout.readline(), 30)
        if b"listening" not in line:
            raise RuntimeError(f"the sandboxed runtime did not start: {line!r}")
        await first_answer(sock)
        return time.perf_counter() - started
    finally:
        handle.kill()
        await handle.process.wait()
        await handle.close()


async def spawn_bench(count: int, work: Path) -> list[float]:
    code = work / "spawn-code"
    code.mkdir()
    (code / "lambda_main.py").write_text(SOURCES["python"]["files"]["lambda_main.py"])
    sockets = work / "spawn-sock"
    sockets.mkdir()
    sockets.chmod(0o777)  # whichever uid the sandbox runs as may listen there
    for path in (work, code):
        path.chmod(0o755)
    return [await spawn_once(code, sockets) for _ in range(count)]


# -- through the platform --------------------------------------------------------------------


def deploy_all(
    platform: Platform, kinds: list[str], per_kind: int, cpu: str | None
) -> list[tuple[str, str]]:
    gateway = platform.urls["gateway"]
    functions = []
    for kind in kinds:
        for i in range(per_kind):
            name = f"cold-{kind}-{i}"
            spec: dict[str, Any] = {"name": name, "scale": SCALE}
            source = SOURCES[kind]
            if "runtime" in source:
                spec["runtime"] = source["runtime"]
            spec["source"] = {"files": source["files"]}
            if cpu:
                spec["cpu"] = int(cpu.removesuffix("m"))
            status, body, _ = http(
                "POST", f"{gateway}/v1/namespaces/{NS}/functions", spec, platform.token
            )
            if status != 202:
                raise RuntimeError(f"deploying {name}: {status} {body}")
            functions.append((kind, name))
    for _, name in functions:

        def built(name: str = name) -> bool:
            st = status_of(platform, name)
            if st.get("image_status") == "error":
                raise RuntimeError(f"{name} did not build: {st}")
            return st.get("image_status") == "ready" or st.get("status") == "running"

        wait_for(built, 300, f"{name} built")
    return functions


def status_of(platform: Platform, name: str) -> dict[str, Any]:
    _, body, _ = http(
        "GET",
        f"{platform.urls['gateway']}/v1/namespaces/{NS}/functions/{name}/status",
        token=platform.token,
    )
    return body if isinstance(body, dict) else {}


def cold_bench(
    platform: Platform, functions: list[tuple[str, str]], per_kind: int
) -> dict[str, list[float]]:
    router = platform.urls["router"]
    results: dict[str, list[float]] = {kind: [] for kind, _ in functions}
    warm: dict[str, int] = {kind: 0 for kind, _ in functions}
    deadline = time.monotonic() + 60 * 60
    while any(len(v) < per_kind for v in results.values()):
        if time.monotonic() > deadline:
            raise RuntimeError("the bench did not finish within an hour")
        progressed = False
        for kind, name in functions:
            if len(results[kind]) >= per_kind:
                continue
            st = status_of(platform, name)
            if st.get("replicas") != 0 or st.get("endpoints"):
                continue
            started = time.perf_counter()
            status, body, headers = http("POST", f"{router}/{NS}/{name}", {})
            elapsed = time.perf_counter() - started
            if status != 200:
                raise RuntimeError(f"{name} answered {status}: {body}")
            if headers.get("X-Lambdabus-Cold-Start") == "true":
                results[kind].append(elapsed)
                progressed = True
            else:
                warm[kind] += 1
        if not progressed:
            time.sleep(0.2)
        done = " ".join(f"{k}={len(v)}" for k, v in results.items())
        print(f"\r  cold starts: {done}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for kind, count in warm.items():
        if count:
            print(f"  ({kind}: {count} calls found an instance already up: not counted)")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--cold-starts", type=int, default=50, help="per kind (default 50)")
    parser.add_argument("--functions", type=int, default=4, help="functions per kind")
    parser.add_argument("--kinds", default="python,python-deps,nodejs")
    parser.add_argument("--pool-size", type=int, help="LAMBDABUS_DEPLOYER_POOL_SIZE")
    parser.add_argument("--cpu", help="the functions' cpu (e.g. 100m, Kyma's preset M)")
    parser.add_argument("--spawns", type=int, default=50, help="bare sandbox spawns")
    parser.add_argument("--keep", action="store_true", help="keep the state dir (its logs)")
    parser.add_argument(
        "--together",
        action="store_true",
        help="cycle every kind's functions at once (default: one kind after another)",
    )
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(SOURCES)
    if unknown:
        parser.error(f"unknown kinds: {', '.join(sorted(unknown))}")
    if not WHEELHOUSE.exists():
        print("run `make fixtures` first: the offline wheelhouse and npm cache", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="lambdabus-coldstart-"))
    try:
        print(
            f"sandboxed runtime spawn x{args.spawns} (bubblewrap, no platform)...", file=sys.stderr
        )
        spawns = asyncio.run(spawn_bench(args.spawns, work))
        env = dict(OFFLINE_ENV)
        if args.pool_size is not None:
            env["LAMBDABUS_DEPLOYER_POOL_SIZE"] = str(args.pool_size)
        with platform_up(work / "state", env) as platform:
            print("deploying...", file=sys.stderr)
            functions = deploy_all(platform, kinds, args.functions, args.cpu)
            if args.together:
                results = cold_bench(platform, functions, args.cold_starts)
            else:  # one kind at a time: the others' functions stay at zero meanwhile
                results = {}
                for kind in kinds:
                    mine = [f for f in functions if f[0] == kind]
                    results.update(cold_bench(platform, mine, args.cold_starts))
        base = statistics.median(spawns) * 1000
        pool = "default" if args.pool_size is None else str(args.pool_size)
        together = "all kinds cycling together" if args.together else "one kind at a time"
        print(
            f"cold start, 0 instances -> first response (pool size: {pool}, "
            f"cpu: {args.cpu or 'default'}, {os.cpu_count()} cores, {together})"
        )
        print(summary("fresh sandboxed runtime", spawns, None))
        for kind in kinds:
            print(summary(f"through the router: {kind}", results[kind], base))
    finally:
        if args.keep:
            print(f"state kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
