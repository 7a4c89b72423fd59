"""Secrets of a namespace: checking a request body (pure), and the write path (seal, write with
compare-and-set, announce `io.lambdabus.secret.*` with key names only).

No error message, log line or event built here contains a value: a bad body is described by
key names and sizes, never by what it holds.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from lambdabus_events.catalog import (
    SecretCreated,
    SecretData,
    SecretDeleted,
    SecretUpdated,
    lifecycle_event,
)
from lambdabus_events.models import SECRET_KEY_PATTERN, SecretInfo
from lambdabus_events.names import label_problem
from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import (
    AlreadyExists,
    Conflict,
    InvalidName,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
)
from lambdabus_platform.secretstore import SecretStore, StoredSecret

log = logging.getLogger("lambdabus.gateway.secrets")

KiB = 1024
MAX_VALUE_BYTES = 64 * KiB
MAX_SECRET_BYTES = 1024 * KiB
MAX_KEYS = 256
# The largest body the API reads for one secret (JSON escaping can double the values).
MAX_BODY_BYTES = 3 * MAX_SECRET_BYTES
_KEY = re.compile(SECRET_KEY_PATTERN)


class InvalidSecret(InvalidRequest):
    code = "invalid_secret"


@dataclass(frozen=True)
class SecretBody:
    name: str
    data: dict[str, str]

    def __repr__(self) -> str:  # never print the values
        return f"SecretBody(name={self.name!r}, keys={sorted(self.data)!r})"


def _key_problem(key: str) -> str | None:
    if _KEY.fullmatch(key) is None:
        shown = key if len(key) <= 64 and key.isprintable() else f"{key[:32]!r}…"
        return (
            f"key {shown!r} is not a valid secret key: 1 to 253 characters of letters, digits, "
            "'-', '_' and '.'"
        )
    return None


def parse_secret_body(body: object, *, name: str | None = None) -> SecretBody:
    """`{"name", "data": {"key": "value"}}` checked, or InvalidSecret / PayloadTooLarge naming
    the field, the key or the size at fault (never a value). `name`: the name in the path
    (PUT), which a body may repeat but not contradict. Pure."""
    if not isinstance(body, dict):
        raise InvalidSecret('a secret is a JSON object {"name": ..., "data": {"key": "value"}}')
    unknown = sorted(str(k)[:64] for k in body if k not in ("name", "data"))
    if unknown:
        raise InvalidSecret(f"unknown field(s) {', '.join(unknown)}: a secret has name and data")
    given = body.get("name", name)
    if not isinstance(given, str):
        raise InvalidName("secret name must be a string")
    problem = label_problem(given)
    if problem:
        shown = given if len(given) <= 80 else given[:80] + "…"
        raise InvalidName(f"secret name {shown!r} {problem}")
    if name is not None and given != name:
        raise InvalidName(f"name {given!r} in the body does not match the secret {name!r}")
    data = body.get("data")
    if not isinstance(data, dict):
        raise InvalidSecret('data must be an object of string values: {"key": "value"}')
    if not data:
        raise InvalidSecret("data must hold at least one key")
    if len(data) > MAX_KEYS:
        raise InvalidSecret(f"a secret holds at most {MAX_KEYS} keys (got {len(data)})")
    total = 0
    for key, value in data.items():
        problem = _key_problem(key)
        if problem:
            raise InvalidSecret(problem)
        if not isinstance(value, str):
            raise InvalidSecret(f"the value of key {key!r} must be a string")
        size = len(value.encode())
        if size > MAX_VALUE_BYTES:
            raise PayloadTooLarge(
                f"the value of key {key!r} is {size} bytes; at most {MAX_VALUE_BYTES} per value"
            )
        total += size + len(key)
    if total > MAX_SECRET_BYTES:
        raise PayloadTooLarge(f"the secret holds {total} bytes; at most {MAX_SECRET_BYTES} in all")
    return SecretBody(given, dict(data))


def _event_data(secret: StoredSecret) -> SecretData:
    return SecretData(
        namespace=secret.namespace, name=secret.name, keys=secret.keys, version=secret.version
    )


class Secrets:
    def __init__(self, *, bus: Bus, store: SecretStore) -> None:
        self._bus = bus
        self._store = store

    def _not_found(self, namespace: str, name: str) -> NotFound:
        return NotFound(
            f"secret {namespace}/{name} does not exist; create it with "
            f"POST /v1/namespaces/{namespace}/secrets",
            code="secret_not_found",
        )

    async def get(self, namespace: str, name: str) -> SecretInfo:
        found = await self._store.get(namespace, name)
        if found is None:
            raise self._not_found(namespace, name)
        return found.secret.info()

    async def in_namespace(self, namespace: str) -> list[SecretInfo]:
        return [s.info() for s in await self._store.in_namespace(namespace)]

    async def create(self, namespace: str, body: SecretBody) -> SecretInfo:
        now = datetime.now(UTC)
        secret = StoredSecret(
            namespace=namespace,
            name=body.name,
            uid=str(uuid.uuid4()),
            version=1,
            keys=sorted(body.data),
            created_at=now,
            updated_at=now,
            sealed=self._store.seal(namespace, body.name, body.data),
        )
        try:
            await self._store.create(secret)
        except AlreadyExists:
            raise AlreadyExists(
                f"secret {namespace}/{body.name} already exists; use PUT to replace its data",
                code="secret_exists",
            ) from None
        await self._announce(SecretCreated, secret, f"{secret.uid}:1")
        log.info(
            "secret created",
            extra={"namespace": namespace, "secret": body.name, "keys": secret.keys},
        )
        return secret.info()

    async def replace(self, namespace: str, body: SecretBody) -> SecretInfo:
        for _ in range(5):
            found = await self._store.get(namespace, body.name)
            if found is None:
                raise self._not_found(namespace, body.name)
            current = found.secret
            secret = current.model_copy(
                update={
                    "version": current.version + 1,
                    "keys": sorted(body.data),
                    "updated_at": datetime.now(UTC),
                    "sealed": self._store.seal(namespace, body.name, body.data),
                }
            )
            try:
                await self._store.update(secret, found.revision)
            except Conflict:
                continue
            await self._announce(SecretUpdated, secret, f"{secret.uid}:{secret.version}")
            log.info(
                "secret updated",
                extra={
                    "namespace": namespace,
                    "secret": body.name,
                    "keys": secret.keys,
                    "version": secret.version,
                },
            )
            return secret.info()
        raise Conflict("the secret is being changed concurrently; retry")

    async def delete(self, namespace: str, name: str) -> SecretInfo:
        for _ in range(5):
            found = await self._store.get(namespace, name)
            if found is None:
                raise self._not_found(namespace, name)
            try:
                await self._store.delete(namespace, name, found.revision)
            except Conflict:
                continue
            await self._announce(SecretDeleted, found.secret, f"{found.secret.uid}:deleted")
            log.info("secret deleted", extra={"namespace": namespace, "secret": name})
            return found.secret.info()
        raise Conflict("the secret is being changed concurrently; retry")

    async def _announce(
        self,
        cls: type[SecretCreated | SecretUpdated | SecretDeleted],
        secret: StoredSecret,
        key: str,
    ) -> None:
        event = lifecycle_event(
            cls,
            _event_data(secret),
            service="gateway",
            subject=f"{secret.namespace}/{secret.name}",
            key=key,
        )
        await self._bus.publish_lifecycle(event)
