"""`ls`, `status`, `history` and `rm`: reading and removing functions."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from typing import Any

from lambdabus_client.client import (
    ApiError,
    ClientSettings,
    JsonObject,
    LambdabusClient,
)
from lambdabus_client.commands.common import (
    EVENT_TYPE_PREFIX,
    _event_data,
    _one_line,
    _print_json,
    format_age,
    format_event_time,
    render_table,
)
from lambdabus_client.commands.events import (
    event_actor,
    event_detail,
)


async def _history(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    async with LambdabusClient.from_settings(settings) as client:
        events = await client.history(settings.namespace, args.name)
    if output == "json":
        _print_json({"items": events})
        return 0
    if not events:
        print(f"No history for {settings.namespace}/{args.name}.")
        return 0
    rows = [
        [
            format_event_time(event.get("time")),
            str(event.get("type", "?")).removeprefix(EVENT_TYPE_PREFIX),
            str(_event_data(event).get("generation", "-")),
            event_actor(event),
            event_detail(event),
        ]
        for event in events
    ]
    print(render_table(["TIME", "TYPE", "GENERATION", "ACTOR", "DETAIL"], rows))
    return 0


async def _ls(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    async with LambdabusClient.from_settings(settings) as client:
        records = await client.list_functions(settings.namespace)

        async def status_of(record: JsonObject) -> JsonObject | None:
            try:
                return await client.function_status(settings.namespace, str(record.get("name")))
            except ApiError as error:
                if error.status == 0:  # the gateway went away: say so rather than print dashes
                    raise
                return None  # deleted meanwhile, or not yet known

        statuses = await asyncio.gather(*(status_of(record) for record in records))
    if output == "json":
        _print_json(
            {
                "items": [
                    {**record, "status": status}
                    for record, status in zip(records, statuses, strict=True)
                ]
            }
        )
        return 0
    if not records:
        print(f"No functions in namespace {settings.namespace}.")
        return 0
    now = datetime.now(UTC)
    rows = []
    for record, status in zip(records, statuses, strict=True):
        spec = record.get("spec") or {}
        rows.append(
            [
                str(record.get("name", "?")),
                str(spec.get("runtime", "-")),
                str(record.get("generation", "-")),
                str(status.get("image_status", "-")) if status else "-",
                str(status.get("status", "-")) if status else "-",
                format_age(record.get("created_at"), now),
            ]
        )
    rows.sort(key=lambda row: row[0])
    print(render_table(["NAME", "RUNTIME", "GEN", "IMAGE", "STATUS", "AGE"], rows))
    return 0


def describe_limits(limits: dict[str, Any]) -> str:
    """One line of a function's status `limits`; an unenforced one says so."""

    def part(label: str, key: str, unit: str) -> str:
        value = limits.get(key)
        return f"{label} {value}{unit}" if value is not None else f"{label} not enforced"

    return ", ".join(
        [
            f"by {limits.get('enforced_by', '?')}: {part('memory', 'memory', ' MiB')}",
            part("cpu", "cpu", "m"),
            part("pids", "pids", ""),
            part("open files", "open_files", ""),
            f"{part('/tmp', 'tmp_size', ' MiB')} ({limits.get('tmp_enforced_by', '?')})",
            part("logs", "log_lines_per_second", " lines/s"),
        ]
    )


async def _status(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    async with LambdabusClient.from_settings(settings) as client:
        status = await client.function_status(settings.namespace, args.name)
    if output == "json":
        _print_json(status)
        return 0
    replicas = f"{status.get('ready_replicas', 0)}/{status.get('replicas', 0)} replicas ready"
    lines = [
        f"Function:    {settings.namespace}/{args.name}",
        f"Generation:  {status.get('generation', '-')}",
        f"Image:       {status.get('image_status', '-')}",
        f"Status:      {status.get('status', '-')} ({replicas})",
    ]
    if isinstance(status.get("limits"), dict):
        lines.append(f"Limits:      {describe_limits(status['limits'])}")
    if status.get("message"):
        lines.append(f"Message:     {_one_line(str(status['message']))}")
    conditions = [
        [
            str(condition.get("type", "")),
            str(condition.get("status", "")),
            str(condition.get("reason", "")),
            _one_line(str(condition.get("message", ""))),
        ]
        for condition in status.get("conditions") or []
        if isinstance(condition, dict)
    ]
    print("\n".join(lines))
    print()
    print(render_table(["TYPE", "STATUS", "REASON", "MESSAGE"], conditions))
    return 0


async def _rm(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    async with LambdabusClient.from_settings(settings) as client:
        record = await client.delete_function(settings.namespace, args.name)
    if output == "json":
        _print_json(record)
    else:
        print(f"Deleting {settings.namespace}/{args.name}.")
    return 0
