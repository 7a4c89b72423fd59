"""The management API: HTTP routes over functions, their status, the lifecycle stream (SSE),
user events, triggers, dead letters and asynchronous invocations."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from lambdabus_events.models import BuildState, DeploymentState, FunctionRecord, LogKind, LogQuery
from lambdabus_events.names import label_problem
from lambdabus_gateway.auth import TOKEN, add_token_routes, require_namespace
from lambdabus_gateway.console import add_console_routes
from lambdabus_gateway.deadletters import DeadLetters, parse_id, parse_limit
from lambdabus_gateway.docs import CONTENT_TYPES, DOCS_HTML, DOCS_YAML, HEADERS, FunctionDocs
from lambdabus_gateway.events import Limits, encoded, read_events, store
from lambdabus_gateway.functions import Functions, labels_match, parse_label_selectors
from lambdabus_gateway.gitsync import GitSync
from lambdabus_gateway.invocations import Invocations, wants_async
from lambdabus_gateway.invoke import Invoker
from lambdabus_gateway.logs import query as query_logs
from lambdabus_gateway.logs import stream_logs
from lambdabus_gateway.openapi import render_openapi
from lambdabus_gateway.quotas import Quotas
from lambdabus_gateway.revisions import Revisions
from lambdabus_gateway.schedules import Schedules, parse_schedule
from lambdabus_gateway.secrets import MAX_BODY_BYTES, Secrets, parse_secret_body
from lambdabus_gateway.settings import GatewaySettings
from lambdabus_gateway.triggers import Triggers, parse_trigger
from lambdabus_gateway.uploads import _json_object, read_body, read_upload
from lambdabus_platform.bus import Bus
from lambdabus_platform.callstats import RouterStats, summarize
from lambdabus_platform.errors import InvalidName, InvalidRequest, NotFound
from lambdabus_platform.registry import Registry, Versioned
from lambdabus_platform.replicas import REPLICAS_BUCKET, list_replicas
from lambdabus_platform.status import compute_status, not_found_status
from lambdabus_platform.streaming import with_keepalive
from lambdabus_platform.subjects import FUNCTION_METRICS_BUCKET, function_key, lifecycle_filter

VERSION = "0.1.0"


@dataclass
class Gateway:
    settings: GatewaySettings
    bus: Bus
    functions: Functions
    builds: Registry[BuildState]
    deployments: Registry[DeploymentState]
    stopping: asyncio.Event
    invoker: Invoker
    triggers: Triggers
    deadletters: DeadLetters
    invocations: Invocations
    secrets: Secrets
    quotas: Quotas
    schedules: Schedules
    git_sync: GitSync | None = None
    revisions: Revisions | None = None
    docs: FunctionDocs = field(default_factory=FunctionDocs)


GATEWAY = web.AppKey("gateway", Gateway)


def _label(request: web.Request, key: str, what: str) -> str:
    value = request.match_info[key]
    problem = label_problem(value)
    if problem:
        raise InvalidName(f"{what} {value!r} {problem}")
    return value


def _record_response(item: Versioned[FunctionRecord], status: int = 200) -> web.Response:
    return web.json_response(
        item.value.model_dump(mode="json"), status=status, headers={"ETag": item.etag}
    )


async def create_function(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns = _label(request, "ns", "namespace")
    s = gw.settings
    upload = await read_upload(
        request, max_upload=s.max_upload_bytes, max_spec=s.max_spec_bytes, require_source=True
    )
    created = await gw.functions.create(ns, upload)
    response = _record_response(created, status=202)
    response.headers["Location"] = f"/v1/namespaces/{ns}/functions/{created.value.name}"
    return response


async def list_functions(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns = _label(request, "ns", "namespace")
    selectors = parse_label_selectors(request.query.getall("label", []))
    items = await gw.functions.in_namespace(ns)
    return web.json_response(
        {
            "items": [
                i.value.model_dump(mode="json")
                for i in items
                if labels_match(i.value.spec.labels, selectors)
            ]
        }
    )


async def get_function(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "function name")
    return _record_response(await gw.functions.get(ns, name))


async def replace_function(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "function name")
    s = gw.settings
    upload = await read_upload(
        request, max_upload=s.max_upload_bytes, max_spec=s.max_spec_bytes, require_source=False
    )
    updated, changes = await gw.functions.replace(ns, name, upload, request.headers.get("If-Match"))
    return _record_response(updated, status=202 if changes else 200)


async def patch_function(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "function name")
    if request.content_type not in ("application/json", "application/merge-patch+json"):
        raise InvalidRequest(
            "PATCH takes application/merge-patch+json (or application/json) with the fields to change",
            code="unsupported_media_type",
            status=415,
        )
    body = await request.content.read(gw.settings.max_spec_bytes + 1)
    if len(body) > gw.settings.max_spec_bytes:
        raise InvalidRequest("the patch is too large", code="payload_too_large", status=413)
    patch = _json_object(body, "the patch")
    updated, changes = await gw.functions.patch(ns, name, patch, request.headers.get("If-Match"))
    return _record_response(updated, status=202 if changes else 200)


async def delete_function(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "function name")
    record = await gw.functions.delete(ns, name, request.headers.get("If-Match"))
    # Its triggers go with it (a crash in between is repaired by `Triggers.reconcile`).
    await gw.triggers.delete_for_function(ns, name)
    await gw.schedules.delete_for_function(ns, name)
    return web.json_response(record.model_dump(mode="json"), status=202)


async def sync_function(request: web.Request) -> web.Response:
    """Look at a git-sourced function's reference now (Kyma polls; this forces it)."""
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "function name")
    if gw.git_sync is None:
        raise InvalidRequest("this gateway takes no git sources", code="git_disabled", status=409)
    return _record_response(await gw.git_sync.sync_one(ns, name))


