"""Schedules: a function called at each tick of a cron expression. The gateway owns their
records (the `schedules` KV bucket); every router replica fires the ticks and delivers them
(see `lambdabus_router.schedules`).

Same order as triggers: validate (the cron expression and time zone are parsed here, so a bad
one is a 400 naming the field), write the record with compare-and-set, then publish
`schedule.created|deleted` with a deterministic id. A schedule needs its function and goes when
the function goes.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from lambdabus_events.catalog import (
    ScheduleCreated,
    ScheduleData,
    ScheduleDeleted,
    lifecycle_event,
)
from lambdabus_events.models import FunctionRecord, ScheduleRecord, ScheduleSpec
from lambdabus_events.names import label_problem
from lambdabus_gateway.functions import Functions, publish_lifecycle
from lambdabus_platform.bus import Bus, Kv
from lambdabus_platform.cron import ScheduleProblem, parse_timing
from lambdabus_platform.errors import AlreadyExists, Conflict, InvalidName, InvalidRequest, NotFound
from lambdabus_platform.registry import Registry, Versioned

log = logging.getLogger("lambdabus.gateway.schedules")


def parse_schedule(fields: dict[str, Any]) -> ScheduleSpec:
    """A schedule spec from a request body, or a 400 that names the bad field."""
    for field, what in (("name", "schedule name"), ("function", "function name")):
        if field not in fields:
            raise InvalidRequest(f"{field} is required ({what})", code="invalid_schedule")
        value = fields[field]
        problem = label_problem(value) if isinstance(value, str) else "must be a string"
        if problem:
            raise InvalidName(f"{what} {value!r} {problem}", details={"field": field})
    if "cron" not in fields:
        raise InvalidRequest(
            "cron is required, e.g. '*/5 * * * *' or '@every 30s'",
            code="invalid_cron",
            details={"field": "cron"},
        )
    try:
        spec = ScheduleSpec.model_validate(fields)
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
            "; ".join(messages), code="invalid_schedule", details={"fields": where}
        ) from exc
    try:
        parse_timing(spec.cron, spec.timezone)
    except ScheduleProblem as exc:
        code = "invalid_cron" if exc.field == "cron" else "invalid_timezone"
        raise InvalidRequest(
            f"{exc.field}: {exc.message}", code=code, details={"field": exc.field}
        ) from None
    return spec


class Schedules:
    def __init__(self, *, bus: Bus, kv: Kv, functions: Functions) -> None:
        self._bus = bus
        self._kv = kv
        self._records: Registry[ScheduleRecord] = Registry(kv, ScheduleRecord)
        self._functions = functions

    async def get(self, namespace: str, name: str) -> Versioned[ScheduleRecord]:
        current = await self._records.get(namespace, name)
        if current is None:
            raise NotFound(f"schedule {namespace}/{name} does not exist", code="schedule_not_found")
        return current

    async def in_namespace(self, namespace: str) -> list[ScheduleRecord]:
        items = await self._records.in_namespace(namespace)
        return sorted((item.value for item in items), key=lambda record: record.name)

    async def create(self, namespace: str, spec: ScheduleSpec) -> Versioned[ScheduleRecord]:
        function = await self._functions.get(namespace, spec.function)  # 404 if missing
        record = ScheduleRecord(
            namespace=namespace,
            name=spec.name,
            uid=str(uuid.uuid4()),
            function=spec.function,
            cron=spec.cron.strip(),
            timezone=spec.timezone,
            data=spec.data,
            delivery=spec.delivery,
            created_at=datetime.now(UTC),
        )
        try:
            stored = await self._records.create(namespace, spec.name, record)
        except AlreadyExists as exc:
            raise AlreadyExists(
                f"schedule {namespace}/{spec.name} already exists; delete it first to change it",
                code="schedule_exists",
            ) from exc
        if not await self._function_is(namespace, function.value):
            with contextlib.suppress(Conflict):
                await self._records.delete(namespace, spec.name, stored.revision)
            raise NotFound(
                f"function {namespace}/{spec.function} was deleted; the schedule is not created",
                code="function_not_found",
            )
        await publish_lifecycle(self._bus, _event(ScheduleCreated, record, "created"))
        log.info(
            "schedule created",
            extra={"namespace": namespace, "schedule": spec.name, "function": spec.function},
        )
        return stored

    async def delete(self, namespace: str, name: str) -> ScheduleRecord:
        for _ in range(5):
            current = await self.get(namespace, name)
            try:
                await self._records.delete(namespace, name, current.revision)
            except Conflict:
                continue
            await self._deleted(current.value)
            return current.value
        raise Conflict("the schedule is being changed concurrently; retry")

    async def delete_for_function(self, namespace: str, function: str) -> list[ScheduleRecord]:
        """Delete every schedule of a function (it was deleted)."""
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

    async def reconcile(self) -> list[ScheduleRecord]:
        """Delete the schedules whose function no longer exists (the gateway stopped between
        deleting a function and deleting its schedules)."""
        orphans = []
        for entry in await self._kv.values(">"):
            try:
                record = ScheduleRecord.model_validate_json(entry.value)
            except ValidationError:
                log.warning("skipping a malformed schedule record", extra={"key": entry.key})
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
            log.info("deleted schedules of deleted functions", extra={"count": len(orphans)})
        return orphans

    async def _function_is(self, namespace: str, function: FunctionRecord) -> bool:
        try:
            current = await self._functions.get(namespace, function.name)
        except NotFound:
            return False
        return current.value.uid == function.uid

    async def _deleted(self, record: ScheduleRecord) -> None:
        await publish_lifecycle(self._bus, _event(ScheduleDeleted, record, "deleted"))
        log.info("schedule deleted", extra={"namespace": record.namespace, "schedule": record.name})


def _event(
    cls: type[ScheduleCreated] | type[ScheduleDeleted], record: ScheduleRecord, verb: str
) -> ScheduleCreated | ScheduleDeleted:
    data = ScheduleData(
        namespace=record.namespace,
        name=record.name,
        function=record.function,
        cron=record.cron,
        timezone=record.timezone,
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
