"""Triggers: which events go to which function. The gateway owns their records (the `triggers`
KV bucket); the router turns each into a durable consumer and delivers.

Same order as functions: validate, write the record with compare-and-set, then publish
`trigger.created|deleted` with a deterministic id. A trigger needs its function to exist (it
need not run yet: its events wait), and goes when the function goes (`attached`).
"""

from __future__ import annotations

import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from lambdabus_events.catalog import TriggerCreated, TriggerData, TriggerDeleted
from lambdabus_events.models import TriggerRecord, TriggerSpec
from lambdabus_gateway.attached import FunctionAttached, check_names, invalid_fields
from lambdabus_platform.errors import InvalidRequest

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
    check_names(fields, "trigger", "invalid_trigger")
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
        raise invalid_fields(exc, "invalid_trigger") from exc


class Triggers(FunctionAttached[TriggerRecord, TriggerSpec]):
    record_type = TriggerRecord
    noun = "trigger"
    created = TriggerCreated
    deleted = TriggerDeleted
    log = log

    def _new_record(self, namespace: str, spec: TriggerSpec) -> TriggerRecord:
        return TriggerRecord(
            namespace=namespace,
            name=spec.name,
            uid=str(uuid.uuid4()),
            function=spec.function,
            filter=dict(spec.filter),
            delivery=spec.delivery,
            created_at=datetime.now(UTC),
        )

    def _data(self, record: TriggerRecord) -> TriggerData:
        return TriggerData(
            namespace=record.namespace,
            name=record.name,
            function=record.function,
            filter=record.filter,
        )
