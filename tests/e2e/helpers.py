"""Helpers shared by the e2e suites: HTTP and CLI calls against a running platform, waiting,
and a platform whose builds use only what `make fixtures` fetched (no network)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Platform, platform_up, token_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
NPM_CACHE = ROOT / ".cache" / "npm"


def http(method: str, url: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    token = token_for(url)  # a call to a platform's gateway goes with its admin token
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw.decode(errors="replace")


def cli(platform: Platform, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lambdabus_client", "--url", platform.urls["gateway"], *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=platform.cli_env,
    )


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last seen: {last!r}")


def status_of(platform: Platform, name: str) -> dict[str, Any]:
    _, body = http(
        "GET", f"{platform.urls['gateway']}/v1/namespaces/default/functions/{name}/status"
    )
    return body  # type: ignore[no-any-return]


def wait_running(platform: Platform, name: str, timeout: float = 90) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        st = status_of(platform, name)
        if st.get("image_status") == "error" or st.get("status") == "terminated":
            raise AssertionError(f"{name} failed: {st}")
        return st if st.get("status") == "running" else None

    return wait_for(check, timeout, f"{name} running")  # type: ignore[no-any-return]


def cmdline(pid: int) -> bytes:
    """A process's command line, empty once it is gone (processes come and go meanwhile)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def without_forks(pids: list[int]) -> list[int]:
    """`pids` without those whose parent is among them: a child between fork and exec shows
    its parent's command line (the deployer starts sandboxes at any moment, for its pool of
    pre-started runtimes too)."""
    found = set(pids)
    return [pid for pid in pids if parent_of(pid) not in found]


def runtime_processes(name: str) -> list[int]:
    """Function instances of default/<name> anywhere on the machine (not only below `up`)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or Path(argv[0].decode(errors="replace")).name == "bwrap":
            continue
        is_runtime = b"lambdabus_runtime" in b" ".join(argv) or any(
            a.endswith(b"server.js") for a in argv
        )
        if is_runtime and f"default/{name}".encode() in argv:
            pids.append(int(cmdline.parent.name))
    return pids


# Short timers so faults and restarts show within seconds; builds offline.
OFFLINE_ENV = {
    "LAMBDABUS_BUILDER_NO_INDEX": "true",
    "LAMBDABUS_BUILDER_FIND_LINKS": json.dumps([str(WHEELHOUSE)]),
    "LAMBDABUS_BUILDER_NPM_CACHE": str(NPM_CACHE),
    "LAMBDABUS_BUILDER_NPM_OFFLINE": "true",
    "LAMBDABUS_DEPLOYER_RESTART_BASE_DELAY": "0.2",
    "LAMBDABUS_DEPLOYER_RESTART_MAX_DELAY": "1",
    "LAMBDABUS_DEPLOYER_HEALTH_INTERVAL": "0.5",
    "LAMBDABUS_DEPLOYER_DRAIN_SECONDS": "1",
    "LAMBDABUS_DEPLOYER_RECONCILE_INTERVAL": "2",
}


def offline_platform(
    tmp_path_factory: pytest.TempPathFactory, name: str, **extra_env: str
) -> Iterator[Platform]:
    """The body of a module-scoped `platform` fixture: `lambdabus up` with offline builds."""
    if not WHEELHOUSE.exists():
        pytest.fail("run `make fixtures` first: the examples' dependencies for offline builds")
    env = {**OFFLINE_ENV, **extra_env}
    with platform_up(tmp_path_factory.mktemp(name) / "state", env=env) as running:
        yield running
        running.process.send_signal(signal.SIGTERM)
        running.process.wait(60)
