"""Secret values stay out of everything the platform writes or serves, with every service as its
own process (`lambdabus up`): a function that uses a secret (mounted and as env) runs, is
invoked, and rolls out when the secret changes; afterwards no value is in the LOGS stream (the
function's runtime and build logs), the services' own log files, any service's /metrics, the
lifecycle history, or an API answer. The function's own output is its business: it prints
nothing of the secret here, so whatever held a value would be the platform's doing."""

from __future__ import annotations

import secrets
import signal
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import SERVICES, Platform, platform_up
from tests.e2e.helpers import OFFLINE_ENV, WHEELHOUSE, cli, http, wait_for, wait_running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FUNCTION = """\
async def main(request):
    print("handled a request", flush=True)
    return {"ok": True}
"""


@dataclass
class Running:
    platform: Platform
    data_dir: Path


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    if not WHEELHOUSE.exists():
        pytest.fail("run `make fixtures` first: the examples' dependencies for offline builds")
    data_dir = tmp_path_factory.mktemp("secrets") / "state"
    with platform_up(data_dir, env=OFFLINE_ENV) as platform:
        yield Running(platform, data_dir)
        platform.process.send_signal(signal.SIGTERM)
        platform.process.wait(60)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def test_secret_values_are_in_no_log_metric_event_or_answer(running: Running) -> None:
    platform = running.platform
    gateway, router = platform.urls["gateway"], platform.urls["router"]
    first, second = "pw-" + secrets.token_hex(12), "pw-" + secrets.token_hex(12)
    answers: list[str] = []

    def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
        status, answer = http(method, url, body)
        answers.append(_text(answer))
        return status, answer

    status, _ = call(
        "POST",
        f"{gateway}/v1/namespaces/default/secrets",
        {"name": "db", "data": {"password": first, "user": "app"}},
    )
    assert status == 201
    key_file = running.data_dir / "secrets.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    status, _ = call(
        "POST",
        f"{gateway}/v1/namespaces/default/functions",
        {
            "name": "uses-db",
            "secrets": ["db"],
            "env_from": {"DB_PASSWORD": {"secret": "db", "key": "password"}},
            "source": {"files": {"lambda_main.py": FUNCTION}},
        },
    )
    assert status == 202
    wait_running(platform, "uses-db")
    for _ in range(3):
        assert call("POST", f"{router}/default/uses-db", {})[0] == 200

    # A changed secret rolls the function out: a new instance answers.
    def instances() -> set[str]:
        logs = cli(platform, "logs", "uses-db")
        return {word for word in logs.stdout.split() if word.startswith("uses-db-")}

    before = wait_for(instances, 30, "the instance's log lines")
    status, _ = call(
        "PUT", f"{gateway}/v1/namespaces/default/secrets/db", {"data": {"password": second}}
    )
    assert status == 200

    def rolled_out() -> bool:
        call("POST", f"{router}/default/uses-db", {})
        return bool(instances() - before)

    wait_for(rolled_out, 60, "a new instance after the secret changed", interval=0.5)
    wait_running(platform, "uses-db")

    # Everything the API shows about them.
    for path in (
        "/v1/namespaces/default/secrets",
        "/v1/namespaces/default/secrets/db",
        "/v1/namespaces/default/functions/uses-db",
        "/v1/namespaces/default/functions/uses-db/status",
        "/v1/namespaces/default/functions/uses-db/history",
        "/v1/namespaces/default/functions/db/history",  # the secret's own lifecycle events
    ):
        status, _ = call("GET", gateway + path)
        assert status == 200, path
    history = answers[-1]
    assert "io.lambdabus.secret.updated" in history

    places: dict[str, str] = {"API answers": "\n".join(answers)}
    runtime = cli(platform, "logs", "uses-db")
    build = cli(platform, "logs", "uses-db", "--build")
    assert runtime.returncode == 0
    assert "handled a request" in runtime.stdout
    places["LOGS: runtime"] = runtime.stdout + runtime.stderr
    places["LOGS: build"] = build.stdout + build.stderr
    for service in SERVICES:
        status, metrics = http("GET", platform.urls[service] + "/metrics")
        assert status == 200, service
        places[f"{service} /metrics"] = _text(metrics)
    for log_file in sorted((running.data_dir / "logs").glob("*.log")):
        places[f"log file {log_file.name}"] = log_file.read_text(errors="replace")
    assert "secret updated" in places["log file gateway.log"]

    leaks = [
        (where, which)
        for where, text in places.items()
        for which, value in (("first", first), ("second", second))
        if value in text
    ]
    assert leaks == []
