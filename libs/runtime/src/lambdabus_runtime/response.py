"""`Response`: what a function returns to choose its status code and headers."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any


class Response:
    """A function's answer with an explicit status and headers.

    `body` is encoded like a plain return value: dict/list (or any JSON value but str)
    → JSON, str → text/plain, bytes → application/octet-stream, None → no body.
    A `Content-Type` in `headers` replaces the one chosen from the body.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        body: Any = None,
        status: int = 200,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        if type(status) is not int or not 200 <= status <= 599:
            raise ValueError(f"status must be an int from 200 to 599, not {status!r}")
        self.body = body
        self.status = status
        self.headers = headers

    def __repr__(self) -> str:
        return f"Response(status={self.status}, body={type(self.body).__name__})"
