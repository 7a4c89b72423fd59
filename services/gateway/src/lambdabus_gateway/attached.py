"""Records attached to a function (triggers, schedules): what they share.

Validate, write the record with compare-and-set, then publish `<noun>.created|deleted` with a
deterministic id. A record needs its function to exist (it need not run yet), and goes when the
function goes: `delete_for_function` on the function's deletion, `reconcile` for the records
left behind when the gateway stopped in between.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from lambdabus_events.catalog import (
    LifecycleEvent,
    ScheduleData,
    TriggerData,
    lifecycle_event,
)
from lambdabus_events.models import (
    FunctionRecord,
    ScheduleRecord,
    ScheduleSpec,
    TriggerRecord,
    TriggerSpec,
)
from lambdabus_events.names import label_problem
from lambdabus_gateway.functions import Functions, publish_lifecycle
from lambdabus_platform.bus import Bus, Kv
from lambdabus_platform.errors import AlreadyExists, Conflict, InvalidName, InvalidRequest, NotFound
from lambdabus_platform.registry import Registry, Versioned

R = TypeVar("R", TriggerRecord, ScheduleRecord)
S = TypeVar("S", TriggerSpec, ScheduleSpec)


def check_names(fields: dict[str, Any], noun: str, code: str) -> None:
    """A 400 unless the body has a valid `name` (of the `noun`) and `function`."""
    for field, what in (("name", f"{noun} name"), ("function", "function name")):
        if field not in fields:
            raise InvalidRequest(f"{field} is required ({what})", code=code)
        value = fields[field]
        problem = label_problem(value) if isinstance(value, str) else "must be a string"
        if problem:
            raise InvalidName(f"{what} {value!r} {problem}", details={"field": field})


def invalid_fields(exc: ValidationError, code: str) -> InvalidRequest:
    """The 400 for a spec that does not validate, naming every bad field."""
    messages, where = [], []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        where.append(loc)
        if err["type"] == "extra_forbidden":
            messages.append(f"{loc}: unknown field; remove it")
        else:
            messages.append(f"{loc}: {err['msg']}")
    return InvalidRequest("; ".join(messages), code=code, details={"fields": where})


class FunctionAttached(ABC, Generic[R, S]):
    """The records of one KV bucket, each attached to a function by `record.function`."""

    # What a subclass names: its record type, the noun of its messages and error codes
    # (`<noun>_not_found`, `<noun>_exists`), its lifecycle events and its logger.
    record_type: type[R]
    noun: str
    created: type[LifecycleEvent]
    deleted: type[LifecycleEvent]
    log: logging.Logger

    def __init__(self, *, bus: Bus, kv: Kv, functions: Functions) -> None:
        self._bus = bus
        self._kv = kv
        self._records: Registry[R] = Registry(kv, self.record_type)
        self._functions = functions

    @abstractmethod
    def _new_record(self, namespace: str, spec: S) -> R:
        """The record a spec makes (a new uid, created now)."""

    @abstractmethod
    def _data(self, record: R) -> TriggerData | ScheduleData:
        """The data of the record's lifecycle events."""

    async def get(self, namespace: str, name: str) -> Versioned[R]:
        current = await self._records.get(namespace, name)
        if current is None:
            raise NotFound(
                f"{self.noun} {namespace}/{name} does not exist", code=f"{self.noun}_not_found"
            )
        return current

    async def in_namespace(self, namespace: str) -> list[R]:
        items = await self._records.in_namespace(namespace)
        return sorted((item.value for item in items), key=lambda record: record.name)

    async def create(self, namespace: str, spec: S) -> Versioned[R]:
        noun = self.noun
        function = await self._functions.get(namespace, spec.function)  # 404 if missing
        record = self._new_record(namespace, spec)
        try:
            stored = await self._records.create(namespace, spec.name, record)
        except AlreadyExists as exc:
            raise AlreadyExists(
                f"{noun} {namespace}/{spec.name} already exists; delete it first to change it",
                code=f"{noun}_exists",
            ) from exc
        # The function may have gone meanwhile (and not taken this record with it).
        if not await self._function_is(namespace, function.value):
            with contextlib.suppress(Conflict):  # someone else deleted or replaced it
                await self._records.delete(namespace, spec.name, stored.revision)
            raise NotFound(
                f"function {namespace}/{spec.function} was deleted; the {noun} is not created",
                code="function_not_found",
            )
        await publish_lifecycle(self._bus, self._event(self.created, record, "created"))
        self.log.info(
            f"{noun} created",
            extra={"namespace": namespace, noun: spec.name, "function": spec.function},
        )
        return stored

    async def delete(self, namespace: str, name: str) -> R:
        for _ in range(5):
            current = await self.get(namespace, name)
            try:
                await self._records.delete(namespace, name, current.revision)
            except Conflict:
                continue
            await self._deleted(current.value)
            return current.value
        raise Conflict(f"the {self.noun} is being changed concurrently; retry")

    async def delete_for_function(self, namespace: str, function: str) -> list[R]:
        """Delete every record of a function (it was deleted)."""
        deleted = []
        for item in await self._records.in_namespace(namespace):
            if item.value.function != function:
                continue
            try:
                await self._records.delete(namespace, item.value.name, item.revision)
            except Conflict:
                continue  # replaced meanwhile; the reconcile takes it if it is an orphan
            await self._deleted(item.value)
            deleted.append(item.value)
        return deleted

    async def reconcile(self) -> list[R]:
        """Delete the records whose function no longer exists (the gateway stopped between
        deleting a function and deleting its records)."""
        orphans = []
        for entry in await self._kv.values(">"):
            try:
                record = self.record_type.model_validate_json(entry.value)
            except ValidationError:
                self.log.warning(
                    f"skipping a malformed {self.noun} record", extra={"key": entry.key}
                )
                continue
            try:
                await self._functions.get(record.namespace, record.function)
                continue
            except NotFound:
                pass
            try:
                await self._records.delete(record.namespace, record.name, entry.revision)
            except Conflict:
                continue
            await self._deleted(record)
            orphans.append(record)
        if orphans:
            self.log.info(
                f"deleted {self.noun}s of deleted functions", extra={"count": len(orphans)}
            )
        return orphans

    async def _function_is(self, namespace: str, function: FunctionRecord) -> bool:
        try:
            current = await self._functions.get(namespace, function.name)
        except NotFound:
            return False
        return current.value.uid == function.uid

    async def _deleted(self, record: R) -> None:
        await publish_lifecycle(self._bus, self._event(self.deleted, record, "deleted"))
        self.log.info(
            f"{self.noun} deleted",
            extra={"namespace": record.namespace, self.noun: record.name},
        )

    def _event(self, cls: type[LifecycleEvent], record: R, verb: str) -> LifecycleEvent:
        event = lifecycle_event(
            cls,
            self._data(record),
            service="gateway",
            subject=f"{record.namespace}/{record.name}",
            key=f"{record.uid}:{verb}",
        )
        assert isinstance(event, cls)
        return event