async def function_status(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "function name")
    try:
        current = await gw.functions.get(ns, name)
    except NotFound as exc:
        body: dict[str, Any] = {**exc.to_json(), **not_found_status(ns, name)}
        return web.json_response(body, status=404)
    build, deployment = await asyncio.gather(gw.builds.get(ns, name), gw.deployments.get(ns, name))
    status = compute_status(
        current.value, build.value if build else None, deployment.value if deployment else None
    )
    return web.json_response(status.model_dump(mode="json"), headers={"ETag": current.etag})


# -- LUNA docs


async def _function_doc(request: web.Request, path: str) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "function name")
    current = await gw.functions.get(ns, name)
    body = await gw.docs.get(
        current.value, lambda: gw.functions.source_archive(current.value), path
    )
    return web.Response(
        body=body,
        headers={
            **HEADERS,
            "Content-Type": CONTENT_TYPES[path],
            "ETag": f'"{current.value.source.sha256}"',
        },
    )


async def function_docs(request: web.Request) -> web.Response:
    return await _function_doc(request, DOCS_HTML)


async def function_docs_yaml(request: web.Request) -> web.Response:
    return await _function_doc(request, DOCS_YAML)


def _parse_since(value: str | None) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            f"since={value!r} is not an RFC 3339 time (e.g. 2026-01-31T12:00:00Z)",
            code="invalid_since",
        ) from None
    if parsed.tzinfo is None:
        raise InvalidRequest(
            f"since={value!r} needs a time zone (e.g. a trailing Z)", code="invalid_since"
        )
    return parsed


def lifecycle_subject_filter(query: dict[str, str]) -> str:
    """The LIFECYCLE subject filter for the query's namespace/function/type. Pure."""
    for key, what in (("namespace", "namespace"), ("function", "function name")):
        value = query.get(key)
        if value:
            problem = label_problem(value)
            if problem:
                raise InvalidName(f"{what} {value!r} {problem}")
    try:
        return lifecycle_filter(
            query.get("type") or None, query.get("namespace") or None, query.get("function") or None
        )
    except ValueError:
        raise InvalidRequest(
            f"type={query.get('type')!r} is not a lifecycle event type (io.lambdabus.<entity>.<verb>)",
            code="invalid_type",
        ) from None


