"""The router's pure core: the tables kept from KV, and the choice of an endpoint."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from lambdabus_events.models import DeploymentState
from lambdabus_router.table import apply, apply_known, load, load_known, parse_key, pick


def state(ns: str, name: str, endpoints: list[str], timeout: float = 30.0) -> bytes:
    return (
        DeploymentState(
            namespace=ns,
            name=name,
            uid="u",
            generation=1,
            phase="ready",
            endpoints=endpoints,
            timeout=timeout,
            updated_at=datetime(2024, 1, 1, tzinfo=UTC),
        )
        .model_dump_json()
        .encode()
    )


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("ns.fn", ("ns", "fn")),
        ("a-1.b-2", ("a-1", "b-2")),
        ("ns", None),
        ("ns.fn.extra", None),
        ("NS.fn", None),
        ("ns.", None),
        (".fn", None),
    ],
)
def test_parse_key(key: str, expected: tuple[str, str] | None) -> None:
    assert parse_key(key) == expected


def test_apply_adds_replaces_and_removes() -> None:
    table = apply({}, "ns.fn", state("ns", "fn", ["http://a"]))
    assert table[("ns", "fn")].endpoints == ["http://a"]
    table = apply(table, "ns.fn", state("ns", "fn", ["http://b"], timeout=5))
    assert table[("ns", "fn")].endpoints == ["http://b"]
    assert table[("ns", "fn")].timeout == 5
    table = apply(table, "ns.other", state("ns", "other", []))
    assert set(table) == {("ns", "fn"), ("ns", "other")}
    table = apply(table, "ns.fn", b"")
    assert set(table) == {("ns", "other")}


def test_apply_is_pure_and_returns_the_same_table_when_nothing_changes() -> None:
    first = apply({}, "ns.fn", state("ns", "fn", ["http://a"]))
    again = apply(first, "ns.fn", state("ns", "fn", ["http://a"]))
    assert again is first
    assert apply(first, "ns.gone", b"") is first
    changed = apply(first, "ns.fn", state("ns", "fn", ["http://b"]))
    assert changed is not first
    assert first[("ns", "fn")].endpoints == ["http://a"]


def test_a_value_that_is_not_a_state_of_that_function_routes_nowhere() -> None:
    table = apply({}, "ns.fn", state("ns", "fn", ["http://a"]))
    assert ("ns", "fn") not in apply(table, "ns.fn", b"{not json")
    assert ("ns", "fn") not in apply(table, "ns.fn", state("ns", "elsewhere", ["http://x"]))
    assert apply(table, "bad key", state("ns", "fn", ["http://x"])) is table


def test_load_builds_the_table_from_a_snapshot() -> None:
    table = load(
        [
            ("ns.a", state("ns", "a", ["http://a"])),
            ("ns.b", b""),
            ("ns.c", b"garbage"),
            ("x", state("ns", "x", [])),
        ]
    )
    assert set(table) == {("ns", "a")}


def test_known_functions() -> None:
    known = apply_known(frozenset(), "ns.fn", b"{}")
    assert known == {("ns", "fn")}
    assert apply_known(known, "ns.fn", b"{}") is known
    assert apply_known(known, "ns.fn", b"") == frozenset()
    assert apply_known(known, "not-a-key", b"{}") is known
    assert load_known([("ns.a", b"1"), ("ns.b", b""), ("bad", b"1")]) == {("ns", "a")}


def test_pick_round_robin() -> None:
    endpoints = ["a", "b", "c"]
    assert [pick(endpoints, i) for i in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert pick([], 0) is None
    assert pick(["a"], 0, exclude="a") is None
    assert pick(endpoints, 0, exclude="a") == "b"


def test_pick_least_in_flight_spreads_ties_and_avoids_busy_ones() -> None:
    endpoints = ["a", "b", "c"]
    idle: dict[str, int] = {}
    assert Counter(pick(endpoints, i, idle) for i in range(300)) == {"a": 100, "b": 100, "c": 100}
    busy = {"a": 3, "b": 0, "c": 1}
    assert {pick(endpoints, i, busy) for i in range(10)} == {"b"}
    loaded = {"a": 3, "b": 2, "c": 5}
    assert pick(endpoints, 0, loaded) == "b"
    assert pick(endpoints, 0, loaded, exclude="b") == "a"
    assert pick(["a"], 0, {"a": 9}) == "a"
    assert pick(["a"], 0, {"a": 0}, exclude="a") is None
