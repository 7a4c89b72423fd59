"""API tokens and what they may do: the token format, its hashing and constant-time check, the
token record kept in the `tokens` KV bucket, the role-by-action matrix, the gateway's route
table and the limit on failed attempts. Pure: no I/O (the KV side is `tokenstore`).

A token is `lbt_<id>_<secret>`: `id` (16 hex digits) names its record, `secret` is 32 random
bytes (base64url). Only `sha256(secret)` is stored; a random 256-bit secret needs no slow hash.

Authorization is DEFAULT DENY: a route absent from `ROUTES` (and not public) is refused, and
an action absent from a role's set is refused. Classifying a new gateway route is one line in
`ROUTES`: `("METHOD", "/canonical/{path}"): Action.X`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from lambdabus_events.names import is_label

PREFIX: Final = "lbt"
ID_BYTES: Final = 8
SECRET_BYTES: Final = 32
_ID_HEX: Final = ID_BYTES * 2
_SECRET_B64: Final = 43  # base64url of 32 bytes, unpadded
_TOKEN = re.compile(rf"^{PREFIX}_([0-9a-f]{{{_ID_HEX}}})_([A-Za-z0-9_-]{{{_SECRET_B64}}})$")
_ID = re.compile(rf"^[0-9a-f]{{{_ID_HEX}}}$")
ALL_NAMESPACES: Final = "*"
# KV key of the record that says the admin token was bootstrapped (not a token id: not hex).
BOOTSTRAP_KEY: Final = "bootstrap"
QUERY_PARAMETERS: Final = ("token", "access_token")

Role = Literal["admin", "developer", "viewer", "invoker", "auditor"]
ROLES: Final[tuple[Role, ...]] = ("admin", "developer", "viewer", "invoker", "auditor")
TokenName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", max_length=63)
]


class Action(StrEnum):
    """What a request does; each route belongs to exactly one."""

    INFO = "info"  # the API's own description (/v1/info, OpenAPI): any valid token
    READ = "read"  # functions, status, logs, triggers, dead letters, quota (namespaced)
    MANAGE = "manage"  # functions, triggers, secrets, dead letters: write (namespaced)
    INVOKE = "invoke"  # call a function, read an asynchronous invocation (namespaced)
    PUBLISH = "publish"  # publish user CloudEvents (not namespaced: needs "*")
    AUDIT = "audit"  # lifecycle stream and history (filtered to the token's namespaces)
    METRICS = "metrics"  # the gateway's Prometheus metrics (needs "*")
    TOKENS = "tokens"  # mint, list, revoke tokens (needs "*")
    QUOTAS = "quotas"  # change namespace quotas (needs "*")
    REPLICAS = "replicas"  # list the platform's service replicas (needs "*"; admin only)


# Actions on something outside any one namespace: the token needs namespaces ["*"].
CLUSTER_ACTIONS: Final = frozenset(
    {Action.PUBLISH, Action.METRICS, Action.TOKENS, Action.QUOTAS, Action.REPLICAS}
)

PERMISSIONS: Final[dict[Role, frozenset[Action]]] = {
    "admin": frozenset(Action),
    "developer": frozenset(
        {
            Action.INFO,
            Action.READ,
            Action.MANAGE,
            Action.INVOKE,
            Action.PUBLISH,
            Action.AUDIT,
        }
    ),
    # A viewer for every namespace is what a Prometheus scrape of the gateway uses.
    "viewer": frozenset({Action.INFO, Action.READ, Action.AUDIT, Action.METRICS}),
    "invoker": frozenset({Action.INFO, Action.INVOKE}),
    "auditor": frozenset({Action.INFO, Action.AUDIT}),
}

# The gateway's routes by (method, canonical path). HEAD is checked as GET.
_FN = "/v1/namespaces/{ns}/functions"
_NS = "/v1/namespaces/{ns}"
ROUTES: Final[dict[tuple[str, str], Action]] = {
    ("POST", _FN): Action.MANAGE,
    ("GET", _FN): Action.READ,
    ("GET", _FN + "/{name}"): Action.READ,
    ("PUT", _FN + "/{name}"): Action.MANAGE,
    ("PATCH", _FN + "/{name}"): Action.MANAGE,
    ("DELETE", _FN + "/{name}"): Action.MANAGE,
    ("GET", _FN + "/{name}/status"): Action.READ,
    ("POST", _FN + "/{name}/invoke"): Action.INVOKE,
    ("GET", _FN + "/{name}/logs"): Action.READ,
    ("GET", _FN + "/{name}/build/logs"): Action.READ,
    ("GET", _FN + "/{name}/history"): Action.AUDIT,
    ("POST", _FN + "/{name}/sync"): Action.MANAGE,
    ("POST", _NS + "/triggers"): Action.MANAGE,
    ("GET", _NS + "/triggers"): Action.READ,
    ("GET", _NS + "/triggers/{name}"): Action.READ,
    ("DELETE", _NS + "/triggers/{name}"): Action.MANAGE,
    ("GET", _NS + "/functions/{name}/metrics"): Action.READ,
    # revisions and traffic (issue 11)
    ("GET", _NS + "/functions/{name}/revisions"): Action.READ,
    ("GET", _NS + "/functions/{name}/revisions/{revision}"): Action.READ,
    ("DELETE", _NS + "/functions/{name}/revisions/{revision}"): Action.MANAGE,
    ("GET", _NS + "/functions/{name}/traffic"): Action.READ,
    ("PUT", _NS + "/functions/{name}/traffic"): Action.MANAGE,
    ("POST", _NS + "/schedules"): Action.MANAGE,
    ("GET", _NS + "/schedules"): Action.READ,
    ("GET", _NS + "/schedules/{name}"): Action.READ,
    ("DELETE", _NS + "/schedules/{name}"): Action.MANAGE,
    ("GET", _NS + "/deadletters"): Action.READ,
    ("POST", _NS + "/deadletters/{id}/redrive"): Action.MANAGE,
    ("GET", _NS + "/invocations/{id}"): Action.INVOKE,
    ("POST", _NS + "/secrets"): Action.MANAGE,
    ("GET", _NS + "/secrets"): Action.MANAGE,
    ("GET", _NS + "/secrets/{name}"): Action.MANAGE,
    ("PUT", _NS + "/secrets/{name}"): Action.MANAGE,
    ("DELETE", _NS + "/secrets/{name}"): Action.MANAGE,
    ("GET", _NS + "/quota"): Action.READ,
    ("PUT", _NS + "/quota"): Action.QUOTAS,
    ("POST", "/v1/events"): Action.PUBLISH,
    ("GET", "/v1/info"): Action.INFO,
    ("GET", "/v1/namespaces"): Action.INFO,
    ("GET", "/v1/lifecycle"): Action.AUDIT,
    ("GET", "/v1/openapi.json"): Action.INFO,
    ("GET", "/metrics"): Action.METRICS,
    ("POST", "/v1/tokens"): Action.TOKENS,
    ("GET", "/v1/tokens"): Action.TOKENS,
    ("DELETE", "/v1/tokens/{id}"): Action.TOKENS,
    # -- LUNA docs
    ("GET", _FN + "/{name}/docs"): Action.READ,
    ("GET", _FN + "/{name}/docs.yml"): Action.READ,
    ("GET", "/v1/replicas"): Action.REPLICAS,
}
# Open to anyone: the health check, and the static files of a web UI under /ui/.
# The routes by canonical path, one by one: a route added later under /ui is not public by being
# there (it is denied until ROUTES classifies it).
PUBLIC_PATHS: Final = frozenset({"/healthz", "/ui", "/ui/", "/ui/{file}"})
PUBLIC_PREFIX: Final = "/ui"  # the console's files: left out of the OpenAPI document


def is_public(canonical: str) -> bool:
    return canonical in PUBLIC_PATHS


def route_action(method: str, canonical: str) -> Action | None:
    """The action of a route, or None when it is not classified (then it is denied)."""
    return ROUTES.get(("GET" if method == "HEAD" else method, canonical))


# -- tokens ---------------------------------------------------------------------------------


class TokenRecord(BaseModel):
    """A token as stored in the `tokens` KV bucket (key: its id). Never holds the secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_ID.pattern)
    name: TokenName
    role: Role
    namespaces: tuple[str, ...] = Field(min_length=1)
    secret_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: AwareDatetime
    expires_at: AwareDatetime | None = None
    created_by: str | None = Field(default=None, description="the id of the token that minted it")

    @property
    def all_namespaces(self) -> bool:
        return ALL_NAMESPACES in self.namespaces

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def public(self, now: datetime) -> dict[str, object]:
        """What the API shows of it: everything but the hash."""
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "namespaces": list(self.namespaces),
            "created": self.created_at.isoformat().replace("+00:00", "Z"),
            "expires": (
                self.expires_at.isoformat().replace("+00:00", "Z") if self.expires_at else None
            ),
            "expired": self.expired(now),
            "created_by": self.created_by,
        }


