"""The management API's front door: every route but the public ones (`/healthz`, `/ui/...`)
needs `Authorization: Bearer <token>`, checked against the route's action (see
`lambdabus_platform.tokens.ROUTES`: a route not classified there is refused), plus the token
routes `POST/GET /v1/tokens` and `DELETE /v1/tokens/{id}`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError

from lambdabus_platform.errors import Forbidden, InvalidRequest, LambdabusError
from lambdabus_platform.httpauth import (
    CURRENT_ACTOR,
    Actor,
    Authenticator,
    auth_error_response,
    authorize,
    client_address,
)
from lambdabus_platform.tokens import (
    QUERY_PARAMETERS,
    TokenRecord,
    TokenRequest,
    in_scope,
    is_public,
    mint_problem,
    namespaces_problem,
    route_action,
    utcnow,
)
from lambdabus_platform.tokenstore import TokenStore

TOKEN = web.RequestKey("token", TokenRecord)
AUTH = web.AppKey("auth", Authenticator)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate and authorize every request before its handler runs."""
    try:
        for parameter in QUERY_PARAMETERS:
            if parameter in request.query:
                raise InvalidRequest(
                    f"a token in the query string ({parameter}=) ends up in logs and histories; "
                    "send it as 'Authorization: Bearer <token>' instead",
                    code="token_in_query",
                )
        resource = request.match_info.route.resource
        canonical = resource.canonical if resource is not None else None
        if canonical is not None and is_public(canonical):
            return await handler(request)
        record = await request.app[AUTH].authenticate(request.headers, client_address(request))
        if canonical is not None:  # else no route matched: the handler answers 404 or 405
            action = route_action(request.method, canonical)
            if action is None:
                raise Forbidden(
                    f"{request.method} {canonical} has no access class; denied by default "
                    "(classify it in lambdabus_platform.tokens.ROUTES)"
                )
            authorize(record, action, request.match_info.get("ns"))
    except LambdabusError as exc:
        return auth_error_response(exc)
    request[TOKEN] = record
    reset = CURRENT_ACTOR.set(Actor(record.id, record.name))
    try:
        return await handler(request)
    finally:
        CURRENT_ACTOR.reset(reset)


def allowed_namespace(request: web.Request, namespace: str) -> bool:
    """Whether the request's token covers `namespace` (for answers that span namespaces)."""
    return in_scope(request[TOKEN], namespace)


def require_namespace(request: web.Request, namespace: str) -> None:
    if not allowed_namespace(request, namespace):
        raise Forbidden(f"this token is not for namespace {namespace!r}")


# -- token routes ---------------------------------------------------------------------------

TOKENS = web.AppKey("tokens", TokenStore)
_MAX_BODY = 16 * 1024


async def create_token(request: web.Request) -> web.Response:
    store = request.app[TOKENS]
    raw = await request.content.read(_MAX_BODY + 1)
    if len(raw) > _MAX_BODY:
        raise InvalidRequest("the token request is too large", code="payload_too_large", status=413)
    try:
        body = json.loads(raw or b"null")
        wanted = TokenRequest.model_validate(body)
    except (ValueError, ValidationError) as exc:
        raise InvalidRequest(
            'send {"name", "role": admin|developer|viewer|invoker|auditor, "namespaces": '
            f'["team-a"] or ["*"], "expires_in": seconds or null}}: {_first_problem(exc)}',
            code="invalid_token_request",
        ) from None
    problem = namespaces_problem(wanted.namespaces)
    if problem:
        raise InvalidRequest(problem, code="invalid_token_request")
    minter = request[TOKEN]
    beyond = mint_problem(minter, wanted, utcnow())
    if beyond:
        raise Forbidden(beyond)
    minted = await store.create(
        wanted.name,
        wanted.role,
        wanted.namespaces,
        expires_in=wanted.expires_in,
        created_by=minter.id,
    )
    shown = minted.record.public(utcnow())
    body_out = {key: shown[key] for key in ("id", "name", "role", "namespaces", "expires")}
    return web.json_response(
        {**body_out, "token": minted.token},
        status=201,
        headers={"Location": f"/v1/tokens/{minted.record.id}", "Cache-Control": "no-store"},
    )


def _first_problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "body"
        return f"{where}: {error['msg']}"
    return "the body is not JSON"


async def list_tokens(request: web.Request) -> web.Response:
    now = utcnow()
    records = await request.app[TOKENS].list()
    return web.json_response({"items": [r.public(now) for r in records]})


async def delete_token(request: web.Request) -> web.Response:
    record = await request.app[TOKENS].revoke(request.match_info["id"])
    return web.json_response(record.public(utcnow()))


def add_token_routes(app: web.Application) -> None:
    app.router.add_post("/v1/tokens", create_token)
    app.router.add_get("/v1/tokens", list_tokens)
    app.router.add_delete("/v1/tokens/{id}", delete_token)