_SEQUENCE = re.compile(r"[0-9]{1,19}")  # ASCII digits only (str.isdigit takes "²")


def _last_event_id(request: web.Request) -> int | None:
    value = request.headers.get("Last-Event-ID", "").strip()
    if not value:
        return None
    if _SEQUENCE.fullmatch(value) is None:
        raise InvalidRequest(
            f"Last-Event-ID {value[:40]!r} is not the id of a lifecycle event (a stream "
            "sequence: the `id:` line of an event this stream sent)",
            code="invalid_last_event_id",
        )
    return int(value)


async def lifecycle(request: web.Request) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    query = dict(request.query)
    subject = lifecycle_subject_filter(query)
    since = _parse_since(query.get("since"))
    # A reader that lost its connection resumes after the last event it had (SSE's own rule).
    after = _last_event_id(request)
    token = request[TOKEN]
    if query.get("namespace"):
        require_namespace(request, query["namespace"])
    # A token for some namespaces sees their events only (the subject's 5th token).
    scope = None if token.all_namespaces else frozenset(token.namespaces)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    await response.write(b": lambdabus lifecycle stream\n\n")
    messages = gw.bus.replay("LIFECYCLE", subject, since=since, after_sequence=after)
    keepalive = gw.settings.sse_keepalive_seconds
    try:
        async for item in with_keepalive(messages, keepalive, gw.stopping):
            if item is None:
                await response.write(b": keepalive\n\n")
                continue
            if scope is not None and item.subject.split(".")[4] not in scope:
                continue
            event_type = json.loads(item.data).get("type", "")
            frame = (
                f"id: {item.sequence}\nevent: {event_type}\ndata: ".encode() + item.data + b"\n\n"
            )
            await response.write(frame)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            await messages.aclose()  # type: ignore[attr-defined]
    return response


async def runtime_logs(request: web.Request) -> web.StreamResponse:
    return await _logs(request, "runtime")


async def build_logs(request: web.Request) -> web.StreamResponse:
    return await _logs(request, "build")


async def _logs(request: web.Request, kind: LogKind) -> web.StreamResponse:
    gw = request.app[GATEWAY]
    # No existence check: the logs of a deleted function stay readable until they expire.
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "function name")
    return await stream_logs(
        request,
        gw.bus,
        kind,
        ns,
        name,
        since=_parse_since(request.query.get("since")),
        stopping=gw.stopping,
        keepalive=gw.settings.sse_keepalive_seconds,
    )


async def function_metrics(request: web.Request) -> web.Response:
    """Calls, errors, throttles, cold starts and p50/p95/p99 over the last 1 m, 5 m and 1 h:
    what every router wrote to `function-metrics`, added up (`callstats.summarize`)."""
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "function name")
    await gw.functions.get(ns, name)  # 404 function_not_found
    entries = await gw.bus.kv(FUNCTION_METRICS_BUCKET).values(f"{function_key(ns, name)}.*")
    routers = []
    for entry in entries:
        with contextlib.suppress(ValidationError):
            routers.append(RouterStats.model_validate_json(entry.value))
    windows = summarize(routers, time.time())
    return web.json_response({"namespace": ns, "name": name, "windows": windows})


async def history(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "function name")
    result = await query_logs(
        gw.bus,
        LogQuery(
            namespace=ns,
            name=name,
            kind="lifecycle",
            since=_parse_since(request.query.get("since")),
        ),
    )
    return web.json_response({"items": result.events, "truncated": result.truncated})


