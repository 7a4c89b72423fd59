"""`POST .../functions/{name}/invoke`: relays the request to the router, the data plane, and
relays its answer back unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import aiohttp
from aiohttp import web

from lambdabus_gateway.uploads import read_body
from lambdabus_platform.errors import TemporaryError

# Headers that describe one connection, not the message: never forwarded.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)


def forward_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The end-to-end headers of a message. Pure."""
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


# What a function's answer may not do to the gateway's origin (the API's and the web console's):
# set cookies, clear the console's storage, pin transport or open it to other origins.
ORIGIN_HEADERS: Final = frozenset(
    {
        "set-cookie",
        "set-cookie2",
        "clear-site-data",
        "alt-svc",
        "strict-transport-security",
        "public-key-pins",
        "content-security-policy",
        "content-security-policy-report-only",
        "x-content-type-options",
    }
)
# The answer is data, never a page of the gateway's origin.
ANSWER_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox; default-src 'none'",
}


def relayed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of a function's answer as the gateway relays them. Pure."""
    kept = {
        k: v
        for k, v in forward_headers(headers).items()
        if k.lower() not in ORIGIN_HEADERS and not k.lower().startswith("access-control-")
    }
    return {**kept, **ANSWER_HEADERS}


class Invoker:
    def __init__(self, router_url: str, max_body: int) -> None:
        self._router = router_url.rstrip("/")
        self._max_body = max_body
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def relay(
        self,
        request: web.Request,
        namespace: str,
        name: str,
        timeout: float,
        *,
        forward_token: bool = False,
    ) -> web.Response:
        """Relay to the router. The caller's `Authorization` (its platform token, checked
        already) goes along only to a function with `invoke_auth: token`, for the router to
        check in turn (the router strips it before the instance); a public function never
        sees it."""
        body = await read_body(request, self._max_body, "the invocation body")
        headers = forward_headers(request.headers)
        if not forward_token:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        assert self._session is not None
        url = f"{self._router}/{namespace}/{name}/"
        try:
            async with self._session.request(
                "POST",
                url,
                params=request.query,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout + 5),
                # A function's redirect is its answer, for the caller: the gateway must not
                # follow it (that would fetch, from inside, any address the function names).
                allow_redirects=False,
            ) as resp:
                payload = await resp.read()
                return web.Response(
                    status=resp.status,
                    body=payload,
                    headers=relayed_headers(resp.headers),
                )
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise TemporaryError(
                f"the router at {self._router} did not answer ({type(exc).__name__}); is it running?",
                code="router_unavailable",
            ) from exc
