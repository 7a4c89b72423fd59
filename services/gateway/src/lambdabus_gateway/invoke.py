"""`POST .../functions/{name}/invoke`: relays the request to the router, the data plane, and
relays its answer back unchanged."""

from __future__ import annotations

from collections.abc import Mapping

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
            ) as resp:
                payload = await resp.read()
                return web.Response(
                    status=resp.status,
                    body=payload,
                    headers=forward_headers(resp.headers),
                )
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise TemporaryError(
                f"the router at {self._router} did not answer ({type(exc).__name__}); is it running?",
                code="router_unavailable",
            ) from exc
