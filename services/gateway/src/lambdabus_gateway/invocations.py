"""Asynchronous invocations (`Prefer: respond-async`): the gateway writes the record `queued` in
the `invocations` KV bucket, then queues the request on `lambdabus.events.i.<ns>.<function>`
for the router, which runs it (with retries), moves the record on and calls the callback.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import urlsplit

from aiohttp import web

from lambdabus_events.models import (
    DeliveryPolicy,
    FunctionRecord,
    InvocationRecord,
    InvocationRequest,
)
from lambdabus_gateway.invoke import HOP_BY_HOP
from lambdabus_gateway.uploads import read_body
from lambdabus_platform.bus import Bus, Kv
from lambdabus_platform.errors import InvalidRequest, NotFound, PayloadTooLarge, TemporaryError
from lambdabus_platform.subjects import invocation_key, invoke_subject

log = logging.getLogger("lambdabus.gateway.invocations")

CALLBACK_HEADER = "X-Callback-Url"
# Headers meant for the platform, not the function (never stored: the caller's token).
_PLATFORM_HEADERS = frozenset({"prefer", "authorization", CALLBACK_HEADER.lower()})
_HEADER_ROOM = 1024


def wants_async(prefer: Iterable[str]) -> bool:
    """Whether `Prefer` headers ask for `respond-async` (RFC 7240: tokens are
    case-insensitive, may carry `=value` and `;` parameters, several to a header)."""
    for header in prefer:
        for preference in header.split(","):
            token = preference.split(";", 1)[0].split("=", 1)[0].strip().lower()
            if token == "respond-async":
                return True
    return False


def callback_problem(url: str) -> str | None:
    """What is wrong with an `X-Callback-Url`, or None: it must be an absolute http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a malformed port
    except ValueError:
        return "is not a URL"
    del port
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname:
        return "has no host"
    if any(c.isspace() for c in url):
        return "must not contain spaces"
    return None


def invocation_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The end-to-end headers the function gets, a repeated header joined with commas (case
    of the first spelling kept); hop-by-hop and platform headers left out. Pure."""
    out: dict[str, str] = {}
    spelled: dict[str, str] = {}
    for key, value in headers:
        lower = key.lower()
        if lower in HOP_BY_HOP or lower in _PLATFORM_HEADERS:
            continue
        if lower in spelled:
            out[spelled[lower]] += f", {value}"
        else:
            spelled[lower] = key
            out[key] = value
    return out


def new_invocation_id() -> str:
    return uuid.uuid4().hex


class Invocations:
    def __init__(self, *, bus: Bus, kv: Kv, max_body: int) -> None:
        self._bus = bus
        self._kv = kv
        self._max_body = max_body

    async def submit(self, request: web.Request, function: FunctionRecord) -> InvocationRecord:
        """Record and queue the request; the record answers `queued` at once."""
        callback = request.headers.get(CALLBACK_HEADER)
        if callback is not None:
            problem = callback_problem(callback)
            if problem:
                raise InvalidRequest(
                    f"{CALLBACK_HEADER} {callback!r} {problem}", code="invalid_callback_url"
                )
        body = await read_body(request, self._max_body, "the invocation body")
        namespace, name = function.namespace, function.name
        invocation_id = new_invocation_id()
        queued = InvocationRequest(
            namespace=namespace,
            function=name,
            id=invocation_id,
            method="POST",
            path="/",
            query=request.query_string,
            headers=invocation_headers(request.headers.items()),
            body_base64=base64.b64encode(body).decode("ascii"),
            callback_url=callback,
            delivery=DeliveryPolicy(timeout=function.spec.timeout),
        )
        payload = queued.model_dump_json().encode()
        limit = self._bus.max_payload - _HEADER_ROOM
        if len(payload) > limit:
            raise PayloadTooLarge(
                f"an asynchronous invocation takes at most about {limit * 3 // 4} bytes of body; "
                f"this one is {len(body)}: invoke synchronously, or pass a reference to the data",
                details={"limit": limit * 3 // 4},
            )
        now = datetime.now(UTC)
        record = InvocationRecord(
            namespace=namespace,
            function=name,
            id=invocation_id,
            status="queued",
            callback_url=callback,
            created_at=now,
            updated_at=now,
        )
        key = invocation_key(namespace, invocation_id)
        await self._kv.create(key, record.model_dump_json().encode())
        try:
            await self._bus.publish(
                invoke_subject(namespace, name),
                payload,
                msg_id=invocation_id,
                headers={"Content-Type": "application/json"},
            )
        except TemporaryError:
            # Not queued: no record should say it is.
            await self._kv.delete(key)
            raise
        log.info(
            "invocation queued",
            extra={"namespace": namespace, "function": name, "invocation": invocation_id},
        )
        return record

    async def get(self, namespace: str, invocation_id: str) -> InvocationRecord:
        try:
            key = invocation_key(namespace, invocation_id)
        except ValueError:
            key = None
        entry = await self._kv.get(key) if key is not None else None
        if entry is None:
            raise NotFound(
                f"no invocation {invocation_id!r} in namespace {namespace}",
                code="invocation_not_found",
            )
        return InvocationRecord.model_validate_json(entry.value)
