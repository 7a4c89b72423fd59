"""One call of a function for the asynchronous paths (event deliveries, async invocations): a
ready instance picked like the synchronous path does (`table.pick`, sharing its in-flight
counts), the request over the router's HTTP/1.1 client, and either the answer or the kind of
error that kept one from coming back.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from lambdabus_router.plan import ErrorKind
from lambdabus_router.proxy import Router
from lambdabus_router.table import FunctionId, pick
from lambdabus_router.upstream import ConnectFailed, Upstream, UpstreamError

Headers = list[tuple[str, str]]

log = logging.getLogger("lambdabus.router.calls")


@dataclass(frozen=True, slots=True)
class Answer:
    """A function's answer. `complete` is False when the body was longer than the caller's
    limit: then `body` is empty (it was not kept)."""

    status: int
    headers: Headers
    body: bytes
    complete: bool = True

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for key, value in self.headers:
            if key.lower() == lower:
                return value
        return None


class NoReadyInstance(Exception):
    """The function has no ready instance now: nothing was sent."""


class CallFailed(Exception):
    """No answer came back; `kind` says why."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message


class Caller:
    """Calls functions through their ready instances, as the router's endpoints table has them."""

    def __init__(self, router: Router, upstream: Upstream, *, body_limit: int) -> None:
        self._router = router
        self._upstream = upstream
        self._limit = body_limit
        self._counter = itertools.count()

    def ready(self, fid: FunctionId) -> bool:
        state = self._router.table.get(fid)
        return state is not None and bool(state.endpoints)

    async def call(
        self,
        fid: FunctionId,
        method: str,
        target: str,
        headers: Headers,
        body: bytes,
        *,
        timeout: float,
    ) -> Answer:
        """Send the request to one ready instance (to a second one when the first refused the
        connection: nothing reached it) and read the answer within `timeout` seconds.
        NoReadyInstance when there is none, CallFailed when no answer came back."""
        state = self._router.table.get(fid)
        endpoints = state.endpoints if state is not None else []
        counter = next(self._counter)
        in_flight = self._router.in_flight
        endpoint = pick(endpoints, counter, in_flight)
        if endpoint is None:
            wake = self._router.wake
            if wake is not None and fid in self._router.autoscaled:
                # Scaled to zero: wake it; the delivery waits and comes back (no attempt).
                try:
                    await wake(fid)
                except Exception as exc:
                    log.warning("could not wake a function", extra={"error": str(exc)})
            raise NoReadyInstance(f"{fid[0]}/{fid[1]} has no ready instance")
        tried_another = False
        while True:
            in_flight[endpoint] += 1
            try:
                return await self._exchange(endpoint, method, target, headers, body, timeout)
            except ConnectFailed as exc:
                other = (
                    None if tried_another else pick(endpoints, counter, in_flight, exclude=endpoint)
                )
                if other is None:
                    raise CallFailed("connection_refused", f"{endpoint}: {exc}") from exc
                endpoint, tried_another = other, True
            except TimeoutError as exc:
                raise CallFailed("timeout", f"no answer within {timeout:g} s") from exc
            except UpstreamError as exc:
                raise CallFailed("connection_error", f"{endpoint}: {exc}") from exc
            except ValueError as exc:  # a header that cannot be sent (CR or LF in it)
                raise CallFailed("invalid_request", str(exc)) from exc
            finally:
                in_flight[endpoint] -= 1

    async def _exchange(
        self,
        endpoint: str,
        method: str,
        target: str,
        headers: Headers,
        body: bytes,
        timeout: float,
    ) -> Answer:
        response = await self._upstream.request(
            endpoint, method, target, headers, body, timeout=timeout, buffer_limit=self._limit
        )
        if response.body is not None:
            return Answer(response.status, response.headers, response.body)
        # Streamed: unsized, chunked, or longer than the limit. Keep it up to the limit.
        parts: list[bytes] = []
        size = 0
        while chunk := await response.read():
            size += len(chunk)
            if size > self._limit:
                response.close()
                return Answer(response.status, response.headers, b"", complete=False)
            parts.append(chunk)
        return Answer(response.status, response.headers, b"".join(parts))
