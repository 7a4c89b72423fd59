"""The shell every service runs in: structured logs, a NATS connection with the platform's
streams declared, a FastStream broker for event handlers, an HTTP listener with `/healthz` and
`/metrics`, and a clean stop on SIGTERM/SIGINT.

A service supplies a `setup` async context manager: it registers FastStream subscribers on
`ctx.broker`, routes on `ctx.app`, and owns whatever else it needs for its lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web
from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from faststream.nats.security import (
    NatsCredentials,
    NatsNKey,
    NatsSecurity,
    NatsToken,
    NatsUserPassword,
)
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError

from lambdabus_events.catalog import LifecycleEvent, parse_lifecycle
from lambdabus_platform.bus import Bus, tls_context
from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.jsonlog import configure_logging
from lambdabus_platform.replicas import REPLICAS_BUCKET, Heartbeat, beating, default_replica_id
from lambdabus_platform.settings import NatsSettings, ServiceSettings

log = logging.getLogger("lambdabus.service")


def _events_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(f"lambdabus.{name}.events")
    if not any(isinstance(f, EmptyFetchFilter) for f in logger.filters):
        logger.addFilter(EmptyFetchFilter())
    return logger


_RESTART_NOTICE = re.compile(r"callback for \S+ is being executed\.\.\.")


class EmptyFetchFilter(logging.Filter):
    """Drops FastStream's error report of an empty pull fetch. FastStream 0.7 suppresses nats-py's
    `nats.errors.TimeoutError` around `fetch`, but nats-py raises asyncio's plain `TimeoutError`
    when the deadline runs out between its two pull requests; FastStream's supervisor then logs
    an error and starts the fetch loop again. Nothing was lost: it is a fetch that found no
    message, and an idle platform must not log errors. Any other failure is still reported.
    The supervisor's info line announcing each such restart ("callback for Task-N is being
    executed...") is dropped too: an idle platform wrote one every few seconds."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and _RESTART_NOTICE.fullmatch(record.getMessage()):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            type(exc) is TimeoutError and "raised an exception, retrying" in record.getMessage()
        )


@dataclass
class Metrics:
    registry: CollectorRegistry
    http_requests: Counter
    http_duration: Histogram
    nats_connected: Gauge
    events_handled: Counter

    @classmethod
    def create(cls, service: str) -> Metrics:
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            http_requests=Counter(
                "lambdabus_http_requests",
                "HTTP requests answered",
                ["method", "route", "status"],
                registry=registry,
            ),
            http_duration=Histogram(
                "lambdabus_http_request_duration_seconds",
                "HTTP request latency",
                ["method", "route"],
                registry=registry,
                buckets=(
                    0.0005,
                    0.001,
                    0.0025,
                    0.005,
                    0.01,
                    0.025,
                    0.05,
                    0.1,
                    0.25,
                    0.5,
                    1,
                    2.5,
                    5,
                    10,
                ),
            ),
            nats_connected=Gauge(
                "lambdabus_nats_connected", "1 while connected to NATS", registry=registry
            ),
            events_handled=Counter(
                "lambdabus_events_handled",
                "events handled by this service's subscribers",
                ["type", "outcome"],
                registry=registry,
            ),
        )


@dataclass
class ServiceContext:
    name: str
    settings: ServiceSettings
    bus: Bus
    broker: NatsBroker
    app: web.Application
    metrics: Metrics
    # This replica's heartbeat; a service that elects a leader sets its role through it.
    heartbeat: Heartbeat
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    # A service's own server in front of aiohttp's (the router's data plane), set by its setup.
    front: FrontEnd | None = None


class FrontEnd(Protocol):
    """A protocol factory that wraps aiohttp's (`wrap`): it may serve some requests itself
    and hand a connection to aiohttp's protocol for the rest; `shutdown` ends its connections
    (after aiohttp's, within `timeout`)."""

    def wrap(self, fallback: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]: ...

    async def shutdown(self, timeout: float) -> None: ...


LifecycleHandler = Callable[[LifecycleEvent], Awaitable[None]]

# A lifecycle handler that fails is tried again after 1, 2, 4 … s (at most a minute), this many
# deliveries in all; then its message is terminated (logged, never delivered again).
MAX_DELIVERIES = 10
_BACKOFF_FIRST = 1.0
_BACKOFF_MAX = 60.0


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], *, again_after: float = 1.0) -> None:
    """Cancel `tasks` and wait until every one has ended. A cancellation can be lost: Python
    3.11's `asyncio.wait_for` returns the result of an inner task that finished in the same
    moment and drops the cancel (nats-py's requests use it). So a task still running after
    `again_after` seconds is cancelled again, instead of being waited for forever."""
    tasks = list(tasks)
    pending = {task for task in tasks if not task.done()}
    for task in pending:
        task.cancel()
    while pending:
        _, pending = await asyncio.wait(pending, timeout=again_after)
        for task in pending:
            task.cancel()
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: an ended task's error is its own business here


