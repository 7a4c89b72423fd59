"""The synchronous data plane: `ANY /{ns}/{name}/{path...}` relayed to a ready instance.

The request goes out as it came (method, raw path and query, end-to-end headers plus
`X-Forwarded-*`, body) over a pooled keep-alive connection of the router's own HTTP/1.1 client
(`upstream`); the response comes back the same way. The body is buffered up to
`max_body_bytes`, so a connection refused by one instance can be retried on another: nothing of
the request reached the first one. Nothing else is ever retried: an instance that closed the
connection after the request went out may have run it (502 `instance_disconnected`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import random
import secrets
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from http import HTTPStatus

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import ValidationError

from lambdabus_events.models import (
    DeploymentState,
    FunctionRevisions,
    InstanceStarting,
    RevisionDeployment,
)
from lambdabus_events.names import label_problem
from lambdabus_events.traffic import Route, choose, effective
from lambdabus_platform.bus import Kv
from lambdabus_platform.errors import (
    InvalidName,
    InvalidRequest,
    LambdabusError,
    NotFound,
    PayloadTooLarge,
    TemporaryError,
)
from lambdabus_platform.httpauth import (
    Authenticator,
    auth_error_response,
    authorize,
    client_address,
)
from lambdabus_platform.service import ERROR_HEADER, error_response
from lambdabus_platform.tokens import Action
from lambdabus_router.headers import request_headers, response_headers
from lambdabus_router.load import LoadReporter
from lambdabus_router.metrics import InvocationMetrics
from lambdabus_router.settings import RouterSettings
from lambdabus_router.stats import CallStats
from lambdabus_router.table import (
    FunctionId,
    Table,
    apply,
    apply_known,
    apply_protected,
    autoscaled_of,
    concurrency_of,
    load,
    load_known,
    load_protected,
    parse_key,
    pick,
    quota_concurrency,
)
from lambdabus_router.upstream import (
    ConnectFailed,
    Disconnected,
    Response,
    StaleConnection,
    Upstream,
    UpstreamError,
    resendable,
    unix_path,
)

log = logging.getLogger("lambdabus.router")

INVOCATION_HEADER = "X-Lambdabus-Invocation-Id"
COLD_START_HEADER = "X-Lambdabus-Cold-Start"  # the runtime's, on an instance's first answer
_COLD_START_LOWER = COLD_START_HEADER.lower()
REVISION_HEADER = "X-Lambdabus-Revision"
# Request headers never relayed to an instance: the router sets its own invocation id, and a
# protected function never sees the platform token its caller showed the router.
_DROP = frozenset({INVOCATION_HEADER.lower()})
_DROP_PROTECTED = _DROP | {"authorization"}

_NO_BODY = b""
# How often a held request tries an announced endpoint until the runtime there accepts (a
# pooled runtime takes a few ms; a try is one connect(2) that fails at once), then less often.
STARTING_POLL_SECONDS = 0.0005
STARTING_POLL_MAX_SECONDS = 0.01


class BodyTooLarge(Exception):
    pass


class Router:
    """The endpoints table (kept by two KV watchers) and the request handler that uses it."""

    def __init__(
        self,
        settings: RouterSettings,
        metrics: InvocationMetrics,
        auth: Authenticator | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.auth = auth
        self.table: Table = {}
        self.known: frozenset[FunctionId] = frozenset()
        # Functions with `invoke_auth: token`: a caller needs a token that may invoke there.
        self.protected: frozenset[FunctionId] = frozenset()
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        self._least_loaded = settings.balance == "least_in_flight"
        self._counter = 0
        self._ids = random.Random(secrets.randbits(128))
        # requests served by the router's own server, and connections it gave to aiohttp
        self.served_by_front = 0
        self.handed_off = 0
        # requests in flight per (function, revision): the autoscaler's per-revision input
        self.revision_in_flight: defaultdict[tuple[FunctionId, str], int] = defaultdict(int)
        self._session: aiohttp.ClientSession | None = None
        self._upstream: Upstream | None = None
        self._limit = settings.max_body_bytes
        self._changed = asyncio.Condition()
        # Admission: per-function `max_concurrency` and the per-namespace quota on concurrent
        # invocations, against counters of what is open now (no I/O on the request path).
        self.max_concurrency: dict[FunctionId, int] = {}
        self.namespace_limits: dict[str, int] = {}
        self._default_namespace_limit = settings.quota.max_concurrent_invocations
        self.active: defaultdict[FunctionId, int] = defaultdict(int)
        self.namespace_active: defaultdict[str, int] = defaultdict(int)
        self._retry_after = settings.busy_retry_after_seconds
        self.stats: CallStats | None = None  # per-function statistics, when published
        self.load: LoadReporter | None = None  # the autoscaler's input, when published
        # Scale from zero: functions with `spec.scale`, whose requests are held while no
        # instance runs (at most `cold_queue_max_requests` each) and who are woken by `wake`.
        self.autoscaled: set[FunctionId] = set()
        self.wake: Callable[[FunctionId], Awaitable[None]] | None = None
        self.held: defaultdict[FunctionId, int] = defaultdict(int)
        # Where an instance of a held function is about to listen (`on_starting`), while some
        # request is held for it: tried before the state says it is ready.
        self.starting: dict[FunctionId, InstanceStarting] = {}
        self._probes: dict[FunctionId, tuple[InstanceStarting, asyncio.Future[bool]]] = {}
        # `spec.concurrency`: requests in flight per instance at most; more wait for a slot.
        self.per_instance: dict[FunctionId, int] = {}
        self._freed: dict[FunctionId, asyncio.Event] = {}
        # Revisions (issue 11): each function's route (`revisions` KV) and the endpoints of the
        # revisions run apart from its latest one (`revision-deployments` KV).
        self._revision_kvs: tuple[Kv, Kv] | None = None
        self.routes: dict[FunctionId, FunctionRevisions] = {}
        self.pinned: dict[FunctionId, dict[str, list[str]]] = {}
        self._route_cache: dict[
            FunctionId,
            tuple[
                FunctionRevisions | None,
                DeploymentState | None,
                dict[str, list[str]] | None,
                Route | None,
                Mapping[str, list[str]],
            ],
        ] = {}

    # -- lifetime ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(
        self,
        deployments: Kv,
        functions: Kv,
        quotas: Kv | None = None,
        revisions: tuple[Kv, Kv] | None = None,
    ) -> AsyncIterator[Router]:
        """Load both tables, follow them, and own the HTTP clients, for the router's life: the
        data plane's `Upstream`, and an aiohttp session for other calls to instances."""
        s = self.settings
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=s.pool_size_per_instance,
            keepalive_timeout=s.keepalive_seconds,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            # Send the caller's headers and nothing the client library would add of its own.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )
        follower: asyncio.Task[None] | None = None
        self._revision_kvs = revisions
        try:
            async with Upstream(
                pool_size=s.pool_size_per_instance,
                connect_timeout=s.connect_timeout_seconds,
                keepalive=s.keepalive_seconds,
            ) as self._upstream:
                await self._load(deployments, functions, quotas)
                follower = asyncio.create_task(self._follow(deployments, functions, quotas))
                yield self
        finally:
            if follower is not None:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower
            probes = [task for _, task in self._probes.values()]
            for task in probes:
                task.cancel()
            await asyncio.gather(*probes, return_exceptions=True)
            self._upstream = None
            await self._session.close()
            self._session = None

    async def _load(self, deployments: Kv, functions: Kv, quotas: Kv | None) -> None:
        """Replace the tables with the buckets' current values."""
        records = [(e.key, e.value) for e in await functions.values(">")]
        self.protected = load_protected(records)
        self._set_known(load_known(records))
        self.max_concurrency = {}
        self.autoscaled = set()
        self.per_instance = {}
        for key, value in records:
            self._on_limit(key, value)
        if quotas is not None:
            self.namespace_limits = {}
            for entry in await quotas.values(">"):
                self._on_quota(entry.key, entry.value)
        self.table = load((e.key, e.value) for e in await deployments.values(">"))
        if self._revision_kvs is not None:
            self.routes, self.pinned = {}, {}
            routes, pinned = self._revision_kvs
            for entry in await routes.values(">"):
                self._on_route(entry.key, entry.value)
            for entry in await pinned.values(">"):
                self._on_pinned(entry.key, entry.value)
        log.info(
            "endpoints loaded",
            extra={"functions": len(self.known), "deployments": len(self.table)},
        )
        await self._notify()

    async def _follow(self, deployments: Kv, functions: Kv, quotas: Kv | None) -> None:
        """Follow both buckets for the router's life. Should a watch end, both tables are
        loaded afresh before watching again, so nothing missed meanwhile lingers."""
        loop = asyncio.get_running_loop()
        delay = 0.1
        while True:
            opened = loop.time()
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._watch(deployments, self._on_deployment))
                    group.create_task(self._watch(functions, self._on_function))
                    if quotas is not None:
                        group.create_task(self._watch(quotas, self._on_quota))
                    if self._revision_kvs is not None:
                        group.create_task(self._watch(self._revision_kvs[0], self._on_route))
                        group.create_task(self._watch(self._revision_kvs[1], self._on_pinned))
            except* Exception as errors:
                log.warning("KV watch failed; re-opening", exc_info=errors)
            # Back off while watches keep failing at once; start over after a long run.
            delay = 0.1 if loop.time() - opened > 60 else min(delay * 2, 5.0)
            await asyncio.sleep(delay)
            with contextlib.suppress(Exception):
                await self._load(deployments, functions, quotas)
                delay = 0.1

    async def _watch(self, kv: Kv, on_entry: Callable[[str, bytes], None]) -> None:
        async for entry in kv.watch(">"):
            on_entry(entry.key, entry.value)
            await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, predicate: Callable[[Router], bool]) -> None:
        """Wait until the tables satisfy `predicate` (for tests and tools: the router says
        when it has seen a change, nobody polls)."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def on_starting(self, subject: str, payload: bytes) -> None:
        """A deployer's `InstanceStarting` (core NATS `lambdabus.starting.<ns>.<fn>`): kept
        while some request is held for that function (else nobody needs it)."""
        try:
            notice = InstanceStarting.model_validate_json(payload)
        except ValidationError:
            log.warning("ignoring a starting notice that does not parse")
            return
        fid = (notice.namespace, notice.name)
        if subject.split(".")[2:] != list(fid):
            log.warning("ignoring a starting notice of another subject", extra={"subject": subject})
            return
        if self.held.get(fid, 0) > 0:
            self.starting[fid] = notice
            await self._notify()

    def _on_deployment(self, key: str, value: bytes) -> None:
        self.table = apply(self.table, key, value)
        if value and parse_key(key) not in self.table:
            log.warning("ignoring a deployments entry that is not a state", extra={"key": key})

    def _on_route(self, key: str, value: bytes) -> None:
        fid = parse_key(key)
        if fid is None:
            return
        try:
            doc = FunctionRevisions.model_validate_json(value) if value else None
        except ValidationError:
            doc = None
        if doc is None:
            self.routes.pop(fid, None)
            self._route_cache.pop(fid, None)
        else:
            self.routes[fid] = doc

    def _on_pinned(self, key: str, value: bytes) -> None:
        function, _, revision = key.rpartition(".")
        fid = parse_key(function)
        if fid is None or not revision:
            return
        try:
            item = RevisionDeployment.model_validate_json(value) if value else None
        except ValidationError:
            item = None
        found = dict(self.pinned.get(fid, {}))  # a new mapping: the route cache sees it moved
        if item is None or not item.endpoints:
            found.pop(revision, None)
        else:
            found[revision] = list(item.endpoints)
        self.pinned[fid] = found

    def _route(
        self, fid: FunctionId, state: DeploymentState | None
    ) -> tuple[Route | None, Mapping[str, list[str]]]:
        """The function's route as it applies now and the endpoints per ready revision,
        computed again only when the route, the state or the run-apart endpoints moved."""
        doc, pinned = self.routes.get(fid), self.pinned.get(fid)
        cached = self._route_cache.get(fid)
        if cached is not None and cached[0] is doc and cached[1] is state and cached[2] is pinned:
            return cached[3], cached[4]
        endpoints: dict[str, list[str]] = dict(pinned or {})
        latest: str | None = None
        if state is not None and state.endpoints:
            latest = state.revision or None
            endpoints[state.revision] = state.endpoints
        route: Route | None = None
        if doc is not None and (state is None or doc.uid == state.uid):
            route = effective(doc.traffic, latest, [r for r, e in endpoints.items() if e and r])
        self._route_cache[fid] = (doc, state, pinned, route, endpoints)
        return route, endpoints

    def _revision_endpoints(
        self, fid: FunctionId, state: DeploymentState | None, tag: str | None
    ) -> tuple[str, list[str]] | None:
        """The revision this request goes to and its endpoints, by the function's route; None
        for a tag the route does not name."""
        route, endpoints = self._route(fid, state)
        if route is None:
            if tag is not None:
                return None
            return (state.revision, state.endpoints) if state is not None else ("", [])
        if tag is not None:
            name = route.tags.get(tag)
            return (name, endpoints.get(name, [])) if name is not None else None
        name = choose(route.weights, self._counter)
        if name is None:
            return (state.revision, state.endpoints) if state is not None else ("", [])
        return name, endpoints.get(name, [])

    def _on_function(self, key: str, value: bytes) -> None:
        self.protected = apply_protected(self.protected, key, value)
        self._set_known(apply_known(self.known, key, value))
        self._on_limit(key, value)

    def _on_limit(self, key: str, value: bytes) -> None:
        fid = parse_key(key)
        if fid is None:
            return
        autoscaled, per_instance = autoscaled_of(value)
        if autoscaled:
            self.autoscaled.add(fid)
        else:
            self.autoscaled.discard(fid)
        if per_instance:
            self.per_instance[fid] = per_instance
        else:
            self.per_instance.pop(fid, None)
        limit = concurrency_of(value)
        if limit is None:
            self.max_concurrency.pop(fid, None)
        else:
            self.max_concurrency[fid] = limit

    def _on_quota(self, key: str, value: bytes) -> None:
        limit = quota_concurrency(value)
        if limit is None:
            self.namespace_limits.pop(key, None)
        else:
            self.namespace_limits[key] = limit

    def _set_known(self, known: frozenset[FunctionId]) -> None:
        for fid in self.known - known:
            self.metrics.forget(*fid)
        self.known = known

    # -- the data plane ---------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{ns}/{name}", self.handle)
        app.router.add_route("*", "/{ns}/{name}/{tail:.*}", self.handle)

    def new_id(self) -> str:
        """A fresh invocation id: 128 random bits as 32 hex digits (from a generator seeded
        from the OS, so no syscall per request; ids need to be unique, not secret)."""
        return f"{self._ids.getrandbits(128):032x}"

    def new_call(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        client: str | None,
        host: str | None,
        tag: str | None,
        body: bytes,
    ) -> Call:
        """A call parsed by the router's own server (`front`), body read."""
        return Call(method, target, headers, client, host, "http", tag, self.new_id(), body)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The data plane behind aiohttp: what `front` does not take (protected functions,
        unknown ones, chunked or large bodies, HEAD, HTTP/1.0, encoded paths...)."""
        started = time.perf_counter()
        # Every invocation has an id: the function's runtime tags the lines it writes with it,
        # and the caller reads it on the answer (`lambdabus logs NAME --invocation ID`).
        info = request.match_info
        name, at, tag = info["name"].partition("@")
        fid = (info["ns"], name)
        call = Call(
            request.method,
            request.raw_path,
            list(request.headers.items()),
            request.remote,
            request.host,
            request.scheme,
            tag if at else None,
            self.new_id(),
            None,
            functools.partial(self._read_body, request),
        )
        refused = await self._check_token(request, fid) if fid in self.protected else None
        if refused is not None:  # before admission: a refused caller takes no slot
            refused.headers[INVOCATION_HEADER] = call.invocation
            self.observe(fid, refused.status, started, cold=False)
            return refused
        reply = await self.dispatch(call, fid)
        self.observed(fid, reply, started)
        if reply.upstream is None:
            response = web.Response(
                status=reply.status, reason=reply.reason, headers=reply.headers, body=reply.body
            )
            response.headers[INVOCATION_HEADER] = call.invocation
            if call.revision:
                response.headers[REVISION_HEADER] = call.revision
            return response
        return await self._stream(request, call, reply)

    async def dispatch(self, call: Call, fid: FunctionId) -> Reply:
        """One invocation, whichever server took it: admission, revision, instance, answer.
        The server counts it (`observed`) once the answer went out."""
        if fid in self.known:
            return await self._admitted(call, fid)
        return _error_reply(_unknown(fid))

    def start(self, call: Call, fid: FunctionId, done: Callable[[Reply], None]) -> bool:
        """`dispatch` without a coroutine, for the common case: the function is admitted, has a
        ready instance of the chosen revision with an idle pooled connection, and no limit of
        requests per instance. Then the request is written at once and True returned; `done`
        gets the reply (from a callback of the upstream future). False when anything would
        need waiting or an error answer: nothing was counted or sent, use `dispatch`."""
        upstream = self._upstream
        body = call.body
        if upstream is None or body is None or fid not in self.known or fid in self.per_instance:
            return False
        state = self.table.get(fid)
        if state is None or not state.endpoints:
            return False
        active = self.active[fid]
        limit = self.max_concurrency.get(fid)
        if limit is not None and active >= limit:
            return False
        ns = fid[0]
        in_namespace = self.namespace_active[ns]
        if in_namespace >= self.namespace_limits.get(ns, self._default_namespace_limit):
            return False
        chosen = self._revision_endpoints(fid, state, call.tag)
        if chosen is None or not chosen[1]:
            return False
        revision, endpoints = chosen
        counter = self._counter + 1
        in_flight = self.in_flight
        endpoint = pick(endpoints, counter, in_flight if self._least_loaded else None)
        if endpoint is None:
            return False
        headers = request_headers(
            call.headers,
            client=call.client,
            host=call.host,
            proto=call.scheme,
            drop=_DROP_PROTECTED if fid in self.protected else _DROP,
        )
        headers.append((INVOCATION_HEADER, call.invocation))
        key = (fid, revision)
        answered = functools.partial(self._answered, call, fid, state, endpoint, key, done)
        # Counted before the request goes out: its answer may come back at any time after.
        self.active[fid] = active + 1
        self.namespace_active[ns] = in_namespace + 1
        in_flight[endpoint] += 1
        self.revision_in_flight[key] += 1
        sent = False
        with contextlib.suppress(ValueError):  # a CR or LF in a header: `dispatch` answers 400
            sent = upstream.start(
                endpoint,
                call.method,
                call.target,
                headers,
                body,
                timeout=state.timeout + self.settings.timeout_margin_seconds,
                buffer_limit=self.settings.buffer_response_bytes,
                answered=answered,
            )
        if not sent:
            self._release(fid, key)
            in_flight[endpoint] -= 1
            return False
        self._counter = counter
        call.revision = revision
        if self.load is not None:
            self.load.arrived(fid)
        return True

    def _release(self, fid: FunctionId, key: tuple[FunctionId, str]) -> None:
        self.active[fid] -= 1
        self.namespace_active[fid[0]] -= 1
        by_revision = self.revision_in_flight
        left = by_revision[key] - 1
        if left:
            by_revision[key] = left
        else:
            del by_revision[key]

    def _answered(
        self,
        call: Call,
        fid: FunctionId,
        state: DeploymentState,
        endpoint: str,
        key: tuple[FunctionId, str],
        done: Callable[[Reply], None],
        upstream: Response | None,
        error: BaseException | None,
    ) -> None:
        """The end of a `start`: counters released, the answer (or error) as a reply."""
        self._release(fid, key)
        if upstream is not None:
            reply = Reply(
                upstream.status,
                upstream.reason,
                response_headers(upstream.headers),
                upstream.body,
            )
            if upstream.body is None:
                reply.upstream = upstream
                reply.finish = functools.partial(self._finished, endpoint)
            else:
                self.in_flight[endpoint] -= 1
            done(reply)
            return
        self.in_flight[endpoint] -= 1
        if isinstance(error, StaleConnection):
            # The pooled connection was closed as the request went out: `dispatch` sends it
            # again on a fresh one when that is safe, or answers 502.
            if resendable(call.method, call.body or b""):
                task = asyncio.get_running_loop().create_task(self.dispatch(call, fid))
                task.add_done_callback(functools.partial(_then, done))
                return
            done(_disconnected(fid, error))
        elif isinstance(error, TimeoutError):
            done(_timed_out(fid, state))
        elif isinstance(error, Disconnected):
            done(_disconnected(fid, error))
        else:
            done(_bad_gateway(fid, error or UpstreamError("no answer")))

    def observed(self, fid: FunctionId, reply: Reply, started: float) -> None:
        """Count an answered invocation in the metrics and the call statistics."""
        cold = False
        for key, value in reply.headers:
            if value == "true" and key.lower() == _COLD_START_LOWER:
                cold = True
        self.observe(fid, reply.status, started, cold=cold)

    def observe(self, fid: FunctionId, status: int, started: float, *, cold: bool) -> None:
        took = time.perf_counter() - started
        if fid in self.known:
            self.metrics.observe(fid[0], fid[1], status, took)
            if self.stats is not None:
                self.stats.observe(fid, status, took, cold=cold)
        else:
            self.metrics.observe("", "", status, took)

    async def _admitted(self, call: Call, fid: FunctionId) -> Reply:
        """`_invoke` within the function's `max_concurrency` and its namespace's quota of
        concurrent invocations; beyond either, 429 with Retry-After at once. O(1)."""
        if self.load is not None:
            self.load.arrived(fid)  # demand, admitted or not: the autoscaler's input
        active = self.active[fid]
        limit = self.max_concurrency.get(fid)
        if limit is not None and active >= limit:
            return _error_reply(_at_max_concurrency(fid, limit, self._retry_after))
        ns = fid[0]
        in_namespace = self.namespace_active[ns]
        quota = self.namespace_limits.get(ns, self._default_namespace_limit)
        if in_namespace >= quota:
            return _error_reply(_over_quota(ns, quota, self._retry_after))
        self.active[fid] = active + 1
        self.namespace_active[ns] = in_namespace + 1
        try:
            return await self._invoke(call, fid)
        finally:
            self.active[fid] -= 1
            self.namespace_active[ns] -= 1

    async def _invoke(self, call: Call, fid: FunctionId) -> Reply:
        if fid not in self.known:
            return _error_reply(_unknown(fid))
        protected = fid in self.protected  # its token was checked in `handle`
        state = self.table.get(fid)
        released: DeploymentState | None = None  # what a held request was released to
        if (state is None or not state.endpoints) and fid in self.autoscaled:
            held = await self._hold(fid)
            if isinstance(held, Reply):
                return held
            state = released = held
        chosen = self._revision_endpoints(fid, state, call.tag)
        if chosen is None:
            return _error_reply(
                NotFound(
                    f"function {fid[0]}/{fid[1]} has no traffic tag {call.tag}",
                    code="tag_not_found",
                )
            )
        call.revision, endpoints = chosen
        if state is None or not endpoints:
            return _error_reply(
                TemporaryError(
                    f"function {fid[0]}/{fid[1]} has no ready instance yet; retry shortly",
                    code="no_ready_instance",
                    retry_after=1,
                )
            )
        body = call.body
        if body is None:
            assert call.read_body is not None
            try:
                body = call.body = await call.read_body()
            except BodyTooLarge:
                return _error_reply(
                    PayloadTooLarge(
                        f"the request body is larger than {self._limit} bytes",
                        details={"max_body_bytes": self._limit},
                    )
                )
            except (asyncio.IncompleteReadError, ConnectionError, HttpProcessingError) as exc:
                return _error_reply(
                    InvalidRequest(f"the request body could not be read in full: {exc}")
                )
        headers = request_headers(
            call.headers,
            client=call.client,
            host=call.host,
            proto=call.scheme,
            # the router's id, never one the caller sent; a platform token was for the
            # router: the function never sees it
            drop=_DROP_PROTECTED if protected else _DROP,
        )
        headers.append((INVOCATION_HEADER, call.invocation))
        timeout = state.timeout + self.settings.timeout_margin_seconds
        per_instance = self.per_instance.get(fid, 0)
        if per_instance:
            return await self._within_concurrency(fid, per_instance, call, headers, body, released)
        return await self._send(fid, state, endpoints, call, headers, body, timeout)

    async def _within_concurrency(
        self,
        fid: FunctionId,
        limit: int,
        call: Call,
        headers: list[tuple[str, str]],
        body: bytes,
        released: DeploymentState | None = None,
    ) -> Reply:
        """Send to the least busy instance below `limit` requests in flight; while every one is
        at it, wait (FIFO-ish: woken as one finishes) up to the function's timeout. `released`:
        the state a held request was released to (an announced instance), used while the
        table names no endpoint yet."""

        def current() -> DeploymentState | None:
            state = self.table.get(fid)
            return released if released is not None and not _ready(state) else state

        loop = asyncio.get_running_loop()
        state = current()
        assert state is not None
        deadline = loop.time() + state.timeout
        while True:
            state = current()
            chosen = self._revision_endpoints(fid, state, call.tag)
            endpoints = chosen[1] if chosen is not None else []
            if chosen is not None:
                call.revision = chosen[0]
            if state is not None and endpoints:
                free = [e for e in endpoints if self.in_flight[e] < limit]
                if free:
                    endpoint = min(free, key=lambda e: self.in_flight[e])
                    timeout = state.timeout + self.settings.timeout_margin_seconds
                    reply = await self._send(
                        fid, state, endpoints, call, headers, body, timeout, endpoint
                    )
                    if reply.finish is None:
                        self._free(fid)
                    else:  # a streamed answer holds its slot until it is relayed
                        reply.finish = functools.partial(_both, reply.finish, self._free, fid)
                    return reply
            remaining = deadline - loop.time()
            if remaining <= 0:
                return _error_reply(
                    TemporaryError(
                        f"every instance of {fid[0]}/{fid[1]} is at its concurrency of {limit} "
                        "requests in flight; retry shortly",
                        code="instances_busy",
                        retry_after=self._retry_after,
                        details={"concurrency": limit},
                    )
                )
            freed = self._freed.setdefault(fid, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed.wait(), min(remaining, 1.0))

    def _free(self, fid: FunctionId) -> None:
        freed = self._freed.pop(fid, None)
        if freed is not None:
            freed.set()

    async def _send(
        self,
        fid: FunctionId,
        state: DeploymentState,
        endpoints: list[str],
        call: Call,
        headers: list[tuple[str, str]],
        body: bytes,
        timeout: float,
        endpoint: str | None = None,
    ) -> Reply:
        self._counter += 1
        in_flight = self.in_flight if self._least_loaded else None
        if endpoint is None:
            endpoint = pick(endpoints, self._counter, in_flight)
        assert endpoint is not None
        retried = False
        key = (fid, call.revision)
        by_revision = self.revision_in_flight
        by_revision[key] += 1
        try:
            while True:
                try:
                    return await self._forward(call, endpoint, headers, body, timeout)
                except ConnectFailed as exc:
                    # Refused, unreachable or timed out while connecting: no byte of the
                    # request reached this instance, so another one may take it, once.
                    other = (
                        None
                        if retried
                        else pick(endpoints, self._counter, in_flight, exclude=endpoint)
                    )
                    if other is None:
                        return _bad_gateway(fid, exc)
                    log.debug("instance refused; trying another", extra={"endpoint": endpoint})
                    self.metrics.retried()
                    endpoint, retried = other, True
                except TimeoutError:
                    return _timed_out(fid, state)
                except Disconnected as exc:
                    return _disconnected(fid, exc)
                except UpstreamError as exc:
                    return _bad_gateway(fid, exc)
        finally:
            left = by_revision[key] - 1
            if left:
                by_revision[key] = left
            else:
                del by_revision[key]

    async def _hold(self, fid: FunctionId) -> DeploymentState | Reply:
        """Hold a request for a function with no instance (scaled to zero, or starting) until
        one is ready: the function is woken (again every `wake_repeat_seconds`), and the request
        goes on the moment the router sees an endpoint. Beyond `cold_queue_max_requests` held,
        503 `cold_queue_full` with Retry-After at once."""
        s = self.settings
        if self.held[fid] >= s.cold_queue_max_requests:
            return _error_reply(
                TemporaryError(
                    f"function {fid[0]}/{fid[1]} is starting and {s.cold_queue_max_requests} "
                    "requests already wait for it; retry after the Retry-After seconds",
                    code="cold_queue_full",
                    retry_after=self._retry_after,
                    details={"cold_queue_max_requests": s.cold_queue_max_requests},
                )
            )
        self.held[fid] += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.cold_start_timeout_seconds
        try:
            while True:
                if self.wake is not None:
                    try:
                        await self.wake(fid)
                    except Exception as exc:
                        log.warning("could not wake a function", extra={"error": str(exc)})
                wait = min(s.wake_repeat_seconds, deadline - loop.time())
                if wait <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self.until(lambda r: _ready(r.table.get(fid)) or fid in r.starting), wait
                    )
                state = self.table.get(fid)
                if state is not None and state.endpoints:
                    self.metrics.released(announced=False)
                    return state
                notice = self.starting.get(fid)
                if notice is not None:
                    limit = min(wait, deadline - loop.time())
                    announced = await self._announced(fid, notice, limit)
                    if announced is not None:
                        return announced
        finally:
            self.held[fid] -= 1
            if not self.held[fid]:
                del self.held[fid]
                self.starting.pop(fid, None)
        return _error_reply(
            TemporaryError(
                f"function {fid[0]}/{fid[1]} has no instance ready after "
                f"{s.cold_start_timeout_seconds:g} s; retry shortly",
                code="no_ready_instance",
                retry_after=1,
            )
        )

    async def _announced(
        self, fid: FunctionId, notice: InstanceStarting, limit: float
    ) -> DeploymentState | None:
        """The function's state with the announced endpoint, once the runtime there accepts
        connections (within `limit` seconds); the state itself if it says an instance is
        ready meanwhile; None when it did not accept in time, or the notice is not of this
        function's state (then the state is waited for). Accepting is what "listening" means
        to the deployer too: the function is loaded. One probe per notice, however many
        requests are held."""
        state = self.table.get(fid)
        path = unix_path(notice.endpoint)
        if state is None or state.uid != notice.uid or path is None:
            self.starting.pop(fid, None)
            return None
        probe = self._probes.get(fid)
        if probe is None or probe[0] is not notice:
            task = asyncio.ensure_future(self._accepting(fid, path, limit))
            self._probes[fid] = probe = (notice, task)

            def forget(done: asyncio.Future[bool], fid: FunctionId = fid) -> None:
                if self._probes.get(fid, (None, None))[1] is done:
                    del self._probes[fid]

            task.add_done_callback(forget)
        accepted = await asyncio.shield(probe[1])
        state = self.table.get(fid)
        if state is None:
            return None
        if state.endpoints:
            self.metrics.released(announced=False)
            return state
        if not accepted:
            if self.starting.get(fid) is notice:
                del self.starting[fid]
            return None
        self.metrics.released(announced=True)
        revision = notice.revision or state.revision
        return state.model_copy(update={"endpoints": [notice.endpoint], "revision": revision})

    async def _accepting(self, fid: FunctionId, path: str, limit: float) -> bool:
        """Whether the unix socket at `path` accepts within `limit` seconds: tried every
        `STARTING_POLL_SECONDS` at first, less often the longer it takes; False at once when
        the function's state names endpoints (or the function is gone)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        delay = STARTING_POLL_SECONDS
        while True:
            state = self.table.get(fid)
            if state is None or state.endpoints:
                return False
            if _accepts(path):
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 1.25, STARTING_POLL_MAX_SECONDS)

    async def _check_token(self, request: web.Request, fid: FunctionId) -> web.Response | None:
        """The refusal of a call to a protected function (401, 403 or 429), or None."""
        if self.auth is None:
            return error_response(
                TemporaryError(
                    "this router checks no tokens; the function needs one", code="no_token_check"
                )
            )
        try:
            record = await self.auth.authenticate(request.headers, client_address(request))
            authorize(record, Action.INVOKE, fid[0])
        except LambdabusError as exc:
            return auth_error_response(exc)
        return None

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, refused as soon as it is known to be over the limit: from
        Content-Length before reading, or while reading a chunked one."""
        length = request.content_length
        if length is not None:
            if length > self._limit:
                raise BodyTooLarge
            if length == 0:
                return _NO_BODY
            return await request.content.readexactly(length)
        if not request.body_exists:
            return _NO_BODY
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self._limit:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def _forward(
        self,
        call: Call,
        endpoint: str,
        headers: list[tuple[str, str]],
        body: bytes,
        timeout: float,
    ) -> Reply:
        assert self._upstream is not None
        in_flight = self.in_flight
        in_flight[endpoint] += 1
        streamed = False
        try:
            try:
                upstream = await self._upstream.request(
                    endpoint,
                    call.method,
                    call.target,
                    headers,
                    body,
                    timeout=timeout,
                    buffer_limit=self.settings.buffer_response_bytes,
                )
            except ValueError as exc:  # a CR or LF that would split the instance's request
                return _error_reply(InvalidRequest(f"the request cannot be forwarded: {exc}"))
            reply = Reply(
                upstream.status,
                upstream.reason,
                response_headers(upstream.headers),
                upstream.body,
            )
            if upstream.body is None or call.method == "HEAD":
                # Relayed as it arrives; the instance counts as busy until it is.
                reply.upstream = upstream
                reply.finish = functools.partial(self._finished, endpoint)
                streamed = True
            return reply
        finally:
            if not streamed:
                in_flight[endpoint] -= 1

    def _finished(self, endpoint: str) -> None:
        self.in_flight[endpoint] -= 1

    async def _stream(self, request: web.Request, call: Call, reply: Reply) -> web.StreamResponse:
        """Relay a large or unsized response as it arrives (and a HEAD answer, with the
        Content-Length it declares for the body it does not carry)."""
        upstream = reply.upstream
        assert upstream is not None
        try:
            response = web.StreamResponse(
                status=reply.status, reason=reply.reason, headers=reply.headers
            )
            response.headers[INVOCATION_HEADER] = call.invocation
            if call.revision:
                response.headers[REVISION_HEADER] = call.revision
            length = _head_length(upstream) if request.method == "HEAD" else upstream.length
            if length is not None:
                response.content_length = length
            await response.prepare(request)
            try:
                while chunk := await upstream.read():
                    await response.write(chunk)
            except (UpstreamError, TimeoutError) as exc:
                # The status is sent already: cut the connection so the caller sees a truncated
                # body rather than a complete-looking one.
                log.warning("instance response broke off", extra={"error": repr(exc)})
                if request.transport is not None:
                    request.transport.close()
            return response
        finally:
            upstream.close()
            if reply.finish is not None:
                reply.finish()


class Call:
    """One invocation as the router got it, whichever server parsed it. `body` is None until
    read (by `read_body`); `revision` is set once the route chose one."""

    __slots__ = (
        "body",
        "client",
        "headers",
        "host",
        "invocation",
        "method",
        "read_body",
        "revision",
        "scheme",
        "tag",
        "target",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        client: str | None,
        host: str | None,
        scheme: str,
        tag: str | None,
        invocation: str,
        body: bytes | None,
        read_body: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        self.method = method
        self.target = target  # the raw path and query
        self.headers = headers
        self.client = client
        self.host = host
        self.scheme = scheme
        self.tag = tag
        self.invocation = invocation
        self.body = body
        self.read_body = read_body
        self.revision = ""


class Reply:
    """The answer to a `Call`: whole (`body`), or the instance's `upstream` response to relay
    as it arrives (then `finish` is called once it is relayed)."""

    __slots__ = ("body", "finish", "headers", "reason", "status", "upstream")

    def __init__(
        self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes | None
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.upstream: Response | None = None
        self.finish: Callable[[], None] | None = None


def _timed_out(fid: FunctionId, state: DeploymentState) -> Reply:
    return _error_reply(
        LambdabusError(
            f"function {fid[0]}/{fid[1]} did not answer within its timeout of {state.timeout:g} s",
            code="function_timeout",
            status=504,
            details={"timeout": state.timeout},
        )
    )


def _then(done: Callable[[Reply], None], task: asyncio.Task[Reply]) -> None:
    """Hand a task's reply on (a failed task's as a 500, as the server would)."""
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("unhandled error", exc_info=error)
        done(
            _error_reply(
                LambdabusError("internal error; see the service log", code="internal", status=500)
            )
        )
        return
    done(task.result())


def _both(first: Callable[[], None], then: Callable[[FunctionId], None], fid: FunctionId) -> None:
    first()
    then(fid)


def _error_reply(error: LambdabusError) -> Reply:
    """The platform's own error answer (as `service.error_response` writes it)."""
    headers = [(ERROR_HEADER, error.code), ("Content-Type", "application/json; charset=utf-8")]
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers.append(("Retry-After", str(max(1, round(retry_after)))))
    body = json.dumps(error.to_json()).encode()
    return Reply(error.status, _reason(error.status), headers, body)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def _ready(state: DeploymentState | None) -> bool:
    return state is not None and bool(state.endpoints)


