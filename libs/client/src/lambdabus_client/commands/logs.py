"""`logs`: a function's runtime or build log lines."""

from __future__ import annotations

import argparse
import contextlib
from datetime import UTC, datetime

from lambdabus_client.client import (
    ClientSettings,
    JsonObject,
    LambdabusClient,
)
from lambdabus_client.commands.common import (
    UsageError,
    _parse_time,
    parse_since,
    print_item,
)


def format_log_time(value: object) -> str:
    """`HH:MM:SS.mmm` (UTC) of a log line's RFC 3339 `ts`."""
    moment = _parse_time(value)
    if moment is None:
        return str(value) if value else "-"
    return moment.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3]


def format_log_line(entry: JsonObject) -> str:
    """`<time> <instance|build> <line>`, with `[stderr]` or `[system]` before what did not come
    from the function's stdout."""
    source = "build" if entry.get("kind") == "build" else str(entry.get("instance") or "-")
    stream = entry.get("stream")
    marker = f"[{stream}] " if stream in ("stderr", "system") else ""
    return f"{format_log_time(entry.get('ts'))} {source} {marker}{entry.get('line', '')}"


async def _logs(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    if args.tail is not None and args.tail < 1:
        raise UsageError("--tail must be at least 1")
    since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    async with LambdabusClient.from_settings(settings) as client:
        await client.get_function(settings.namespace, args.name)  # function_not_found
        entries = client.logs(
            settings.namespace,
            args.name,
            build=args.build,
            tail=args.tail,
            since=since,
            follow=args.follow,
            invocation=args.invocation,
        )
        async with contextlib.aclosing(entries):
            async for entry in entries:
                if output != "table":
                    print_item(output, entry)
                else:
                    print(format_log_line(entry), flush=args.follow)
    return 0
