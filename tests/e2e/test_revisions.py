"""Revisions and traffic (issue 11) on a running platform: deploy v1, then v2; set 90/10 with
the candidate tag on the latest; 2,000 calls through the router split within ±3 percentage
points (each answer's `X-Lambdabus-Revision` counted, and the body says the same version); the
tagged URL answers from the tagged revision only; a revision with traffic cannot be deleted;
rollback → 100% v1 within 1 s of the call. Then: v1 deleted once nothing routes to it; a
replica change makes no revision, a timeout change does (the same build under the new config,
which @latest follows); revision.created|ready|deleted on the function's history; no service
logged a warning or an error.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.e2e.conftest import Platform
from tests.e2e.helpers import cli, http, offline_platform, wait_for, wait_running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NAME = "rev"
SOURCE = "async def main(request):\n    return {{'version': {version}}}\n"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(tmp_path_factory, "revisions")


class Caller:
    """Calls through the router on one kept-alive connection."""

    def __init__(self, router: str) -> None:
        url = urlsplit(router)
        self._conn = HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=10)

    def call(self, path: str) -> tuple[int, str, Any]:
        self._conn.request("GET", path)
        response = self._conn.getresponse()
        body = response.read()
        revision = response.getheader("X-Lambdabus-Revision") or ""
        try:
            return response.status, revision, json.loads(body)
        except ValueError:
            return response.status, revision, body

    def close(self) -> None:
        self._conn.close()


def _level(line: str) -> str:
    """A service log line's level (`traceback` for a line that is not JSON and shows one)."""
    try:
        return str(json.loads(line).get("level", ""))
    except ValueError:
        return "error" if "Traceback" in line else ""


def _deploy(platform: Platform, fn: Path, version: int) -> None:
    (fn / "lambda_main.py").write_text(SOURCE.format(version=version))
    deployed = cli(platform, "deploy", str(fn), "--name", NAME)
    assert deployed.returncode == 0, deployed.stderr