def _accepts(path: str) -> bool:
    """Whether a unix socket at `path` accepts connections now (a listening runtime: a full
    backlog counts too). The connection is closed at once, before anything is sent."""
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:  # out of fds: the state decides, as without a notice
        return False
    try:
        probe.setblocking(False)
        return probe.connect_ex(path) in (0, errno.EAGAIN, errno.EINPROGRESS)
    except OSError:
        return False
    finally:
        probe.close()


def _head_length(upstream: Response) -> int | None:
    """The size a HEAD answer declares for the body it does not carry (relayed as it came)."""
    if upstream.status in (204, 304) or upstream.status < 200:
        return None
    for name, value in upstream.headers:
        if name.lower() == "content-length" and value.isascii() and value.isdigit():
            return int(value)
    return None


def _unknown(fid: FunctionId) -> LambdabusError:
    for value, what in ((fid[0], "namespace"), (fid[1], "function name")):
        problem = label_problem(value)
        if problem:
            return InvalidName(f"{what} {value!r} {problem}")
    return NotFound(f"function {fid[0]}/{fid[1]} does not exist", code="function_not_found")


def _at_max_concurrency(fid: FunctionId, limit: int, retry_after: float) -> TemporaryError:
    return TemporaryError(
        f"function {fid[0]}/{fid[1]} is at its max_concurrency of {limit} invocations; retry "
        "after the Retry-After seconds, or raise the function's max_concurrency",
        code="max_concurrency",
        status=429,
        retry_after=retry_after,
        details={"max_concurrency": limit},
    )


