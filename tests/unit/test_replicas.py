"""The heartbeat registry's pure parts: keys, the value on the wire, who is live and how old."""

from __future__ import annotations

import pytest

from lambdabus_platform.replicas import (
    STALE_AFTER_BEATS,
    Beat,
    beat_key,
    decode_beat,
    default_replica_id,
    encode_beat,
    live_replicas,
)


def test_a_beat_round_trips_under_its_key() -> None:
    beat = Beat("router", "router-2", "standby", 1000.5, 2.0, "http://127.0.0.1:8085")
    assert beat_key("router", "router-2") == "router.router-2"
    assert decode_beat("router.router-2", encode_beat(beat)) == beat


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("router.a", b"not json"),
        ("router.a", b"[]"),
        ("router.a", b'{"service": "router", "id": "a"}'),
        # a role nobody defined, a non-positive interval
        ("router.a", b'{"service":"router","id":"a","role":"king","at":1,"interval":2}'),
        ("router.a", b'{"service":"router","id":"a","role":"active","at":1,"interval":0}'),
        # a value that names another key than the one it is stored under
        ("router.a", b'{"service":"gateway","id":"a","role":"active","at":1,"interval":2}'),
    ],
)
def test_what_is_not_a_beat_is_skipped(key: str, value: bytes) -> None:
    assert decode_beat(key, value) is None


def test_a_replica_is_live_for_three_intervals_then_drops_out() -> None:
    beats = [
        Beat("router", "b", "active", 100.0, 2.0),
        Beat("gateway", "a", "leader", 100.0, 1.0),
        Beat("router", "a", "active", 98.0, 2.0),
        Beat("logs", "killed", "active", 96.9, 2.0),  # its last beat is 6.1 s old
    ]
    now = 100.0 + STALE_AFTER_BEATS * 1.0  # the gateway's last moment
    listed = live_replicas(beats, now)
    assert [(r.service, r.id, r.heartbeat_age) for r in listed] == [
        ("gateway", "a", 3.0),
        ("router", "a", 5.0),
        ("router", "b", 3.0),
    ]
    later = [(r.service, r.id) for r in live_replicas(beats, now + 0.001)]
    assert later == [("router", "a"), ("router", "b")]
    assert [r.id for r in live_replicas(beats, 101.0 + STALE_AFTER_BEATS * 2.0)] == []


def test_an_age_is_never_negative_when_clocks_disagree() -> None:
    (replica,) = live_replicas([Beat("logs", "x", "active", 200.0, 2.0)], 199.0)
    assert replica.heartbeat_age == 0.0
    assert replica.to_json() == {
        "service": "logs",
        "id": "x",
        "role": "active",
        "heartbeat_age": 0.0,
        "url": None,
    }


def test_a_default_id_is_a_single_key_token() -> None:
    assert default_replica_id("node-1.example.com", 42) == "node-1-example-com-42"
    assert default_replica_id("...", 7) == "host-7"
    with pytest.raises(ValueError, match="not a replica key"):
        beat_key("router", "a.b")
    with pytest.raises(ValueError, match="not a replica key"):
        beat_key("router", "*")
