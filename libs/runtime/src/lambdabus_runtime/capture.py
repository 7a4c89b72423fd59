"""Per-invocation log lines: what a function writes to stdout or stderr during an invocation
goes out as whole lines, each tagged with that invocation's id, never mixed with another
invocation's text within a line (two threads' `print` calls write their text and newline
separately, and would otherwise interleave).

`install()` puts a `TaggedStream` in place of `sys.stdout` and `sys.stderr`. Within
`invocation(id)` (a contextvar, carried into worker threads by `contextvars.copy_context`),
writes are buffered per invocation and stream until a newline; each complete line is written as
`MARK + id + END + text + "\\n"` in one write under one lock. The deployer's log capture takes
the tag off into the log record's `invocation` field. Writes outside an invocation (imports,
the runtime itself) pass through untouched. Standard library only.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, TextIO

MARK = "\x1e"  # ASCII record separator: a line that starts with it carries an invocation id
END = "\x1f"  # ASCII unit separator: ends the id
# An id taken from the request (the router's header or the event's ce-id) must be this safe.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/@+=-]{1,128}$")
HEADER = "x-lambdabus-invocation-id"

_lock = threading.Lock()


class _Pending:
    """One invocation's unfinished lines, per stream."""

    __slots__ = ("invocation", "parts")

    def __init__(self, invocation: str) -> None:
        self.invocation = invocation
        self.parts: dict[int, list[str]] = {}


_current: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar(
    "lambdabus_invocation", default=None
)


def invocation_id(headers: Mapping[str, str]) -> str:
    """The id of the invocation a request is: the router's `X-Lambdabus-Invocation-Id`, else
    the event's `ce-id`, else a new one (an id that is not plainly printable is replaced)."""
    for key in (HEADER, "ce-id"):
        value = headers.get(key)
        if value and _SAFE_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def current() -> str | None:
    pending = _current.get()
    return pending.invocation if pending is not None else None


def tag(invocation: str, text: str) -> str:
    return f"{MARK}{invocation}{END}{text}"


class TaggedStream:
    """A text stream in front of `raw` (sys.stdout or sys.stderr) that tags invocation lines."""

    def __init__(self, raw: TextIO, key: int) -> None:
        self._raw = raw
        self._key = key

    def write(self, text: str) -> int:
        pending = _current.get()
        if pending is None:
            with _lock:
                self._raw.write(text)
            return len(text)
        parts = pending.parts.setdefault(self._key, [])
        parts.append(text)
        if "\n" not in text:
            return len(text)
        whole = "".join(parts)
        parts.clear()
        done, _, rest = whole.rpartition("\n")
        if rest:
            parts.append(rest)
        out = "".join(tag(pending.invocation, line) + "\n" for line in done.split("\n"))
        with _lock:
            self._raw.write(out)
            self._raw.flush()
        return len(text)

    def finish(self, pending: _Pending) -> None:
        """Write what an invocation left without a newline, as a line of its own."""
        parts = pending.parts.pop(self._key, None)
        if parts:
            with _lock:
                self._raw.write(tag(pending.invocation, "".join(parts)) + "\n")
                self._raw.flush()

    def flush(self) -> None:
        with _lock:
            self._raw.flush()

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, buffer...
        return getattr(self._raw, name)


_streams: list[TaggedStream] = []


def install() -> None:
    """Put tagged streams in front of sys.stdout and sys.stderr (once)."""
    import sys

    if _streams:
        return
    out, err = TaggedStream(sys.stdout, 1), TaggedStream(sys.stderr, 2)
    _streams.extend((out, err))
    sys.stdout, sys.stderr = out, err


@contextlib.contextmanager
def invocation(invocation: str) -> Iterator[None]:
    """Tag what is written (in this context, and in the threads it is copied into) with
    `invocation`; unfinished lines are written when it ends."""
    pending = _Pending(invocation)
    token = _current.set(pending)
    try:
        yield
    finally:
        _current.reset(token)
        for stream in _streams:
            stream.finish(pending)