def _over_quota(namespace: str, limit: int, retry_after: float) -> TemporaryError:
    return TemporaryError(
        f"namespace {namespace} is at its quota of {limit} concurrent invocations; retry after "
        "the Retry-After seconds, or ask an operator to raise the quota "
        f"(PUT /v1/namespaces/{namespace}/quota)",
        code="quota_exceeded",
        status=429,
        retry_after=retry_after,
        details={"max_concurrent_invocations": limit},
    )


def _disconnected(fid: FunctionId, exc: BaseException) -> Reply:
    log.debug("instance disconnected", extra={"function": f"{fid[0]}/{fid[1]}", "error": repr(exc)})
    return _error_reply(
        LambdabusError(
            f"the instance of {fid[0]}/{fid[1]} closed the connection before answering; the "
            "request was not retried, since the instance may have run it",
            code="instance_disconnected",
            status=502,
        )
    )


def _bad_gateway(fid: FunctionId, exc: BaseException) -> Reply:
    log.debug("instance failed", extra={"function": f"{fid[0]}/{fid[1]}", "error": repr(exc)})
    return _error_reply(
        LambdabusError(
            f"the instance of {fid[0]}/{fid[1]} closed or refused the connection; retry",
            code="bad_gateway",
            status=502,
        )
    )
