"""Authentication and authorization over real HTTP against the session's nats-server: every
gateway route refuses missing, malformed, unknown, expired, revoked and out-of-scope tokens;
the role matrix end to end; revocation reaching other replicas within a second; the failed
attempt limit; tokens API; lifecycle scoped to the token's namespaces, with the actor on each
event; the router's `invoke_auth: token` and the gateway's relay."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lambdabus_events.models import FunctionConfig, FunctionRecord, SourceRef
from lambdabus_gateway.api import add_routes
from lambdabus_gateway.settings import GatewaySettings
from lambdabus_platform.bus import Bus
from lambdabus_platform.registry import Registry
from lambdabus_platform.service import make_app
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.subjects import FUNCTIONS_BUCKET, TOKENS_BUCKET
from lambdabus_platform.tokens import ROUTES, Role, is_public, mint, route_action
from lambdabus_platform.tokenstore import TokenStore
from tests.integration.conftest import RunningGateway, running_gateway
from tests.integration.test_router import RunningRouter, backend, router

__all__ = ["router"]  # the fixture, used here

NS = "team-a"


def gateway_routes() -> list[tuple[str, str]]:
    """(method, canonical path) of every route the gateway serves."""
    app = make_app()
    add_routes(app)
    found = set()
    for route in app.router.routes():
        resource = route.resource
        if resource is not None:
            found.add((route.method, resource.canonical))
    return sorted(found)


ROUTE_TABLE = gateway_routes()
PROTECTED = [(m, p) for m, p in ROUTE_TABLE if not is_public(p)]


def concrete(path: str, ns: str = NS) -> str:
    values = {"ns": ns, "name": "fn", "id": "0123456789abcdef"}
    return re.sub(r"\{(\w+)(?::[^}]*)?\}", lambda m: values.get(m.group(1), "x"), path)


def test_every_gateway_route_is_classified_or_public() -> None:
    """A new route must get an access class in `lambdabus_platform.tokens.ROUTES` (default
    deny refuses it otherwise): this fails until it does."""
    unclassified = [
        (m, p) for m, p in ROUTE_TABLE if not is_public(p) and route_action(m, p) is None
    ]
    assert unclassified == [], f"classify these routes in tokens.ROUTES: {unclassified}"
    assert ("GET", "/healthz") in ROUTE_TABLE
    assert is_public("/healthz")
    assert ("GET", "/metrics") in PROTECTED


async def _store(bus: Bus) -> TokenStore:
    return TokenStore(bus.kv(TOKENS_BUCKET))


async def token(
    bus: Bus, role: Role = "admin", namespaces: tuple[str, ...] = ("*",), **kw: Any
) -> str:
    minted = await (await _store(bus)).create(f"t-{role}", role, list(namespaces), **kw)
    return minted.token


async def expired_token(bus: Bus) -> str:
    minted = mint("old", "admin", ["*"], now=datetime.now(UTC) - timedelta(hours=2), expires_in=60)
    await bus.kv(TOKENS_BUCKET).create(minted.record.id, minted.record.model_dump_json().encode())
    return minted.token


async def revoked_token(bus: Bus) -> str:
    value = await token(bus)
    store = await _store(bus)
    await store.revoke(value.split("_")[1])
    return value


async def test_a_revoked_token_stays_refused_while_the_watch_still_brings_its_record(
    bus: Bus,
) -> None:
    """A replica's watch may lag: the record of a token revoked on this replica can still
    arrive after the revocation (its deletion comes later, in order). It must not bring the
    token back, not even for a moment."""
    store = await _store(bus)  # its watch is played by hand: the lag is chosen, not hoped for
    minted = await store.create("late", "admin", ["*"])
    record = minted.record.model_dump_json().encode()
    assert (await store.verify(minted.token)).record is not None
    await store.revoke(minted.record.id)
    store._apply(minted.record.id, record)  # the watch, late, delivers the token's record
    assert (await store.verify(minted.token)).record is None
    store._apply(minted.record.id, b"")  # then its deletion
    assert (await store.verify(minted.token)).record is None
    assert await bus.kv(TOKENS_BUCKET).get(minted.record.id) is None


@dataclass
class Answer:
    status: int
    headers: Any
    body: bytes


async def call(gw: RunningGateway, method: str, path: str, bearer: str | None, **kw: Any) -> Answer:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {}
    async with (
        aiohttp.ClientSession() as http,  # without the fixture's admin header
        http.request(
            method, gw.url + path, headers={**headers, **kw.pop("headers", {})}, **kw
        ) as response,
    ):
        return Answer(response.status, response.headers, await response.read())


async def _code(response: Answer) -> str:
    return str(json.loads(response.body)["error"]["code"])


@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[f"{m} {p}" for m, p in PROTECTED])
async def test_every_route_refuses_bad_tokens(
    gateway: RunningGateway, method: str, path: str
) -> None:
    bus = gateway.bus
    url = concrete(path)
    refused = {
        "none": None,
        "malformed": "not-a-token",
        "basic": None,
        "unknown": f"lbt_{uuid.uuid4().hex[:16]}_{'A' * 43}",
        "expired": await expired_token(bus),
        "revoked": await revoked_token(bus),
    }
    for what, bearer in refused.items():
        headers = {"Authorization": "Basic dXNlcjpwYXNz"} if what == "basic" else {}
        response = await call(gateway, method, url, bearer, headers=headers)
        assert response.status == 401, (what, response.status)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        if method != "HEAD":
            assert await _code(response) == "unauthenticated", what
            assert response.headers["X-Lambdabus-Error"] == "unauthenticated"
    # a valid admin token for another namespace only
    action = route_action(method, path)
    outside = await token(bus, "admin", ("elsewhere",))
    if "{ns}" in path or action in ("publish", "metrics", "tokens", "quotas"):
        response = await call(gateway, method, url, outside)
        assert response.status == 403, response.status
        if method != "HEAD":
            assert await _code(response) == "forbidden"
    elif path == "/v1/lifecycle":
        response = await call(gateway, method, url + f"?namespace={NS}", outside)
        assert response.status == 403


async def test_public_routes_need_no_token(gateway: RunningGateway) -> None:
    response = await call(gateway, "GET", "/healthz", None)
    assert response.status == 200


async def test_a_token_in_the_query_string_is_refused(gateway: RunningGateway) -> None:
    admin = gateway.token
    for parameter in ("token", "access_token"):
        response = await call(
            gateway, "GET", f"/v1/namespaces/{NS}/functions?{parameter}={admin}", None
        )
        assert response.status == 400
        body = json.loads(response.body)
        assert body["error"]["code"] == "token_in_query"
        assert "Authorization: Bearer" in body["error"]["message"]


# -- the role matrix, end to end ------------------------------------------------------------

# One request per action class, and the status that means "let through" (the handler ran).
SAMPLES: dict[str, tuple[str, str, dict[str, Any], int]] = {
    "info": ("GET", "/v1/info", {}, 200),
    "read": ("GET", f"/v1/namespaces/{NS}/functions", {}, 200),
    "manage": ("POST", f"/v1/namespaces/{NS}/triggers", {"json": {}}, 400),
    "invoke": ("GET", f"/v1/namespaces/{NS}/invocations/{'0' * 32}", {}, 404),
    "publish": ("POST", "/v1/events", {"data": b"{}"}, 400),
    "audit": ("GET", "/v1/lifecycle?type=nonsense", {}, 400),
    "metrics": ("GET", "/metrics", {}, 200),
    "tokens": ("GET", "/v1/tokens", {}, 200),
}
MATRIX: dict[Role, set[str]] = {
    "admin": set(SAMPLES),
    "developer": {"info", "read", "manage", "invoke", "publish", "audit"},
    "viewer": {"info", "read", "audit", "metrics"},
    "invoker": {"info", "invoke"},
    "auditor": {"info", "audit"},
}


@pytest.mark.parametrize("role", list(MATRIX))
async def test_role_matrix_over_http(gateway: RunningGateway, role: Role) -> None:
    bearer = await token(gateway.bus, role, ("*",))
    for action, (method, path, kw, through) in SAMPLES.items():
        response = await call(gateway, method, path, bearer, **kw)
        expected = through if action in MATRIX[role] else 403
        assert response.status == expected, (role, action, response.status)


async def test_a_namespaced_developer_stays_in_its_namespace(gateway: RunningGateway) -> None:
    bearer = await token(gateway.bus, "developer", (NS,))
    assert (await call(gateway, "GET", f"/v1/namespaces/{NS}/functions", bearer)).status == 200
    assert (await call(gateway, "GET", "/v1/namespaces/team-b/functions", bearer)).status == 403
    # events are not namespaced: publishing needs every namespace
    assert (await call(gateway, "POST", "/v1/events", bearer, data=b"{}")).status == 403


# -- tokens API -----------------------------------------------------------------------------


async def test_tokens_are_minted_listed_and_revoked(gateway: RunningGateway) -> None:
    http = gateway.http  # the admin token
    async with http.post(
        "/v1/tokens",
        json={"name": "team-a-ci", "role": "developer", "namespaces": [NS], "expires_in": 3600},
    ) as resp:
        assert resp.status == 201, await resp.text()
        minted = await resp.json()
    assert set(minted) == {"id", "name", "role", "namespaces", "expires", "token"}
    assert minted["token"].startswith(f"lbt_{minted['id']}_")
    assert minted["namespaces"] == [NS]
    assert minted["expires"]
    # it works at once
    ok = await call(gateway, "GET", f"/v1/namespaces/{NS}/functions", minted["token"])
    assert ok.status == 200
    async with http.get("/v1/tokens") as resp:
        listing = await resp.text()
    assert minted["id"] in listing
    assert minted["token"].split("_", 2)[2] not in listing
    assert "sha256" not in listing
    # bad requests
    for body in (
        {"name": "x", "role": "root", "namespaces": ["*"]},
        {"name": "x", "role": "viewer", "namespaces": []},
        {"name": "x", "role": "viewer", "namespaces": ["*", NS]},
        {"name": "x", "role": "viewer", "namespaces": ["Bad_NS"]},
        {"name": "x", "role": "viewer", "namespaces": ["*"], "expires_in": -1},
    ):
        async with http.post("/v1/tokens", json=body) as resp:
            assert resp.status == 400, body
            assert (await resp.json())["error"]["code"] == "invalid_token_request"
    # only an admin for every namespace mints
    developer = await call(
        gateway,
        "POST",
        "/v1/tokens",
        minted["token"],
        json={"name": "y", "role": "viewer", "namespaces": [NS]},
    )
    assert developer.status == 403
    async with http.delete(f"/v1/tokens/{minted['id']}") as resp:
        assert resp.status == 200
        assert (await resp.json())["id"] == minted["id"]
    async with http.delete(f"/v1/tokens/{minted['id']}") as resp:
        assert resp.status == 404
    gone = await call(gateway, "GET", f"/v1/namespaces/{NS}/functions", minted["token"])
    assert gone.status == 401


async def test_an_admin_cannot_mint_beyond_its_expiry(gateway: RunningGateway) -> None:
    bearer = await token(gateway.bus, "admin", ("*",), expires_in=600)
    body = {"name": "z", "role": "viewer", "namespaces": ["*"], "expires_in": 3600}
    assert (await call(gateway, "POST", "/v1/tokens", bearer, json=body)).status == 403
    body["expires_in"] = 60
    assert (await call(gateway, "POST", "/v1/tokens", bearer, json=body)).status == 201


async def test_an_expiring_token_stops_working(gateway: RunningGateway) -> None:
    bearer = await token(gateway.bus, "viewer", ("*",), expires_in=1)
    assert (await call(gateway, "GET", "/v1/info", bearer)).status == 200
    await asyncio.sleep(1.1)
    response = await call(gateway, "GET", "/v1/info", bearer)
    assert response.status == 401
    assert "expired" in json.loads(response.body)["error"]["message"]


# -- revocation reaches every replica -------------------------------------------------------


async def test_revocation_reaches_another_gateway_within_a_second(
    gateway: RunningGateway, nats_settings: NatsSettings, bus: Bus
) -> None:
    bearer = await token(bus, "viewer", ("*",))
    other_settings = GatewaySettings(port=0, nats=nats_settings)
    async with running_gateway(other_settings, bus) as other:
        assert (await call(other, "GET", "/v1/info", bearer)).status == 200
        assert (await call(gateway, "GET", "/v1/info", bearer)).status == 200
        async with gateway.http.delete(f"/v1/tokens/{bearer.split('_')[1]}") as resp:
            assert resp.status == 200
        revoked_at = time.monotonic()
        async with aiohttp.ClientSession() as http:
            while True:
                async with http.get(
                    other.url + "/v1/info", headers={"Authorization": f"Bearer {bearer}"}
                ) as resp:
                    if resp.status == 401:
                        break
                    assert resp.status == 200
                assert time.monotonic() - revoked_at < 1.0, "still accepted after 1 s"
                await asyncio.sleep(0.02)
        assert time.monotonic() - revoked_at < 1.0


# -- failed attempts ------------------------------------------------------------------------


async def test_twenty_failures_a_minute_then_429(gateway: RunningGateway) -> None:
    bad = f"lbt_{'f' * 16}_{'B' * 43}"
    for _ in range(20):
        assert (await call(gateway, "GET", "/v1/info", bad)).status == 401
    blocked = await call(gateway, "GET", "/v1/info", bad)
    assert blocked.status == 429
    assert 1 <= int(blocked.headers["Retry-After"]) <= 60
    assert await _code(blocked) == "too_many_failed_attempts"
    # while blocked, the address is refused even with a good token (no oracle for guesses)
    assert (await call(gateway, "GET", "/v1/info", gateway.token)).status == 429


# -- lifecycle and history scoped; the actor on every event ---------------------------------


async def _create(gw: RunningGateway, ns: str, name: str) -> None:
    body = {"name": name, "source": {"files": {"lambda_main.py": "def main(r):\n    return 1\n"}}}
    async with gw.http.post(f"/v1/namespaces/{ns}/functions", json=body) as resp:
        assert resp.status == 202, await resp.text()


async def _frames(gw: RunningGateway, bearer: str, query: str, until: str) -> list[dict[str, Any]]:
    """Lifecycle events from the SSE stream until one whose subject is `until`."""
    seen: list[dict[str, Any]] = []
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            gw.url + "/v1/lifecycle" + query, headers={"Authorization": f"Bearer {bearer}"}
        ) as resp,
    ):
        assert resp.status == 200
        async with asyncio.timeout(10):
            async for line in resp.content:
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    seen.append(event)
                    if event["subject"] == until:
                        return seen
    raise AssertionError("unreachable")


async def test_lifecycle_shows_only_the_tokens_namespaces_and_names_the_actor(
    gateway: RunningGateway,
) -> None:
    mine, theirs = f"a{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"
    since = (datetime.now(UTC) - timedelta(seconds=5)).isoformat().replace("+00:00", "Z")
    await _create(gateway, theirs, "secret-fn")
    await _create(gateway, mine, "fn")
    viewer = await token(gateway.bus, "viewer", (mine,))
    events = await _frames(gateway, viewer, f"?since={since}", f"{mine}/fn")
    assert all(e["subject"].startswith(f"{mine}/") for e in events), events
    created = events[-1]
    assert created["type"] == "io.lambdabus.function.created"
    admin_id = gateway.token.split("_")[1]
    assert (created["actorid"], created["actorname"]) == (admin_id, "test-admin")
    # asking for another namespace by name is refused
    response = await call(gateway, "GET", f"/v1/lifecycle?namespace={theirs}", viewer)
    assert response.status == 403
    # an admin for every namespace sees both
    everything = await _frames(gateway, gateway.token, f"?since={since}", f"{mine}/fn")
    assert {e["subject"] for e in everything} >= {f"{theirs}/secret-fn", f"{mine}/fn"}
    # history is per function, so by namespace: another team's is refused
    history = await call(
        gateway, "GET", f"/v1/namespaces/{theirs}/functions/secret-fn/history", viewer
    )
    assert history.status == 403


# -- invocations: the router's invoke_auth, and the gateway's relay ----------------------------


async def _function(bus: Bus, ns: str, name: str, invoke_auth: str) -> None:
    now = datetime.now(UTC)
    record = FunctionRecord(
        namespace=ns,
        name=name,
        uid=f"uid-{name}",
        generation=1,
        spec=FunctionConfig(invoke_auth=invoke_auth),  # type: ignore[arg-type]
        source=SourceRef(
            sha256="0" * 64, size=1, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=now,
        updated_at=now,
    )
    await Registry(bus.kv(FUNCTIONS_BUCKET), FunctionRecord).put(ns, name, record)


@dataclass
class Deployed:
    router: RunningRouter
    seen: list[dict[str, Any]]


@pytest.fixture
async def deployed(router: RunningRouter) -> AsyncIterator[Deployed]:
    """`locked` (invoke_auth: token) and `open` (none) in the router's namespace, one
    backend behind both."""
    async with backend("b") as instance:
        for name, auth in (("locked", "token"), ("open", "none")):
            await _function(router.bus, router.namespace, name, auth)
            await router.deploy(name, [instance.url])
        fid = (router.namespace, "locked")
        await asyncio.wait_for(router.router.until(lambda r: fid in r.protected), 5)
        yield Deployed(router, instance.seen)


def _authorization(seen: dict[str, Any]) -> str | None:
    return next((v for k, v in seen["headers"] if k.lower() == "authorization"), None)


async def test_router_requires_a_token_that_may_invoke_there(deployed: Deployed) -> None:
    r = deployed.router
    ns, bus = r.namespace, r.bus
    cases: list[tuple[str | None, int, str]] = [
        (None, 401, "unauthenticated"),
        ("garbage", 401, "unauthenticated"),
        (await revoked_token(bus), 401, "unauthenticated"),
        (await expired_token(bus), 401, "unauthenticated"),
        (await token(bus, "invoker", ("elsewhere",)), 403, "forbidden"),
        (await token(bus, "viewer", (ns,)), 403, "forbidden"),
        (await token(bus, "auditor", ("*",)), 403, "forbidden"),
    ]
    async with aiohttp.ClientSession() as http:
        for bearer, status, code in cases:
            headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
            async with http.post(f"{r.url}/{ns}/locked", headers=headers, data=b"x") as resp:
                assert resp.status == status, bearer
                assert resp.headers["X-Lambdabus-Error"] == code
                if status == 401:
                    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert deployed.seen == []  # nothing reached the instance
        invoker = await token(bus, "invoker", (ns,))
        async with http.post(
            f"{r.url}/{ns}/locked", headers={"Authorization": f"Bearer {invoker}"}, data=b"x"
        ) as resp:
            assert resp.status == 201
        assert _authorization(deployed.seen[-1]) is None  # the platform token stays out
        # a public function gets the caller's own Authorization, whatever it is
        async with http.post(
            f"{r.url}/{ns}/open", headers={"Authorization": "Bearer app-level"}
        ) as resp:
            assert resp.status == 201
        assert _authorization(deployed.seen[-1]) == "Bearer app-level"


async def test_router_revocation_within_a_second(deployed: Deployed) -> None:
    r = deployed.router
    bearer = await token(r.bus, "invoker", (r.namespace,))
    headers = {"Authorization": f"Bearer {bearer}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{r.url}/{r.namespace}/locked", headers=headers) as resp:
            assert resp.status == 201
        await (await _store(r.bus)).revoke(bearer.split("_")[1])
        revoked_at = time.monotonic()
        while True:
            async with http.post(f"{r.url}/{r.namespace}/locked", headers=headers) as resp:
                if resp.status == 401:
                    break
            assert time.monotonic() - revoked_at < 1.0, "still accepted after 1 s"
            await asyncio.sleep(0.02)


async def test_gateway_relay_passes_the_callers_token_only_to_protected_functions(
    deployed: Deployed, nats_settings: NatsSettings, bus: Bus
) -> None:
    r = deployed.router
    ns = r.namespace
    settings = GatewaySettings(port=0, nats=nats_settings, router_url=r.url)
    async with running_gateway(settings, bus) as gw:
        invoker = await token(bus, "invoker", (ns,))
        # the gateway checks the caller, the router checks it again, the instance never sees it
        response = await call(gw, "POST", f"/v1/namespaces/{ns}/functions/locked/invoke", invoker)
        assert response.status == 201
        assert _authorization(deployed.seen[-1]) is None
        # a public function through the gateway: the platform token is not passed on
        response = await call(gw, "POST", f"/v1/namespaces/{ns}/functions/open/invoke", invoker)
        assert response.status == 201
        assert _authorization(deployed.seen[-1]) is None
        # another namespace's invoker is refused by the gateway
        other = await token(bus, "invoker", ("elsewhere",))
        response = await call(gw, "POST", f"/v1/namespaces/{ns}/functions/locked/invoke", other)
        assert response.status == 403
        # an asynchronous invocation never stores the caller's token
        response = await call(
            gw,
            "POST",
            f"/v1/namespaces/{ns}/functions/open/invoke",
            invoker,
            headers={"Prefer": "respond-async"},
        )
        assert response.status == 202
        (queued,) = await bus.read("EVENTS", f"lambdabus.events.i.{ns}.open", limit=1)
        assert invoker.split("_", 2)[2] not in queued.data.decode()


async def test_bootstrap_mints_one_admin_token_once(
    nats_settings: NatsSettings, bus: Bus, tmp_path: Any
) -> None:
    # a fresh bucket view: the session's bucket may hold a bootstrap record of another test
    kv = bus.kv(TOKENS_BUCKET)
    existing = await kv.get("bootstrap")
    if existing is not None:
        await kv.delete("bootstrap")
    first, second = tmp_path / "a" / "admin.token", tmp_path / "b" / "admin.token"
    store_a, store_b = TokenStore(kv), TokenStore(kv)
    minted = await asyncio.gather(store_a.bootstrap_admin(first), store_b.bootstrap_admin(second))
    assert sorted(minted) == [False, True]  # two replicas at once: one mints
    path = first if first.exists() else second
    assert not (second if path == first else first).exists()
    assert path.stat().st_mode & 0o777 == 0o600
    value = path.read_text().strip()
    verdict = await store_a.verify(value)
    assert verdict.record is not None
    assert verdict.record.role == "admin"
    assert verdict.record.namespaces == ("*",)
    # later starts do nothing, with or without the file
    assert not await store_a.bootstrap_admin(path)
    path.unlink()
    assert not await store_a.bootstrap_admin(path)
    assert not path.exists()
    # the operator lost it: `lambdabus up --renew-admin-token` mints another, revokes the old
    assert await store_b.bootstrap_admin(path, renew=True)
    renewed = path.read_text().strip()
    assert renewed != value
    fresh = TokenStore(kv)  # what any replica reads
    assert (await fresh.verify(renewed)).record is not None
    assert (await fresh.verify(value)).record is None
    await kv.delete("bootstrap")


def test_route_table_has_no_stale_entries_for_existing_paths() -> None:
    """Every classified route of an existing path exists with that method (typos fail)."""
    served_paths = {p for _, p in ROUTE_TABLE}
    stale = [(m, p) for (m, p) in ROUTES if p in served_paths and (m, p) not in set(ROUTE_TABLE)]
    assert stale == []


async def test_app_serves_the_openapi_security_scheme(gateway: RunningGateway) -> None:
    async with gateway.http.get("/v1/openapi.json") as resp:
        spec = await resp.json()
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert spec["security"] == [{"bearer": []}]
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    assert "401" in spec["paths"]["/v1/tokens"]["post"]["responses"]


# -- the CLI ---------------------------------------------------------------------------------


async def _cli(*args: str) -> int:
    from lambdabus_client.cli import main

    return await asyncio.to_thread(main, list(args))


async def test_cli_token_commands_and_clear_refusals(
    gateway: RunningGateway,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
) -> None:
    monkeypatch.delenv("LAMBDABUS_TOKEN", raising=False)
    missing = tmp_path / "nowhere" / "admin.token"
    monkeypatch.setenv("LAMBDABUS_TOKEN_FILE", str(missing))
    url = ("--url", gateway.url)

    # no token at all: one clear line, no traceback
    assert await _cli(*url, "ls") == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: unauthenticated:")
    assert "LAMBDABUS_TOKEN" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err

    # the token file, as `lambdabus up` writes it
    token_file = tmp_path / "admin.token"
    token_file.write_text(gateway.token + "\n")
    monkeypatch.setenv("LAMBDABUS_TOKEN_FILE", str(token_file))
    assert await _cli(*url, "token", "create", "ci", "--role", "viewer", "--namespace", NS,
                      "--ns", "team-b", "--expires-in", "600") == 0  # fmt: skip
    out, err = capsys.readouterr()
    secret = out.strip()
    assert secret.startswith("lbt_")
    assert "shown this once" in err
    token_id = secret.split("_")[1]

    assert await _cli(*url, "token", "ls") == 0
    out, _ = capsys.readouterr()
    assert token_id in out
    assert secret.split("_", 2)[2] not in out
    assert "team-a,team-b" in out

    # LAMBDABUS_TOKEN wins over the file: the viewer may not delete
    monkeypatch.setenv("LAMBDABUS_TOKEN", secret)
    assert await _cli(*url, "-n", NS, "rm", "anything") == 1
    _, err = capsys.readouterr()
    assert err.startswith("error: forbidden:")
    assert len(err.strip().splitlines()) == 1
    assert await _cli(*url, "token", "ls") == 1
    capsys.readouterr()

    monkeypatch.delenv("LAMBDABUS_TOKEN")
    assert await _cli(*url, "token", "rm", token_id) == 0
    out, _ = capsys.readouterr()
    assert f"Revoked token {token_id}" in out
    monkeypatch.setenv("LAMBDABUS_TOKEN", secret)
    assert await _cli(*url, "-n", NS, "ls") == 1
    _, err = capsys.readouterr()
    assert err.startswith("error: unauthenticated:")
    assert "refused" in err


async def test_cli_events_name_the_actor(
    gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`lambdabus events` prints who caused each event (`history` is covered by test_up, where
    the logs service runs)."""
    ns = f"c{uuid.uuid4().hex[:8]}"
    await _create(gateway, ns, "fn")
    monkeypatch.setenv("LAMBDABUS_TOKEN", gateway.token)

    async def tail() -> None:
        await _cli("--url", gateway.url, "-n", ns, "events", "--since", "1h")

    task = asyncio.create_task(tail())
    deadline = time.monotonic() + 10
    out = ""
    while "by test-admin" not in out and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        out += capsys.readouterr().out
    task.cancel()
    assert "function.created" in out
    assert "by test-admin" in out


