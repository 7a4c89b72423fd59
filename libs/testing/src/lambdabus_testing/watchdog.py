"""A last line of defence for the test run: no test may hang it.

pytest-timeout (signal method) fails a test that overruns its timeout, once per test: a
teardown that then hangs (a loop that waits for a thread at close, a fixture that waits for
a process) has no timer left and would hold the run until CI's own limit, printing nothing.
Here, a watchdog thread watches each test's whole protocol (setup, call, teardown) for twice
its timeout plus a minute; past that it prints every thread's stack (`faulthandler`) to the
run's real stderr and ends the run. (Not `faulthandler.dump_traceback_later`: pytest cancels
that timer whenever a test fails, which is when a teardown hang begins.)

With `CI` set, a failing test's report is also printed when it fails, not only in the
summary at the end, so a run that is cut off still says what failed and why.

Loaded with `-p lambdabus_testing.watchdog` (pyproject's addopts), before output capture
starts: the stderr kept here is the terminal's, not a capture file.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Generator

import pytest

_STDERR = os.dup(sys.__stderr__.fileno()) if sys.__stderr__ is not None else None
GRACE_SECONDS = float(os.environ.get("PYTEST_WATCHDOG_GRACE", "60"))


class _Watchdog:
    """One daemon thread; `arm` sets the deadline of the test now running, `disarm` clears it."""

    def __init__(self, out: int) -> None:
        self._out = out
        self._lock = threading.Condition()
        self._deadline: float | None = None
        self._what = ""
        threading.Thread(target=self._watch, name="test watchdog", daemon=True).start()

    def arm(self, seconds: float, what: str) -> None:
        with self._lock:
            self._deadline, self._what = time.monotonic() + seconds, what
            self._lock.notify()

    def disarm(self) -> None:
        with self._lock:
            self._deadline = None
            self._lock.notify()

    def _watch(self) -> None:
        with self._lock:
            while True:
                if self._deadline is None:
                    self._lock.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._lock.wait(left)
                    continue
                message = f"\n---- {self._what} still runs past its watchdog: the run ends ----\n"
                os.write(self._out, message.encode(errors="replace"))
                faulthandler.dump_traceback(file=self._out, all_threads=True)
                os._exit(3)


_WATCHDOG = _Watchdog(_STDERR) if _STDERR is not None else None


def _timeout_of(item: pytest.Item) -> float:
    """pytest-timeout's timeout for the item: its marker, else `--timeout`, else the ini's."""
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    if marker is not None and "timeout" in marker.kwargs:
        return float(marker.kwargs["timeout"])
    option = item.config.getoption("timeout", None)
    if option is not None:
        return float(option)
    ini = item.config.getini("timeout")
    return float(ini) if ini else 0.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    timeout = _timeout_of(item)
    debugging = item.config.getoption("usepdb", False)  # a person at a pdb prompt
    armed = _WATCHDOG is not None and timeout > 0 and not debugging
    if _WATCHDOG is not None and armed:
        _WATCHDOG.arm(2 * timeout + GRACE_SECONDS, item.nodeid)
    try:
        return (yield)
    finally:
        if _WATCHDOG is not None and armed:
            _WATCHDOG.disarm()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and os.environ.get("CI") and _STDERR is not None:
        text = f"\n---- {report.nodeid} failed ({report.when}) ----\n{report.longreprtext}\n"
        os.write(_STDERR, text.encode(errors="replace"))
    return report
