"""`schedules ls|create|rm`."""

from __future__ import annotations

import argparse
import json
from datetime import datetime

from lambdabus_client.client import ClientSettings, JsonObject, LambdabusClient
from lambdabus_client.commands.common import (
    UsageError,
    format_age,
    print_listing,
    print_record,
)
from lambdabus_client.commands.triggers import format_delivery


def schedule_spec(args: argparse.Namespace) -> JsonObject:
    """The body `schedules create` sends; the gateway judges the cron expression."""
    spec: JsonObject = {
        "name": args.name,
        "function": args.function,
        "cron": args.cron,
        "timezone": args.timezone,
    }
    if args.data is not None:
        try:
            data = json.loads(args.data)
        except ValueError as error:
            raise UsageError(f"--data is not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise UsageError('--data must be a JSON object, e.g. \'{"report": "daily"}\'')
        spec["data"] = data
    delivery = {
        key: value
        for key, value in (("retries", args.retries), ("timeout", args.timeout))
        if value is not None
    }
    if delivery:
        spec["delivery"] = delivery
    return spec


async def _schedules(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    namespace = settings.namespace
    async with LambdabusClient.from_settings(settings) as client:
        if args.action == "create":
            record = await client.create_schedule(namespace, schedule_spec(args))
            print_record(
                output,
                record,
                f"Created schedule {namespace}/{args.name}: {record.get('cron')} "
                f"({record.get('timezone')}) -> function {args.function}.",
            )
            return 0
        if args.action == "rm":
            record = await client.delete_schedule(namespace, args.name)
            print_record(output, record, f"Deleted schedule {namespace}/{args.name}.")
            return 0
        items = await client.list_schedules(namespace)
    print_listing(
        output,
        items,
        what="schedules",
        namespace=namespace,
        headers=["NAME", "FUNCTION", "CRON", "TIMEZONE", "DELIVERY", "AGE"],
        row=_schedule_row,
    )
    return 0


def _schedule_row(item: JsonObject, now: datetime) -> list[str]:
    return [
        str(item.get("name", "?")),
        str(item.get("function", "?")),
        str(item.get("cron", "?")),
        str(item.get("timezone", "?")),
        format_delivery(item.get("delivery")),
        format_age(item.get("created_at"), now),
    ]
