"""Autoscaling through the whole platform (`lambdabus up`), issue 11's Must-show: a function with
`scale: {"min": 0, "max": 5, "target": 2, "idle_seconds": 3}` is at 0 instances 3 s after its
last request, with `deployment.scaled` to 0; the first request afterwards succeeds (held by the
router while the function wakes); 40 concurrent clients of a function that sleeps 100 ms get at
least 4 instances within 10 s, and it goes back to 0 once the load stops; requests past the
router's queue bound while it wakes are 503 with Retry-After."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.e2e.conftest import Platform, token_for
from tests.e2e.helpers import http, offline_platform, runtime_processes, status_of, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NS = "default"
QUEUE = 6  # the router's bound on requests held per function while it wakes
SCALE = {"min": 0, "max": 5, "target": 2, "idle_seconds": 3}
SLEEPER = {
    "lambda_main.py": (
        "import asyncio\n"
        "\n"
        "async def main(request):\n"
        "    await asyncio.sleep(0.1)\n"
        "    return {'slept': True}\n"
    )
}

SLOW_TO_LOAD = {
    "lambda_main.py": (
        "import time\n\ntime.sleep(1)\n\n\nasync def main(request):\n    return {'slept': False}\n"
    )
}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(
        tmp_path_factory,
        "autoscale",
        LAMBDABUS_ROUTER_COLD_QUEUE_MAX_REQUESTS=str(QUEUE),
    )


class Lifecycle:
    """The gateway's lifecycle stream (SSE) of one type, read in a thread into `events`."""

    def __init__(self, platform: Platform, event_type: str) -> None:
        url = f"{platform.urls['gateway']}/v1/lifecycle?namespace={NS}&type={event_type}"
        headers = {"Authorization": f"Bearer {token_for(platform.urls['gateway'])}"}
        self._response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=120
        )
        self.events: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for raw in self._response:
                line = raw.decode()
                if line.startswith("data: "):
                    self.events.append(json.loads(line.removeprefix("data: ")))
        except (OSError, ValueError, AttributeError):
            pass  # closed (http.client drops its file on close: AttributeError)

    def close(self) -> None:
        self._response.close()


def deploy(platform: Platform, name: str, files: dict[str, str] = SLEEPER) -> None:
    status, body = http(
        "POST",
        f"{platform.urls['gateway']}/v1/namespaces/{NS}/functions",
        {"name": name, "source": {"files": files}, "scale": SCALE},
    )
    assert status == 202, body


