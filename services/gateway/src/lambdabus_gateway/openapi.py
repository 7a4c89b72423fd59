"""The OpenAPI document of the management API: its paths are the routes the gateway registers
(`gateway_app`), each with its operation from `route_descriptions` (a route without one, or one
without a route, fails the rendering); its schemas are generated from the wire models.

`python -m lambdabus_gateway.openapi [--check]` writes (or checks) `schemas/openapi.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from lambdabus_events.models import (
    RUNTIMES,
    DeadLetter,
    FunctionRecord,
    FunctionSpec,
    FunctionStatus,
    GitSource,
    InvocationRecord,
    LogLine,
    Quota,
    ScheduleRecord,
    ScheduleSpec,
    SecretInfo,
    TriggerRecord,
    TriggerSpec,
)
from lambdabus_events.names import LABEL_PATTERN
from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.service import make_app
from lambdabus_platform.tokens import PUBLIC_PREFIX, TokenRequest

Route = tuple[str, str]
"""(METHOD, path template), e.g. ("GET", "/v1/namespaces/{ns}/functions/{name}")."""


class TokenInfo(BaseModel):
    id: str = Field(description="16 hex digits; DELETE /v1/tokens/{id} revokes it")
    name: str
    role: str = Field(description="admin, developer, viewer, invoker or auditor")
    namespaces: list[str] = Field(description='its namespaces, or ["*"] for every one')
    expires: str | None = Field(description="RFC 3339; null: never")


class TokenCreated(TokenInfo):
    token: str = Field(description="lbt_<id>_<secret>: shown this once, never stored")


class TokenListed(TokenInfo):
    created: str
    expired: bool
    created_by: str | None = Field(description="the id of the token that minted it")


class TokenList(BaseModel):
    items: list[TokenListed]


class ReplicaInfo(BaseModel):
    service: str = Field(description="gateway, router, builder, deployer or logs")
    id: str = Field(description="the replica's id (`<host>-<pid>` unless configured)")
    role: Literal["leader", "standby", "active"] = Field(
        description="leader or standby where the service elects a leader; active otherwise"
    )
    heartbeat_age: float = Field(description="seconds since its last heartbeat")
    url: str | None = Field(description="its HTTP listener")


class ReplicaList(BaseModel):
    items: list[ReplicaInfo]


class History(BaseModel):
    items: list[dict[str, Any]] = Field(
        description="the function's lifecycle CloudEvents (structured mode), oldest first; "
        "`actorid` and `actorname` name who caused each"
    )
    truncated: bool = Field(
        description="true when there are more than the answer holds (10,000 events, or what "
        "fits a NATS reply): ask again with a later `since`"
    )


class Info(BaseModel):
    router_url: str = Field(
        description="where functions answer (`/{ns}/{name}`): the public router URL if one is "
        "configured, else the router URL the gateway relays invocations to"
    )
    version: str = Field(description="the gateway's version")


class NamespaceName(BaseModel):
    name: str


class NamespaceNames(BaseModel):
    items: list[NamespaceName] = Field(
        description="by name: the token's namespaces; for a token of every namespace, each "
        "that holds a function, and `default`"
    )
    all: bool = Field(description='true for a token of every namespace (`["*"]`)')


class ErrorBody(BaseModel):
    code: str = Field(description="stable, machine-readable")
    message: str = Field(description="what went wrong and what to do about it")
    details: dict[str, Any] | None = None


class Error(BaseModel):
    error: ErrorBody


class FunctionList(BaseModel):
    items: list[FunctionRecord]


class TriggerList(BaseModel):
    items: list[TriggerRecord]


class ScheduleList(BaseModel):
    items: list[ScheduleRecord]


class DeadLetterItem(DeadLetter):
    id: str = Field(description="the dead letter's id: its sequence in the DLQ stream")


class DeadLetterList(BaseModel):
    items: list[DeadLetterItem]
    next: str | None = Field(
        default=None, description="pass as `after` for the next page; null when there is no more"
    )


class Redriven(DeadLetterItem):
    redriven: bool = True


class InvocationAccepted(BaseModel):
    invocation_id: str = Field(description="32 hex digits; GET .../invocations/{id} reads it")
    status: str = "queued"


class EventsAccepted(BaseModel):
    accepted: int = Field(description="how many events the request held; all are stored")
    ids: list[str] = Field(description="their ids, in order")
    duplicates: int = Field(
        description="how many of them were stored already (same source and id) and not again"
    )


class SecretWrite(BaseModel):
    name: str = Field(description="an RFC 1035 label (may be left out in a PUT)")
    data: dict[str, str] = Field(
        description="key ([-._a-zA-Z0-9]{1,253}) → value; at most 64 KiB per value, 1 MiB in all"
    )


class SecretList(BaseModel):
    items: list[SecretInfo]


class NamespaceQuota(BaseModel):
    namespace: str
    max_functions: int
    max_instances: int = Field(description="sum of the functions' replicas")
    max_concurrent_invocations: int
    overrides: Quota = Field(description="what an operator set; the rest are the defaults")


class InlineSource(BaseModel):
    files: dict[str, str] = Field(description="path → text; must hold the runtime's entry point")


class GitUploadSource(BaseModel):
    git: GitSource = Field(
        description="a repository the gateway fetches now and polls after (Kyma's git source)"
    )


class InlineUpload(FunctionSpec):
    source: InlineSource | GitUploadSource


AUTH_TEXT = """\
Every route but `/healthz` needs `Authorization: Bearer <token>`. A token has one role (admin:
everything; developer: manage functions, triggers, secrets, dead letters, invoke, publish, read,
audit; viewer: read, audit, metrics; invoker: invoke; auditor: the lifecycle stream and history) and
namespaces (`["*"]`: every one). Publishing events, the metrics, tokens and quotas need `["*"]`.
A token in the query string (`token=`, `access_token=`) is refused (400 `token_in_query`).
"""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(name)}},
    }
    if headers:
        out["headers"] = headers
    return out


_ERRORS = {
    code: _json("Error", text)
    for code, text in {
        "400": "invalid input; `error.code` names the rule, `error.message` what to fix",
        "404": "no such function",
        "409": "already exists",
        "412": "If-Match does not match the current ETag",
        "413": "body or unpacked archive too large",
        "415": "unsupported content type",
    }.items()
}
_QUOTA = {
    "429": _json(
        "Error",
        "`quota_exceeded`: the namespace's functions or instances (replicas) would pass its "
        "quota; the message says what to do. Or `too_many_failed_attempts` (Retry-After): 20 "
        "failed authentications from this address in a minute",
    )
}
_AUTH_RESPONSES = {
    "Unauthenticated": _json(
        "Error",
        "`unauthenticated`: no token, or a malformed, unknown, revoked or expired one",
        {"WWW-Authenticate": {"schema": {"type": "string"}}},
    ),
    "Forbidden": _json("Error", "`forbidden`: the token's role or namespaces do not cover it"),
    "TooManyFailedAttempts": _json(
        "Error",
        "`too_many_failed_attempts`: 20 failed authentications from this address in a minute",
        {"Retry-After": {"schema": {"type": "integer"}}},
    ),
}
_AUTH_ERRORS = {
    status: {"$ref": f"#/components/responses/{name}"}
    for status, name in (
        ("401", "Unauthenticated"),
        ("403", "Forbidden"),
        ("429", "TooManyFailedAttempts"),
    )
}
_ETAG = {"ETag": {"schema": {"type": "string"}, "description": "the record's KV revision"}}
_IF_MATCH = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}


def _ndjson(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/x-ndjson": {"schema": _ref(name)}}}


def _health(description: str) -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "unavailable"]},
            "service": {"const": "gateway"},
            "nats": {"enum": ["connected", "disconnected"]},
        },
    }
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_SINCE = {
    "name": "since",
    "in": "query",
    "required": False,
    "description": "only what was stored at or after this RFC 3339 time, with a zone "
    "(`2026-01-31T12:00:00Z`)",
    "schema": {"type": "string", "format": "date-time"},
}
_LOG_TAIL = {
    "name": "tail",
    "in": "query",
    "required": False,
    "description": "only the last N lines (with `since`: the last N of those)",
    "schema": {"type": "integer", "minimum": 1, "maximum": 100000},
}
_LOG_FOLLOW = {
    "name": "follow",
    "in": "query",
    "required": False,
    "description": "`1`, `true` or `yes`: keep streaming new lines (without `tail` and `since`, "
    "starting with the last 100); any other value: no",
    "schema": {"type": "string"},
}
_LOGS_SERVICE_ERRORS = {
    "502": _json("Error", "the logs service answered an error (its `code` and `message`)"),
    "503": _json(
        "Error",
        "`unavailable`: no logs service answered, or not in time; retry",
        {"Retry-After": {"schema": {"type": "integer"}}},
    ),
}


def _params(*names: str) -> list[dict[str, Any]]:
    return [
        {
            "name": n,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": LABEL_PATTERN, "maxLength": 63},
        }
        for n in names
    ]


EVENTS_DESCRIPTION = """\
Publish CloudEvents 1.0 for triggers to deliver, in any HTTP mode:

