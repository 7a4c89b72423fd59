"""Runtime `custom`: where its program may be (the spec's `command`), how the relay rewrites a
request's target and finds its body, and the instance argv the deployer renders (pure parts)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lambdabus_events.models import FunctionConfig, command_path, command_problem
from lambdabus_runtime.cli import UsageError, parse_args
from lambdabus_runtime.relay import body_framing, rewrite_target


@pytest.mark.parametrize(
    ("command", "problem"),
    [
        (["./server", "--flag"], None),
        (["bin/server"], None),
        ([], "needs command"),
        (["/usr/bin/perl"], "outside the archive"),
        (["../server"], "outside the archive"),
        (["bin/../../server"], "outside the archive"),
        (["bin\\..\\server"], "outside the archive"),
        (["./"], "names no file"),
        (["./srv\0"], "NUL"),
    ],
)
def test_command_problem(command: list[str], problem: str | None) -> None:
    found = command_problem("custom", command)
    assert found == problem if problem is None else problem in (found or "")


def test_command_only_with_runtime_custom() -> None:
    assert command_problem("python3.11", []) is None
    assert command_problem("python3.11", ["./x"]) == "command is only for runtime custom"
    with pytest.raises(ValidationError):
        FunctionConfig(runtime="nodejs20", command=["./server"])
    assert FunctionConfig(runtime="custom", command=["./server"]).command == ["./server"]
    assert command_path(["./bin//server", "-v"]) == "bin/server"


@pytest.mark.parametrize(
    ("target", "rewritten"),
    [
        (b"/default/fn", b"/"),
        (b"/default/fn/", b"/"),
        (b"/default/fn/a/b?x=1", b"/a/b?x=1"),
        (b"/default/fn?x=1", b"/?x=1"),
        (b"/default/fnx/a", b"/default/fnx/a"),
        (b"/healthz", b"/healthz"),
    ],
)
def test_rewrite_target(target: bytes, rewritten: bytes) -> None:
    assert rewrite_target(target, b"/default/fn") == rewritten


def test_body_framing() -> None:
    head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n"
    assert body_framing(head) == (12, False)
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert body_framing(chunked) == (0, True)
    assert body_framing(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == (0, False)


def test_runtime_cli_takes_the_command_as_json() -> None:
    base = ["--code", "/c", "--entrypoint", "server", "--function", "ns/fn", "--runtime", "custom"]
    options = parse_args([*base, "--command", '["./server", "--flag"]'])
    assert options.command == ["./server", "--flag"]
    for bad in ("./server", "[]", "[1]", '{"a": 1}'):
        with pytest.raises(UsageError):
            parse_args([*base, "--command", bad])