async def info(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    return web.json_response(
        {"router_url": gw.settings.public_router_url or gw.settings.router_url, "version": VERSION}
    )


async def namespaces(request: web.Request) -> web.Response:
    """The namespaces this token may use: its own, or, for a token of every namespace, each
    that holds a function (and `default`)."""
    gw = request.app[GATEWAY]
    token = request[TOKEN]
    if token.all_namespaces:
        names = {*(await gw.functions.namespaces()), "default"}
    else:
        names = set(token.namespaces)
    return web.json_response(
        {"items": [{"name": n} for n in sorted(names)], "all": token.all_namespaces}
    )


async def replicas(request: web.Request) -> web.Response:
    """Every live replica of every service, from the heartbeat registry."""
    gw = request.app[GATEWAY]
    found = await list_replicas(gw.bus.kv(REPLICAS_BUCKET))
    return web.json_response({"items": [r.to_json() for r in found]})


async def invoke_function(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "function name")
    current = await gw.functions.get(ns, name)
    if wants_async(request.headers.getall("Prefer", [])):
        record = await gw.invocations.submit(request, current.value)
        return web.json_response(
            {"invocation_id": record.id, "status": record.status},
            status=202,
            headers={
                "Location": f"/v1/namespaces/{ns}/invocations/{record.id}",
                "Preference-Applied": "respond-async",
            },
        )
    return await gw.invoker.relay(
        request,
        ns,
        name,
        current.value.spec.timeout,
        forward_token=current.value.spec.invoke_auth == "token",
    )


async def get_invocation(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns = _label(request, "ns", "namespace")
    record = await gw.invocations.get(ns, request.match_info["id"])
    return web.json_response(record.model_dump(mode="json"))


# -- user events -------------------------------------------------------------------------------


async def publish_events(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    s = gw.settings
    limits = Limits(s.max_event_bytes, s.max_batch_bytes, s.max_batch_events)
    batch, events = await read_events(request, limits)
    payloads = encoded(events, batch=batch, limits=limits, max_payload=gw.bus.max_payload)
    stored = await store(gw.bus, events, payloads)
    return web.json_response(stored.to_json(), status=202)


# -- triggers ----------------------------------------------------------------------------------


def _require_json(request: web.Request, what: str) -> None:
    """A 415 unless the body is sent as JSON (or untyped)."""
    if request.content_type not in ("application/json", ""):
        raise InvalidRequest(
            f"unsupported content type {request.content_type!r}: send {what} as application/json",
            code="unsupported_media_type",
            status=415,
        )


async def _json_spec(request: web.Request, what: str) -> dict[str, Any]:
    """The JSON object of a spec (a trigger, a schedule), or a 400/413/415 naming `what`."""
    _require_json(request, what)
    body = await read_body(request, request.app[GATEWAY].settings.max_spec_bytes, what)
    return _json_object(body, what)


async def create_trigger(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns = _label(request, "ns", "namespace")
    spec = parse_trigger(await _json_spec(request, "the trigger"))
    created = await gw.triggers.create(ns, spec)
    return web.json_response(
        created.value.model_dump(mode="json"),
        status=201,
        headers={"Location": f"/v1/namespaces/{ns}/triggers/{spec.name}"},
    )


async def list_triggers(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns = _label(request, "ns", "namespace")
    items = await gw.triggers.in_namespace(ns)
    return web.json_response({"items": [i.model_dump(mode="json") for i in items]})


async def get_trigger(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "trigger name")
    current = await gw.triggers.get(ns, name)
    return web.json_response(current.value.model_dump(mode="json"))


async def delete_trigger(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "trigger name")
    record = await gw.triggers.delete(ns, name)
    return web.json_response(record.model_dump(mode="json"), status=202)


# -- schedules ---------------------------------------------------------------------------------


async def create_schedule(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns = _label(request, "ns", "namespace")
    spec = parse_schedule(await _json_spec(request, "the schedule"))
    created = await gw.schedules.create(ns, spec)
    return web.json_response(
        created.value.model_dump(mode="json"),
        status=201,
        headers={"Location": f"/v1/namespaces/{ns}/schedules/{spec.name}"},
    )


async def list_schedules(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns = _label(request, "ns", "namespace")
    items = await gw.schedules.in_namespace(ns)
    return web.json_response({"items": [i.model_dump(mode="json") for i in items]})


async def get_schedule(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "schedule name")
    current = await gw.schedules.get(ns, name)
    return web.json_response(current.value.model_dump(mode="json"))


async def delete_schedule(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "schedule name")
    record = await gw.schedules.delete(ns, name)
    return web.json_response(record.model_dump(mode="json"), status=202)


# -- dead letters ------------------------------------------------------------------------------


async def list_deadletters(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns = _label(request, "ns", "namespace")
    trigger = request.query.get("trigger") or None
    if trigger is not None:
        problem = label_problem(trigger)
        if problem:
            raise InvalidName(f"trigger name {trigger!r} {problem}")
    after = request.query.get("after")
    items, more = await gw.deadletters.list(
        ns,
        trigger,
        after=parse_id(after) if after else None,
        limit=parse_limit(request.query.get("limit")),
    )
    return web.json_response({"items": items, "next": more})


async def redrive_deadletter(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns = _label(request, "ns", "namespace")
    answer = await gw.deadletters.redrive(ns, parse_id(request.match_info["id"]))
    return web.json_response(answer, status=202)


# -- secrets (values go in, never out) ---------------------------------------------------------


async def _secret_body(request: web.Request) -> object:
    _require_json(request, "the secret")
    raw = await read_body(request, MAX_BODY_BYTES, "the secret")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        # The decoder's message quotes the input around the fault: say where, not what.
        raise InvalidRequest(
            'the secret is not valid UTF-8 JSON: send {"name": ..., "data": {"key": "value"}}',
            code="malformed_json",
        ) from None


async def create_secret(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns = _label(request, "ns", "namespace")
    body = parse_secret_body(await _secret_body(request))
    info = await gw.secrets.create(ns, body)
    return web.json_response(
        info.model_dump(mode="json"),
        status=201,
        headers={"Location": f"/v1/namespaces/{ns}/secrets/{info.name}"},
    )


async def list_secrets(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns = _label(request, "ns", "namespace")
    items = await gw.secrets.in_namespace(ns)
    return web.json_response({"items": [i.model_dump(mode="json") for i in items]})


async def get_secret(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "secret name")
    return web.json_response((await gw.secrets.get(ns, name)).model_dump(mode="json"))


async def replace_secret(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "secret name")
    body = parse_secret_body(await _secret_body(request), name=name)
    return web.json_response((await gw.secrets.replace(ns, body)).model_dump(mode="json"))


async def delete_secret(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "secret name")
    return web.json_response((await gw.secrets.delete(ns, name)).model_dump(mode="json"))


# -- quotas ------------------------------------------------------------------------------------


async def _quota_response(gw: Gateway, ns: str) -> web.Response:
    override = await gw.quotas.override(ns)
    return web.json_response(
        {
            "namespace": ns,
            **override.over(gw.quotas.defaults).model_dump(),
            "overrides": override.model_dump(exclude_none=True),
        }
    )


async def get_quota(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    return await _quota_response(gw, _label(request, "ns", "namespace"))


async def put_quota(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    ns = _label(request, "ns", "namespace")
    body = await read_body(request, gw.settings.max_spec_bytes, "the quota")
    await gw.quotas.set(ns, _json_object(body, "the quota"))
    return await _quota_response(gw, ns)


# -- revisions and traffic ---------------------------------------------------------------------


async def _revisions_of(request: web.Request) -> tuple[Revisions, FunctionRecord]:
    gw = request.app[GATEWAY]
    ns, name = _label(request, "ns", "namespace"), _label(request, "name", "function name")
    current = await gw.functions.get(ns, name)  # 404 function_not_found
    if gw.revisions is None:
        raise NotFound("revisions are not kept by this gateway", code="revisions_unavailable")
    return gw.revisions, current.value


async def list_revisions(request: web.Request) -> web.Response:
    revisions, record = await _revisions_of(request)
    return web.json_response({"items": await revisions.listing(record)})


async def get_revision(request: web.Request) -> web.Response:
    revisions, record = await _revisions_of(request)
    return web.json_response(await revisions.one(record, request.match_info["revision"]))


async def delete_revision(request: web.Request) -> web.Response:
    revisions, record = await _revisions_of(request)
    return web.json_response(await revisions.delete(record, request.match_info["revision"]))


async def get_traffic(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    revisions, record = await _revisions_of(request)
    router = gw.settings.public_router_url or gw.settings.router_url
    return web.json_response(await revisions.traffic(record, router))


async def put_traffic(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    revisions, record = await _revisions_of(request)
    body = await read_body(request, gw.settings.max_spec_bytes, "the traffic")
    await revisions.set_traffic(record, _json_object(body, "the traffic"))
    router = gw.settings.public_router_url or gw.settings.router_url
    return web.json_response(await revisions.traffic(record, router))


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(render_openapi())


def add_routes(app: web.Application) -> None:
    r = app.router
    base = "/v1/namespaces/{ns}/functions"
    r.add_post(base, create_function)
    r.add_get(base, list_functions)
    r.add_get(base + "/{name}", get_function)
    r.add_put(base + "/{name}", replace_function)
    r.add_patch(base + "/{name}", patch_function)
    r.add_delete(base + "/{name}", delete_function)
    r.add_get(base + "/{name}/status", function_status)
    r.add_post(base + "/{name}/invoke", invoke_function)
    r.add_get(base + "/{name}/logs", runtime_logs)
    r.add_get(base + "/{name}/build/logs", build_logs)
    r.add_get(base + "/{name}/history", history)
    r.add_get(base + "/{name}/metrics", function_metrics)
    r.add_post(base + "/{name}/sync", sync_function)
    r.add_get(base + "/{name}/docs", function_docs)
    r.add_get(base + "/{name}/docs.yml", function_docs_yaml)
    r.add_get(base + "/{name}/revisions", list_revisions)
    r.add_get(base + "/{name}/revisions/{revision}", get_revision)
    r.add_delete(base + "/{name}/revisions/{revision}", delete_revision)
    r.add_get(base + "/{name}/traffic", get_traffic)
    r.add_put(base + "/{name}/traffic", put_traffic)
    namespace = "/v1/namespaces/{ns}"
    r.add_post(namespace + "/triggers", create_trigger)
    r.add_get(namespace + "/triggers", list_triggers)
    r.add_get(namespace + "/triggers/{name}", get_trigger)
    r.add_delete(namespace + "/triggers/{name}", delete_trigger)
    r.add_post(namespace + "/schedules", create_schedule)
    r.add_get(namespace + "/schedules", list_schedules)
    r.add_get(namespace + "/schedules/{name}", get_schedule)
    r.add_delete(namespace + "/schedules/{name}", delete_schedule)
    r.add_get(namespace + "/deadletters", list_deadletters)
    r.add_post(namespace + "/deadletters/{id}/redrive", redrive_deadletter)
    r.add_get(namespace + "/invocations/{id}", get_invocation)
    r.add_post(namespace + "/secrets", create_secret)
    r.add_get(namespace + "/secrets", list_secrets)
    r.add_get(namespace + "/secrets/{name}", get_secret)
    r.add_put(namespace + "/secrets/{name}", replace_secret)
    r.add_delete(namespace + "/secrets/{name}", delete_secret)
    r.add_get(namespace + "/quota", get_quota)
    r.add_put(namespace + "/quota", put_quota)
    r.add_post("/v1/events", publish_events)
    r.add_get("/v1/info", info)
    r.add_get("/v1/lifecycle", lifecycle)
    r.add_get("/v1/namespaces", namespaces)
    r.add_get("/v1/openapi.json", openapi)
    r.add_get("/v1/replicas", replicas)
    add_token_routes(app)
    add_console_routes(app)  # public static files, not API: left out of the OpenAPI paths