- binary: the attributes as `ce-<name>` headers (percent-encoded), the data as the body,
  `Content-Type` as `datacontenttype`;
- structured: one event as a JSON object, `Content-Type: application/cloudevents+json`;
- batch: a JSON array of structured events, `Content-Type: application/cloudevents-batch+json`.

Every event must have `id`, `source`, `specversion` (`1.0`) and `type`, non-empty strings; `time`,
when present, is RFC 3339; `data` and `data_base64` exclude each other and `data_base64` is
base64; attribute names are 1 to 20 of a-z and 0-9. One invalid event refuses the whole request:
400 `invalid_cloudevent`, with `error.details.attribute` (and, in a batch, `error.details.index`)
naming the first problem and `error.details.problems` listing all; nothing is stored. A request
in none of the three modes (no `ce-*` headers and no CloudEvents content type) is a 400
`unsupported_content_type`. A single event's body, and each event of a batch, is at most 1 MiB
(`LAMBDABUS_GATEWAY_MAX_EVENT_BYTES`): 413 beyond.

The 202 comes once every event is stored in the `EVENTS` stream. An event with the `(source, id)`
of one stored within the duplicate window (`LAMBDABUS_NATS_EVENTS_DUPLICATE_WINDOW_SECONDS`, 10
minutes by default) is not stored again and counts in `duplicates`; so a request that failed
(503) can be sent again whole.

