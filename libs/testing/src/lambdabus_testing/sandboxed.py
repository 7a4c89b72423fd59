"""What the benchmarks share to run the function runtime in the platform's sandbox as the
deployer starts it (bubblewrap, the runtime SDK bound read-only, the code at
/lambdabus/code, its socket in a dir of its own), without the platform around it: the spawn
baseline of `coldstart.py`, the direct target of `invoke.py`, the instances of `density.py`."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import lambdabus_runtime
from lambdabus_platform.sandbox import Bind, NetworkMode, SandboxSpec

RUNTIME_SRC = Path(lambdabus_runtime.__file__).resolve().parent.parent  # the SDK's src dir
SOCKET = "/run/lambdabus/http/sock"
FLAGS = ("--code", "/lambdabus/code", "--entrypoint", "lambda_main.py", "--socket", SOCKET)
ENV = (
    ("PATH", "/usr/bin:/bin"),
    ("PYTHONPATH", "/lambdabus/runtime"),
    ("PYTHONDONTWRITEBYTECODE", "1"),
    ("PYTHONUNBUFFERED", "1"),
    ("MALLOC_ARENA_MAX", "2"),
    ("HOME", "/tmp"),
)


def runtime_command(function: str) -> list[str]:
    """The runtime serving `function` (`ns/name`) on the socket, as the deployer starts it."""
    return [
        os.path.realpath(sys.executable),
        "-m",
        "lambdabus_runtime",
        *FLAGS,
        "--function",
        function,
    ]


def runtime_spec(
    code_dir: Path, socket_dir: Path, command: Sequence[str], *, network: NetworkMode = "none"
) -> SandboxSpec:
    """`command` in the sandbox: this Python's installation, the code and the runtime SDK bound
    read-only, `socket_dir` writable at the socket's dir."""
    return SandboxSpec(
        command=tuple(command),
        env=ENV,
        binds=(
            Bind(sys.base_prefix, sys.base_prefix),
            Bind(str(code_dir), "/lambdabus/code"),
            Bind(str(RUNTIME_SRC), "/lambdabus/runtime"),
            Bind(str(socket_dir), "/run/lambdabus/http", writable=True),
        ),
        network=network,
    )


async def first_answer(socket_path: Path) -> None:
    """One call on the runtime's socket; raises unless it answers 200."""
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    status = await reader.readline()
    await reader.read()
    writer.close()
    if b" 200 " not in status:
        raise RuntimeError(f"the sandboxed runtime answered {status!r}")
