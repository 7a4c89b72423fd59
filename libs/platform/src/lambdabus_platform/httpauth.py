"""Bearer authentication of an HTTP request, shared by the gateway and the router: the token
from `Authorization`, checked against the `TokenStore`, failed attempts limited per client
address, and the error answers (401 with `WWW-Authenticate: Bearer`, 403, 429 + Retry-After)."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from lambdabus_platform.errors import (
    Forbidden,
    LambdabusError,
    TooManyFailedAttempts,
    Unauthenticated,
)
from lambdabus_platform.service import error_response
from lambdabus_platform.tokens import Action, FailureLimiter, TokenRecord, bearer, may
from lambdabus_platform.tokenstore import TokenStore

_HELP = "send 'Authorization: Bearer <token>' (`lambdabus token create`, or .lambdabus/admin.token)"


@dataclass(frozen=True)
class Actor:
    """Who made an API call: its token's id and name (on the lifecycle events it causes)."""

    id: str
    name: str


# The actor of the request being handled; read where lifecycle events are published.
CURRENT_ACTOR: contextvars.ContextVar[Actor | None] = contextvars.ContextVar(
    "lambdabus_actor", default=None
)


class Authenticator:
    def __init__(self, store: TokenStore, limiter: FailureLimiter) -> None:
        self.store = store
        self.limiter = limiter

    async def authenticate(self, headers: Mapping[str, str], address: str) -> TokenRecord:
        """The token record of a request, or Unauthenticated / TooManyFailedAttempts."""
        now = asyncio.get_running_loop().time()
        wait = self.limiter.retry_after(address, now)
        if wait is not None:
            raise TooManyFailedAttempts(
                "too many failed authentication attempts from this address; "
                f"retry in {max(1, round(wait))} s",
                retry_after=wait,
            )
        credentials = bearer(headers.get("Authorization"))
        if credentials is None:
            raise Unauthenticated(f"this needs a token: {_HELP}")
        if not credentials:
            self.limiter.failed(address, now)
            raise Unauthenticated(f"the Authorization header is not a bearer token: {_HELP}")
        verdict = await self.store.verify(credentials)
        if verdict.record is None:
            self.limiter.failed(address, now)
            raise Unauthenticated(f"{verdict.problem}: {_HELP}")
        return verdict.record


def authorize(record: TokenRecord, action: Action, namespace: str | None) -> None:
    denied = may(record, action, namespace)
    if denied is not None:
        raise Forbidden(denied.message)


def auth_error_response(error: LambdabusError) -> web.Response:
    """The error answer, with `WWW-Authenticate` on a 401 (RFC 6750)."""
    response = error_response(error)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="lambdabus"'
    return response


def client_address(request: web.Request) -> str:
    return request.remote or "unknown"