def redelivery_delay(deliveries: int) -> float:
    """Seconds before a message whose handler failed on its `deliveries`-th delivery comes
    again: 1, 2, 4, … capped at a minute."""
    return min(_BACKOFF_FIRST * 2.0 ** max(0, deliveries - 1), _BACKOFF_MAX)


@dataclass(frozen=True)
class LifecycleSubscription:
    """One durable subscription of a service to LIFECYCLE (the table: `eventapi.SUBSCRIPTIONS`,
    from which `schemas/asyncapi.json` is generated)."""

    service: str
    durable: str
    subject: str
    summary: str


def lifecycle_subscriber(
    broker: NatsBroker, subscription: LifecycleSubscription, *, inbox_prefix: str
) -> Any:
    """The FastStream subscriber of `subscription` on `broker` (a durable pull consumer on
    LIFECYCLE, explicit acks), without its handler."""
    return broker.subscriber(
        subscription.subject,
        stream=JStream("LIFECYCLE", declare=False),
        durable=subscription.durable,
        pull_sub=PullSub(batch_size=16, timeout=1.0),
        # FastStream's own default is `_INBOX.`: pulled messages come to this user's inbox.
        inbox_prefix=f"{inbox_prefix}.".encode(),
        ack_policy=AckPolicy.MANUAL,
        title=f"{subscription.service}:{subscription.durable}",
        description=subscription.summary,
    )


class Redeliver(Exception):
    """Raised by a lifecycle handler that may not handle the event here (a standby replica):
    the message is not acked but handed back for redelivery after `delay` seconds, to
    whichever replica pulls it next."""

    def __init__(self, why: str, *, delay: float = 0.5) -> None:
        super().__init__(why)
        self.delay = delay


def subscribe_lifecycle(
    ctx: ServiceContext,
    subscription: LifecycleSubscription,
    *,
    handler: LifecycleHandler,
    max_deliveries: int = MAX_DELIVERIES,
) -> None:
    """Register a FastStream subscriber on LIFECYCLE through a durable pull consumer.

    Replicas of a service share the durable name, so each event goes to one of them. Acks are
    explicit (`AckPolicy.MANUAL`): a handled event is acked; an event whose handler raises is
    nacked with a back-off delay (`redelivery_delay`) and JetStream delivers it again (handlers
    are idempotent); one that cannot succeed is terminated and logged: a message that is not a
    catalog event, a handler that raises a pydantic ValidationError (our own data is invalid),
    or `max_deliveries` failed deliveries.
    """
    sub = lifecycle_subscriber(
        ctx.broker, subscription, inbox_prefix=ctx.settings.nats.inbox_prefix
    )
    durable = subscription.durable

    async def _handle(msg: NatsMessage) -> None:
        raw = msg.raw_message
        where: dict[str, object] = {"subject": raw.subject, "consumer": durable}
        try:
            event = parse_lifecycle(msg.body)
        except ValidationError:
            log.warning("terminating a malformed lifecycle message", extra=where)
            ctx.metrics.events_handled.labels("unknown", "malformed").inc()
            await msg.reject()
            return
        deliveries = int(raw.metadata.num_delivered or 1)
        where = {**where, "type": event.type, "id": event.id, "deliveries": deliveries}
        try:
            await handler(event)
        except Redeliver as back:  # not an error: e.g. a standby hands the event back
            await msg.nack(delay=back.delay)
            return
        except ValidationError as exc:
            log.error(
                "terminating a lifecycle event its handler cannot take",
                extra={**where, "error": str(exc)},
            )
            ctx.metrics.events_handled.labels(event.type, "terminated").inc()
            await msg.reject()
            return
        except Exception as exc:
            if deliveries >= max_deliveries:
                log.exception("terminating a lifecycle event after its last delivery", extra=where)
                ctx.metrics.events_handled.labels(event.type, "terminated").inc()
                await msg.reject()
                return
            delay = redelivery_delay(deliveries)
            log.warning(
                "lifecycle handler failed; the event comes again",
                extra={**where, "error": repr(exc), "retry_in": delay},
            )
            ctx.metrics.events_handled.labels(event.type, "error").inc()
            await msg.nack(delay=delay)
            return
        ctx.metrics.events_handled.labels(event.type, "ok").inc()
        await msg.ack()

    sub(_handle)


