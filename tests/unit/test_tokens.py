"""API tokens, pure: format, hashing, the role-by-action matrix, scopes, minting limits, the
failed-attempt limiter."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from lambdabus_platform.tokens import (
    CLUSTER_ACTIONS,
    PERMISSIONS,
    ROLES,
    ROUTES,
    Action,
    FailureLimiter,
    TokenRecord,
    TokenRequest,
    bearer,
    is_public,
    may,
    mint,
    mint_problem,
    namespaces_problem,
    parse_token,
    route_action,
    secret_matches,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)

# The whole matrix, written out: a change to PERMISSIONS must change this table too.
EXPECTED: dict[str, set[Action]] = {
    "admin": set(Action),
    "developer": {
        Action.INFO,
        Action.READ,
        Action.MANAGE,
        Action.INVOKE,
        Action.PUBLISH,
        Action.AUDIT,
    },
    "viewer": {Action.INFO, Action.READ, Action.AUDIT, Action.METRICS},
    "invoker": {Action.INFO, Action.INVOKE},
    "auditor": {Action.INFO, Action.AUDIT},
}


def record(role: str = "admin", namespaces: tuple[str, ...] = ("*",), **kw: object) -> TokenRecord:
    minted = mint("t", role, namespaces, now=NOW, **kw)  # type: ignore[arg-type]
    return minted.record


def test_a_token_has_an_id_and_256_random_bits_and_only_its_hash_is_kept() -> None:
    minted = mint("ci", "developer", ["team-a"], now=NOW)
    parsed = parse_token(minted.token)
    assert parsed is not None
    token_id, secret = parsed
    assert minted.token.startswith(f"lbt_{token_id}_")
    assert token_id == minted.record.id
    assert len(token_id) == 16
    assert len(secret) == 43  # base64url of 32 bytes
    assert minted.record.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in minted.record.model_dump_json()
    assert minted.token not in str(minted.record.public(NOW))
    assert "secret_sha256" not in minted.record.public(NOW)
    assert mint("ci", "developer", ["team-a"], now=NOW).token != minted.token


@pytest.mark.parametrize(
    "text",
    [
        "",
        "lbt_",
        "lbt_0123456789abcdef",
        "lbt_0123456789abcdef_short",
        "lbt_0123456789ABCDEF_" + "a" * 43,  # uppercase id
        "xyz_0123456789abcdef_" + "a" * 43,
        "lbt_0123456789abcdef_" + "a" * 44,
        "lbt_0123456789abcdef_" + "a" * 42 + "!",
        " lbt_0123456789abcdef_" + "a" * 43,
    ],
)
def test_malformed_tokens_do_not_parse(text: str) -> None:
    assert parse_token(text) is None


def test_the_secret_is_checked_in_constant_time_against_the_hash() -> None:
    minted = mint("ci", "viewer", ["*"], now=NOW)
    _, secret = parse_token(minted.token)  # type: ignore[misc]
    assert secret_matches(minted.record, secret)
    assert not secret_matches(minted.record, secret[:-1] + ("A" if secret[-1] != "A" else "B"))
    assert not secret_matches(None, secret)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("Bearer abc", "abc"),
        ("bearer   abc ", "abc"),
        ("Basic dXNlcjpwYXNz", ""),
        ("Bearer", ""),
        ("", ""),
    ],
)
def test_bearer_header(header: str | None, expected: str | None) -> None:
    assert bearer(header) == expected


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", list(Action))
def test_role_matrix(role: str, action: Action) -> None:
    token = record(role)
    allowed = may(token, action, None if action in CLUSTER_ACTIONS else "team-a") is None
    assert allowed == (action in EXPECTED[role])


def test_every_role_is_in_the_matrix_and_unknown_ones_get_nothing() -> None:
    assert set(PERMISSIONS) == set(ROLES) == set(EXPECTED)
    forged = record("admin").model_copy(update={"role": "root"})
    for action in Action:
        assert may(forged, action, "team-a") is not None


def test_namespaced_tokens_stay_in_their_namespaces() -> None:
    token = record("developer", ("team-a", "team-b"))
    assert may(token, Action.MANAGE, "team-a") is None
    assert may(token, Action.INVOKE, "team-b") is None
    denied = may(token, Action.READ, "team-c")
    assert denied is not None
    assert denied.status == 403
    assert "team-c" in denied.message
    # cluster-wide actions need every namespace, whatever the role allows
    assert may(token, Action.PUBLISH, None) is not None
    assert may(record("developer"), Action.PUBLISH, None) is None
    assert may(record("admin", ("team-a",)), Action.TOKENS, None) is not None


def test_routes_are_classified_and_the_rest_denied_by_default() -> None:
    assert route_action("GET", "/v1/namespaces/{ns}/functions") == Action.READ
    assert route_action("HEAD", "/v1/namespaces/{ns}/functions") == Action.READ
    assert route_action("POST", "/v1/namespaces/{ns}/functions/{name}/invoke") == Action.INVOKE
    assert route_action("GET", "/v1/namespaces/{ns}/functions/{name}/history") == Action.AUDIT
    assert route_action("POST", "/v1/tokens") == Action.TOKENS
    assert route_action("GET", "/v1/something-new") is None
    assert route_action("PUT", "/v1/events") is None
    assert all(isinstance(action, Action) for action in ROUTES.values())


def test_public_routes() -> None:
    """By the canonical path of the matched route (what the middleware passes), one by one."""
    assert is_public("/healthz")
    assert is_public("/ui")
    assert is_public("/ui/")
    assert is_public("/ui/{file}")
    assert not is_public("/metrics")
    assert not is_public("/uix")
    assert not is_public("/v1/info")
    # a route added later under /ui is not public by being there
    assert not is_public("/ui/admin")
    assert not is_public("/ui/{file}/raw")


@pytest.mark.parametrize(
    ("namespaces", "problem"),
    [
        (["team-a"], None),
        (["*"], None),
        (["*", "team-a"], "stands alone"),
        (["Team_A"], "RFC 1035"),
        (["a.b"], "RFC 1035"),
    ],
)
def test_namespaces(namespaces: list[str], problem: str | None) -> None:
    found = namespaces_problem(namespaces)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_minting_never_goes_beyond_the_minting_token() -> None:
    admin = record("admin")
    request = TokenRequest(name="x", role="admin", namespaces=["*"])
    assert mint_problem(admin, request, NOW) is None
    viewer = record("viewer")
    assert "cannot mint" in (mint_problem(viewer, request, NOW) or "")
    scoped = record("admin", ("team-a",))
    wider = TokenRequest(name="x", role="viewer", namespaces=["team-b"])
    assert "beyond" in (mint_problem(scoped, wider, NOW) or "")
    expiring = record("admin", expires_in=60)
    assert "expires_in" in (mint_problem(expiring, request, NOW) or "")
    longer = TokenRequest(name="x", role="viewer", namespaces=["*"], expires_in=120)
    assert "outlive" in (mint_problem(expiring, longer, NOW) or "")
    shorter = TokenRequest(name="x", role="viewer", namespaces=["*"], expires_in=30)
    assert mint_problem(expiring, shorter, NOW) is None


def test_expiry() -> None:
    token = record("viewer", expires_in=10)
    assert not token.expired(NOW + timedelta(seconds=9))
    assert token.expired(NOW + timedelta(seconds=10))
    assert not record("viewer").expired(NOW + timedelta(days=3650))


def test_failed_attempts_are_limited_per_address_in_a_sliding_window() -> None:
    limiter = FailureLimiter(limit=20, window=60.0)
    for i in range(20):
        assert limiter.retry_after("10.0.0.1", 100.0 + i) is None
        limiter.failed("10.0.0.1", 100.0 + i)
    wait = limiter.retry_after("10.0.0.1", 120.0)
    assert wait == pytest.approx(40.0)  # the first failure (t=100) ages out at t=160
    assert limiter.retry_after("10.0.0.2", 120.0) is None  # another address is not affected
    assert limiter.retry_after("10.0.0.1", 160.5) is None


def test_the_limiter_keeps_a_bounded_number_of_addresses() -> None:
    limiter = FailureLimiter(limit=2, window=60.0, max_addresses=3)
    for n in range(10):
        limiter.failed(f"a{n}", 1.0)
        limiter.failed(f"a{n}", 1.0)
    assert limiter.retry_after("a9", 2.0) is not None
    assert limiter.retry_after("a0", 2.0) is None  # forgotten
