"""Schedules: a function called at each tick of a cron expression. The gateway owns their
records (the `schedules` KV bucket); every router replica fires the ticks and delivers them
(see `lambdabus_router.schedules`).

Same order as triggers (`attached`): validate (the cron expression and time zone are parsed
here, so a bad one is a 400 naming the field), write the record with compare-and-set, then
publish `schedule.created|deleted` with a deterministic id. A schedule needs its function and
goes when the function goes.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from lambdabus_events.catalog import ScheduleCreated, ScheduleData, ScheduleDeleted
from lambdabus_events.models import ScheduleRecord, ScheduleSpec
from lambdabus_gateway.attached import FunctionAttached, check_names, invalid_fields
from lambdabus_platform.cron import ScheduleProblem, parse_timing
from lambdabus_platform.errors import InvalidRequest

log = logging.getLogger("lambdabus.gateway.schedules")


def parse_schedule(fields: dict[str, Any]) -> ScheduleSpec:
    """A schedule spec from a request body, or a 400 that names the bad field."""
    check_names(fields, "schedule", "invalid_schedule")
    if "cron" not in fields:
        raise InvalidRequest(
            "cron is required, e.g. '*/5 * * * *' or '@every 30s'",
            code="invalid_cron",
            details={"field": "cron"},
        )
    try:
        spec = ScheduleSpec.model_validate(fields)
    except ValidationError as exc:
        raise invalid_fields(exc, "invalid_schedule") from exc
    try:
        parse_timing(spec.cron, spec.timezone)
    except ScheduleProblem as exc:
        code = "invalid_cron" if exc.field == "cron" else "invalid_timezone"
        raise InvalidRequest(
            f"{exc.field}: {exc.message}", code=code, details={"field": exc.field}
        ) from None
    return spec


class Schedules(FunctionAttached[ScheduleRecord, ScheduleSpec]):
    record_type = ScheduleRecord
    noun = "schedule"
    created = ScheduleCreated
    deleted = ScheduleDeleted
    log = log

    def _new_record(self, namespace: str, spec: ScheduleSpec) -> ScheduleRecord:
        return ScheduleRecord(
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

    def _data(self, record: ScheduleRecord) -> ScheduleData:
        return ScheduleData(
            namespace=record.namespace,
            name=record.name,
            function=record.function,
            cron=record.cron,
            timezone=record.timezone,
        )
