"""Records on JetStream KV, read and written with compare-and-set on the KV revision.

`Registry[T]` stores one pydantic model per `<ns>.<name>` key in one bucket; the function
registry (the gateway's), the build states (the builder's) and the deployment states (the
deployer's) are all instances of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

from lambdabus_platform.bus import Kv
from lambdabus_platform.subjects import function_key, namespace_pattern

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Versioned(Generic[M]):
    value: M
    revision: int

    @property
    def etag(self) -> str:
        return f'"{self.revision}"'


class Registry(Generic[M]):
    def __init__(self, kv: Kv, model: type[M]) -> None:
        self._kv = kv
        self._model = model

    async def get(self, namespace: str, name: str) -> Versioned[M] | None:
        entry = await self._kv.get(function_key(namespace, name))
        if entry is None:
            return None
        return Versioned(self._model.model_validate_json(entry.value), entry.revision)

    async def create(self, namespace: str, name: str, value: M) -> Versioned[M]:
        """AlreadyExists if the key holds a value."""
        revision = await self._kv.create(
            function_key(namespace, name), value.model_dump_json().encode()
        )
        return Versioned(value, revision)

    async def update(self, namespace: str, name: str, value: M, revision: int) -> Versioned[M]:
        """Conflict if the key moved past `revision`."""
        new = await self._kv.update(
            function_key(namespace, name), value.model_dump_json().encode(), revision
        )
        return Versioned(value, new)

    async def put(self, namespace: str, name: str, value: M) -> Versioned[M]:
        revision = await self._kv.put(
            function_key(namespace, name), value.model_dump_json().encode()
        )
        return Versioned(value, revision)

    async def delete(self, namespace: str, name: str, revision: int | None = None) -> None:
        await self._kv.delete(function_key(namespace, name), revision)

    async def in_namespace(self, namespace: str) -> list[Versioned[M]]:
        entries = await self._kv.values(namespace_pattern(namespace))
        items = [Versioned(self._model.model_validate_json(e.value), e.revision) for e in entries]
        return sorted(items, key=lambda v: v.revision)

    async def namespaces(self) -> set[str]:
        """Every namespace that holds a record, from the keys (`<ns>.<name>`): no record is
        parsed, so one that does not parse hides none."""
        return {e.key.split(".", 1)[0] for e in await self._kv.values(">")}

    async def everywhere(self) -> list[Versioned[M]]:
        """Every value of the bucket, in every namespace."""
        entries = await self._kv.values(">")
        return [Versioned(self._model.model_validate_json(e.value), e.revision) for e in entries]
