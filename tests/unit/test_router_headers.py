"""Which headers cross the router: hop-by-hop ones never do; X-Forwarded-* are added."""

from __future__ import annotations

from lambdabus_router.headers import is_hop_by_hop, request_headers, response_headers


def test_hop_by_hop_names() -> None:
    for name in ("connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"):
        assert is_hop_by_hop(name)
    for name in ("proxy-authorization", "proxy-authenticate", "proxy-connection"):
        assert is_hop_by_hop(name)
    for name in ("content-type", "authorization", "x-proxy-thing", "trailers-ok"):
        assert not is_hop_by_hop(name)


def test_request_headers_drop_hop_by_hop_and_add_forwarded() -> None:
    incoming = [
        ("Host", "router:8081"),
        ("Content-Length", "4"),
        ("Expect", "100-continue"),
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer t"),
        ("Connection", "keep-alive, X-Per-Hop"),
        ("X-Per-Hop", "drop me"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Trailer", "X-Sum"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "secret"),
        ("X-Multi", "1"),
        ("X-Multi", "2"),
    ]
    out = request_headers(incoming, client="10.0.0.7", host="router:8081", proto="http")
    assert out == [
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer t"),
        ("X-Multi", "1"),
        ("X-Multi", "2"),
        ("X-Forwarded-For", "10.0.0.7"),
        ("X-Forwarded-Host", "router:8081"),
        ("X-Forwarded-Proto", "http"),
    ]


def test_forwarded_for_extends_the_callers_chain_and_the_rest_is_replaced() -> None:
    incoming = [
        ("x-forwarded-for", "203.0.113.1, 10.0.0.1"),
        ("X-Forwarded-Host", "spoofed"),
        ("X-Forwarded-Proto", "gopher"),
    ]
    out = dict(request_headers(incoming, client="127.0.0.1", host="h", proto="https"))
    assert out == {
        "X-Forwarded-For": "203.0.113.1, 10.0.0.1, 127.0.0.1",
        "X-Forwarded-Host": "h",
        "X-Forwarded-Proto": "https",
    }
    assert dict(request_headers([], client=None, host=None, proto="http")) == {
        "X-Forwarded-Proto": "http"
    }


def test_response_headers_keep_end_to_end_ones() -> None:
    incoming = [
        ("Content-Type", "text/plain"),
        ("Content-Length", "12"),
        ("Content-Encoding", "gzip"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Connection", "close"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Proxy-Authenticate", "Basic"),
        ("X-Forwarded-For", "kept: a response header like any other"),
        ("X-Lambdabus-Invocation-Id", "forged by the function"),
        ("x-lambdabus-revision", "forged by the function"),
    ]
    assert response_headers(incoming) == [
        ("Content-Type", "text/plain"),
        ("Content-Encoding", "gzip"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Forwarded-For", "kept: a response header like any other"),
    ]
