"""The OpenAPI document of the management API, generated from the wire models.

`python -m lambdabus_gateway.openapi [--check]` writes (or checks) `schemas/openapi.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from lambdabus_events.models import RUNTIMES, FunctionRecord, FunctionSpec, FunctionStatus
from lambdabus_events.names import LABEL_PATTERN


class ErrorBody(BaseModel):
    code: str = Field(description="stable, machine-readable")
    message: str = Field(description="what went wrong and what to do about it")
    details: dict[str, Any] | None = None


class Error(BaseModel):
    error: ErrorBody


class FunctionList(BaseModel):
    items: list[FunctionRecord]


class InlineSource(BaseModel):
    files: dict[str, str] = Field(description="path → text; must hold the runtime's entry point")


class InlineUpload(FunctionSpec):
    source: InlineSource


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
_ETAG = {"ETag": {"schema": {"type": "string"}, "description": "the record's KV revision"}}
_IF_MATCH = {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}


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


@cache
def render_openapi() -> dict[str, Any]:
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
            )
        ],
        ref_template="#/components/schemas/{model}",
    )
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
                            "description": "the function's zip",
                        },
                        "spec": _ref("FunctionSpec"),
                    },
                },
                "encoding": {"spec": {"contentType": "application/json"}},
            },
            "application/json": {"schema": _ref("InlineUpload")},
        },
    }
    fn = "/v1/namespaces/{ns}/functions"
    paths: dict[str, Any] = {
        fn: {
            "parameters": _params("ns"),
            "post": {
                "operationId": "createFunction",
                "summary": f"Create a function (runtimes: {', '.join(RUNTIMES)})",
                "requestBody": upload_body,
                "responses": {
                    "202": _json("FunctionRecord", "accepted; the build follows", _ETAG),
                    **_ERRORS,
                },
            },
            "get": {
                "operationId": "listFunctions",
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
                },
            },
            "patch": {
                "operationId": "patchFunction",
                "parameters": [_IF_MATCH],
                "requestBody": {
                    "content": {"application/merge-patch+json": {"schema": {"type": "object"}}}
                },
                "responses": {"202": _json("FunctionRecord", "changed", _ETAG), **_ERRORS},
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
        fn + "/{name}/invoke": {
            "parameters": _params("ns", "name"),
            "post": {
                "operationId": "invokeFunction",
                "summary": "Invoke synchronously through the router; the function's answer comes back as it is",
                "requestBody": {"content": {"*/*": {}}},
                "responses": {
                    "200": {"description": "the function's response"},
                    "404": _ERRORS["404"],
                    "413": _ERRORS["413"],
                    "503": _json("Error", "no ready instance, or the router is unavailable"),
                    "504": _json("Error", "the function ran past its timeout"),
                },
            },
        },
        "/v1/lifecycle": {
            "get": {
                "operationId": "lifecycle",
                "summary": "Server-sent lifecycle CloudEvents (structured JSON per `data:` line)",
                "parameters": [
                    {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
                    for n in ("namespace", "function", "type", "since")
                ],
                "responses": {
                    "200": {"description": "event stream", "content": {"text/event-stream": {}}},
                    "400": _ERRORS["400"],
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "responses": {"200": {"description": "ok"}, "503": {"description": "not ready"}},
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "responses": {"200": {"description": "Prometheus text"}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Lambdabus management API", "version": "1"},
        "paths": paths,
        "components": {"schemas": defs["$defs"]},
    }


def render_text() -> str:
    return json.dumps(render_openapi(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--root", type=Path, default=Path("schemas"))
    args = parser.parse_args(argv)
    target = args.root / "openapi.json"
    text = render_text()
    if args.check:
        if not target.exists() or target.read_text() != text:
            print(f"{target} drifts from the models; run `make schemas`", file=sys.stderr)
            return 1
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
