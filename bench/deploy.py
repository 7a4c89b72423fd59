"""Deploy speed, measured on the real platform (`lambdabus up` as processes, on ephemeral ports):

- upload → first successful response, for a function without dependencies, against a baseline
  measured in the same run: starting the bare runtime process until it says it listens;
- builder time of a rebuild whose dependencies are unchanged (cache hit), against the builder
  time of the first build of the same dependencies (a fresh virtualenv).

Builds use the wheel directory made by `make fixtures` (no network).

    uv run python bench/deploy.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from lambdabus_runtime.paths import runtime_pythonpath

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
HELLO = "async def main(request):\n    return {'n': %d}\n"


# The admin token `lambdabus up` bootstraps, sent to the gateway (not to the router).
TOKEN: dict[str, str] = {}


def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if TOKEN and url.startswith(TOKEN["gateway"]):
        headers["Authorization"] = f"Bearer {TOKEN['token']}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (urllib.error.URLError, ConnectionError):
        return 0, None


def until_answers(url: str, expected: Any, limit: float = 60) -> float:
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        status, body = call("POST", url, {})
        if status == 200 and body == expected:
            return time.perf_counter()
        time.sleep(0.005)
    raise TimeoutError(f"{url} did not answer {expected!r}")


def bare_runtime_start(code_dir: Path) -> float:
    """Seconds from spawning the runtime to its listening line: the floor of any cold start."""
    env = {**os.environ, "PYTHONPATH": runtime_pythonpath()}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [
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
            "bench/bare",
        ],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    elapsed = time.perf_counter() - started
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    proc.stdout.close()
    return elapsed


def build_duration(gateway: str, name: str, generation: int, limit: float = 120) -> float:
    """The builder's own measure of a build, from the lifecycle history of the function."""
    deadline = time.perf_counter() + limit
    while time.perf_counter() < deadline:
        status, body = call("GET", f"{gateway}/v1/namespaces/default/functions/{name}/history")
        for event in (body or {}).get("items", []) if status == 200 else []:
            data = event.get("data", {})
            if (
                event["type"] == "io.lambdabus.build.succeeded"
                and data.get("generation") == generation
            ):
                return float(data["duration_seconds"])
            if (
                event["type"] == "io.lambdabus.build.failed"
                and data.get("generation") == generation
            ):
                raise RuntimeError(f"build failed: {data.get('message')}")
        time.sleep(0.05)
    raise TimeoutError("no build result")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not WHEELHOUSE.exists():
        sys.exit("run `make fixtures` first")
    with tempfile.TemporaryDirectory() as tmp:
        code = Path(tmp) / "code"
        code.mkdir()
        (code / "lambda_main.py").write_text(HELLO % 0)
        bare = statistics.median(bare_runtime_start(code) for _ in range(args.rounds))

        env = {
            **os.environ,
            "LAMBDABUS_BUILDER_NO_INDEX": "true",
            "LAMBDABUS_BUILDER_FIND_LINKS": json.dumps([str(WHEELHOUSE)]),
        }
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lambdabus_client",
                "up",
                "--ephemeral-ports",
                "--data-dir",
                f"{tmp}/state",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        assert up.stdout is not None
        urls: dict[str, str] = {}
        for line in up.stdout:
            words = line.split()
            if len(words) == 2:
                urls[words[0]] = words[1]
            if line.startswith("lambdabus is up"):
                break
        gateway, router = urls["gateway"], urls["router"]
        TOKEN.update(
            gateway=gateway, token=(Path(tmp) / "state" / "admin.token").read_text().strip()
        )
        try:
            first: list[float] = []
            for i in range(args.rounds):
                name = f"cold-{i}"
                started = time.perf_counter()
                status, _ = call(
                    "POST",
                    f"{gateway}/v1/namespaces/default/functions",
                    {"name": name, "source": {"files": {"lambda_main.py": HELLO % i}}},
                )
                assert status == 202, status
                first.append(until_answers(f"{router}/default/{name}", {"n": i}) - started)

            deps = "humanize==4.12.3\n"
            fresh: list[float] = []
            cached: list[float] = []
            rollout: list[float] = []
            for i in range(args.rounds):
                name = f"deps-{i}"
                files = {"lambda_main.py": HELLO % 0, "requirements.txt": deps + f"# round {i}\n"}
                status, _ = call(
                    "POST",
                    f"{gateway}/v1/namespaces/default/functions",
                    {"name": name, "source": {"files": files}},
                )
                assert status == 202
                fresh.append(build_duration(gateway, name, 1))
                until_answers(f"{router}/default/{name}", {"n": 0})
                files["lambda_main.py"] = HELLO % 1
                started = time.perf_counter()
                status, _ = call(
                    "PUT",
                    f"{gateway}/v1/namespaces/default/functions/{name}",
                    {"name": name, "source": {"files": files}},
                )
                assert status == 202
                rollout.append(until_answers(f"{router}/default/{name}", {"n": 1}) - started)
                cached.append(build_duration(gateway, name, 2))
        finally:
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(60)
            up.stdout.close()

    med = statistics.median
    print(f"{'measure':<52}{'median s':>10}{'max s':>9}{'ratio':>8}")
    print(f"{'baseline: bare runtime start → listening':<52}{bare:>10.3f}{'':>9}{1.0:>8.2f}")
    print(
        f"{'upload → first response (no dependencies)':<52}{med(first):>10.3f}{max(first):>9.3f}{med(first) / bare:>8.2f}"
    )
    print(
        f"{'baseline: builder time, fresh dependencies':<52}{med(fresh):>10.3f}{max(fresh):>9.3f}{1.0:>8.2f}"
    )
    print(
        f"{'builder time, rebuild with cached dependencies':<52}{med(cached):>10.3f}{max(cached):>9.3f}{med(cached) / med(fresh):>8.2f}"
    )
    print(
        f"{'update → new code answering (cached dependencies)':<52}{med(rollout):>10.3f}{max(rollout):>9.3f}"
    )
    print("targets: upload → first response ≤ 2 s; cached rebuild ≤ 0.5 s of builder time")


if __name__ == "__main__":
    main()
