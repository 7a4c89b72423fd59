"""The instance processes the deployer runs, kept in a file (in the state dir its replicas
share) so that the next leading deployer, after a graceful stop, a SIGKILL or a takeover, adopts
them (the same processes keep serving) and `--stop-instances` can stop them all.

Each record holds the pid and the process start time from `/proc/<pid>/stat`, so a pid the
kernel has since given to another process is never adopted nor killed; and what a new leader
needs to watch the instance: its sandbox's pid 1, socket dir and endpoint, its log files and
how far they were shipped, its cgroup's OOM count when it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    start_time: int
    instance: str
    function: str
    revision: str
    scratch: str
    child_pid: int | None = None  # a sandbox's pid 1 on the host
    socket_dir: str = ""
    endpoint: str = ""
    stdout: str = ""  # log files, and how far each was shipped
    stderr: str = ""
    stdout_offset: int = 0
    stderr_offset: int = 0
    status_file: str = ""  # bubblewrap's JSON status (the exit code)
    oom_baseline: int = 0
    restarts: int = 0
    ready: bool = False
    code_dir: str = ""  # a pooled run's own copy of its code (removed with it)

    @classmethod
    def parse(cls, item: dict[str, Any]) -> ProcessRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in item.items() if k in known})


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
        self._dirty = False
        self._saving = threading.RLock()

    def add(self, record: ProcessRecord) -> None:
        self._records[record.instance] = record
        self._save()

    def adopt(self, records: list[ProcessRecord]) -> None:
        """Take over records a previous leader wrote (they are ours to keep up to date)."""
        for record in records:
            self._records[record.instance] = record
        self._save()

    def update(self, instance: str, **changes: Any) -> None:
        """Change a record in memory; written by the next `flush` (offsets change often)."""
        record = self._records.get(instance)
        if record is not None:
            self._records[instance] = replace(record, **changes)
            self._dirty = True

    def flush(self) -> None:
        """Write the table if it changed; once this returns, what it held then is written
        (a save another thread is making meanwhile is waited for)."""
        with self._saving:
            if self._dirty:
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
            return [ProcessRecord.parse(item) for item in raw["processes"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _save(self) -> None:
        # The periodic flush runs in a worker thread while the event loop changes records and
        # may save too: one save at a time (the later one takes the newer records); the records
        # (immutable) are taken in one step, and a change made after it leaves the table dirty.
        with self._saving:
            self._dirty = False
            records = list(self._records.values())
            try:
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"processes": [asdict(r) for r in records]}))
                os.replace(tmp, self.path)
            except BaseException:
                self._dirty = True
                raise

    def kill_leftovers(self, *, wait: float = 5.0) -> list[ProcessRecord]:
        """Kill the process groups of the recorded processes that still run; forget them all.
        Returns the records that were killed."""
        killed = [r for r in self.load() if is_running(r)]
        for record in killed:
            kill_record(record)
        deadline = time.monotonic() + wait
        while any(is_running(r) for r in killed) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._records.clear()
        self._save()
        return killed


def kill_record(record: ProcessRecord) -> None:
    """SIGKILL a recorded instance: its sandbox's pid 1 (the whole pid namespace goes with it)
    and its process group (it leads its own session: its group is its pid)."""
    if record.child_pid is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(record.child_pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, signal.SIGKILL)
