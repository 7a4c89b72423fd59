"""The OpenAPI document's paths are the gateway's routes: every route, registered as the running
gateway registers it, has an operation; an operation of a route that does not exist fails; and
`match_operation` finds the operation a concrete URL path falls under."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lambdabus_gateway.openapi import (
    OpenApiDrift,
    api_routes,
    document_for,
    gateway_app,
    match_operation,
    render_openapi,
    route_descriptions,
)

FN = "/v1/namespaces/{ns}/functions"


async def _handler(request: web.Request) -> web.Response:
    return web.Response()


def _operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted(
        (key.upper(), path)
        for path, item in document["paths"].items()
        for key in item
        if key != "parameters"
    )


def test_every_gateway_route_has_an_operation_and_the_document_lists_nothing_else() -> None:
    routes = api_routes(gateway_app())
    assert _operations(render_openapi()) == routes
    # the routes the hand-written paths once missed, and the service shell's own
    for route in [
        ("GET", FN + "/{name}/logs"),
        ("GET", FN + "/{name}/build/logs"),
        ("GET", FN + "/{name}/history"),
        ("GET", "/v1/info"),
        ("GET", "/v1/openapi.json"),
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("DELETE", "/v1/tokens/{id}"),
    ]:
        assert route in routes
    assert [r for r in routes if r[0] == "HEAD"] == []


def test_an_undescribed_route_fails_the_rendering_naming_it() -> None:
    app = gateway_app()
    app.router.add_get("/v1/namespaces/{ns}/undescribed", _handler)
    app.router.add_post("/v1/info", _handler)  # a new method on a described path
    with pytest.raises(OpenApiDrift) as caught:
        document_for(api_routes(app))
    assert caught.value.undescribed == [
        ("GET", "/v1/namespaces/{ns}/undescribed"),
        ("POST", "/v1/info"),
    ]
    assert caught.value.stale == []
    message = caught.value.message
    assert "GET /v1/namespaces/{ns}/undescribed has no OpenAPI description" in message
    assert 'route_descriptions()["/v1/namespaces/{ns}/undescribed"]["get"]' in message
    assert "POST /v1/info has no OpenAPI description" in message


def test_a_route_whose_description_is_removed_fails_the_rendering() -> None:
    described = route_descriptions()
    del described[FN + "/{name}/logs"]["get"]
    with pytest.raises(OpenApiDrift, match=re.escape(f"GET {FN}/{{name}}/logs has no OpenAPI")):
        document_for(api_routes(gateway_app()), described)


def test_a_stale_description_fails_the_rendering_naming_it() -> None:
    described = route_descriptions()
    described["/v1/gone"] = {"get": {"responses": {"200": {"description": "gone"}}}}
    described["/v1/info"]["delete"] = {"responses": {"200": {"description": "no such route"}}}
    with pytest.raises(OpenApiDrift) as caught:
        document_for(api_routes(gateway_app()), described)
    assert caught.value.stale == [("DELETE", "/v1/info"), ("GET", "/v1/gone")]
    assert caught.value.undescribed == []
    assert "the OpenAPI description of GET /v1/gone names no route" in caught.value.message


def test_the_console_files_are_left_out(tmp_path: Path) -> None:
    app = gateway_app()
    # as the console registers them (`lambdabus_gateway.console`), and a static directory
    app.router.add_get("/ui", _handler)
    app.router.add_get("/ui/", _handler)
    app.router.add_get("/ui/{file}", _handler)
    app.router.add_static("/ui/assets", tmp_path)
    routes = api_routes(app)
    assert routes == api_routes(gateway_app())
    assert _operations(document_for(routes)) == routes


def test_only_the_head_routes_aiohttp_adds_for_a_get_are_left_out() -> None:
    app = gateway_app()
    assert ("HEAD", "/v1/info") in {
        (r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None
    }
    app.router.add_head("/v1/head-only", _handler)
    routes = api_routes(app)
    assert [r for r in routes if r[0] == "HEAD"] == [("HEAD", "/v1/head-only")]
    with pytest.raises(OpenApiDrift, match=re.escape("HEAD /v1/head-only has no OpenAPI")):
        document_for(routes)


def test_every_path_parameter_is_declared() -> None:
    for path, item in render_openapi()["paths"].items():
        for key, operation in item.items():
            if key == "parameters":
                continue
            declared = {
                p["name"]
                for p in [*item.get("parameters", []), *operation.get("parameters", [])]
                if p["in"] == "path"
            }
            assert declared == set(re.findall(r"\{(\w+)\}", path)), (key, path)


@pytest.mark.parametrize(
    ("method", "url_path", "template", "operation_id"),
    [
        ("GET", "/v1/namespaces/default/functions/hello/logs", FN + "/{name}/logs", "functionLogs"),
        ("get", "/v1/namespaces/default/functions/hello/logs?follow=1", FN + "/{name}/logs", None),
        ("GET", "/v1/namespaces/a/functions/b/build/logs", FN + "/{name}/build/logs", None),
        ("GET", "/v1/namespaces/a/functions/b/history", FN + "/{name}/history", None),
        ("GET", "/v1/namespaces/a/functions/b/docs.yml", FN + "/{name}/docs.yml", None),
        ("PATCH", "/v1/namespaces/a/functions/b", FN + "/{name}", "patchFunction"),
        ("POST", "/v1/namespaces/a/functions", FN, "createFunction"),
        ("DELETE", "/v1/tokens/0123456789abcdef", "/v1/tokens/{id}", "revokeToken"),
        ("GET", "/v1/openapi.json", "/v1/openapi.json", "openapi"),
        ("GET", "/healthz", "/healthz", "health"),
    ],
)
def test_match_operation_finds_the_template(
    method: str, url_path: str, template: str, operation_id: str | None
) -> None:
    document = render_openapi()
    found = match_operation(document, method, url_path)
    assert found is not None
    assert found[0] == template
    assert found[1] is document["paths"][template][method.lower()]
    if operation_id is not None:
        assert found[1]["operationId"] == operation_id


@pytest.mark.parametrize(
    ("method", "url_path"),
    [
        ("POST", "/v1/namespaces/default/functions/hello/logs"),  # no such method there
        ("GET", "/v1/namespaces/default/functions/hello/logs/more"),
        ("GET", "/v1/namespaces//functions"),  # a parameter is never empty
        ("GET", "/v1/info/"),
        ("GET", "/v1/nothing"),
        ("GET", "/ui/index.html"),
    ],
)
def test_match_operation_finds_nothing(method: str, url_path: str) -> None:
    assert match_operation(render_openapi(), method, url_path) is None


def test_match_operation_prefers_literal_segments_from_the_left() -> None:
    document = {
        "paths": {
            "/a/{x}": {"get": {"operationId": "param"}},
            "/a/b": {"get": {"operationId": "literal"}},
            "/{y}/c": {"get": {"operationId": "late-literal"}},
        }
    }
    assert match_operation(document, "GET", "/a/b") == ("/a/b", {"operationId": "literal"})
    assert match_operation(document, "GET", "/a/z") == ("/a/{x}", {"operationId": "param"})
    assert match_operation(document, "GET", "/a/c") == ("/a/{x}", {"operationId": "param"})
    assert match_operation(document, "GET", "/q/c") == ("/{y}/c", {"operationId": "late-literal"})
