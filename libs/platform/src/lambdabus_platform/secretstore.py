"""Secrets in the `secrets` KV bucket (`<ns>.<name>`): key names and versions in the clear, the
values sealed together by `SecretBox` with the secret's identity as associated data. The gateway
writes them; the deployer reads them; nothing else holds the key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from lambdabus_events.models import SecretInfo
from lambdabus_events.names import Label
from lambdabus_platform.bus import Kv
from lambdabus_platform.secretbox import SecretBox
from lambdabus_platform.subjects import function_key, namespace_pattern


class StoredSecret(BaseModel):
    """The KV value of one secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    namespace: Label
    name: Label
    uid: str
    version: int = Field(ge=1)
    keys: list[str]
    created_at: datetime
    updated_at: datetime
    sealed: str = Field(description="SecretBox.seal of the JSON object of the values", repr=False)

    def info(self) -> SecretInfo:
        return SecretInfo(
            namespace=self.namespace,
            name=self.name,
            keys=self.keys,
            version=self.version,
            created_at=self.created_at,
            updated_at=self.updated_at,
        )


def identity(namespace: str, name: str) -> str:
    """The associated data a secret's values are sealed with."""
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class Found:
    secret: StoredSecret
    revision: int


class SecretStore:
    def __init__(self, kv: Kv, box: SecretBox) -> None:
        self._kv = kv
        self._box = box

    def seal(self, namespace: str, name: str, data: dict[str, str]) -> str:
        plaintext = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
        return self._box.seal(plaintext, identity(namespace, name)).decode("ascii")

    def values(self, secret: StoredSecret) -> dict[str, str]:
        """The decrypted values; SecretKeyError when the key is not the sealing one."""
        plaintext = self._box.open(
            secret.sealed.encode("ascii"), identity(secret.namespace, secret.name)
        )
        data: dict[str, str] = json.loads(plaintext)
        return data

    async def get(self, namespace: str, name: str) -> Found | None:
        entry = await self._kv.get(function_key(namespace, name))
        if entry is None:
            return None
        return Found(StoredSecret.model_validate_json(entry.value), entry.revision)

    async def create(self, secret: StoredSecret) -> int:
        return await self._kv.create(
            function_key(secret.namespace, secret.name), secret.model_dump_json().encode()
        )

    async def update(self, secret: StoredSecret, revision: int) -> int:
        return await self._kv.update(
            function_key(secret.namespace, secret.name),
            secret.model_dump_json().encode(),
            revision,
        )

    async def delete(self, namespace: str, name: str, revision: int) -> None:
        await self._kv.delete(function_key(namespace, name), revision)

    async def in_namespace(self, namespace: str) -> list[StoredSecret]:
        entries = await self._kv.values(namespace_pattern(namespace))
        items = [StoredSecret.model_validate_json(e.value) for e in entries]
        return sorted(items, key=lambda s: s.name)
