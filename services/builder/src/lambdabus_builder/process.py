"""Running a build tool (uv, npm, node, the compile check) as a child process, or inside the
build sandbox: every output line handed on as it comes, the whole process group (or sandbox)
killed if the build is cancelled or times out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lambdabus_builder.errors import BuildFailure
from lambdabus_platform.sandbox import Sandbox, SandboxSpec, SandboxStartError, launch

Stream = Literal["stdout", "stderr"]
OnLine = Callable[[Stream, str], Awaitable[None]]

_LINE_LIMIT = 1024 * 1024  # bytes buffered for one line before it is cut
_MAX_LINE = 4096  # characters of one line handed on


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: tuple[str, ...]  # the last lines of each stream, for error messages
    stderr: tuple[str, ...]


async def run(
    argv: Sequence[str],
    *,
    cwd: Path,
    on_line: OnLine,
    env: dict[str, str] | None = None,
    keep: int = 40,
) -> Completed:
    """Run `argv` to its end, calling `on_line` for each output line in order of arrival per
    stream. A missing executable is a `BuildFailure("RuntimeUnavailable")`."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group, so that its children die with it
            limit=_LINE_LIMIT,
        )
    except FileNotFoundError as exc:
        raise BuildFailure(
            "RuntimeUnavailable", f"{argv[0]} is not installed on the builder machine"
        ) from exc
    return await _follow(process, tuple(argv), on_line, keep, lambda: _kill_group(process))


async def run_sandboxed(
    sandbox: Sandbox, spec: SandboxSpec, *, key: str, on_line: OnLine, keep: int = 40
) -> Completed:
    """`run`, inside the sandbox `spec` describes (as the host uid of `key`)."""
    try:
        handle = await launch(sandbox, spec, key=key)
    except (SandboxStartError, OSError) as exc:
        raise BuildFailure("InternalError", f"the build sandbox could not start: {exc}") from exc
    try:
        return await _follow(handle.piped, spec.command, on_line, keep, handle.kill)
    finally:
        await asyncio.shield(handle.close())


async def _follow(
    process: asyncio.subprocess.Process,
    argv: tuple[str, ...],
    on_line: OnLine,
    keep: int,
    kill: Callable[[], None],
) -> Completed:
    tails: dict[Stream, deque[str]] = {"stdout": deque(maxlen=keep), "stderr": deque(maxlen=keep)}

    async def pump(stream: Stream, reader: asyncio.StreamReader | None) -> None:
        assert reader is not None
        while True:
            try:
                raw = await reader.readline()
            except ValueError:  # a line longer than the buffer: what was read of it is dropped
                text = "[a line too long to show was cut]"
            else:
                if not raw:
                    return
                text = raw.decode(errors="replace").rstrip("\r\n")[:_MAX_LINE]
            tails[stream].append(text)
            await on_line(stream, text)

    try:
        await asyncio.gather(pump("stdout", process.stdout), pump("stderr", process.stderr))
        code = await process.wait()
    except BaseException:
        kill()
        with contextlib.suppress(BaseException):
            await asyncio.shield(process.wait())
        raise
    return Completed(argv, code, tuple(tails["stdout"]), tuple(tails["stderr"]))


def _kill_group(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