@dataclass(frozen=True)
class RequestSubscription:
    """A NATS request/reply service (core NATS, a queue group its replicas share); the table:
    `eventapi.REQUESTS`."""

    service: str
    subject: str
    queue: str
    summary: str


def request_subscriber(broker: NatsBroker, subscription: RequestSubscription) -> Any:
    """The FastStream core subscriber of `subscription` on `broker`, without its handler."""
    return broker.subscriber(
        subscription.subject,
        queue=subscription.queue,
        title=f"{subscription.service}:{subscription.subject}",
        description=subscription.summary,
    )


def serve_requests(
    ctx: ServiceContext,
    subscription: RequestSubscription,
    *,
    handler: Callable[[bytes], Awaitable[bytes]],
) -> None:
    """Answer requests on `subscription.subject` with `handler` (request payload → reply
    payload), through a FastStream subscriber; replicas share the work through the queue group.
    The handler answers its own errors (a reply is always sent)."""
    sub = request_subscriber(ctx.broker, subscription)

    async def _answer(msg: NatsMessage) -> bytes:
        return await handler(msg.body)

    sub(_answer)


Setup = Callable[[ServiceContext], AbstractAsyncContextManager[None]]

SERVICE_KEY = web.AppKey("service", ServiceContext)


ERROR_HEADER = "X-Lambdabus-Error"


def error_response(error: LambdabusError) -> web.Response:
    """The platform's own error answer; the header tells it apart from a function's answer."""
    headers = {ERROR_HEADER: error.code}
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return web.json_response(error.to_json(), status=error.status, headers=headers)


