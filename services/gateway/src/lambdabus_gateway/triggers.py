"""Triggers: which events go to which function. The gateway owns their records (the `triggers`
KV bucket); the router turns each into a durable consumer and delivers.

Same order as functions: validate, write the record with compare-and-set, then publish
`trigger.created|deleted` with a deterministic id. A trigger needs its function to exist (it
need not run yet: its events wait), and goes when the function goes.
"""

from __future__ import annotations

import contextlib
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from lambdabus_events.catalog import TriggerCreated, TriggerData, TriggerDeleted, lifecycle_event
from lambdabus_events.models import FunctionRecord, TriggerRecord, TriggerSpec
from lambdabus_events.names import label_problem
from lambdabus_gateway.functions import Functions, publish_lifecycle
from lambdabus_platform.bus import Bus, Kv
from lambdabus_platform.errors import (
    AlreadyExists,
    Conflict,
    InvalidName,
    InvalidRequest,
    NotFound,
)
from lambdabus_platform.registry import Registry, Versioned

log = logging.getLogger("lambdabus.gateway.triggers")

_FILTER_KEY = re.compile(r"^[a-z0-9]{1,20}$")
FILTER_VALUE_MAX = 1024


def filter_problems(value: Any) -> list[tuple[str, str]]:
    """What is wrong with a trigger's `filter`, as (key, message) pairs. Pure.

    Keys are CloudEvent attribute names (`type`, `source`, `subject`, `id`, or an extension:
    1 to 20 of a-z and 0-9); values are non-empty strings matched exactly, or by prefix when
    they end in `*` (which may appear only there)."""
    if not isinstance(value, dict):
        return [("", 'filter must be an object of attribute name to value, e.g. {"type": "..."}')]
    problems = []
    for key, match in value.items():
        if not isinstance(key, str) or _FILTER_KEY.fullmatch(key) is None:
            problems.append(
                (
                    str(key),
                    f"filter key {key!r} is not a CloudEvent attribute name "
                    "(1 to 20 lowercase letters and digits, e.g. type, source, subject)",
                )
            )
        elif key == "data":
            problems.append((key, "'data' is not an attribute; triggers filter on attributes"))
        elif not isinstance(match, str) or not match:
            problems.append((key, f"filter.{key} must be a non-empty string"))
        elif len(match) > FILTER_VALUE_MAX:
            problems.append((key, f"filter.{key} is longer than {FILTER_VALUE_MAX} characters"))
        elif "*" in match[:-1]:
            problems.append(
                (
                    key,
                    f"filter.{key} {match!r}: '*' may only end a value (a prefix match, "
                    "e.g. 'com.example.*')",
                )
            )
    return problems


def parse_trigger(fields: dict[str, Any]) -> TriggerSpec:
    """A trigger spec from a request body, or a 400 that names every bad field."""
    for field, what in (("name", "trigger name"), ("function", "function name")):
        if field not in fields:
            raise InvalidRequest(f"{field} is required ({what})", code="invalid_trigger")
        value = fields[field]
        problem = label_problem(value) if isinstance(value, str) else "must be a string"
        if problem:
            raise InvalidName(f"{what} {value!r} {problem}", details={"field": field})
    problems = filter_problems(fields.get("filter", {}))
    if problems:
        raise InvalidRequest(
            "; ".join(message for _, message in problems),
            code="invalid_filter",
            details={"keys": [key for key, _ in problems]},
        )
    try:
        return TriggerSpec.model_validate(fields)
    except ValidationError as exc:
        messages, where = [], []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            where.append(loc)
            if err["type"] == "extra_forbidden":
                messages.append(f"{loc}: unknown field; remove it")
            else:
                messages.append(f"{loc}: {err['msg']}")
        raise InvalidRequest(
            "; ".join(messages), code="invalid_trigger", details={"fields": where}
        ) from exc


