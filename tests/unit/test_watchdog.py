"""The test run's watchdog (lambdabus_testing.watchdog): a teardown that hangs after its test
timed out ends the run, printing where every thread is, instead of holding CI until its limit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HANGING = """\
import asyncio
import threading

import pytest


@pytest.mark.timeout(1)
async def test_times_out_then_hangs_in_teardown(request):
    stuck = threading.Event()

    def teardown():
        while True:
            try:
                stuck.wait()
            except BaseException:
                pass  # deaf to pytest-timeout, as a loop waiting for a thread is

    request.addfinalizer(teardown)
    await asyncio.sleep(5)
"""


def test_a_teardown_that_hangs_after_a_timeout_ends_the_run(tmp_path: Path) -> None:
    (tmp_path / "test_hang.py").write_text(HANGING)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\naddopts = -p lambdabus_testing.watchdog -p no:cacheprovider\n"
        "asyncio_mode = auto\ntimeout = 1\n"
    )
    started = time.monotonic()
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(tmp_path / "test_hang.py")],
        cwd=tmp_path,
        env={**os.environ, "CI": "true", "PYTEST_WATCHDOG_GRACE": "2"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    took = time.monotonic() - started
    assert ran.returncode == 3, ran.stdout + ran.stderr
    assert took < 30
    # The failure, said when it happened; then the watchdog, with the stack of the hang.
    assert "test_times_out_then_hangs_in_teardown failed (call)" in ran.stderr
    assert "Timeout (>1.0s) from pytest-timeout" in ran.stderr
    assert "still runs past its watchdog: the run ends" in ran.stderr
    assert "in teardown" in ran.stderr
