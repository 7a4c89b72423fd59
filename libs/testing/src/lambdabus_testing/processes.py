"""Processes for tests and benchmarks: started, ready by their own word (a JSON line such as
`{"event": "listening", ...}`), drained, and stopped (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def ready_process(
    *args: str,
    env: dict[str, str],
    stream: str,
    ready: str = "listening",
    start_timeout: float = 20.0,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, object]]]:
    """Start a process, wait for the JSON line whose `event` is `ready` on `stream` (stdout or
    stderr), keep draining its output, and stop it (SIGTERM, then SIGKILL) on exit."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    watched = proc.stdout if stream == "stdout" else proc.stderr
    other = proc.stderr if stream == "stdout" else proc.stdout
    tail: list[bytes] = []

    async def wait_ready() -> dict[str, object]:
        while line := await watched.readline():
            tail.append(line)
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == ready:
                    return record
        raise RuntimeError(
            f"{args[:3]} exited before it was ready:\n" + b"".join(tail[-20:]).decode()
        )

    async def drain(reader: asyncio.StreamReader) -> None:
        while await reader.readline():
            pass

    drains = [asyncio.create_task(drain(other))]
    try:
        record = await asyncio.wait_for(wait_ready(), start_timeout)
        drains.append(asyncio.create_task(drain(watched)))
        yield proc, record
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        for task in drains:
            task.cancel()
        await asyncio.gather(*drains, return_exceptions=True)
