"""The process table that finds the instances a killed deployer left behind, and the
detection of bubblewrap."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lambdabus_deployer.process_table import ProcessRecord, ProcessTable, is_running, start_time
from lambdabus_platform.sandbox import SandboxUnavailable, detect_sandbox

# -- process table ---------------------------------------------------------------------------


def spawn_sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "30"], start_new_session=True)


def record_of(process: subprocess.Popen[bytes], started: int | None = None) -> ProcessRecord:
    began = start_time(process.pid) if started is None else started
    assert began is not None
    return ProcessRecord(
        pid=process.pid,
        start_time=began,
        instance=f"i-{process.pid}",
        function="default/hello",
        revision="abc",
        scratch="/nowhere",
    )


def test_leftovers_are_killed_but_a_reused_pid_is_spared(tmp_path: Path) -> None:
    orphan, stranger = spawn_sleeper(), spawn_sleeper()
    try:
        table = ProcessTable(tmp_path / "instances.json")
        table.add(record_of(orphan))
        # A record whose pid now belongs to another process: its start time differs.
        began = start_time(stranger.pid)
        assert began is not None
        table.add(record_of(stranger, started=began - 1))
        assert not is_running(record_of(stranger, started=began - 1))

        again = ProcessTable(tmp_path / "instances.json")  # the next run of the deployer
        assert {r.pid for r in again.load()} == {orphan.pid, stranger.pid}
        killed = again.kill_leftovers(wait=5)
        assert [r.pid for r in killed] == [orphan.pid]
        assert orphan.wait(5) == -9
        assert stranger.poll() is None
        assert again.load() == []
    finally:
        for process in (orphan, stranger):
            process.kill()
            process.wait()


def test_the_periodic_flush_in_a_thread_saves_whole_tables_while_records_change(
    tmp_path: Path,
) -> None:
    """The deployer flushes the table in a worker thread while its event loop adds, updates
    and discards records (and saves on its own): every save is a whole table, none fails, and
    the last one written holds what the table holds."""
    table = ProcessTable(tmp_path / "instances.json")
    base = ProcessRecord(
        pid=1, start_time=1, instance="i-0", function="default/f", revision="r", scratch="/x"
    )
    stop = threading.Event()
    errors: list[BaseException] = []

    def flusher() -> None:
        while not stop.is_set():
            try:
                table.flush()
            except BaseException as exc:
                errors.append(exc)
                return
            time.sleep(0.0002)

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        for i in range(2000):
            table.update(f"i-{i - 1}", stdout_offset=i)
            table.discard(f"i-{i - 8}")
            table.add(replace(base, instance=f"i-{i}", pid=i + 1))
    finally:
        stop.set()
        thread.join()
    assert errors == []
    table.flush()
    assert {r.instance for r in ProcessTable(table.path).load()} == {
        r.instance for r in table.records()
    }


def test_a_missing_or_broken_table_holds_nothing(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path / "instances.json")
    assert table.load() == []
    (tmp_path / "instances.json").write_text("{not json")
    assert table.load() == []
    assert table.kill_leftovers() == []


def test_start_time_of_a_dead_process_is_none() -> None:
    process = spawn_sleeper()
    assert start_time(process.pid) is not None
    process.kill()
    process.wait()
    assert start_time(process.pid) is None


# -- sandbox detection -----------------------------------------------------------------------


async def test_sandbox_can_be_turned_off() -> None:
    sandbox = await detect_sandbox("none")
    assert not sandbox.enabled
    assert "disabled by settings" in sandbox.reason


async def test_without_bwrap_auto_falls_back_and_bubblewrap_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("lambdabus_platform.sandbox.shutil.which", lambda name: None)
    sandbox = await detect_sandbox("auto")
    assert not sandbox.enabled
    assert sandbox.reason == "bubblewrap (bwrap) is not installed"
    with pytest.raises(SandboxUnavailable, match="install bubblewrap"):
        await detect_sandbox("bubblewrap")
