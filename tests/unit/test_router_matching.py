"""Trigger filters against event attributes: exact values, prefixes, missing attributes."""

from __future__ import annotations

import pytest

from lambdabus_router.matching import match_trigger, match_value

EVENT = {
    "id": "42",
    "source": "/shop/eu/berlin",
    "type": "com.example.order.created",
    "subject": "orders/42",
    "tenant": "acme",
}


@pytest.mark.parametrize(
    ("value", "pattern", "expected"),
    [
        ("com.example.order", "com.example.order", True),
        ("com.example.order", "com.example.orde", False),
        ("com.example.order", "com.example.order.created", False),
        ("com.example.order", "com.example.*", True),
        ("com.example.order", "com.ex*", True),
        ("com.example.order", "com.example.order*", True),
        ("com.example.order", "org.*", False),
        ("anything", "*", True),
        ("", "*", True),
        ("", "", True),
        ("a*", "a*", True),  # a trailing star is always a prefix: `a*` matches `a` and more
        ("a", "a*", True),
        ("A", "a", False),  # case matters
    ],
)
def test_match_value(value: str, pattern: str, expected: bool) -> None:
    assert match_value(value, pattern) is expected


@pytest.mark.parametrize(
    ("filter", "expected"),
    [
        ({}, True),  # no filter: every event
        ({"type": "com.example.order.created"}, True),
        ({"type": "com.example.order.updated"}, False),
        ({"type": "com.example.*"}, True),
        ({"type": "com.example.ord*"}, True),  # not on a token boundary: only checkable here
        ({"source": "/shop/*"}, True),
        ({"source": "/shop/us/*"}, False),
        ({"source": "/shop"}, False),
        ({"subject": "orders/42"}, True),
        ({"tenant": "acme"}, True),
        ({"tenant": "globex"}, False),
        ({"tenant": "ac*"}, True),
        ({"region": "eu"}, False),  # an attribute the event does not carry
        ({"region": "*"}, False),
        ({"type": "com.example.*", "source": "/shop/eu/*", "tenant": "acme"}, True),
        ({"type": "com.example.*", "source": "/shop/eu/*", "tenant": "globex"}, False),
    ],
)
def test_match_trigger(filter: dict[str, str], expected: bool) -> None:
    assert match_trigger(EVENT, filter) is expected