# -- the console's needs: namespaces, and a lifecycle stream that resumes ----------------------


async def test_namespaces_are_the_tokens_own_or_every_one_holding_a_function(
    gateway: RunningGateway,
) -> None:
    mine, theirs = f"a{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"
    await _create(gateway, theirs, "fn")
    viewer = await token(gateway.bus, "viewer", (mine, "other"))
    scoped = await call(gateway, "GET", "/v1/namespaces", viewer)
    assert scoped.status == 200
    expected = [{"name": n} for n in sorted((mine, "other"))]
    assert json.loads(scoped.body) == {"items": expected, "all": False}
    everything = json.loads((await call(gateway, "GET", "/v1/namespaces", gateway.token)).body)
    names = [n["name"] for n in everything["items"]]
    assert {theirs, "default"} <= set(names)
    assert mine not in names  # it holds no function
    assert names == sorted(names)
    assert everything["all"] is True
    assert (await call(gateway, "GET", "/v1/namespaces", None)).status == 401


async def _events_with_ids(
    gw: RunningGateway, bearer: str, query: str, count: int, last_id: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """The first `count` (id, event) frames of the lifecycle stream."""
    headers = {"Authorization": f"Bearer {bearer}"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    seen: list[tuple[str, dict[str, Any]]] = []
    async with (
        aiohttp.ClientSession() as http,
        http.get(gw.url + "/v1/lifecycle" + query, headers=headers) as resp,
    ):
        assert resp.status == 200, await resp.text()
        frame_id = ""
        async with asyncio.timeout(10):
            async for line in resp.content:
                if line.startswith(b"id: "):
                    frame_id = line[4:].decode().strip()
                elif line.startswith(b"data: "):
                    seen.append((frame_id, json.loads(line[6:])))
                    if len(seen) == count:
                        return seen
    raise AssertionError("unreachable")


async def test_the_lifecycle_stream_resumes_after_the_last_event_id_it_sent(
    gateway: RunningGateway,
) -> None:
    mine, theirs = f"a{uuid.uuid4().hex[:8]}", f"b{uuid.uuid4().hex[:8]}"
    since = (datetime.now(UTC) - timedelta(seconds=1)).isoformat().replace("+00:00", "Z")
    viewer = await token(gateway.bus, "viewer", (mine,))
    for ns, name in ((mine, "one"), (theirs, "hidden"), (mine, "two"), (mine, "three")):
        await _create(gateway, ns, name)
    query = f"?since={since}&type=io.lambdabus.function.created"
    first = await _events_with_ids(gateway, viewer, query, 3)
    assert [e["subject"] for _, e in first] == [f"{mine}/one", f"{mine}/two", f"{mine}/three"]
    # a reader that stopped after "one" gets "two" next: nothing lost, nothing twice, and a
    # resume from a sequence shows no other namespace's event either
    resumed = await _events_with_ids(gateway, viewer, query, 2, last_id=first[0][0])
    assert [(i, e["subject"]) for i, e in resumed] == [(i, e["subject"]) for i, e in first[1:]]
    # the id wins over `since`, and a bad one is a 400 that says what an id is
    for value in ("yesterday", "²", "١٢", "1" * 20):  # "²".isdigit(), int("²") fails
        bad = await call(gateway, "GET", "/v1/lifecycle", viewer, headers={"Last-Event-ID": value})
        assert bad.status == 400, value
        assert await _code(bad) == "invalid_last_event_id"


@contextlib.asynccontextmanager
async def _serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_the_gateway_relays_a_functions_answer_as_data_for_the_caller(
    router: RunningRouter, nats_settings: NatsSettings, bus: Bus
) -> None:
    """A hostile function answers a redirect to an address of the gateway's host and headers
    aimed at the gateway's origin (where the web console lives): the gateway follows nothing
    and passes none of them on."""
    fetched: list[str] = []

    async def sink(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.Response(text="internal secret")

    inside = web.Application()
    inside.router.add_route("*", "/{tail:.*}", sink)
    async with _serving(inside) as internal:

        async def hostile(request: web.Request) -> web.Response:
            return web.Response(
                status=307,
                headers={
                    "Location": f"{internal}/metadata",
                    "Set-Cookie": "session=evil; Path=/",
                    "Clear-Site-Data": '"storage"',
                    "Access-Control-Allow-Origin": "*",
                    "Content-Security-Policy": "default-src *",
                    "X-Mine": "kept",
                },
            )

        outside = web.Application()
        outside.router.add_route("*", "/{tail:.*}", hostile)
        async with _serving(outside) as instance:
            ns = router.namespace
            await _function(bus, ns, "hostile", "none")
            await router.deploy("hostile", [instance])
            settings = GatewaySettings(port=0, nats=nats_settings, router_url=router.url)
            async with running_gateway(settings, bus) as gw:
                answer = await call(
                    gw,
                    "POST",
                    f"/v1/namespaces/{ns}/functions/hostile/invoke",
                    gw.token,
                    allow_redirects=False,  # the test's own client follows nothing either
                )
    assert answer.status == 307
    assert answer.headers["Location"] == f"{internal}/metadata"
    assert fetched == []
    assert b"internal secret" not in answer.body
    for header in ("Set-Cookie", "Clear-Site-Data", "Access-Control-Allow-Origin"):
        assert header not in answer.headers
    assert answer.headers["Content-Security-Policy"] == "sandbox; default-src 'none'"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["X-Mine"] == "kept"