class Triggers:
    def __init__(self, *, bus: Bus, kv: Kv, functions: Functions) -> None:
        self._bus = bus
        self._kv = kv
        self._records: Registry[TriggerRecord] = Registry(kv, TriggerRecord)
        self._functions = functions

    async def get(self, namespace: str, name: str) -> Versioned[TriggerRecord]:
        current = await self._records.get(namespace, name)
        if current is None:
            raise NotFound(f"trigger {namespace}/{name} does not exist", code="trigger_not_found")
        return current

    async def in_namespace(self, namespace: str) -> list[TriggerRecord]:
        items = await self._records.in_namespace(namespace)
        return sorted((item.value for item in items), key=lambda record: record.name)

    async def create(self, namespace: str, spec: TriggerSpec) -> Versioned[TriggerRecord]:
        function = await self._functions.get(namespace, spec.function)  # 404 if missing
        record = TriggerRecord(
            namespace=namespace,
            name=spec.name,
            uid=str(uuid.uuid4()),
            function=spec.function,
            filter=dict(spec.filter),
            delivery=spec.delivery,
            created_at=datetime.now(UTC),
        )
        try:
            stored = await self._records.create(namespace, spec.name, record)
        except AlreadyExists as exc:
            raise AlreadyExists(
                f"trigger {namespace}/{spec.name} already exists; delete it first to change it",
                code="trigger_exists",
            ) from exc
        # The function may have gone meanwhile (and not taken this trigger with it).
        if not await self._function_is(namespace, function.value):
            await self._forget(namespace, spec.name, stored.revision)
            raise NotFound(
                f"function {namespace}/{spec.function} was deleted; the trigger is not created",
                code="function_not_found",
            )
        await publish_lifecycle(self._bus, _event(TriggerCreated, record, "created"))
        log.info(
            "trigger created",
            extra={"namespace": namespace, "trigger": spec.name, "function": spec.function},
        )
        return stored

    async def delete(self, namespace: str, name: str) -> TriggerRecord:
        for _ in range(5):
            current = await self.get(namespace, name)
            try:
                await self._records.delete(namespace, name, current.revision)
            except Conflict:
                continue
            await self._deleted(current.value)
            return current.value
        raise Conflict("the trigger is being changed concurrently; retry")

    async def delete_for_function(self, namespace: str, function: str) -> list[TriggerRecord]:
        """Delete every trigger of a function (it was deleted)."""
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

    async def reconcile(self) -> list[TriggerRecord]:
        """Delete the triggers whose function no longer exists (the gateway stopped between
        deleting a function and deleting its triggers)."""
        orphans = []
        for entry in await self._kv.values(">"):
            try:
                record = TriggerRecord.model_validate_json(entry.value)
            except ValidationError:
                log.warning("skipping a malformed trigger record", extra={"key": entry.key})
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
            log.info("deleted triggers of deleted functions", extra={"count": len(orphans)})
        return orphans

    async def _function_is(self, namespace: str, function: FunctionRecord) -> bool:
        try:
            current = await self._functions.get(namespace, function.name)
        except NotFound:
            return False
        return current.value.uid == function.uid

    async def _forget(self, namespace: str, name: str, revision: int) -> None:
        with contextlib.suppress(Conflict):  # someone else deleted or replaced it
            await self._records.delete(namespace, name, revision)

    async def _deleted(self, record: TriggerRecord) -> None:
        await publish_lifecycle(self._bus, _event(TriggerDeleted, record, "deleted"))
        log.info(
            "trigger deleted",
            extra={"namespace": record.namespace, "trigger": record.name},
        )


def _event(
    cls: type[TriggerCreated] | type[TriggerDeleted], record: TriggerRecord, verb: str
) -> TriggerCreated | TriggerDeleted:
    data = TriggerData(
        namespace=record.namespace,
        name=record.name,
        function=record.function,
        filter=record.filter,
    )
    event = lifecycle_event(
        cls,
        data,
        service="gateway",
        subject=f"{record.namespace}/{record.name}",
        key=f"{record.uid}:{verb}",
    )
    assert isinstance(event, cls)
    return event
