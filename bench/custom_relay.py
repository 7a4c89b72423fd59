"""Runtime `custom`: what the relay (instance socket → the program's $PORT) adds per request.
Starts `python -m lambdabus_runtime --runtime custom` on the Perl example (TCP, no sandbox: the
relay alone is measured) and times sequential POSTs straight to the program and through the
relay, each on a new connection (the example closes every connection).

    uv run python bench/custom_relay.py [--requests 500]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom-perl"


def timed(port: int, path: str, requests: int) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", path, body=b'{"name": "x"}')
        conn.getresponse().read()
        conn.close()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    argv = [sys.executable, "-m", "lambdabus_runtime", "--code", str(EXAMPLE)]
    argv += ["--entrypoint", "server.pl", "--function", "default/bench", "--runtime", "custom"]
    argv += ["--command", '["./server.pl"]', "--port", "0"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    program = relay = 0
    for line in process.stdout:
        found = re.search(r"listening on port (\d+)", line)
        if found:
            program = int(found.group(1))
        if line.startswith("{"):
            relay = int(json.loads(line)["port"])
            break
    try:
        timed(program, "/", 50)
        timed(relay, "/default/bench", 50)
        direct = timed(program, "/", args.requests)
        relayed = timed(relay, "/default/bench", args.requests)
    finally:
        process.terminate()
        process.wait(10)
    print(f"straight to the program: p50 {direct[0]:.3f} ms, p99 {direct[1]:.3f} ms")
    print(f"through the relay:       p50 {relayed[0]:.3f} ms, p99 {relayed[1]:.3f} ms")
    print(f"the relay adds {relayed[0] - direct[0]:.3f} ms at the median")


if __name__ == "__main__":
    main()
