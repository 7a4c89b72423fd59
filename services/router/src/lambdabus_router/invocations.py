"""Asynchronous invocations: the durable consumer `invocations` on `lambdabus.events.i.>`.

For each `InvocationRequest` the router moves the gateway's `InvocationRecord` on: `running`
(attempts + 1) before each call, then `succeeded` with the result, or `failed` with the error
once the delivery plan gives up (the record says it; nothing goes to the DLQ). The attempts are
counted in the record itself, so they survive a restart exactly. A function with no ready
instance keeps the request waiting, uncounted. The callback URL, when there is one, gets the
final record, best effort, in a task of its own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
from pydantic import ValidationError

from lambdabus_events.models import InvocationRecord, InvocationRequest
from lambdabus_platform.bus import Bus, Kv, PulledMessage
from lambdabus_platform.errors import Conflict, TemporaryError
from lambdabus_platform.subjects import INVOCATIONS_BUCKET, INVOKE_PREFIX, invocation_key
from lambdabus_router import plan
from lambdabus_router.calls import Answer, Caller, CallFailed, NoReadyInstance
from lambdabus_router.consumer import ConsumerLoop
from lambdabus_router.delivery import EVENTS_STREAM
from lambdabus_router.headers import is_hop_by_hop
from lambdabus_router.metrics import DeliveryMetrics
from lambdabus_router.settings import RouterSettings

log = logging.getLogger("lambdabus.router.invocations")

CONSUMER = "invocations"
ID_HEADER = "X-Lambdabus-Invocation-Id"
_NOT_FORWARDED = frozenset({"host", "content-length", "expect"})
_CAS_TRIES = 5
_FINISHED = ("succeeded", "failed")


# -- pure ---------------------------------------------------------------------------------------


def request_target(request: InvocationRequest) -> str:
    path = request.path if request.path.startswith("/") else "/" + request.path
    return f"{path}?{request.query}" if request.query else path


def request_headers(request: InvocationRequest) -> list[tuple[str, str]]:
    headers = [
        (name, value)
        for name, value in request.headers.items()
        if not is_hop_by_hop(name.lower()) and name.lower() not in _NOT_FORWARDED
    ]
    headers.append((ID_HEADER, request.id))
    return headers


def result_of(answer: Answer, limit: int) -> tuple[Any, str | None]:
    """(result, a note when it was not kept): JSON decoded when the answer is JSON (or says
    nothing of its type and parses as JSON), else text."""
    if not answer.complete or len(answer.body) > limit:
        return None, f"the result is larger than {limit} bytes; not kept"
    content_type = answer.header("Content-Type")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not answer.body:
        return None, None
    if media in ("", "application/json", "text/json") or media.endswith("+json"):
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            return json.loads(answer.body), None
    return answer.body.decode("utf-8", "replace"), None


# -- the shell ----------------------------------------------------------------------------------


class Invocations:
    def __init__(
        self, bus: Bus, caller: Caller, metrics: DeliveryMetrics, settings: RouterSettings
    ) -> None:
        self._bus = bus
        self._kv: Kv = bus.kv(INVOCATIONS_BUCKET)
        self._caller = caller
        self._metrics = metrics
        self._settings = settings
        self._callbacks: set[asyncio.Task[None]] = set()
        self._http: aiohttp.ClientSession | None = None
        self._loop = ConsumerLoop(
            bus,
            EVENTS_STREAM,
            CONSUMER,
            self.handle,
            limit=settings.invocations_max_in_flight,
            ensure=self.ensure,
            expires=settings.pull_expires_seconds,
        )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Invocations]:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            self._http = http
            self._loop.start()
            try:
                yield self
            finally:
                grace = self._settings.shutdown_grace_seconds
                await self._loop.stop(grace)
                if self._callbacks:
                    await asyncio.wait(set(self._callbacks), timeout=grace)
                for task in set(self._callbacks):
                    task.cancel()
                await asyncio.gather(*self._callbacks, return_exceptions=True)
                self._http = None

    def stop_fetching(self) -> None:
        self._loop.stop_fetching()

    async def ensure(self) -> None:
        await self._bus.ensure_consumer(
            EVENTS_STREAM,
            CONSUMER,
            filter_subjects=[f"{INVOKE_PREFIX}.>"],
            ack_wait=self._settings.invocations_ack_wait_seconds,
            max_ack_pending=self._settings.invocations_max_in_flight,
            description="asynchronous invocations",
        )

    # -- one request ------------------------------------------------------------------------

    async def handle(self, msg: PulledMessage) -> None:
        try:
            request = InvocationRequest.model_validate_json(msg.data)
            key = invocation_key(request.namespace, request.id)
            body = base64.b64decode(request.body_base64, validate=True)
        except (ValidationError, ValueError, binascii.Error) as exc:
            log.warning("dropping an invalid invocation request", extra={"error": str(exc)})
            await msg.ack()
            return
        ns, fn = request.namespace, request.function
        entry = await self._kv.get(key)
        record = InvocationRecord.model_validate_json(entry.value) if entry else None
        if record is None or record.status in ("succeeded", "failed"):
            await msg.ack()  # gone, or a duplicate of one already finished
            return
        policy = request.delivery
        if record.attempts > policy.retries:  # the router stopped during the last attempt
            await self._finish(
                key,
                msg,
                status="failed",
                error=record.error or f"gave up after {record.attempts} attempts",
            )
            return
        if not self._caller.ready((ns, fn)):
            await msg.nak(self._settings.wait_seconds)
            self._metrics.invocation(ns, fn, "waiting")
            return
        now = datetime.now(UTC)
        running = await self._update(
            key,
            lambda r: (
                None
                if r.status in _FINISHED
                else r.model_copy(
                    update={"status": "running", "attempts": r.attempts + 1, "updated_at": now}
                )
            ),
        )
        if running is None or running.status != "running":
            await msg.ack()
            return
        answer: Answer | None = None
        keepalive = self._keepalive(msg, policy.timeout)
        try:
            answer = await self._caller.call(
                (ns, fn),
                request.method,
                request_target(request),
                request_headers(request),
                body,
                timeout=policy.timeout,
            )
        except NoReadyInstance:
            # Gone between the check and the call: not an attempt after all.
            await self._update(
                key,
                lambda r: (
                    None
                    if r.status in _FINISHED
                    else r.model_copy(update={"attempts": max(0, r.attempts - 1)})
                ),
            )
            await msg.nak(self._settings.wait_seconds)
            return
        except CallFailed as exc:
            outcome: plan.Outcome = exc.kind
            detail = exc.message
        else:
            outcome = answer.status
            detail = ""
        finally:
            if keepalive is not None:
                keepalive.cancel()
        retry_after = plan.parse_retry_after(answer.header("Retry-After")) if answer else None
        action = plan.next_action(
            outcome,
            running.attempts,
            policy,
            retry_after,
            max_delay=self._settings.max_backoff_seconds,
        )
        if isinstance(action, plan.Retry):
            error = detail or f"attempt {running.attempts}: {action.reason}"
            await self._update(
                key,
                lambda r: None if r.status in _FINISHED else r.model_copy(update={"error": error}),
            )
            await msg.nak(action.delay)
            self._metrics.invocation(ns, fn, "retried")
            return
        fields: dict[str, Any] = {"error": None}
        if answer is not None:
            result, note = result_of(answer, self._settings.result_max_bytes)
            fields.update(
                result=result,
                result_status=answer.status,
                result_content_type=answer.header("Content-Type"),
            )
            if note is not None:
                fields["error"] = note
        if isinstance(action, plan.DeadLetter):
            fields["error"] = f"{action.message}: {detail}" if detail else action.message
            await self._finish(key, msg, status="failed", **fields)
        else:
            await self._finish(key, msg, status="succeeded", **fields)

    def _keepalive(self, msg: PulledMessage, timeout: float) -> asyncio.Task[None] | None:
        """Tell JetStream the request is being worked on while a call outlasts the ack wait."""
        interval = self._settings.invocations_ack_wait_seconds / 3
        if timeout < interval:
            return None

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval)
                with contextlib.suppress(TemporaryError):
                    await msg.in_progress()

        return asyncio.create_task(beat())

    async def _finish(self, key: str, msg: PulledMessage, *, status: str, **fields: Any) -> None:
        now = datetime.now(UTC)
        finished: list[InvocationRecord] = []

        def finish(r: InvocationRecord) -> InvocationRecord | None:
            if r.status in _FINISHED:  # a duplicate delivery finished it first
                return None
            done = r.model_copy(update={"status": status, "updated_at": now, **fields})
            finished.append(done)
            return done

        final = await self._update(key, finish)
        await msg.ack()
        if final is None or not finished:
            return
        self._metrics.invocation(final.namespace, final.function, status)
        log.info(
            "invocation finished",
            extra={
                "invocation": final.id,
                "function": f"{final.namespace}/{final.function}",
                "status": status,
                "attempts": final.attempts,
            },
        )
        if final.callback_url:
            task = asyncio.create_task(self._callback(final))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    async def _update(
        self, key: str, change: Callable[[InvocationRecord], InvocationRecord | None]
    ) -> InvocationRecord | None:
        """Compare-and-set `change` onto the record (a change of None leaves it as it is); the
        record then, or None when it is gone."""
        for _ in range(_CAS_TRIES):
            entry = await self._kv.get(key)
            if entry is None:
                return None
            current = InvocationRecord.model_validate_json(entry.value)
            proposed = change(current)
            if proposed is None:
                return current
            # Validate again: `model_copy(update=...)` does not.
            changed = InvocationRecord.model_validate(proposed.model_dump())
            try:
                await self._kv.update(key, changed.model_dump_json().encode(), entry.revision)
            except Conflict:
                continue
            return changed
        raise TemporaryError(f"invocation {key} keeps changing; retry")

    async def _callback(self, record: InvocationRecord) -> None:
        """POST the final record to its callback URL: a few tries, then give up (logged)."""
        assert record.callback_url is not None
        assert self._http is not None
        payload = record.model_dump_json().encode()
        timeout = aiohttp.ClientTimeout(total=self._settings.callback_timeout_seconds)
        error = ""
        for attempt in range(self._settings.callback_attempts):
            if attempt:
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
            try:
                async with self._http.post(
                    record.callback_url,
                    data=payload,
                    headers={"Content-Type": "application/json", ID_HEADER: record.id},
                    timeout=timeout,
                    allow_redirects=False,
                ) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        self._metrics.callback("delivered")
                        return
                    error = f"answered {response.status}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                error = repr(exc)
        self._metrics.callback("failed")
        log.warning(
            "invocation callback failed",
            extra={"invocation": record.id, "url": record.callback_url, "error": error},
        )
