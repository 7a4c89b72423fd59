"""The builder's KV records, as one replica writes them: build states under its claim (each write
a compare-and-set that `claims.holds` allows, a conflict re-read and retried, never overwritten)
and the index of built inputs every replica shares."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime

from pydantic import BaseModel, ValidationError

from lambdabus_builder.claims import LostClaim, Target, holds, new_claim, renewed
from lambdabus_builder.plan import next_build_state
from lambdabus_events.models import BuildState, FunctionRecord
from lambdabus_platform.bus import Kv
from lambdabus_platform.errors import AlreadyExists, Conflict, TemporaryError
from lambdabus_platform.registry import Registry, Versioned

CAS_ATTEMPTS = 8  # re-reads of a record that moved under a write, before giving up for now


def now_utc() -> datetime:
    return datetime.now(UTC)


class ClaimedStates:
    """The `builds` bucket through replica `me`'s claims, with leases of `lease` seconds."""

    def __init__(
        self, kv: Kv, me: str, lease: float, clock: Callable[[], datetime] = now_utc
    ) -> None:
        self._states = Registry(kv, BuildState)
        self.me = me
        self.lease = lease
        self._clock = clock

    async def get(self, namespace: str, name: str) -> Versioned[BuildState] | None:
        return await self._states.get(namespace, name)

    async def update(
        self, namespace: str, name: str, value: BuildState, revision: int
    ) -> Versioned[BuildState]:
        """An unclaimed write (a re-stamp) over `revision`; Conflict if the record moved."""
        return await self._states.update(namespace, name, value, revision)

    async def delete(self, namespace: str, name: str, revision: int | None) -> None:
        """Conflict if the record moved past `revision`."""
        await self._states.delete(namespace, name, revision)

    async def claim(
        self, record: FunctionRecord, seen: Versioned[BuildState] | None
    ) -> Versioned[BuildState]:
        """A new queued build of `record`, claimed by `me`, written over the state `seen` (None:
        there was none). Conflict / AlreadyExists when another replica wrote first: the caller
        reads and decides again."""
        now = self._clock()
        state = next_build_state(None, record, "queued", now).model_copy(
            update={"claim": new_claim(self.me, now, self.lease)}
        )
        if seen is None:
            return await self._states.create(record.namespace, record.name, state)
        return await self._states.update(record.namespace, record.name, state, seen.revision)

    async def write(
        self,
        namespace: str,
        name: str,
        target: Target,
        change: Callable[[BuildState], BuildState],
    ) -> Versioned[BuildState]:
        """Write `change(current)` while the record is `me`'s claim on `target`: re-read on a
        conflict and try again. Raises `LostClaim` (writing nothing) once it is not."""
        for _ in range(CAS_ATTEMPTS):
            current = await self._states.get(namespace, name)
            value = current.value if current is not None else None
            if current is None or value is None or not holds(value, self.me, target):
                holder = value.claim.holder if value is not None and value.claim else None
                raise LostClaim(holder)
            try:
                return await self._states.update(
                    namespace, name, change(current.value), current.revision
                )
            except Conflict:
                continue
        raise TemporaryError(f"the build record {namespace}/{name} kept changing under a write")

    async def renew(self, namespace: str, name: str, target: Target) -> Versioned[BuildState]:
        """`me`'s lease on the build of `target`, extended from now; `LostClaim` if it is gone."""
        return await self.write(
            namespace,
            name,
            target,
            lambda state: renewed(state, self.me, target, self._clock(), self.lease),
        )

    async def release(self, namespace: str, name: str, target: Target) -> None:
        """Give the claim up (a stopping builder): another replica takes the build over now."""
        await self.write(namespace, name, target, lambda s: s.model_copy(update={"claim": None}))


class BuiltInputs(BaseModel):
    """An entry of the `build-inputs` bucket: a successful build of these inputs, by any replica."""

    artifact: str
    deps_key: str
    built_by: str
    built_at: datetime


class InputsIndex:
    """`build-inputs`: `<inputs_key>` → the artifact of a successful build of those inputs."""

    def __init__(self, kv: Kv) -> None:
        self._kv = kv

    async def get(self, key: str) -> BuiltInputs | None:
        entry = await self._kv.get(key)
        if entry is None:
            return None
        try:
            return BuiltInputs.model_validate_json(entry.value)
        except ValidationError:
            return None

    async def remember(self, key: str, built: BuiltInputs) -> None:
        """Record `built` for `key`: a new entry, or over one whose artifact this replica found
        unusable (built again); a concurrent writer's entry wins the compare-and-set."""
        data = built.model_dump_json().encode()
        try:
            await self._kv.create(key, data)
        except AlreadyExists:
            entry = await self._kv.get(key)
            if entry is None:
                return
            with contextlib.suppress(Conflict):
                await self._kv.update(key, data, entry.revision)
