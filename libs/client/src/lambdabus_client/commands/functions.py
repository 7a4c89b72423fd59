"""`ls`, `status`, `describe`, `history`, `update` and `rm`: reading, changing and removing
functions."""

from __future__ import annotations

import argparse
import asyncio
import sys
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
    TABLE_WIDTH,
    UsageError,
    _event_data,
    _one_line,
    format_age,
    format_event_time,
    parse_env,
    print_data,
    render_table,
    truncate,
)
from lambdabus_client.commands.events import (
    event_actor,
    event_detail,
)
from lambdabus_client.commands.triggers import format_filter


async def _history_or_not_found(
    client: LambdabusClient, namespace: str, name: str
) -> list[JsonObject]:
    """The function's lifecycle events; a removed function keeps its history, a function that
    never existed (no record, no history) is function_not_found."""
    try:
        await client.get_function(namespace, name)
    except ApiError as missing:
        if missing.status != 404:
            raise
        try:
            events = await client.history(namespace, name)
        except ApiError:
            raise missing from None
        if not events:
            raise
        return events
    return await client.history(namespace, name)


async def _history(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    async with LambdabusClient.from_settings(settings) as client:
        events = await _history_or_not_found(client, settings.namespace, args.name)
    if output != "table":
        print_data(output, {"items": events})
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
    print(render_table(["TIME", "TYPE", "GEN", "ACTOR", "DETAIL"], rows, shrink_first=(4, 3)))
    return 0


async def _ls(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    async with LambdabusClient.from_settings(settings) as client:
        records = await client.list_functions(settings.namespace, args.labels)

        async def status_of(record: JsonObject) -> JsonObject | None:
            try:
                return await client.function_status(settings.namespace, str(record.get("name")))
            except ApiError as error:
                if error.status == 0:  # the gateway went away: say so rather than print dashes
                    raise
                return None  # deleted meanwhile, or not yet known

        statuses = await asyncio.gather(*(status_of(record) for record in records))
    if output != "table":
        print_data(
            output,
            {
                "items": [
                    {**record, "status": status}
                    for record, status in zip(records, statuses, strict=True)
                ]
            },
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
        try:
            status = await client.function_status(settings.namespace, args.name)
        except ApiError as error:
            if error.status == 404 and error.code == "function_not_found":
                # The README's promise: after `rm`, the status is not_found (and exit 1).
                _print_not_found(settings.namespace, args.name, output)
            raise
    if output != "table":
        print_data(output, status)
        return 0
    lines = [
        f"Function:    {settings.namespace}/{args.name}",
        f"Generation:  {status.get('generation', '-')}",
        *image_and_status(status),
    ]
    if isinstance(status.get("limits"), dict):
        lines.append(f"Limits:      {describe_limits(status['limits'])}")
    lines += presets_and_pods(status)
    if status.get("message"):
        lines.append(truncate(f"Message:     {_one_line(str(status['message']))}", TABLE_WIDTH))
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
    if output != "table":
        print_data(output, record)
    else:
        print(f"Deleting {settings.namespace}/{args.name}.")
    return 0


def _print_not_found(namespace: str, name: str, output: str) -> None:
    status = {
        "namespace": namespace,
        "name": name,
        "image_status": "not_found",
        "status": "not_found",
    }
    if output != "table":
        print_data(output, status)
        return
    print(f"Function:    {namespace}/{name}")
    print("Image:       not_found")
    print("Status:      not_found")
    sys.stdout.flush()


# How many recent lifecycle events `describe` shows.
DESCRIBE_EVENTS = 5


async def _describe(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    namespace = settings.namespace
    async with LambdabusClient.from_settings(settings) as client:
        record = await client.get_function(namespace, args.name)
        status, info, triggers = await asyncio.gather(
            client.function_status(namespace, args.name),
            client.info(),
            client.list_triggers(namespace),
        )
        events: list[JsonObject] = []
        events_error = ""
        try:
            events = await client.history(namespace, args.name)
        except ApiError as error:  # the history lives in the logs service: say so, show the rest
            events_error = f"{error.code}: {_one_line(error.message)}"
    url = f"{str(info.get('router_url', '')).rstrip('/')}/{namespace}/{args.name}"
    own_triggers = [item for item in triggers if item.get("function") == args.name]
    recent = events[-DESCRIBE_EVENTS:]
    if output != "table":
        print_data(
            output,
            {
                "function": record,
                "status": status,
                "url": url,
                "triggers": own_triggers,
                "events": recent,
                **({"events_error": events_error} if events_error else {}),
            },
        )
        return 0
    print("\n".join(describe_lines(record, status, url)))
    print()
    print("Conditions:")
    conditions = render_table(
        ["TYPE", "STATUS", "REASON", "MESSAGE"], condition_rows(status), max_width=TABLE_WIDTH - 2
    )
    print(indent(conditions))
    print()
    print("Triggers:")
    if own_triggers:
        rows = [
            [str(item.get("name", "?")), format_filter(item.get("filter"))] for item in own_triggers
        ]
        print(indent(render_table(["NAME", "FILTER"], rows, max_width=78)))
    else:
        print("  (none)")
    print()
    print("Recent events:")
    if recent:
        rows = [
            [
                format_event_time(event.get("time")),
                str(event.get("type", "?")).removeprefix(EVENT_TYPE_PREFIX),
                event_detail(event),
            ]
            for event in recent
        ]
        print(indent(render_table(["TIME", "TYPE", "DETAIL"], rows, max_width=78)))
    else:
        print(
            truncate(f"  (unavailable: {events_error})", TABLE_WIDTH)
            if events_error
            else "  (none)"
        )
    return 0


def indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else line for line in text.splitlines())


def condition_rows(status: JsonObject) -> list[list[str]]:
    return [
        [
            str(condition.get("type", "")),
            str(condition.get("status", "")),
            str(condition.get("reason", "")),
            _one_line(str(condition.get("message", ""))),
        ]
        for condition in status.get("conditions") or []
        if isinstance(condition, dict)
    ]


def image_and_status(status: JsonObject) -> list[str]:
    """The image status and the one-line status summary, as `status` and `describe` show them."""
    replicas = f"{status.get('ready_replicas', 0)}/{status.get('replicas', 0)} replicas ready"
    summary = status.get("summary") or f"{status.get('status', '-')} ({replicas})"
    return [f"Image:       {status.get('image_status', '-')}", f"Status:      {summary}"]


# -- Kyma presets and LUNA pod statuses

PRESET_OPTIONS = ("resources_preset", "replicas_preset", "build_preset")


def presets_and_pods(status: JsonObject) -> list[str]:
    """The presets a function follows (and what its spec overrides), then one line per
    instance (its pod status): shared by `status` and `describe`."""
    lines = []
    applied = status.get("presets")
    if isinstance(applied, dict):
        overridden = applied.get("overridden") or []
        line = (
            f"Presets:     resources {applied.get('resources')}, replicas {applied.get('replicas')}"
            f" ({applied.get('min_replicas')}-{applied.get('max_replicas')}), "
            f"build {applied.get('build')}"
        )
        lines.append(truncate(line, TABLE_WIDTH))
        if overridden:
            shown = ", ".join(map(str, overridden))
            lines.append(truncate(f"Overridden:  {shown} (set in the spec)", TABLE_WIDTH))
    pods = status.get("pod_statuses")
    if isinstance(pods, dict) and pods:
        lines.append("Instances:")
        for pod_id, pod in pods.items():
            if not isinstance(pod, dict):
                continue
            line = (
                f"  {pod_id}  {pod.get('status')} ({pod.get('phase')}), "
                f"restarts {pod.get('restarts', 0)}, started {pod.get('started_at') or '-'}"
            )
            lines.append(truncate(line, TABLE_WIDTH))
    return lines


def describe_lines(record: JsonObject, status: JsonObject, url: str) -> list[str]:
    """The head of `describe`: who the function is, its spec, where it answers."""
    raw_spec = record.get("spec")
    spec: JsonObject = raw_spec if isinstance(raw_spec, dict) else {}
    lines = [
        f"Name:        {record.get('namespace', '?')}/{record.get('name', '?')}",
        f"Generation:  {record.get('generation', '-')}",
        f"URL:         {url}",
        *image_and_status(status),
        *presets_and_pods(status),
    ]
    if status.get("message"):
        lines.append(truncate(f"Message:     {_one_line(str(status['message']))}", TABLE_WIDTH))
    lines.append("Spec:")
    for key, value in spec.items():
        if value is None or value in ({}, [], ""):
            continue
        if isinstance(value, dict):
            shown = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            shown = ", ".join(map(str, value))
        else:
            shown = str(value)
        lines.append(truncate(f"  {key + ':':<16} {_one_line(shown)}", TABLE_WIDTH))
    return lines


async def _update(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    patch: JsonObject = {}
    if args.env:
        patch["env"] = parse_env(args.env)
    for key in ("replicas", "memory", "timeout", "description", *PRESET_OPTIONS):
        value = getattr(args, key, None)
        if value is not None:
            patch[key] = value
    if not patch:
        raise UsageError(
            "nothing to update: give --env, --replicas, --memory, --timeout, --description or "
            "a preset (--resources-preset, --replicas-preset, --build-preset)"
        )
    async with LambdabusClient.from_settings(settings) as client:
        changed, record = await client.patch_function(settings.namespace, args.name, patch)
    if output != "table":
        print_data(output, {"changed": changed, "function": record})
    elif changed:
        print(
            f"Updated {settings.namespace}/{args.name}: generation {record.get('generation')} "
            f"rolls out (see 'lambdabus status {args.name}')."
        )
    else:
        print(f"Unchanged {settings.namespace}/{args.name}: it already had these settings.")
    return 0
