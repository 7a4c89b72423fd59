"""The heartbeat registry's pure parts (keys, the value on the wire, who is live and how old),
and the launcher's plan of replicas (names, ids, ports, which router each gateway relays to)."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest

from lambdabus_platform.launcher import SERVICES, Platform, UpSettings, extra_ports
from lambdabus_platform.launcher import main as launcher_main
from lambdabus_platform.natskeys import ensure_keys
from lambdabus_platform.natsserver import NatsServer
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


# -- `lambdabus up --replicas N`: names, ports, which router a gateway relays to -------------


def test_replicas_after_the_first_take_the_next_free_ports(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        fixed = {f"{s}_port": taken - 5 + i for i, s in enumerate(SERVICES)}  # up to taken - 1
        settings = UpSettings.model_validate({"data_dir": tmp_path, "replicas": 3, **fixed})
        ports = extra_ports(settings)
    assert set(ports) == {(s, i) for s in SERVICES for i in (1, 2)}
    chosen = list(ports.values())
    assert len(set(chosen)) == len(chosen)  # no two replicas on one port
    assert taken not in chosen  # in use: skipped
    assert min(chosen) > taken - 1  # above every configured port
    # ephemeral ports: every replica's server picks its own
    ephemeral = UpSettings.model_validate(
        {"data_dir": tmp_path, "replicas": 2, **{f"{s}_port": 0 for s in SERVICES}}
    )
    assert set(extra_ports(ephemeral).values()) == {0}


def test_each_replica_has_its_name_id_and_router(tmp_path: Path) -> None:
    platform = Platform(
        UpSettings(data_dir=tmp_path, replicas=2), out=io.StringIO(), err=io.StringIO()
    )
    assert list(platform.children) == [
        name for s in SERVICES for name in (s, f"{s}-2")
    ]  # the first keeps the service's name: logs, restarts and URLs of one replica unchanged
    platform.children["router"].url = "http://127.0.0.1:1"
    platform.children["router-2"].url = "http://127.0.0.1:2"
    keys = ensure_keys(tmp_path / "keys", SERVICES)
    nats = NatsServer(url="nats://127.0.0.1:9", port=9, process=None, keys=keys)  # type: ignore[arg-type]
    first = platform.env_for(platform.children["gateway"], nats)
    second = platform.env_for(platform.children["gateway-2"], nats)
    assert (first["LAMBDABUS_GATEWAY_ROUTER_URL"], second["LAMBDABUS_GATEWAY_ROUTER_URL"]) == (
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
    )
    assert (first["LAMBDABUS_GATEWAY_REPLICA_ID"], second["LAMBDABUS_GATEWAY_REPLICA_ID"]) == (
        "gateway-1",
        "gateway-2",
    )
    # replicas of a service share its state directory
    assert first["LAMBDABUS_GATEWAY_STATE_DIR"] == second["LAMBDABUS_GATEWAY_STATE_DIR"]


@pytest.mark.parametrize("count", ["0", "10", "two"])
def test_a_replica_count_out_of_range_is_refused_in_one_line(
    count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        launcher_main(["--replicas", count])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "is not a number of replicas from 1 to 9" in err
    assert "Traceback" not in err


def test_a_replica_count_from_the_environment_is_checked_too(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LAMBDABUS_UP_REPLICAS", "0")  # `LAMBDABUS_UP_REPLICAS=0 make run`
    assert launcher_main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LAMBDABUS_UP_REPLICAS: ")
    assert len(err.splitlines()) == 1
