"""The gateway's pure request rules for triggers and asynchronous invocations: trigger filters,
`Prefer: respond-async`, callback URLs and the headers a queued invocation keeps."""

from __future__ import annotations

from typing import Any

import pytest

from lambdabus_gateway.invocations import callback_problem, invocation_headers, wants_async
from lambdabus_gateway.triggers import filter_problems


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"type": "com.example.order.created"},
        {"type": "com.example.*", "source": "/shop*", "subject": "orders/1", "id": "42"},
        {"region": "eu", "a" * 20: "x", "n0": "*"},
    ],
)
def test_good_filters(value: dict[str, Any]) -> None:
    assert filter_problems(value) == []


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ({"Type": "x"}, "Type"),
        ({"my-ext": "x"}, "my-ext"),
        ({"a" * 21: "x"}, "a" * 21),
        ({"": "x"}, ""),
        ({"type": ""}, "type"),
        ({"type": None}, "type"),
        ({"type": 3}, "type"),
        ({"type": "a*b"}, "type"),
        ({"source": "**"}, "source"),
        ({"type": "x" * 1025}, "type"),
        ({"data": "x"}, "data"),
        (["type"], ""),
    ],
)
def test_bad_filters_name_the_key(value: Any, key: str) -> None:
    [(named, message)] = filter_problems(value)

    assert named == key
    assert message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([], False),
        (["respond-async"], True),
        (["Respond-Async"], True),
        (["wait=10, respond-async"], True),
        (["handling=lenient", "respond-async; foo=bar"], True),
        (["respond-async=1"], True),
        (["respond-asynchronously"], False),
        (["return=minimal"], False),
    ],
)
def test_wants_async(headers: list[str], expected: bool) -> None:
    assert wants_async(headers) is expected


@pytest.mark.parametrize(
    "url", ["http://example.com/cb", "https://example.com:8443/cb?x=1", "http://127.0.0.1:9/"]
)
def test_good_callback_urls(url: str) -> None:
    assert callback_problem(url) is None


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/", "example.com/cb", "/cb", "http://", "https://:80/", "http://a b/", ""],
)
def test_bad_callback_urls(url: str) -> None:
    assert callback_problem(url)


def test_invocation_headers_join_repeats_and_drop_platform_and_hop_by_hop_headers() -> None:
    headers = [
        ("Content-Type", "application/json"),
        ("Accept", "text/plain"),
        ("accept", "application/json"),
        ("Host", "gateway"),
        ("Content-Length", "9"),
        ("Connection", "keep-alive"),
        ("Prefer", "respond-async"),
        ("X-Callback-Url", "http://x/"),
        ("Authorization", "Bearer t"),
    ]

    # Authorization holds the caller's platform token: never stored, never passed on
    assert invocation_headers(headers) == {
        "Content-Type": "application/json",
        "Accept": "text/plain, application/json",
    }
