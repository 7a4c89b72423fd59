"""Which headers cross the router, both ways: pure functions over (name, value) pairs.

Hop-by-hop headers (RFC 9110 §7.6.1) belong to one connection and are dropped, with any header
that `Connection` names; the router adds the `X-Forwarded-*` headers an instance needs to know
who called it and how. `Content-Length` and `Host` are set by the client library for the
instance's connection.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[str, str]]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
    }
)
# Set anew for the instance's connection by the router. `Expect: 100-continue` was answered by
# the router itself, which has read the whole body before it calls the instance.
_REPLACED_ON_REQUEST = frozenset(
    {
        "host",
        "content-length",
        "expect",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
    }
)


_DROPPING: dict[frozenset[str], frozenset[str]] = {}


def is_hop_by_hop(lower_name: str) -> bool:
    return lower_name in HOP_BY_HOP or lower_name.startswith("proxy-")


def _filter(
    headers: Iterable[tuple[str, str]], replaced: frozenset[str]
) -> tuple[Headers, list[str]]:
    """One pass: the end-to-end headers not in `replaced`, and the X-Forwarded-For values."""
    kept: Headers = []
    chain: list[str] = []
    named: set[str] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower in replaced or lower in HOP_BY_HOP or lower.startswith("proxy-"):
            if lower == "connection":
                named = named or set()
                named.update(t.strip().lower() for t in value.split(","))
            elif lower == "x-forwarded-for" and value.strip():
                chain.append(value.strip())
            continue
        kept.append((name, value))
    if named:
        kept = [(n, v) for n, v in kept if n.lower() not in named]
    return kept, chain


def request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    client: str | None,
    host: str | None,
    proto: str,
    drop: frozenset[str] = frozenset(),
) -> Headers:
    """Headers to send to the instance: the caller's end-to-end headers (less those named in
    `drop`, lower case), then `X-Forwarded-For` (the caller's chain plus the peer's address),
    `X-Forwarded-Host` (the Host the caller asked for) and `X-Forwarded-Proto` (the scheme the
    router was reached by)."""
    replaced = _DROPPING.get(drop)
    if replaced is None:
        replaced = _DROPPING[drop] = _REPLACED_ON_REQUEST | drop
    kept, chain = _filter(headers, replaced)
    if client:
        chain.append(client)
    if chain:
        kept.append(("X-Forwarded-For", ", ".join(chain)))
    if host:
        kept.append(("X-Forwarded-Host", host))
    kept.append(("X-Forwarded-Proto", proto))
    return kept


def response_headers(headers: Iterable[tuple[str, str]]) -> Headers:
    """Headers to relay to the caller: the instance's end-to-end headers. `Content-Length` is
    set by the router's own response; `Content-Encoding` stays, as the body is relayed as is.
    The router's own headers (invocation id, revision) are never the instance's: a function
    cannot pose as the router (the router adds its own)."""
    return _filter(headers, _REPLACED_ON_RESPONSE)[0]


_REPLACED_ON_RESPONSE = frozenset(
    {"content-length", "x-lambdabus-invocation-id", "x-lambdabus-revision"}
)
