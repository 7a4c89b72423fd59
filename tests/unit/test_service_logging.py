"""The service shell's logging: FastStream's report of an empty pull fetch is no error."""

from __future__ import annotations

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
