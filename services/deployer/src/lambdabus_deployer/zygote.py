"""The deployer's side of `lambdabus_runtime.zygote`: one zygote (of the deployer's interpreter), from
which pre-started runtimes are forked into their slot's sandbox (see that module's doc for
what the fork does and why it is safe; `docs/design.md` for what it saves)."""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.procs import die_with_parent

log = logging.getLogger(__name__)

# The zygote's own command line (`-m`: the runtime's `retitle` keeps what comes before the
# flags it writes over the padding that follows).
_MODULE = "lambdabus_runtime.zygote"
_REPLY = 4096
# The sandbox's command while a forked runtime serves in it: it exits with the status the
# keeper writes (EOF: 1), and ignores the signals a graceful stop sends the sandbox's
# processes (the runtime drains, exits 0, and so does the placeholder). (Here, not in the
# zygote's module: the deployer need not import what the zygote imports.)
STUB = ("/bin/sh", "-c", 'trap "" TERM INT HUP; read -r code; exit "${code:-1}"')


class ZygoteError(LambdabusError):
    """The zygote cannot fork a runtime (it is gone, or refused): the pool starts it afresh."""

    code = "zygote_failed"
    status = 503


class Zygote:
    """One zygote process and its control socket; requests one at a time."""

    def __init__(self, python: str, pythonpath: Sequence[str], title_room: str) -> None:
        self.python = python
        self._pythonpath = list(pythonpath)
        self._title_room = title_room
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def _start(self) -> None:
        await self.aclose()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # On the loop's thread, once: the parent-death signal follows the thread that forks.
            self._process = subprocess.Popen(  # noqa: ASYNC220 - once per zygote
                [self.python, "-sSB", "-m", _MODULE, str(theirs.fileno()), self._title_room],
                # Not the deployer's streams: its keepers live as long as their instances, and
                # would hold the pipes a launcher reads the deployer's output from open.
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={
                    "PATH": "/usr/bin:/bin",
                    "LANG": "C.UTF-8",
                    "PYTHONPATH": ":".join(self._pythonpath),
                },
                cwd="/",
                pass_fds=[theirs.fileno()],
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self._control = ours
        loop = asyncio.get_running_loop()
        try:
            ready = await asyncio.wait_for(loop.sock_recv(ours, _REPLY), 10.0)
        except TimeoutError:
            ready = b""
        if not ready:
            await self.aclose()
            raise ZygoteError(f"the zygote ({self.python}) did not start")
        log.info("zygote started", extra={"pid": self._process.pid, "python": self.python})

    async def fork(self, request: dict[str, Any], fds: Sequence[int]) -> int:
        """Fork a runtime into the sandbox `request` names; the keeper's pid."""
        async with self._lock:
            if not self.alive:
                await self._start()
            control = self._control
            assert control is not None
            loop = asyncio.get_running_loop()
            payload = json.dumps(request).encode()
            try:
                control.sendmsg(
                    [payload],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())],
                )
                reply = await asyncio.wait_for(loop.sock_recv(control, _REPLY), 10.0)
            except (OSError, TimeoutError) as exc:
                await self.aclose()
                raise ZygoteError(f"the zygote did not answer: {exc!r}") from exc
            if not reply:
                await self.aclose()
                raise ZygoteError("the zygote ended")
            answer = json.loads(reply)
            if "error" in answer:
                raise ZygoteError(f"the zygote cannot fork: {answer['error']}")
            return int(answer["keeper"])

    async def fork_into(
        self, child_pid: int, request: dict[str, Any], fds: Sequence[int]
    ) -> tuple[int, int]:
        """Fork a runtime into the sandbox whose pid 1 is `child_pid` (`request` and `fds` as
        for `fork`, less the placeholder, which is found and pinned here); the keeper's and
        the placeholder's pids."""
        pid, pidfd = await placeholder(child_pid)
        try:
            return await self.fork({**request, "pid": pid}, [*fds, pidfd]), pid
        finally:
            os.close(pidfd)

    async def aclose(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        process, self._process = self._process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.to_thread(process.wait)


async def placeholder(child_pid: int, timeout: float = 2.0) -> tuple[int, int]:
    """The host pid of a sandbox's command (the only child of bubblewrap's pid 1), and a pidfd
    of it: the zygote checks, once it has opened what it needs of `/proc/<pid>`, that the
    process is still the one the pidfd names (a pid is not reused while its process lives)."""
    path = Path(f"/proc/{child_pid}/task/{child_pid}/children")
    deadline = time.monotonic() + timeout
    while True:
        try:
            children = path.read_text().split()
        except OSError as exc:
            raise ZygoteError(f"the sandbox's pid 1 ({child_pid}) is gone") from exc
        if children:
            break
        if time.monotonic() >= deadline:
            raise ZygoteError("the sandbox's command did not start")
        await asyncio.sleep(0.001)
    pid = int(children[0])
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise ZygoteError(f"the sandbox's command ({pid}) is gone") from exc
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if int(stat.rsplit(")", 1)[1].split()[1]) != child_pid:
            raise ZygoteError(f"{pid} is no longer the sandbox's command")
    except BaseException:
        os.close(pidfd)
        raise
    return pid, pidfd
