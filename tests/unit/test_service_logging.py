"""The service shell's logging: FastStream's report of an empty pull fetch is no error."""

from __future__ import annotations

import asyncio
import logging

import nats.errors
import pytest

from lambdabus_platform.service import EmptyFetchFilter

RETRYING = "Task-9 raised an exception, retrying...\nIf this behavior causes issues, ..."


def _record(message: str, exc: BaseException | None) -> logging.LogRecord:
    return logging.LogRecord(
        "lambdabus.builder.events",
        logging.ERROR,
        __file__,
        1,
        message,
        None,
        (type(exc), exc, None) if exc is not None else None,
    )


def test_an_empty_fetch_reported_as_an_error_is_dropped() -> None:
    assert not EmptyFetchFilter().filter(_record(RETRYING, TimeoutError()))


@pytest.mark.parametrize(
    ("message", "exc"),
    [
        (RETRYING, RuntimeError("boom")),  # a real failure of the fetch loop
        (RETRYING, nats.errors.NoServersError()),
        ("handler failed", TimeoutError()),  # a timeout that is not the supervisor's retry
        (RETRYING, None),
    ],
)
def test_every_other_error_is_kept(message: str, exc: BaseException | None) -> None:
    assert EmptyFetchFilter().filter(_record(message, exc))


def test_the_supervisors_restart_notice_is_dropped() -> None:
    """Each empty fetch restarts FastStream's fetch task, which it announces at info level:
    an idle platform logged one such line every few seconds, per subscriber."""
    record = _record("callback for Task-23 is being executed...", None)
    record.levelno, record.levelname = logging.INFO, "INFO"
    assert not EmptyFetchFilter().filter(record)
    assert EmptyFetchFilter().filter(_record("callback for the order handler failed", None))


async def test_stop_tasks_cancels_again_a_task_that_lost_its_cancellation() -> None:
    """Python 3.11's wait_for can drop a cancellation; stopping must not wait forever then."""
    from lambdabus_platform.service import stop_tasks

    cancels = 0

    async def deaf_once() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancels += 1
                if cancels >= 2:
                    raise
                # swallowed, as a lost cancellation is

    async def failing() -> None:
        raise ValueError("its own business")

    tasks = [asyncio.create_task(deaf_once()), asyncio.create_task(failing())]
    await asyncio.sleep(0)
    await asyncio.wait_for(stop_tasks(tasks, again_after=0.05), 5)
    assert all(task.done() for task in tasks)
    assert cancels == 2
