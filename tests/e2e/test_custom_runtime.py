"""Runtime `custom` on a running platform (`lambdabus up`): the Perl example (a language the
platform has no runtime for) deploys, is sandboxed like any function, answers through the
router with its env applied and its output in the runtime log; a program outside the archive is
a 400 that stores nothing; a program missing from the archive is a build error naming it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Platform
from tests.e2e.helpers import (
    EXAMPLES,
    cli,
    http,
    offline_platform,
    runtime_processes,
    status_of,
    wait_for,
    wait_running,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

FUNCTIONS = "/v1/namespaces/default/functions"
SERVER = (EXAMPLES / "custom-perl" / "server.pl").read_text()


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(tmp_path_factory, "custom")


def test_perl_example_deploys_and_answers(platform: Platform) -> None:
    gateway, router = platform.urls["gateway"], platform.urls["router"]
    spec = {
        "name": "perl",
        "runtime": "custom",
        "command": ["./server.pl"],
        "env": {"GREETING": "Hi"},
        "source": {"files": {"server.pl": SERVER}},
    }
    status, body = http("POST", gateway + FUNCTIONS, spec)
    assert status == 202, body
    wait_running(platform, "perl")
    status, answer = http("POST", f"{router}/default/perl/greet?x=1", {"name": "Ada"})
    assert status == 200, answer
    assert answer == {"message": "Hi, Ada!", "method": "POST", "path": "/greet?x=1"}
    for _ in range(20):  # the relay keeps serving, connection after connection
        assert http("GET", f"{router}/default/perl")[0] == 200

    state = status_of(platform, "perl")
    assert state["status"] == "running"
    deployment = http("GET", f"{gateway}{FUNCTIONS}/perl/status")[1]
    assert deployment["limits"] is not None  # limited like any other function
    assert runtime_processes("perl"), "the relay runs as the function's runtime process"
    programs = [
        p
        for p in Path("/proc").glob("[0-9]*")
        if _cmdline(p).startswith(b"/usr/bin/perl\0") and b"server.pl" in _cmdline(p)
    ]
    assert programs, "the Perl program runs"
    for proc in programs:  # in the sandbox: its view of the code, its own network namespace
        assert b"/lambdabus/code/" in _cmdline(proc)
        assert os.readlink(proc / "ns" / "net") != os.readlink("/proc/self/ns/net")

    def logged() -> bool:
        out = cli(platform, "logs", "perl").stdout
        return "greeting Ada" in out and "listening on port" in out

    wait_for(logged, 30, "the program's output in its runtime log")


@pytest.mark.parametrize("command", [["/usr/bin/perl"], ["../server.pl"], ["bin/../../x"]])
def test_command_outside_the_archive_is_a_400(platform: Platform, command: list[str]) -> None:
    gateway = platform.urls["gateway"]
    spec = {
        "name": "outside",
        "runtime": "custom",
        "command": command,
        "source": {"files": {"server.pl": SERVER}},
    }
    status, body = http("POST", gateway + FUNCTIONS, spec)
    assert (status, body["error"]["code"]) == (400, "invalid_spec"), body
    assert "outside the archive" in body["error"]["message"]
    assert http("GET", f"{gateway}{FUNCTIONS}/outside")[0] == 404


def test_program_missing_from_the_archive_is_a_build_error(platform: Platform) -> None:
    gateway = platform.urls["gateway"]
    spec = {
        "name": "missing-program",
        "runtime": "custom",
        "command": ["./server", "--port-from-env"],
        "source": {"files": {"server.pl": SERVER}},
    }
    assert http("POST", gateway + FUNCTIONS, spec)[0] == 202

    def failed() -> dict[str, object] | None:
        state = status_of(platform, "missing-program")
        return state if state.get("image_status") == "error" else None

    state = wait_for(failed, 60, "the build error")
    assert "server" in str(state["summary"])
    assert "command[0]" in str(state["summary"])