@web.middleware
async def _observe(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map platform errors to JSON responses in one place, and count every request."""
    ctx = request.app[SERVICE_KEY]
    route = (
        request.match_info.route.resource.canonical
        if request.match_info.route.resource
        else "unmatched"
    )
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except LambdabusError as exc:
        status = exc.status
        return error_response(exc)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status >= 400 and exc.content_type != "application/json":
            code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
                exc.status, "http_error"
            )
            return web.json_response(
                {"error": {"code": code, "message": exc.reason}},
                status=exc.status,
                headers={
                    k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")
                },
            )
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path, "method": request.method})
        return web.json_response(
            {"error": {"code": "internal", "message": "internal error; see the service log"}},
            status=500,
            headers={ERROR_HEADER: "internal"},
        )
    finally:
        ctx.metrics.http_requests.labels(request.method, route, str(status)).inc()
        ctx.metrics.http_duration.labels(request.method, route).observe(
            time.perf_counter() - started
        )


async def _healthz(request: web.Request) -> web.Response:
    ctx = request.app[SERVICE_KEY]
    ok = ctx.bus.connected and not ctx.stopping.is_set()
    body = {
        "status": "ok" if ok else "unavailable",
        "service": ctx.name,
        "nats": "connected" if ctx.bus.connected else "disconnected",
    }
    return web.json_response(body, status=200 if ok else 503)


async def _metrics(request: web.Request) -> web.Response:
    ctx = request.app[SERVICE_KEY]
    ctx.metrics.nats_connected.set(1 if ctx.bus.connected else 0)
    return web.Response(
        body=generate_latest(ctx.metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


def make_app(*, client_max_size: int = 1024**2) -> web.Application:
    app = web.Application(middlewares=[_observe], client_max_size=client_max_size)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/metrics", _metrics)
    return app


async def serve(
    name: str,
    settings: ServiceSettings,
    setup: Setup,
    *,
    client_max_size: int = 1024**2,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run a service until `stop` is set (by SIGTERM/SIGINT when run from `run`)."""
    stop = stop or asyncio.Event()
    metrics = Metrics.create(name)
    async with Bus.connect(settings.nats, name=name) as bus:
        if settings.nats.declare:
            await bus.declare()
        broker = NatsBroker(
            settings.nats.url,
            security=broker_security(settings.nats),
            inbox_prefix=settings.nats.inbox_prefix,
            name=f"lambdabus-{name}-events",
            max_reconnect_attempts=-1,
            graceful_timeout=settings.shutdown_grace_seconds,
            logger=_events_logger(name),
        )
        app = make_app(client_max_size=client_max_size)
        heartbeat = Heartbeat(
            bus.kv(REPLICAS_BUCKET),
            name,
            settings.replica_id or default_replica_id(socket.gethostname(), os.getpid()),
            interval=settings.heartbeat_seconds,
        )
        ctx = ServiceContext(name, settings, bus, broker, app, metrics, heartbeat)
        app[SERVICE_KEY] = ctx
        async with setup(ctx):
            await broker.start()
            # The subscriptions are sent; a round trip makes sure the server has them before the
            # service says it is ready (else a first request may meet "no responders").
            await broker.connection.flush()
            runner = web.AppRunner(
                app,
                access_log=None,
                handle_signals=False,
                shutdown_timeout=settings.shutdown_grace_seconds,
            )
            await runner.setup()
            site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
            fronted: asyncio.Server | None = None
            try:
                if ctx.front is None:
                    await site.start()
                else:
                    assert runner.server is not None
                    fronted = await asyncio.get_running_loop().create_server(
                        ctx.front.wrap(runner.server),
                        settings.host,
                        settings.port,
                        reuse_address=True,
                    )
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                await runner.cleanup()
                await _stop_broker(broker, settings.shutdown_grace_seconds)
                raise PortInUse(name, settings.host, settings.port) from None
            if fronted is not None:
                port = int(fronted.sockets[0].getsockname()[1])
            else:
                port = _bound_port(runner) or settings.port
            url = f"http://{settings.host}:{port}"
            heartbeat.url = url
            log.info(
                "listening",
                extra={"url": url, "port": port, "event": "listening", "replica": heartbeat.id},
            )
            if on_ready is not None:
                on_ready(url)
            try:
                async with beating(heartbeat):
                    await stop.wait()
            finally:
                log.info("stopping", extra={"event": "stopping"})
                ctx.stopping.set()
                if fronted is not None:
                    fronted.close()
                await runner.cleanup()
                if ctx.front is not None:
                    await ctx.front.shutdown(settings.shutdown_grace_seconds)
                await _stop_broker(broker, settings.shutdown_grace_seconds)
    log.info("stopped", extra={"event": "stopped"})


class PortInUse(LambdabusError):
    """The service's port is held by another process."""

    def __init__(self, service: str, host: str, port: int) -> None:
        super().__init__(
            f"port {port} on {host} is already in use: set LAMBDABUS_{service.upper()}_PORT "
            "(LAMBDABUS_UP_" + service.upper() + "_PORT under 'lambdabus up') to a free port",
            code="port_in_use",
            details={"port": port, "host": host},
        )


def broker_security(settings: NatsSettings) -> NatsSecurity | None:
    """The same credentials and TLS as the bus's connection, in FastStream's terms."""
    ssl_context = tls_context(settings)
    tls: dict[str, Any] = {"ssl_context": ssl_context, "use_ssl": True if ssl_context else None}
    if settings.nkey_seed_file is not None:
        return NatsNKey.from_file(settings.nkey_seed_file, **tls)
    if settings.creds_file is not None:
        return NatsCredentials.from_file(settings.creds_file, **tls)
    if settings.user is not None:
        password = settings.password.get_secret_value() if settings.password else ""
        return NatsUserPassword(settings.user, password, **tls)
    if settings.token is not None:
        return NatsToken(settings.token.get_secret_value(), **tls)
    if ssl_context is not None:
        return NatsSecurity(**tls)
    return None


async def _stop_broker(broker: NatsBroker, grace: float) -> None:
    """Stop FastStream's subscribers and connection. Its graceful drain fails while NATS is
    unreachable; then close the connection without draining, so a service always stops."""
    try:
        await asyncio.wait_for(broker.stop(), grace)
    except Exception as exc:
        log.warning("event subscribers stopped without draining", extra={"error": repr(exc)})
        connection = getattr(broker, "_connection", None)  # FastStream has no public close-now
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)


def _bound_port(runner: web.AppRunner) -> int | None:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return None


def run(
    name: str,
    settings: ServiceSettings,
    setup: Setup,
    *,
    client_max_size: int = 1024**2,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
) -> int:
    """The `main` of a service process: logs, signals, serve, exit code. `loop_factory`: the
    event loop to run on (asyncio's default when None)."""
    configure_logging(name, settings.log_level)

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(name, settings, setup, client_max_size=client_max_size, stop=stop)

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_main())
    except PortInUse as exc:  # no restart cures it: the launcher stops on this exit code
        log.error("cannot start", extra={"code": exc.code, "error": exc.message, "exit": 78})
        return 78
    except LambdabusError as exc:
        log.error("cannot start", extra={"code": exc.code, "error": exc.message})
        return 1
    return 0


@contextlib.asynccontextmanager
async def no_setup(ctx: ServiceContext) -> AsyncIterator[None]:
    yield
