"""Secrets over real HTTP and a real nats-server: values go in and never come out (responses,
lists, errors, lifecycle events); at rest they are sealed, and only the right key opens them."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import pytest

from lambdabus_events.catalog import parse_lifecycle
from lambdabus_events.models import env_digest
from lambdabus_platform.bus import Bus
from lambdabus_platform.secretbox import SecretBox, SecretKeyError, load_or_create_key_file
from lambdabus_platform.secretstore import SecretStore, StoredSecret
from lambdabus_platform.subjects import SECRETS_BUCKET, function_key, lifecycle_filter
from tests.integration.conftest import SESSION_SECRETS_KEY, RunningGateway

HELLO = "async def main(request):\n    return {}\n"


def _value() -> str:
    return "s3cr3t-" + secrets.token_hex(16)


def _contains(text: str, *values: str) -> list[str]:
    return [v for v in values if v in text]


async def _lifecycle_text(bus: Bus, ns: str) -> str:
    messages = await bus.read("LIFECYCLE", lifecycle_filter(namespace=ns), limit=1000)
    return "\n".join(m.data.decode() for m in messages)


async def test_values_go_in_and_never_come_out(gateway: RunningGateway) -> None:
    gw, ns = gateway, "sec-api"
    password, token, newer = _value(), _value(), _value()
    resp = await gw.http.post(
        f"/v1/namespaces/{ns}/secrets",
        json={"name": "db", "data": {"password": password, "api.token": token}},
    )
    text = await resp.text()
    assert resp.status == 201, text
    assert resp.headers["Location"] == f"/v1/namespaces/{ns}/secrets/db"
    body = json.loads(text)
    assert body["keys"] == ["api.token", "password"]
    assert body["version"] == 1
    assert "data" not in body
    assert not _contains(text, password, token)

    again = await gw.http.post(
        f"/v1/namespaces/{ns}/secrets", json={"name": "db", "data": {"password": password}}
    )
    assert again.status == 409
    assert (await again.json())["error"]["code"] == "secret_exists"
    assert not _contains(await again.text(), password)

    listed = await gw.http.get(f"/v1/namespaces/{ns}/secrets")
    listed_text = await listed.text()
    assert [i["name"] for i in json.loads(listed_text)["items"]] == ["db"]
    assert not _contains(listed_text, password, token)
    got = await gw.http.get(f"/v1/namespaces/{ns}/secrets/db")
    got_text = await got.text()
    assert json.loads(got_text)["keys"] == ["api.token", "password"]
    assert not _contains(got_text, password, token)

    put = await gw.http.put(f"/v1/namespaces/{ns}/secrets/db", json={"data": {"password": newer}})
    put_text = await put.text()
    assert put.status == 200, put_text
    assert json.loads(put_text)["keys"] == ["password"]
    assert json.loads(put_text)["version"] == 2
    assert not _contains(put_text, newer)
    missing = await gw.http.put(f"/v1/namespaces/{ns}/secrets/nope", json={"data": {"a": "b"}})
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "secret_not_found"

    gone = await gw.http.delete(f"/v1/namespaces/{ns}/secrets/db")
    assert gone.status == 200
    assert not _contains(await gone.text(), newer)
    assert (await gw.http.get(f"/v1/namespaces/{ns}/secrets/db")).status == 404

    # The lifecycle stream has the three events with key names, and no value anywhere.
    events = [
        parse_lifecycle(m.data)
        for m in await gw.bus.read(
            "LIFECYCLE", lifecycle_filter(namespace=ns, name="db"), limit=100
        )
    ]
    assert [e.type for e in events] == [
        "io.lambdabus.secret.created",
        "io.lambdabus.secret.updated",
        "io.lambdabus.secret.deleted",
    ]
    assert events[0].data.model_dump()["keys"] == ["api.token", "password"]
    assert not _contains(await _lifecycle_text(gw.bus, ns), password, token, newer)


@pytest.mark.parametrize(
    ("body", "status", "code", "names"),
    [
        ({"name": "Bad_Name", "data": {"k": "{v}"}}, 400, "invalid_name", "RFC 1035"),
        ({"name": "x" * 64, "data": {"k": "{v}"}}, 400, "invalid_name", "at most 63"),
        ({"name": "db", "data": {"bad key!": "{v}"}}, 400, "invalid_secret", "bad key!"),
        ({"name": "db", "data": {"k": 12345}}, 400, "invalid_secret", "key 'k'"),
        ({"name": "db", "data": "{v}"}, 400, "invalid_secret", "data must be an object"),
        ({"name": "db", "data": {}}, 400, "invalid_secret", "at least one key"),
        ({"name": "db", "data": {"k": "{v}"}, "extra": "{v}"}, 400, "invalid_secret", "extra"),
        ({"name": "db", "data": {"big": "{v}" + "x" * 70_000}}, 413, "payload_too_large", "big"),
        (
            {"name": "db", "data": {f"k{i}": "{v}" + "x" * 60_000 for i in range(20)}},
            413,
            "payload_too_large",
            "in all",
        ),
    ],
)
async def test_a_bad_secret_is_refused_without_echoing_its_value(
    gateway: RunningGateway, body: dict[str, Any], status: int, code: str, names: str
) -> None:
    value = _value()
    raw = io.BytesIO(json.dumps(body).replace("{v}", value).encode())
    resp = await gateway.http.post(
        "/v1/namespaces/sec-bad/secrets", data=raw, headers={"Content-Type": "application/json"}
    )
    text = await resp.text()
    assert resp.status == status, text
    error = json.loads(text)["error"]
    assert error["code"] == code
    assert names in error["message"]
    assert value not in text
    assert (await gateway.http.get("/v1/namespaces/sec-bad/secrets/db")).status == 404


async def test_malformed_json_does_not_echo_the_body(gateway: RunningGateway) -> None:
    value = _value()
    resp = await gateway.http.post(
        "/v1/namespaces/sec-bad/secrets",
        data=f'{{"name": "db", "data": {{"k": "{value}" oops}}}}',
        headers={"Content-Type": "application/json"},
    )
    text = await resp.text()
    assert resp.status == 400
    assert json.loads(text)["error"]["code"] == "malformed_json"
    assert value not in text
    assert "oops" not in text


async def test_sealed_at_rest_and_bound_to_its_name(gateway: RunningGateway, bus: Bus) -> None:
    ns, value = "sec-rest", _value()
    resp = await gateway.http.post(
        f"/v1/namespaces/{ns}/secrets", json={"name": "db", "data": {"password": value}}
    )
    assert resp.status == 201
    kv = bus.kv(SECRETS_BUCKET)
    entry = await kv.get(function_key(ns, "db"))
    assert entry is not None
    assert value.encode() not in entry.value
    assert base64.b64encode(value.encode())[:16] not in entry.value
    stored = StoredSecret.model_validate_json(entry.value)
    right = SecretStore(kv, SecretBox(base64.b64decode(SESSION_SECRETS_KEY)))
    assert right.values(stored) == {"password": value}

    wrong = SecretStore(kv, SecretBox(secrets.token_bytes(32)))
    with pytest.raises(SecretKeyError) as caught:
        wrong.values(stored)
    assert value not in str(caught.value)

    # The ciphertext copied onto another secret's record does not open there.
    moved = stored.model_copy(update={"name": "other"})
    with pytest.raises(SecretKeyError):
        right.values(moved)


async def test_function_events_carry_env_keys_and_a_digest_never_values(
    gateway: RunningGateway,
) -> None:
    gw, ns = gateway, "sec-env"
    first, second = _value(), _value()
    created = await gw.http.post(
        f"/v1/namespaces/{ns}/functions",
        json={
            "name": "fn",
            "env": {"API_KEY": first, "MODE": "prod"},
            "source": {"files": {"lambda_main.py": HELLO}},
        },
    )
    assert created.status == 202, await created.text()
    patched = await gw.http.patch(
        f"/v1/namespaces/{ns}/functions/fn",
        json={"env": {"API_KEY": second}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert patched.status == 202, await patched.text()
    assert (
        await gw.http.post(
            f"/v1/namespaces/{ns}/secrets", json={"name": "db", "data": {"password": first}}
        )
    ).status == 201
    assert (
        await gw.http.put(f"/v1/namespaces/{ns}/secrets/db", json={"data": {"password": second}})
    ).status == 200
    events = [
        parse_lifecycle(m.data)
        for m in await gw.bus.read("LIFECYCLE", lifecycle_filter(namespace=ns), limit=100)
    ]
    specs = [e.data.model_dump()["spec"] for e in events if e.entity == "function"]
    assert [s["env_keys"] for s in specs] == [["API_KEY", "MODE"], ["API_KEY", "MODE"]]
    assert specs[0]["env_digest"] != specs[1]["env_digest"]
    assert all("env" not in s for s in specs)
    # keyed by the function's own random salt (in its record, not in any event)
    record = await (await gw.http.get(f"/v1/namespaces/{ns}/functions/fn")).json()
    assert len(record["env_salt"]) == 32
    env = {"API_KEY": second, "MODE": "prod"}
    assert specs[1]["env_digest"] == env_digest(env, record["env_salt"])
    assert record["env_salt"] not in await _lifecycle_text(gw.bus, ns)
    assert not _contains(await _lifecycle_text(gw.bus, ns), first, second)


def test_the_key_file_is_made_once_private_and_shared(tmp_path: Path) -> None:
    path = tmp_path / "data" / "secrets.key"
    keys = [load_or_create_key_file(path) for _ in range(3)]
    assert keys[0] == keys[1] == keys[2]
    assert len(keys[0]) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["secrets.key"]  # no temp left
    os.chmod(path, 0o644)
    with pytest.raises(SecretKeyError, match="chmod 600"):
        load_or_create_key_file(path)


async def test_concurrent_first_starts_make_one_key(tmp_path: Path) -> None:
    path = tmp_path / "secrets.key"
    keys = await asyncio.gather(
        *(asyncio.to_thread(load_or_create_key_file, path) for _ in range(8))
    )
    assert len(set(keys)) == 1


async def test_cli_secret_commands_never_print_values(
    gateway: RunningGateway,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    from lambdabus_client.cli import main

    ns = f"c{secrets.token_hex(4)}"
    first, second = _value(), _value()
    password_file = tmp_path / "password"
    password_file.write_text(second)
    monkeypatch.setenv("LAMBDABUS_TOKEN", gateway.token)
    base = ["--url", gateway.url, "-n", ns, "secret"]

    async def cli(*args: str) -> int:
        return await asyncio.to_thread(main, [*base, *args])

    assert await cli("create", "db", "--from-literal", f"user={first}") == 0
    assert await cli("set", "db", "--from-file", f"password={password_file}") == 0
    assert await cli("ls") == 0
    out, err = capsys.readouterr()
    assert "Created secret" in out
    assert "Replaced secret" in out
    assert "db" in out
    assert "password" in out
    assert _contains(out + err, first, second) == []

    # the replaced data holds only `password`
    listed = await gateway.http.get(f"{gateway.url}/v1/namespaces/{ns}/secrets/db")
    assert (await listed.json())["keys"] == ["password"]

    assert await cli("create", "empty") == 2
    _, err = capsys.readouterr()
    assert "--from-literal" in err
    assert "Traceback" not in err

    assert await cli("rm", "db") == 0
    assert await cli("ls") == 0
    out, _ = capsys.readouterr()
    assert f"No secrets in namespace {ns}." in out