**Publishing straight onto NATS.** A producer with access to NATS may skip this endpoint: publish
the event in structured mode (JSON, header `Content-Type: application/cloudevents+json`) with a
JetStream publish, waiting for the ack, to the subject `lambdabus.events.t.<encoded type>` with
the header `Nats-Msg-Id: <hex sha256 of source + NUL + id>` (the deduplication key). The encoded
type keeps the type's dots as token separators and writes every other byte outside
`[A-Za-z0-9_-]` as `%XX` (uppercase hex of its UTF-8 bytes), so no value can act as a wildcard
(`*`, `>`) or add a token; a type with an empty token (a leading, trailing or doubled dot) is
escaped whole into one token, its dots as `%2E`. For example `com.example.order.created` →
`lambdabus.events.t.com.example.order.created`, `a b.*` → `lambdabus.events.t.a%20b.%2A`,
`.x` → `lambdabus.events.t.%2Ex`. Nothing validates an event published that way: send only
valid CloudEvents 1.0.
"""

_STRUCTURED_EVENT: dict[str, Any] = {
    "type": "object",
    "description": "a CloudEvent in the JSON format (structured mode)",
    "required": ["specversion", "id", "source", "type"],
    "properties": {
        "specversion": {"const": "1.0"},
        "id": {"type": "string", "minLength": 1},
        "source": {"type": "string", "minLength": 1, "format": "uri-reference"},
        "type": {"type": "string", "minLength": 1},
        "subject": {"type": "string", "minLength": 1},
        "time": {"type": "string", "format": "date-time"},
        "datacontenttype": {"type": "string", "minLength": 1},
        "dataschema": {"type": "string", "format": "uri"},
        "data": {},
        "data_base64": {"type": "string", "contentEncoding": "base64"},
    },
    "propertyNames": {"pattern": "^([a-z0-9]{1,20}|data_base64)$"},
    "additionalProperties": {"type": ["string", "integer", "boolean"]},
}


def route_descriptions() -> dict[str, dict[str, Any]]:
    """What each route does, by path then lowercase method (plus the path's own `parameters`).

    A new route of the gateway gets its operation here; `document_for` fails on a route without
    one and on an operation of a route that does not exist.
    """
    upload_body = {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["archive", "spec"],
                    "properties": {
                        "archive": {
                            "type": "string",
                            "format": "binary",
                            "description": "the function's zip, tar (plain, gzip, bzip2 or xz: "
                            "told from the content) or single source file (stored under the "
                            "handler's module name; its file name must end in .py or .js)",
                        },
                        "spec": _ref("FunctionSpec"),
                        "dependencies": {
                            "type": "string",
                            "format": "binary",
                            "description": "a requirements.txt or package.json replacing the "
                            "one in the archive (Kubeless's --dependencies)",
                        },
                    },
                },
                "encoding": {"spec": {"contentType": "application/json"}},
            },
            "application/json": {"schema": _ref("InlineUpload")},
        },
    }
    fn = "/v1/namespaces/{ns}/functions"
    described: dict[str, dict[str, Any]] = {
        fn: {
            "parameters": _params("ns"),
            "post": {
                "operationId": "createFunction",
                "summary": f"Create a function (runtimes: {', '.join(RUNTIMES)})",
                "requestBody": upload_body,
                "responses": {
                    "202": _json("FunctionRecord", "accepted; the build follows", _ETAG),
                    **_ERRORS,
                    **_QUOTA,
                },
            },
            "get": {
                "operationId": "listFunctions",
                "parameters": [
                    {
                        "name": "label",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "array", "items": {"type": "string"}},
                        "style": "form",
                        "explode": True,
                        "description": "`key=value` (equal) or `key` (present); repeated: all",
                    }
                ],
                "responses": {
                    "200": _json("FunctionList", "the namespace's functions"),
                    "400": _ERRORS["400"],
                },
            },
        },
        fn + "/{name}": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "getFunction",
                "responses": {"200": _json("FunctionRecord", "the record", _ETAG), **_ERRORS},
            },
            "put": {
                "operationId": "replaceFunction",
                "parameters": [_IF_MATCH],
                "requestBody": upload_body,
                "responses": {
                    "202": _json("FunctionRecord", "changed; a new generation", _ETAG),
                    "200": _json("FunctionRecord", "nothing changed", _ETAG),
                    **_ERRORS,
                    **_QUOTA,
                },
            },
            "patch": {
                "operationId": "patchFunction",
                "parameters": [_IF_MATCH],
                "requestBody": {
                    "content": {"application/merge-patch+json": {"schema": {"type": "object"}}}
                },
                "responses": {
                    "202": _json("FunctionRecord", "changed", _ETAG),
                    **_ERRORS,
                    **_QUOTA,
                },
            },
            "delete": {
                "operationId": "deleteFunction",
                "parameters": [_IF_MATCH],
                "responses": {"202": _json("FunctionRecord", "deleted; instances stop"), **_ERRORS},
            },
        },
        fn + "/{name}/status": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "functionStatus",
                "responses": {
                    "200": _json("FunctionStatus", "image status, lambda status, conditions"),
                    **_ERRORS,
                },
            },
        },
        fn + "/{name}/sync": {
            "parameters": _params("ns", "name"),
            "post": {
                "operationId": "syncFunction",
                "summary": "Look at a git-sourced function's reference now (it is polled anyway)",
                "description": (
                    "A new commit becomes a new source and generation (built and rolled out as "
                    "an update); a failed look is recorded as `ConfigurationReady` "
                    "`SourceUpdateFailed` with why. 409 `not_git_sourced` for other functions."
                ),
                "responses": {
                    "200": _json("FunctionRecord", "the record after the look"),
                    **_ERRORS,
                },
            },
        },
        fn + "/{name}/logs": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "functionLogs",
                "summary": "The function's runtime log lines, oldest first, as NDJSON",
                "description": (
                    "Read through the logs service from the LOGS stream: at most 10,000 lines "
                    "(or what fits a NATS reply; then `X-Lambdabus-Truncated: true`). There is "
                    "no existence check: a deleted function's lines stay readable until the "
                    "stream drops them, and an unknown one has none. With `follow` the answer "
                    "stays open and new lines follow as they are written, with an empty line "
                    "as a keepalive every `LAMBDABUS_GATEWAY_SSE_KEEPALIVE_SECONDS` (15) while "
                    "none comes; it ends when the client goes or the gateway stops."
                ),
                "parameters": [
                    _LOG_TAIL,
                    _SINCE,
                    _LOG_FOLLOW,
                    {
                        "name": "invocation",
                        "in": "query",
                        "required": False,
                        "description": "only the lines written during this invocation (the "
                        "`X-Lambdabus-Invocation-Id` of a call, or the id of an event)",
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:/@+=-]{1,128}$"},
                    },
                ],
                "responses": {
                    "200": _ndjson("LogLine", "one `LogLine` JSON object per line"),
                    "400": _json(
                        "Error",
                        "`invalid_name`, `invalid_tail`, `invalid_since` or `invalid_invocation`",
                    ),
                    **_LOGS_SERVICE_ERRORS,
                },
            },
        },
        fn + "/{name}/build/logs": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "functionBuildLogs",
                "summary": "The function's build log lines, oldest first, as NDJSON",
                "description": (
                    "As `.../logs`, for the lines its builds wrote (every generation's: each "
                    "line says its `generation`)."
                ),
                "parameters": [_LOG_TAIL, _SINCE, _LOG_FOLLOW],
                "responses": {
                    "200": _ndjson("LogLine", "one `LogLine` JSON object per line"),
                    "400": _json("Error", "`invalid_name`, `invalid_tail` or `invalid_since`"),
                    **_LOGS_SERVICE_ERRORS,
                },
            },
        },
        fn + "/{name}/history": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "functionHistory",
                "summary": "The function's lifecycle events and who caused each (its audit trail)",
                "description": (
                    "Read through the logs service from the LIFECYCLE stream; there is no "
                    "existence check: a deleted function's history stays readable until the "
                    "stream drops it."
                ),
                "parameters": [_SINCE],
                "responses": {
                    "200": _json("History", "its lifecycle events, oldest first"),
                    "400": _json("Error", "`invalid_name` or `invalid_since`"),
                    **_LOGS_SERVICE_ERRORS,
                },
            },
        },
        # -- LUNA docs
        fn + "/{name}/docs": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "functionDocs",
                "summary": "The archive's docs/lambda.html, under a CSP that runs no script",
                "responses": {
                    "200": {
                        "description": "the HTML as uploaded",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **_ERRORS,
                },
            },
        },
        fn + "/{name}/docs.yml": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "functionDocsYaml",
                "summary": "The archive's docs/lambda.yml",
                "responses": {
                    "200": {
                        "description": "the YAML as uploaded",
                        "content": {"application/yaml": {"schema": {"type": "string"}}},
                    },
                    **_ERRORS,
                },
            },
        },
        fn + "/{name}/invoke": {
            "parameters": _params("ns", "name"),
            "post": {
                "operationId": "invokeFunction",
                "summary": "Invoke synchronously through the router; the function's answer comes back as it is",
                "description": (
                    "With `Prefer: respond-async` the invocation is queued instead: 202 with "
                    "`invocation_id`, `Location` (GET it for the status and result) and "
                    "`Preference-Applied: respond-async`. An `X-Callback-Url` (http or https) "
                    "receives the result. The function gets the request's end-to-end headers, "
                    "query and body, and is retried like a trigger's delivery."
                ),
                "parameters": [
                    {
                        "name": "Prefer",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "example": "respond-async"},
                    },
                    {
                        "name": "X-Callback-Url",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "format": "uri"},
                    },
                ],
                "requestBody": {"content": {"*/*": {}}},
                "responses": {
                    "200": {"description": "the function's response"},
                    "202": _json(
                        "InvocationAccepted",
                        "queued (Prefer: respond-async)",
                        {
                            "Location": {"schema": {"type": "string"}},
                            "Preference-Applied": {"schema": {"type": "string"}},
                        },
                    ),
                    "400": _json("Error", "X-Callback-Url is not an http(s) URL"),
                    "404": _ERRORS["404"],
                    "413": _ERRORS["413"],
                    "503": _json("Error", "no ready instance, or the router is unavailable"),
                    "504": _json("Error", "the function ran past its timeout"),
                },
            },
        },
        "/v1/namespaces/{ns}/invocations/{id}": {
            "parameters": [
                *_params("ns"),
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
            ],
            "get": {
                "operationId": "getInvocation",
                "summary": "An asynchronous invocation: queued, running, succeeded or failed",
                "responses": {
                    "200": _json("InvocationRecord", "its status, result or error, attempts"),
                    "404": _json("Error", "no such invocation (`invocation_not_found`)"),
                },
            },
        },
        "/v1/events": {
            "post": {
                "operationId": "publishEvents",
                "summary": "Publish CloudEvents (binary, structured or batch mode)",
                "description": EVENTS_DESCRIPTION,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/cloudevents+json": {"schema": _STRUCTURED_EVENT},
                        "application/cloudevents-batch+json": {
                            "schema": {"type": "array", "items": _STRUCTURED_EVENT}
                        },
                        "*/*": {
                            "schema": {"description": "binary mode: the data; attributes in ce-*"}
                        },
                    },
                },
                "responses": {
                    "202": _json("EventsAccepted", "stored"),
                    "400": _json(
                        "Error",
                        "`invalid_cloudevent` (details name the attribute) or "
                        "`unsupported_content_type`; nothing stored",
                    ),
                    "413": _ERRORS["413"],
                    "503": _json("Error", "NATS did not acknowledge; send the request again"),
                },
            }
        },
        "/v1/namespaces/{ns}/triggers": {
            "parameters": _params("ns"),
            "post": {
                "operationId": "createTrigger",
                "summary": "Deliver every event matching `filter` to `function`",
                "description": (
                    "Filter keys are attribute names (`type`, `source`, `subject`, `id` or an "
                    "extension); a value matches exactly, or by prefix when it ends in `*` "
                    "(allowed only there). The function must exist; it need not run yet, its "
                    "events wait. Deleting the function deletes its triggers."
                ),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("TriggerSpec")}},
                },
                "responses": {
                    "201": _json(
                        "TriggerRecord",
                        "created",
                        {"Location": {"schema": {"type": "string"}}},
                    ),
                    "400": _json("Error", "`invalid_name`, `invalid_filter` or `invalid_trigger`"),
                    "404": _json("Error", "no such function (`function_not_found`)"),
                    "409": _json("Error", "the trigger exists (`trigger_exists`)"),
                    "415": _ERRORS["415"],
                },
            },
            "get": {
                "operationId": "listTriggers",
                "responses": {
                    "200": _json("TriggerList", "the namespace's triggers, by name"),
                    "400": _ERRORS["400"],
                },
            },
        },
        "/v1/namespaces/{ns}/triggers/{name}": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "getTrigger",
                "responses": {
                    "200": _json("TriggerRecord", "the trigger"),
                    "400": _ERRORS["400"],
                    "404": _json("Error", "no such trigger (`trigger_not_found`)"),
                },
            },
            "delete": {
                "operationId": "deleteTrigger",
                "responses": {
                    "202": _json("TriggerRecord", "deleted; its consumer goes"),
                    "400": _ERRORS["400"],
                    "404": _json("Error", "no such trigger (`trigger_not_found`)"),
                },
            },
        },
        "/v1/namespaces/{ns}/functions/{name}/metrics": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "functionMetrics",
                "summary": "Calls, errors, throttles, cold starts and p50/p95/p99 (ms) per window",
                "description": (
                    "`windows` has `1m`, `5m` and `1h`, each `{calls, errors, throttles, "
                    "cold_starts, p50_ms, p95_ms, p99_ms}` (percentiles null without calls). "
                    "Every router counts the calls it relays in 10-second slots and writes them "
                    "every `stats_publish_seconds`; this adds up every router's slots. Errors "
                    "are 5xx answers, throttles 429s, a cold start an instance's first call."
                ),
                "responses": {
                    "200": {
                        "description": "the function's call statistics",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "400": _ERRORS["400"],
                    "404": _json("Error", "no such function (`function_not_found`)"),
                },
            },
        },
        "/v1/namespaces/{ns}/functions/{name}/revisions": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "listRevisions",
                "summary": "The function's immutable revisions, oldest first",
                "description": (
                    "`{items: [{name, generation, created, ready, image_status, status, "
                    "traffic_percent, tags, runtime, source_sha256}]}`. A change of what runs "
                    "(source, runtime, handler, env, secrets, memory, cpu, timeout, limits, "
                    "command) makes a revision `<name>-00001`, `<name>-00002`, ...; a change of "
                    "scale settings alone makes none."
                ),
                "responses": {
                    "200": {
                        "description": "the revisions",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "400": _ERRORS["400"],
                    "404": _json("Error", "no such function (`function_not_found`)"),
                },
            },
        },
        "/v1/namespaces/{ns}/functions/{name}/revisions/{revision}": {
            "parameters": [*_params("ns", "name"), *_params("revision")],
            "get": {
                "operationId": "getRevision",
                "responses": {
                    "200": {
                        "description": "the revision",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "400": _ERRORS["400"],
                    "404": _json("Error", "no such revision (`revision_not_found`)"),
                },
            },
            "delete": {
                "operationId": "deleteRevision",
                "summary": "Delete a revision nothing routes to",
                "responses": {
                    "200": {
                        "description": "deleted; its instances stop",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "400": _ERRORS["400"],
                    "404": _json("Error", "no such revision (`revision_not_found`)"),
                    "409": _json(
                        "Error",
                        "the route gives it traffic or a tag, or it is the latest "
                        "(`revision_in_use`)",
                    ),
                },
            },
        },
        "/v1/namespaces/{ns}/functions/{name}/traffic": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "getTraffic",
                "summary": "The function's route and its status",
                "description": (
                    "`{traffic, effective, latest_created_revision, latest_ready_revision, "
                    "urls: {default, <tag>...}, conditions: [{type: AllTrafficAssigned, ...}]}`. "
                    "`effective`: the percent each ready revision gets now (the share of an "
                    "entry whose revision is not ready goes to the ready ones meanwhile)."
                ),
                "responses": {
                    "200": {
                        "description": "the route",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "400": _ERRORS["400"],
                    "404": _json("Error", "no such function (`function_not_found`)"),
                },
            },
            "put": {
                "operationId": "setTraffic",
                "summary": "Split the function's traffic among its revisions",
                "description": (
                    '`{"traffic": [{"revision": "hello-00001", "percent": 90}, {"latest": '
                    'true, "percent": 10, "tag": "candidate"}]}`: integer percents summing to '
                    "100; a tagged entry answers at `/{ns}/{name}@{tag}/...` on the router. "
                    "Every answer through the router says its revision in "
                    "`X-Lambdabus-Revision`."
                ),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": {
                        "description": "the route after the change",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "400": _json(
                        "Error",
                        "percents that do not sum to 100 (`traffic_sum`, naming the sum), an "
                        "unknown revision (`revision_not_found`), a tag used twice",
                    ),
                    "404": _json("Error", "no such function (`function_not_found`)"),
                },
            },
        },
        "/v1/namespaces/{ns}/schedules": {
            "parameters": _params("ns"),
            "post": {
                "operationId": "createSchedule",
                "summary": "Call `function` at each tick of `cron` (in `timezone`)",
                "description": (
                    "`cron` is a five-field expression (`*/5 * * * *`), a shorthand (`@hourly`, "
                    "`@daily`, ...) or `@every <duration>` (`@every 30s`, `@every 1h30m`). Each "
                    "tick delivers one `io.lambdabus.schedule.fired` CloudEvent (subject "
                    "`<ns>/<schedule>`, `time` the tick, data `data`) with the retries and dead "
                    "letters of a trigger; after downtime the newest missed tick fires once."
                ),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ScheduleSpec")}},
                },
                "responses": {
                    "201": _json(
                        "ScheduleRecord",
                        "created",
                        {"Location": {"schema": {"type": "string"}}},
                    ),
                    "400": _json(
                        "Error",
                        "`invalid_name`, `invalid_cron`, `invalid_timezone` or `invalid_schedule`"
                        " (`details.field` names the field)",
                    ),
                    "404": _json("Error", "no such function (`function_not_found`)"),
                    "409": _json("Error", "the schedule exists (`schedule_exists`)"),
                    "415": _ERRORS["415"],
                },
            },
            "get": {
                "operationId": "listSchedules",
                "responses": {
                    "200": _json("ScheduleList", "the namespace's schedules, by name"),
                    "400": _ERRORS["400"],
                },
            },
        },
        "/v1/namespaces/{ns}/schedules/{name}": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "getSchedule",
                "responses": {
                    "200": _json("ScheduleRecord", "the schedule"),
                    "400": _ERRORS["400"],
                    "404": _json("Error", "no such schedule (`schedule_not_found`)"),
                },
            },
            "delete": {
                "operationId": "deleteSchedule",
                "responses": {
                    "202": _json("ScheduleRecord", "deleted; no tick fires after this"),
                    "400": _ERRORS["400"],
                    "404": _json("Error", "no such schedule (`schedule_not_found`)"),
                },
            },
        },
        "/v1/namespaces/{ns}/secrets": {
            "parameters": _params("ns"),
            "post": {
                "operationId": "createSecret",
                "summary": "Store a secret, encrypted at rest; no answer ever shows its values",
                "description": (
                    "A function uses it by `secrets: [name]` (each key a read-only file "
                    "/secrets/<name>/<key>) or `env_from: {VAR: {secret, key}}`. Changing it "
                    "rolls out the functions that use it."
                ),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SecretWrite")}},
                },
                "responses": {
                    "201": _json(
                        "SecretInfo",
                        "created: key names and version, no values",
                        {"Location": {"schema": {"type": "string"}}},
                    ),
                    "400": _json("Error", "`invalid_name`, `invalid_secret` or `malformed_json`"),
                    "409": _json("Error", "the secret exists (`secret_exists`); PUT replaces it"),
                    "413": _ERRORS["413"],
                    "415": _ERRORS["415"],
                },
            },
            "get": {
                "operationId": "listSecrets",
                "responses": {
                    "200": _json("SecretList", "the namespace's secrets: key names, no values"),
                    "400": _ERRORS["400"],
                },
            },
        },
        "/v1/namespaces/{ns}/secrets/{name}": {
            "parameters": _params("ns", "name"),
            "get": {
                "operationId": "getSecret",
                "responses": {
                    "200": _json("SecretInfo", "key names and version, no values"),
                    "404": _json("Error", "no such secret (`secret_not_found`)"),
                },
            },
            "put": {
                "operationId": "replaceSecret",
                "summary": "Replace a secret's data (the version goes up by one)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SecretWrite")}},
                },
                "responses": {
                    "200": _json("SecretInfo", "replaced"),
                    "400": _json("Error", "`invalid_name`, `invalid_secret` or `malformed_json`"),
                    "404": _json("Error", "no such secret (`secret_not_found`)"),
                    "413": _ERRORS["413"],
                },
            },
            "delete": {
                "operationId": "deleteSecret",
                "responses": {
                    "200": _json("SecretInfo", "deleted; functions that use it keep running"),
                    "404": _json("Error", "no such secret (`secret_not_found`)"),
                },
            },
        },
        "/v1/namespaces/{ns}/quota": {
            "parameters": _params("ns"),
            "get": {
                "operationId": "getQuota",
                "responses": {"200": _json("NamespaceQuota", "the limits in force")},
            },
            "put": {
                "operationId": "setQuota",
                "summary": "Set a namespace's overrides (fields left out take the defaults)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("Quota")}},
                },
                "responses": {
                    "200": _json("NamespaceQuota", "the limits in force now"),
                    "400": _ERRORS["400"],
                },
            },
        },
        "/v1/namespaces/{ns}/deadletters": {
            "parameters": _params("ns"),
            "get": {
                "operationId": "listDeadLetters",
                "summary": "Events whose delivery was given up, oldest first",
                "parameters": [
                    {
                        "name": "trigger",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": LABEL_PATTERN},
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "description": "only dead letters after this id (the previous `next`)",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                ],
                "responses": {
                    "200": _json("DeadLetterList", "a page of dead letters"),
                    "400": _ERRORS["400"],
                },
            },
        },
        "/v1/namespaces/{ns}/deadletters/{id}/redrive": {
            "parameters": [
                *_params("ns"),
                {
                    "name": "id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                },
            ],
            "post": {
                "operationId": "redriveDeadLetter",
                "summary": "Send a dead letter's event again to its trigger, and remove it",
                "responses": {
                    "202": _json("Redriven", "sent again; no longer listed"),
                    "400": _json("Error", "not a dead letter id"),
                    "404": _json(
                        "Error",
                        "no such dead letter (`deadletter_not_found`) or its trigger is gone "
                        "(`trigger_not_found`)",
                    ),
                },
            },
        },
        "/v1/lifecycle": {
            "get": {
                "operationId": "lifecycle",
                "summary": "Server-sent lifecycle CloudEvents (structured JSON per `data:` line)",
                "description": (
                    "Each event is a frame with `id:` (its sequence in the LIFECYCLE stream), "
                    "`event:` (its type) and `data:`. A reader that lost its connection sends "
                    "the last `id:` it had as `Last-Event-ID` and the stream resumes right "
                    "after it: nothing lost, nothing twice. `since` (RFC 3339) starts at a "
                    "time instead; with neither, the stream starts now."
                ),
                "parameters": [
                    *(
                        {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                        for n in ("namespace", "function", "type", "since")
                    ),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": "resume after this event (400 `invalid_last_event_id` "
                        "unless it is a sequence)",
                        "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"},
                    },
                ],
                "responses": {
                    "200": {"description": "event stream", "content": {"text/event-stream": {}}},
                    "400": _ERRORS["400"],
                },
            }
        },
        "/v1/tokens": {
            "post": {
                "operationId": "createToken",
                "summary": "Mint an API token (an admin token for every namespace only)",
                "description": (
                    "The secret (`token`) is in this answer only; the platform keeps a hash. A "
                    "token cannot be minted beyond the minting token's role, namespaces or "
                    "expiry."
                ),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("TokenRequest")}},
                },
                "responses": {
                    "201": _json("TokenCreated", "minted; keep the secret"),
                    "400": _json("Error", "`invalid_token_request`"),
                },
            },
            "get": {
                "operationId": "listTokens",
                "responses": {"200": _json("TokenList", "every token, never a secret")},
            },
        },
        "/v1/tokens/{id}": {
            "parameters": [
                {
                    "name": "id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": "^[0-9a-f]{16}$"},
                }
            ],
            "delete": {
                "operationId": "revokeToken",
                "summary": "Revoke a token: every gateway and router refuses it within a second",
                "responses": {
                    "200": _json("TokenListed", "revoked"),
                    "404": _json("Error", "no such token (`token_not_found`)"),
                },
            },
        },
        "/v1/info": {
            "get": {
                "operationId": "info",
                "summary": "The gateway's version and where functions answer (any valid token)",
                "responses": {"200": _json("Info", "version and router URL")},
            },
        },
        "/v1/namespaces": {
            "get": {
                "operationId": "listNamespaces",
                "summary": "The namespaces this token may use (any valid token)",
                "responses": {"200": _json("NamespaceNames", "the namespaces, by name")},
            },
        },
        "/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "the OpenAPI 3.1 document of the management API",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            },
        },
        "/v1/replicas": {
            "get": {
                "operationId": "listReplicas",
                "summary": "Every live replica of every service (admin only)",
                "description": (
                    "From the heartbeat registry: a replica is listed while its last heartbeat "
                    "is younger than three of its intervals."
                ),
                "responses": {"200": _json("ReplicaList", "the live replicas")},
            },
        },
        # Added by the service shell (`lambdabus_platform.service.make_app`), as on every service.
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Whether the gateway is up and connected to NATS (no token needed)",
                "security": [],
                "responses": {
                    "200": _health("ok"),
                    "503": _health("not ready: NATS is disconnected, or the gateway is stopping"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "The gateway's Prometheus metrics",
                "description": 'Needs an admin or viewer token for every namespace (`["*"]`).',
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    return described


# The static files of the web console under /ui (`tokens.PUBLIC_PREFIX`) are public, and not
# API: they are left out of the document.
_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


class OpenApiDrift(LambdabusError):
    """The routes and their descriptions disagree: `undescribed` routes have no operation in
    `route_descriptions`, `stale` operations name no route. Each a (METHOD, path)."""

    code = "openapi_drift"

    def __init__(self, undescribed: list[Route], stale: list[Route]) -> None:
        problems = [
            f"{m} {p} has no OpenAPI description: add its operation as "
            f'route_descriptions()["{p}"]["{m.lower()}"] in lambdabus_gateway/openapi.py, '
            "then run `make schemas`"
            for m, p in undescribed
        ] + [
            f"the OpenAPI description of {m} {p} names no route of the gateway: remove "
            f'route_descriptions()["{p}"]["{m.lower()}"] from lambdabus_gateway/openapi.py, '
            "or register the route (lambdabus_gateway.api.add_routes)"
            for m, p in stale
        ]
        super().__init__(
            "\n".join(problems),
            details={
                "undescribed": [" ".join(r) for r in undescribed],
                "stale": [" ".join(r) for r in stale],
            },
        )
        self.undescribed = undescribed
        self.stale = stale


def gateway_app() -> web.Application:
    """An application with the gateway's routes, registered as the running gateway does it
    (`make_app`, then `add_routes`): no NATS, no client; no handler is called."""
    # Imported here: `api` imports this module to serve the document.
    from lambdabus_gateway.api import add_routes

    app = make_app()
    add_routes(app)
    return app


def api_routes(app: web.Application) -> list[Route]:
    """(METHOD, path) of every route of `app` the document describes, sorted: not the HEAD route
    aiohttp adds for each GET, not the web console's files under `PUBLIC_PREFIX`."""
    found: set[Route] = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is None:
            continue
        path = resource.canonical
        if path == PUBLIC_PREFIX or path.startswith(PUBLIC_PREFIX + "/"):
            continue
        found.add((route.method, path))
    return sorted(r for r in found if not (r[0] == "HEAD" and ("GET", r[1]) in found))


def _paths(routes: Iterable[Route], described: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The document's `paths`: each route with its operation. Raises `OpenApiDrift`."""
    routes = list(routes)
    undescribed = [(m, p) for m, p in routes if m.lower() not in described.get(p, {})]
    served = set(routes)
    stale = sorted(
        (key.upper(), path)
        for path, item in described.items()
        for key in item
        if key in _METHODS and (key.upper(), path) not in served
    )
    if undescribed or stale:
        raise OpenApiDrift(undescribed, stale)
    paths: dict[str, Any] = {}
    for method, path in routes:
        item = described[path]
        shared = {k: v for k, v in item.items() if k not in _METHODS}
        operation = dict(item[method.lower()])
        if operation.get("security") != []:
            # A route's own 429 (quota_exceeded) stays: both codes are documented there.
            operation["responses"] = {**_AUTH_ERRORS, **operation["responses"]}
        paths.setdefault(path, shared)[method.lower()] = operation
    return paths


@cache
def render_openapi() -> dict[str, Any]:
    """The document of the gateway's routes (`gateway_app`). Raises `OpenApiDrift` when a route
    has no description or a description no route."""
    return document_for(api_routes(gateway_app()))


def document_for(
    routes: Iterable[Route], described: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The OpenAPI document of `routes`, each described by `described` (by default
    `route_descriptions()`). Raises `OpenApiDrift`."""
    paths = _paths(routes, route_descriptions() if described is None else described)
    _, defs = models_json_schema(
        [
            (m, "validation")
            for m in (
                FunctionSpec,
                FunctionRecord,
                FunctionStatus,
                FunctionList,
                Error,
                InlineUpload,
                TriggerSpec,
                TriggerRecord,
                TriggerList,
                ScheduleSpec,
                ScheduleRecord,
                ScheduleList,
                DeadLetterList,
                Redriven,
                InvocationRecord,
                InvocationAccepted,
                EventsAccepted,
                SecretWrite,
                SecretInfo,
                SecretList,
                Quota,
                NamespaceQuota,
                TokenRequest,
                TokenCreated,
                TokenList,
                ReplicaList,
                LogLine,
                History,
                Info,
                NamespaceNames,
            )
        ],
        ref_template="#/components/schemas/{model}",
    )
    return {
        "openapi": "3.1.0",
        "info": {"title": "Lambdabus management API", "version": "1", "description": AUTH_TEXT},
        "paths": paths,
        "security": [{"bearer": []}],
        "components": {
            "schemas": defs["$defs"],
            "responses": _AUTH_RESPONSES,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "lbt_<id>_<secret>",
                    "description": "an API token (POST /v1/tokens; the first admin token is in "
                    "<data dir>/admin.token)",
                }
            },
        },
    }


def match_operation(
    document: dict[str, Any], method: str, url_path: str
) -> tuple[str, dict[str, Any]] | None:
    """The path template of `document` that `url_path` (a concrete path such as
    `/v1/namespaces/default/functions/hello/logs`; a query string is ignored) falls under, and
    its operation for `method`; None when no path has that operation. A `{param}` segment
    matches one non-empty segment; where several templates match, the one with literal segments
    first wins (`/a/b` before `/a/{x}`), as in OpenAPI."""
    segments = url_path.split("?", 1)[0].split("/")
    best: tuple[tuple[bool, ...], str, dict[str, Any]] | None = None
    for template, item in document["paths"].items():
        operation = item.get(method.lower())
        parts = template.split("/")
        if operation is None or len(parts) != len(segments):
            continue
        literal = tuple(not (p.startswith("{") and p.endswith("}")) for p in parts)
        if all(
            part == segment if is_literal else segment != ""
            for part, segment, is_literal in zip(parts, segments, literal, strict=True)
        ) and (best is None or literal > best[0]):
            best = (literal, template, operation)
    return None if best is None else (best[1], best[2])


def render_text() -> str:
    return json.dumps(render_openapi(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--root", type=Path, default=Path("schemas"))
    args = parser.parse_args(argv)
    target = args.root / "openapi.json"
    try:
        text = render_text()
    except OpenApiDrift as exc:
        print(exc.message, file=sys.stderr)
        return 1
    if args.check:
        if not target.exists() or target.read_text() != text:
            print(f"{target} drifts from the routes or models; run `make schemas`", file=sys.stderr)
            return 1
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
