"""Instances that belong to the platform, not to a deployer process: what lets a deployer
start an instance that outlives it, and a later deployer watch, stop and read it.

- Its output goes to two log files (like a kubelet's container logs), not to pipes of the
  deployer: `LogFollower` reads one from a recorded offset, so the next leader goes on shipping
  from where the last one stopped; a file is truncated once read past `max_bytes`.
- `Running` is one run of the instance by pid (checked against its start time, so a reused pid
  is never taken for it): awaiting its exit through a pidfd when it is not our child, its exit
  code from bubblewrap's JSON status file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from lambdabus_deployer.process_table import start_time
from lambdabus_platform.sandbox import ChildProcess, members

# Seconds between looks at a log file that has nothing new: from FAST_POLL, doubling while
# idle up to SLOW_POLL (an idle instance costs the deployer little); FAST_POLL while `eager`
# (a starting instance's stdout, where its listening line is awaited).
FAST_POLL = 0.02
SLOW_POLL = 0.25


def open_log_file(path: Path) -> int:
    """The fd an instance writes one of its streams to (appending: a truncation by the reader
    makes the next write land at the start)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)


class LogFollower:
    """Reads an instance's log file like a pipe (`read` as `asyncio.StreamReader.read`): waits
    for more while the instance runs, ends (b"") once it has ended and all is read."""

    def __init__(
        self, path: Path, offset: int, ended: asyncio.Event, *, max_bytes: int, cap_bytes: int
    ) -> None:
        self.path = path
        self.offset = offset
        self.skipped = 0  # bytes cut away unread: the instance wrote faster than we ship
        self._ended = ended
        self._max = max_bytes
        self._cap = cap_bytes
        self._fd: int | None = None
        self.eager = False
        self.fast = FAST_POLL  # seconds between looks while eager

    def _open(self) -> int | None:
        if self._fd is None:
            with contextlib.suppress(OSError):
                self._fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
        return self._fd

    def _read(self, size: int) -> bytes:
        fd = self._open()
        if fd is None:
            return b""
        length = os.fstat(fd).st_size
        if length < self.offset:  # cut by someone else: start over
            self.offset = 0
        if length - self.offset > self._cap:
            self.skipped += length - self.offset
            os.ftruncate(fd, 0)
            self.offset = 0
            return b""
        data = os.pread(fd, size, self.offset)
        self.offset += len(data)
        if not data and self.offset >= self._max:
            os.ftruncate(fd, 0)  # all of it is shipped: the next write lands at 0
            self.offset = 0
        return data

    async def read(self, n: int = -1) -> bytes:
        size = n if n > 0 else 65536
        poll = self.fast
        while True:
            ended = self._ended.is_set()
            data = self._read(size)
            if data or ended:
                return data
            await asyncio.sleep(poll)
            poll = self.fast if self.eager else min(max(poll, FAST_POLL) * 2, SLOW_POLL)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def status_exit_code(path: str) -> int | None:
    """The command's exit code from bubblewrap's `--json-status-fd` output, if it wrote it."""
    with contextlib.suppress(OSError):
        for line in reversed(Path(path).read_text().splitlines()):
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict) and isinstance(item.get("exit-code"), int):
                    return int(item["exit-code"])
    return None


@dataclass
class Running:
    """One run of an instance: ours (`process`) or adopted from a previous deployer."""

    pid: int
    started: int  # its start time (clock ticks since boot)
    child_pid: int | None = None  # the sandbox's pid 1
    process: ChildProcess | None = None
    status_file: str = ""
    returncode: int | None = field(default=None, init=False)
    _ended: bool = field(default=False, init=False)

    @property
    def alive(self) -> bool:
        if self.process is not None:
            return self.process.returncode is None
        return not self._ended and start_time(self.pid) == self.started

    async def wait(self) -> int | None:
        """Wait for the run's end; its exit code when known."""
        if self.process is not None:
            self.returncode = await self.process.wait()
            return self.returncode
        try:
            fd = os.pidfd_open(self.pid)
        except OSError:
            fd = None
        if fd is not None:
            try:
                if start_time(self.pid) == self.started:
                    loop = asyncio.get_running_loop()
                    gone: asyncio.Future[None] = loop.create_future()

                    def _gone() -> None:
                        if not gone.done():
                            gone.set_result(None)

                    loop.add_reader(fd, _gone)
                    try:
                        await gone
                    finally:
                        loop.remove_reader(fd)
            finally:
                os.close(fd)
        else:
            while start_time(self.pid) == self.started:  # noqa: ASYNC110 (no pidfd here)
                await asyncio.sleep(0.2)
        self._ended = True
        self.returncode = status_exit_code(self.status_file) if self.status_file else None
        return self.returncode

    def signal_payload(self, sig: int) -> None:
        """Signal the command (sandboxed: the sandbox's processes, not bubblewrap, which would
        not pass it on; else its process group)."""
        if not self.alive:
            return
        if self.child_pid is not None:
            for pid in members(self.child_pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL all of it: the sandbox's pid 1 (its pid namespace goes with it), the group."""
        if not self.alive:
            return
        if self.child_pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.child_pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