class TokenRequest(BaseModel):
    """`POST /v1/tokens`."""

    model_config = ConfigDict(extra="forbid")

    name: TokenName
    role: Role
    namespaces: list[str] = Field(min_length=1, max_length=256)
    expires_in: int | None = Field(default=None, gt=0, le=10 * 365 * 86_400)


@dataclass(frozen=True)
class Minted:
    record: TokenRecord
    token: str  # shown once


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def namespaces_problem(namespaces: list[str] | tuple[str, ...]) -> str | None:
    if ALL_NAMESPACES in namespaces:
        return (
            None if len(namespaces) == 1 else '"*" stands alone: it already means every namespace'
        )
    for ns in namespaces:
        if not is_label(ns):
            return f"namespace {ns!r} is not an RFC 1035 label"
    return None


def mint(
    name: str,
    role: Role,
    namespaces: list[str] | tuple[str, ...],
    *,
    now: datetime,
    expires_in: float | None = None,
    created_by: str | None = None,
    random: bytes | None = None,
) -> Minted:
    """A new token and its record. `random` (ID_BYTES + SECRET_BYTES) is for tests only."""
    problem = namespaces_problem(namespaces)
    if problem:
        raise ValueError(problem)
    raw = random if random is not None else secrets.token_bytes(ID_BYTES + SECRET_BYTES)
    token_id = raw[:ID_BYTES].hex()
    secret = base64.urlsafe_b64encode(raw[ID_BYTES:]).decode().rstrip("=")
    record = TokenRecord(
        id=token_id,
        name=name,
        role=role,
        namespaces=tuple(sorted(set(namespaces))),
        secret_sha256=_hash(secret),
        created_at=now,
        expires_at=now + timedelta(seconds=expires_in) if expires_in is not None else None,
        created_by=created_by,
    )
    return Minted(record, f"{PREFIX}_{token_id}_{secret}")