def call(url: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(url, data=b"{}", method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def replicas(platform: Platform, name: str) -> int:
    return int(status_of(platform, name).get("replicas", -1))


def scaled_to(events: list[dict[str, Any]], name: str, to: int) -> list[dict[str, Any]]:
    return [e for e in events if e["data"]["name"] == name and e["data"].get("to_replicas") == to]


def released(platform: Platform, by: str) -> float:
    """The router's count of held requests released to an instance, `announced` or `state`."""
    status, text = http("GET", f"{platform.urls['router']}/metrics")
    assert status == 200, text
    line = f'lambdabus_router_held_released_total{{by="{by}"}} '
    return sum(float(row[len(line) :]) for row in text.splitlines() if row.startswith(line))


def wait_for_zero(platform: Platform, name: str, scaled: Lifecycle, before: int) -> float:
    """Wait until the function runs no instance and a new deployment.scaled to 0 came."""
    started = time.monotonic()
    wait_for(lambda: replicas(platform, name) == 0, 60, f"{name} at 0 replicas")
    wait_for(lambda: runtime_processes(name) == [], 30, f"{name} without processes")
    wait_for(lambda: len(scaled_to(scaled.events, name, 0)) > before, 30, "deployment.scaled to 0")
    return time.monotonic() - started


def test_scale_to_zero_wake_on_the_first_request_grow_with_load_and_back_to_zero(
    platform: Platform,
) -> None:
    scaled = Lifecycle(platform, "io.lambdabus.deployment.scaled")
    try:
        deploy(platform, "sleeper")
        url = f"{platform.urls['router']}/{NS}/sleeper"
        wait_for(lambda: replicas(platform, "sleeper") >= 1, 120, "sleeper deployed")
        # Idle from its start: 0 instances 3 s after (no request came).
        wait_for_zero(platform, "sleeper", scaled, 0)
        to_zero = scaled_to(scaled.events, "sleeper", 0)[-1]["data"]
        assert to_zero["reason"] == "Idle"
        assert to_zero["from_replicas"] >= 1
        assert "no request for" in to_zero["message"]

        # The first request afterwards is held while the function wakes, and succeeds.
        started = time.monotonic()
        status, body, headers = call(url)
        cold = time.monotonic() - started
        assert (status, body) == (200, {"slept": True})
        assert headers.get("X-Lambdabus-Cold-Start") == "true"
        woken = wait_for(
            lambda: [
                e for e in scaled_to(scaled.events, "sleeper", 1) if e["data"]["from_replicas"] == 0
            ],
            10,
            "deployment.scaled 0 -> 1",
        )
        assert woken[-1]["data"]["reason"] in ("Woken", "Stable", "Panic")

        # 40 concurrent clients of a function that sleeps 100 ms (target 2 in flight each).
        stop = threading.Event()
        answers: list[int] = []

        def client() -> None:
            while not stop.is_set():
                answers.append(call(url)[0])

        load_started = time.monotonic()
        with ThreadPoolExecutor(40) as pool:
            for _ in range(40):
                pool.submit(client)
            try:
                wait_for(lambda: replicas(platform, "sleeper") >= 4, 10, "at least 4 instances")
                grown = time.monotonic() - load_started
                wait_for(lambda: len(runtime_processes("sleeper")) >= 4, 30, "4 instances run")
            finally:
                stop.set()
        assert set(answers) == {200}, sorted(set(answers))
        most = max(
            e["data"]["to_replicas"] for e in scaled.events if e["data"]["name"] == "sleeper"
        )
        assert most <= 5  # never above max

        # The load stopped: back to 0 after idle_seconds.
        back = wait_for_zero(platform, "sleeper", scaled, 1)
        # Woken again; of the two held requests, one at least went to the instance the
        # deployer announced (a pre-started runtime) as soon as it accepted, before the state
        # said so: both of their NATS users may do that. (The state may win a race on a busy
        # machine: `by="state"`.)
        again = call(url)
        assert again[0] == 200
        assert again[2].get("X-Lambdabus-Cold-Start") == "true"
        assert released(platform, "announced") >= 1
        print(
            f"\nautoscale: cold first request {cold * 1000:.0f} ms; >= 4 instances "
            f"{grown:.1f} s into 40 clients ({len(answers)} calls, all 200); back to 0 "
            f"{back:.1f} s after the load stopped"
        )
    finally:
        scaled.close()


def test_requests_past_the_queue_bound_while_waking_get_503_with_retry_after(
    platform: Platform,
) -> None:
    # Its code takes 1 s to load: every request below arrives while it wakes (a pre-started
    # runtime makes the others a matter of milliseconds, shorter than the clients' start).
    deploy(platform, "queued", SLOW_TO_LOAD)
    wait_for(lambda: replicas(platform, "queued") >= 1, 120, "queued deployed")
    wait_for(lambda: replicas(platform, "queued") == 0, 60, "queued at 0 replicas")
    wait_for(lambda: runtime_processes("queued") == [], 30, "queued without processes")
    url = f"{platform.urls['router']}/{NS}/queued"
    with ThreadPoolExecutor(QUEUE * 3) as pool:
        results = list(pool.map(lambda _: call(url), range(QUEUE * 3)))
    refused = [r for r in results if r[0] == 503]
    served = [r for r in results if r[0] == 200]
    assert len(served) + len(refused) == len(results), [r[0] for r in results]
    assert len(served) >= QUEUE  # the held ones went on once it woke
    assert refused, "no request was over the bound"
    for _, body, headers in refused:
        assert body["error"]["code"] == "cold_queue_full"
        assert float(headers["Retry-After"]) > 0
