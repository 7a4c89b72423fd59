"""`lambdabus up` as a subprocess, exactly as `make run` starts it, on ephemeral ports."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SERVICES = ("gateway", "router", "builder", "deployer", "logs")
# The admin token each running platform's gateway minted at first start, by gateway URL.
GATEWAY_TOKENS: dict[str, str] = {}


def token_for(url: str) -> str | None:
    """The admin token of the platform whose gateway `url` points at, if it is one."""
    for gateway, token in GATEWAY_TOKENS.items():
        if url == gateway or url.startswith(gateway + "/"):
            return token
    return None


@dataclass
class Platform:
    process: subprocess.Popen[str]
    data_dir: Path
    urls: dict[str, str] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)
    token: str = ""  # the admin token `up` bootstrapped into <data dir>/admin.token

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def cli_env(self) -> dict[str, str]:
        """The environment a CLI call against this platform needs (its admin token)."""
        return {**os.environ, "LAMBDABUS_TOKEN": self.token}

    def nats_seed(self, user: str = "admin") -> Path:
        """A NATS user's key, where `lambdabus up` made it."""
        return self.data_dir / "nats" / "credentials" / f"{user}.nk"

    def descendants(self) -> set[int]:
        """Every process below `lambdabus up`, read from /proc."""
        parents: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                parents[int(stat.parent.name)] = int(fields[1])
        found: set[int] = set()
        frontier = {self.process.pid}
        while frontier:
            children = {pid for pid, ppid in parents.items() if ppid in frontier}
            found |= children
            frontier = children
        return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def platform_up(
    data_dir: Path,
    *,
    ready_timeout: float = 90,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> Iterator[Platform]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lambdabus_client",
            "up",
            "--ephemeral-ports",
            "--data-dir",
            str(data_dir),
            *args,
        ],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    platform = Platform(process, data_dir)
    assert process.stdout is not None
    deadline = time.monotonic() + ready_timeout
    try:
        # ready by its own word: `up` prints each URL, then "lambdabus is up"
        for line in process.stdout:
            platform.output.append(line)
            words = line.split()
            # `router`, and with --replicas `router-2`...
            if len(words) == 2 and words[0].split("-")[0] in (*SERVICES, "nats"):
                platform.urls[words[0]] = words[1]
            if line.startswith("lambdabus is up"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    "lambdabus up was not ready in time:\n" + "".join(platform.output)
                )
        else:
            raise RuntimeError("lambdabus up exited:\n" + "".join(platform.output))
        platform.token = (data_dir / "admin.token").read_text().strip()
        gateways = [u for n, u in platform.urls.items() if n.split("-")[0] == "gateway"]
        for url in gateways:
            GATEWAY_TOKENS[url] = platform.token
        yield platform
    finally:
        for name, url in platform.urls.items():
            if name.split("-")[0] == "gateway":
                GATEWAY_TOKENS.pop(url, None)
        left = platform.descendants()
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for pid in left:  # the services run in sessions of their own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait(10)
        # Function instances outlive a killed deployer (they belong to the platform): stop
        # what a platform that did not stop by itself left, as its own stop would have.
        subprocess.run(
            [sys.executable, "-m", "lambdabus_deployer", "--stop-instances"],
            env={**os.environ, "LAMBDABUS_DEPLOYER_STATE_DIR": str(data_dir / "deployer")},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
        process.stdout.close()


def stop(
    platform: Platform, sig: int = signal.SIGTERM, timeout: float = 40
) -> tuple[int, set[int]]:
    """Signal `up`, wait for it to exit; return its code and the processes it left behind."""
    before = platform.descendants()
    assert before, "lambdabus up has no child processes"
    platform.process.send_signal(sig)
    code = platform.process.wait(timeout)
    deadline = time.monotonic() + 5
    left = {pid for pid in before if _alive(pid)}
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = {pid for pid in before if _alive(pid)}
    return code, left


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"