def parse_token(token: str) -> tuple[str, str] | None:
    """`(id, secret)` of a well-formed token, else None."""
    match = _TOKEN.fullmatch(token)
    return (match.group(1), match.group(2)) if match else None


def is_token_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def bearer(header: str | None) -> str | None:
    """The credentials of an `Authorization: Bearer <token>` header ('' when the header is there
    but not a bearer token), None when there is no header."""
    if header is None:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return credentials.strip()


_DUMMY = _hash("not a secret")


def secret_matches(record: TokenRecord | None, secret: str) -> bool:
    """Whether `secret` is the record's, in time independent of where they differ."""
    expected = record.secret_sha256 if record is not None else _DUMMY
    ok = hmac.compare_digest(_hash(secret).encode(), expected.encode())
    return ok and record is not None


# -- authorization --------------------------------------------------------------------------


@dataclass(frozen=True)
class Denied:
    status: Literal[401, 403]
    message: str


def may(record: TokenRecord, action: Action, namespace: str | None) -> Denied | None:
    """Whether the token may do `action` (in `namespace` for a namespaced one); None if so."""
    if action not in PERMISSIONS.get(record.role, frozenset()):
        return Denied(403, f"a {record.role} token may not {_verb(action)}")
    if action in CLUSTER_ACTIONS and not record.all_namespaces:
        return Denied(403, f'to {_verb(action)} a token needs every namespace ("*")')
    if namespace is not None and not in_scope(record, namespace):
        return Denied(403, f"this token is not for namespace {namespace!r}")
    return None


def in_scope(record: TokenRecord, namespace: str) -> bool:
    return record.all_namespaces or namespace in record.namespaces


def _verb(action: Action) -> str:
    return {
        Action.INFO: "read the API description",
        Action.READ: "read",
        Action.MANAGE: "change functions, triggers, secrets or dead letters",
        Action.INVOKE: "invoke functions",
        Action.PUBLISH: "publish events",
        Action.AUDIT: "read the lifecycle stream or history",
        Action.METRICS: "read the metrics",
        Action.TOKENS: "manage tokens",
        Action.QUOTAS: "change quotas",
        Action.REPLICAS: "list the service replicas",
    }[action]


def mint_problem(minter: TokenRecord, request: TokenRequest, now: datetime) -> str | None:
    """Why `minter` may not mint what `request` asks (nothing beyond its own scope), or None."""
    if not PERMISSIONS[request.role] <= PERMISSIONS[minter.role]:
        return f"a {minter.role} token cannot mint a {request.role} token"
    if not minter.all_namespaces and not set(request.namespaces) <= set(minter.namespaces):
        return "a token cannot be minted for namespaces beyond the minting token's"
    if minter.expires_at is not None:
        if request.expires_in is None:
            return "the minting token expires: give expires_in, at most until it expires"
        if now + timedelta(seconds=request.expires_in) > minter.expires_at:
            return "a token cannot outlive the token that mints it"
    return None


# -- failed attempts --------------------------------------------------------------------------


class FailureLimiter:
    """Failed authentication attempts per client address in a sliding window: past `limit`
    failures within `window` seconds the address is refused until the oldest one ages out.
    Keeps at most `max_addresses` addresses (the least recently failing go first)."""

    def __init__(self, limit: int = 20, window: float = 60.0, max_addresses: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str, now: float) -> float | None:
        """Seconds until `address` may try again, or None if it may now."""
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        if len(times) < self.limit:
            return None
        return max(0.001, times[0] + self.window - now)

    def failed(self, address: str, now: float) -> None:
        times = self._failures.pop(address, None) or deque()
        times.append(now)
        while len(times) > self.limit:
            times.popleft()
        self._failures[address] = times
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)


def utcnow() -> datetime:
    return datetime.now(UTC)
