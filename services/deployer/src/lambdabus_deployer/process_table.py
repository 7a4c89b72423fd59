"""The instance processes this deployer started, kept in a file so that a deployer killed with
SIGKILL can, when it starts again, kill the instances it left behind.

Each record holds the pid and the process start time from `/proc/<pid>/stat`, so a pid the
kernel has since given to another process is never killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    start_time: int
    instance: str
    function: str
    revision: str
    scratch: str


def start_time(pid: int) -> int | None:
    """Start time of a live (not zombie) process in clock ticks since boot, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_running(record: ProcessRecord) -> bool:
    return start_time(record.pid) == record.start_time


class ProcessTable:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._records: dict[str, ProcessRecord] = {}

    def add(self, record: ProcessRecord) -> None:
        self._records[record.instance] = record
        self._save()

    def discard(self, instance: str) -> None:
        if self._records.pop(instance, None) is not None:
            self._save()

    def records(self) -> list[ProcessRecord]:
        return list(self._records.values())

    def load(self) -> list[ProcessRecord]:
        """The records a previous run left (none if the file is missing or unreadable)."""
        try:
            raw = json.loads(self.path.read_text())
            return [ProcessRecord(**item) for item in raw["processes"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"processes": [asdict(r) for r in self._records.values()]}))
        os.replace(tmp, self.path)

    def kill_leftovers(self, *, wait: float = 5.0) -> list[ProcessRecord]:
        """Kill the process groups of the recorded processes that still run; forget them all.
        Returns the records that were killed."""
        killed = [r for r in self.load() if is_running(r)]
        for record in killed:
            # The instance leads its own session (start_new_session): its group is its pid.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + wait
        while any(is_running(r) for r in killed) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._records.clear()
        self._save()
        return killed