def test_traffic_split_tag_rollback(platform: Platform, tmp_path: Path) -> None:
    gateway = f"{platform.urls['gateway']}/v1/namespaces/default/functions/{NAME}"
    v1, v2 = f"{NAME}-00001", f"{NAME}-00002"
    fn = tmp_path / NAME
    fn.mkdir()
    _deploy(platform, fn, 1)
    wait_running(platform, NAME)
    caller = Caller(platform.urls["router"])
    try:
        assert caller.call(f"/default/{NAME}") == (200, v1, {"version": 1})
        status, listing = http("GET", f"{gateway}/revisions")
        assert status == 200
        assert [(i["name"], i["traffic_percent"]) for i in listing["items"]] == [(v1, 100)]

        _deploy(platform, fn, 2)
        wait_for(
            lambda: caller.call(f"/default/{NAME}") == (200, v2, {"version": 2}),
            120,
            "v2 answering",
        )
        listed = cli(platform, "revisions", NAME)
        assert listed.returncode == 0, listed.stderr
        assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == [v1, v2]

        bad = [{"revision": v1, "percent": 90}, {"latest": True, "percent": 5}]
        status, body = http("PUT", f"{gateway}/traffic", {"traffic": bad})
        assert status == 400
        assert "sum to 95" in body["error"]["message"]

        split = cli(
            platform, "traffic", NAME, f"{v1}=90", "@latest=10", "--tag", "candidate=@latest"
        )
        assert split.returncode == 0, split.stderr
        assert f"/default/{NAME}@candidate" in split.stdout

        def assigned() -> bool:
            _, route = http("GET", f"{gateway}/traffic")
            return bool(route["conditions"][0]["status"] == "True") and route["effective"] == {
                v1: 90,
                v2: 10,
            }

        wait_for(assigned, 90, "v1 running apart and the route assigned")
        # The router sees the pinned endpoints by its own watch: wait until it sends to v1.
        wait_for(
            lambda: any(caller.call(f"/default/{NAME}")[1] == v1 for _ in range(20)),
            30,
            "the router sending to v1",
        )

        counted: Counter[str] = Counter()
        for _ in range(2000):
            status, revision, body = caller.call(f"/default/{NAME}")
            assert status == 200
            assert body == {"version": 1 if revision == v1 else 2}, (revision, body)
            counted[revision] += 1
        share = counted[v1] / 2000 * 100
        print(f"2,000 calls: {dict(counted)} ({share:.1f}% {v1})")
        assert set(counted) == {v1, v2}
        assert abs(share - 90) <= 3

        tagged = [caller.call(f"/default/{NAME}@candidate") for _ in range(50)]
        assert {(s, r, json.dumps(b)) for s, r, b in tagged} == {(200, v2, '{"version": 2}')}
        status, body = caller.call(f"/default/{NAME}@nosuchtag")[0], None
        assert status == 404

        status, body = http("DELETE", f"{gateway}/revisions/{v1}")
        assert status == 409, body
        assert body["error"]["code"] == "revision_in_use"

        rollback = cli(platform, "rollback", NAME)
        called = time.monotonic()
        assert rollback.returncode == 0, (rollback.stderr, http("GET", f"{gateway}/revisions"))
        assert f"100% to {v1}" in rollback.stdout
        took = None
        while time.monotonic() - called < 5:
            window = [caller.call(f"/default/{NAME}")[1] for _ in range(10)]
            if set(window) == {v1}:
                took = time.monotonic() - called
                break
        print(f"rollback: every call on {v1} {took} s after the call")
        assert took is not None
        assert took <= 1.0
        after = Counter(caller.call(f"/default/{NAME}")[1] for _ in range(200))
        assert after == Counter({v1: 200})
        status, body = http("DELETE", f"{gateway}/revisions/{v2}")
        assert status == 409  # the latest revision stays

        back = cli(platform, "traffic", NAME, "@latest=100")
        assert back.returncode == 0, back.stderr
        status, body = http("DELETE", f"{gateway}/revisions/{v1}")
        assert status == 200, body
        status, listing = http("GET", f"{gateway}/revisions")
        assert [i["name"] for i in listing["items"]] == [v2]

        def revision_events() -> set[tuple[str, str]] | None:
            _, history = http("GET", f"{gateway}/history")
            found = {
                (e["type"].removeprefix("io.lambdabus.revision."), e["data"]["revision"])
                for e in history["items"]
                if e["type"].startswith("io.lambdabus.revision.")
            }
            return found if ("deleted", v1) in found else None

        # A change of scale alone makes no revision; a change of what runs does.
        scaled = cli(platform, "update", NAME, "--replicas", "2")
        assert scaled.returncode == 0, scaled.stderr
        _, listing = http("GET", f"{gateway}/revisions")
        assert [i["name"] for i in listing["items"]] == [v2]
        changed = cli(platform, "update", NAME, "--timeout", "20")
        assert changed.returncode == 0, changed.stderr
        _, listing = http("GET", f"{gateway}/revisions")
        assert [i["name"] for i in listing["items"]] == [v2, f"{NAME}-00003"]
        wait_for(  # the same build under the new config: @latest follows it
            lambda: caller.call(f"/default/{NAME}") == (200, f"{NAME}-00003", {"version": 2}),
            60,
            "rev-00003 answering",
        )

        events = wait_for(revision_events, 30, "revision.deleted of v1")
        assert events >= {
            ("created", v1),
            ("created", v2),
            ("ready", v1),
            ("ready", v2),
            ("deleted", v1),
        }
        assert ("deleted", v2) not in events
    finally:
        caller.close()
    # Nothing of this was a problem: no service logged a warning or an error.
    noisy = [
        line
        for log in sorted((platform.data_dir / "logs").glob("*.log"))
        if log.name != "nats.log"
        for line in log.read_text().splitlines()
        if _level(line) in ("warning", "error", "critical")
    ]
    assert not noisy, "\n".join(noisy)
