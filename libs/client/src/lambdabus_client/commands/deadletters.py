"""`deadletters ls|redrive`."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from lambdabus_client.client import (
    ClientSettings,
    LambdabusClient,
)
from lambdabus_client.commands.common import (
    UsageError,
    format_age,
    print_data,
    render_table,
)


async def _deadletters(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    namespace = settings.namespace
    async with LambdabusClient.from_settings(settings) as client:
        if args.action == "redrive":
            answer = await client.redrive(namespace, args.id)
            if output != "table":
                print_data(output, answer)
            else:
                event = answer.get("event") or {}
                print(
                    f"Redriven dead letter {args.id}: event {event.get('id', '?')} "
                    f"({event.get('type', '?')}) sent to trigger {answer.get('trigger', '?')} again."
                )
            return 0
        if args.limit is not None and args.limit < 1:
            raise UsageError("--limit must be at least 1")
        page = await client.list_deadletters(
            namespace, args.trigger, after=args.after, limit=args.limit
        )
    items = page["items"]
    if output != "table":
        print_data(output, page)
        return 0
    if not items:
        where = f"trigger {args.trigger} in " if args.trigger else ""
        print(f"No dead letters for {where}namespace {namespace}.")
        return 0
    now = datetime.now(UTC)
    rows = []
    for item in items:
        event = item.get("event") if isinstance(item.get("event"), dict) else {}
        reason = str(item.get("reason", ""))
        rows.append(
            [
                str(item.get("id", "?")),
                str(item.get("trigger", "?")),
                str(event.get("type", "?")),
                str(event.get("id", "?")),
                reason,
                str(item.get("attempts", "?")),
                format_age(item.get("deadlettered_at"), now),
            ]
        )
    print(render_table(["ID", "TRIGGER", "TYPE", "EVENT", "REASON", "ATTEMPTS", "AGE"], rows))
    if page.get("next"):
        print(f"More: lambdabus deadletters ls --after {page['next']}")
    return 0
