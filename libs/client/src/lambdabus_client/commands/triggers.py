"""`triggers ls|create|rm`."""

from __future__ import annotations

import argparse
from datetime import datetime

from lambdabus_client.client import (
    ClientSettings,
    JsonObject,
    LambdabusClient,
)
from lambdabus_client.commands.common import (
    format_age,
    parse_assignments,
    print_listing,
    print_record,
)


def format_filter(value: object) -> str:
    """A trigger's filter as `key=value` pairs (`*` when it matches every event)."""
    if not isinstance(value, dict) or not value:
        return "*"
    return ",".join(f"{key}={match}" for key, match in value.items())


def format_delivery(value: object) -> str:
    """`3 retries, exponential from 1s, timeout 30s` (what is not said is the default)."""
    delivery = value if isinstance(value, dict) else {}
    retries = delivery.get("retries", 3)
    backoff = delivery.get("backoff", "exponential")
    return (
        f"{retries} {'retry' if retries == 1 else 'retries'}, "
        f"{backoff} from {delivery.get('backoff_delay', 1.0):g}s, "
        f"timeout {delivery.get('timeout', 30.0):g}s"
    )


async def _triggers(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    namespace = settings.namespace
    async with LambdabusClient.from_settings(settings) as client:
        if args.action == "create":
            delivery = {
                key: value
                for key, value in (
                    ("retries", args.retries),
                    ("backoff", args.backoff),
                    ("backoff_delay", args.backoff_delay),
                    ("timeout", args.timeout),
                    ("max_in_flight", args.max_in_flight),
                )
                if value is not None
            }
            spec: JsonObject = {
                "name": args.name,
                "function": args.function,
                "filter": parse_assignments(args.filter, "--filter"),
            }
            if delivery:
                spec["delivery"] = delivery
            record = await client.create_trigger(namespace, spec)
            print_record(
                output,
                record,
                f"Created trigger {namespace}/{args.name}: "
                f"{format_filter(record.get('filter'))} -> function {args.function} "
                f"({format_delivery(record.get('delivery'))}).",
            )
            return 0
        if args.action == "rm":
            record = await client.delete_trigger(namespace, args.name)
            print_record(output, record, f"Deleting trigger {namespace}/{args.name}.")
            return 0
        items = await client.list_triggers(namespace)
    print_listing(
        output,
        items,
        what="triggers",
        namespace=namespace,
        headers=["NAME", "FUNCTION", "FILTER", "DELIVERY", "AGE"],
        row=_trigger_row,
    )
    return 0


def _trigger_row(item: JsonObject, now: datetime) -> list[str]:
    return [
        str(item.get("name", "?")),
        str(item.get("function", "?")),
        format_filter(item.get("filter")),
        format_delivery(item.get("delivery")),
        format_age(item.get("created_at"), now),
    ]
