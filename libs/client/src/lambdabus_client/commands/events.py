"""`events` (tail lifecycle events) and `publish` (send a CloudEvent), and how events read."""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

from lambdabus_client.client import (
    ClientSettings,
    JsonObject,
    LambdabusClient,
)
from lambdabus_client.commands.common import (
    EVENT_TYPE_PREFIX,
    UsageError,
    _event_data,
    _reason,
    _reason_text,
    format_event_time,
    parse_assignments,
    parse_since,
    print_data,
    print_item,
)


def summarize_event(event: JsonObject) -> str:
    """A few words on what a lifecycle CloudEvent says, chosen by its type."""
    kind = str(event.get("type", "")).removeprefix(EVENT_TYPE_PREFIX)
    data = _event_data(event)
    facts = _event_facts(kind, data)
    if kind.startswith(("trigger.", "delivery.", "secret.")):
        return ", ".join(facts)
    generation = f"generation {data['generation']}" if "generation" in data else ""
    if kind == "function.updated" and facts:
        return f"{generation} ({facts[0]})".strip()
    reason = _reason(data) if kind.startswith(("build.", "deployment.")) else ""
    return ", ".join(part for part in (generation, *facts) if part) + reason


def event_detail(event: JsonObject) -> str:
    """What `summarize_event` says, less the generation (for tables that show it apart)."""
    kind = str(event.get("type", "")).removeprefix(EVENT_TYPE_PREFIX)
    data = _event_data(event)
    reason = _reason_text(data) if kind.startswith(("build.", "deployment.")) else ""
    return ", ".join(part for part in (*_event_facts(kind, data), reason) if part)


def _event_facts(kind: str, data: JsonObject) -> list[str]:
    if kind == "function.updated" and data.get("changes"):
        return [f"{', '.join(map(str, data['changes']))} changed"]
    if kind == "build.succeeded":
        took = data.get("duration_seconds")
        facts = [f"built in {took:.1f}s"] if isinstance(took, int | float) else []
        return [*facts, "dependencies cached"] if data.get("dependencies_cached") else facts
    if kind.startswith("build."):
        return [str(data["runtime"])] if data.get("runtime") else []
    if kind.startswith("deployment."):
        return [f"{data.get('ready_replicas', '?')}/{data.get('replicas', '?')} ready"]
    if kind.startswith("trigger."):
        return [f"trigger {data.get('name', '?')} -> function {data.get('function', '?')}"]
    if kind.startswith("secret."):
        keys = data.get("keys")
        named = ", ".join(map(str, keys)) if isinstance(keys, list) else "?"
        return [f"version {data.get('version', '?')}", f"keys {named}"]
    if kind == "delivery.deadlettered":
        return [
            (
                f"{data.get('event_type', '?')} to {data.get('function', '?')} "
                f"after {data.get('attempts', '?')} attempts: {data.get('reason', '')}"
            ).rstrip(": ")
        ]
    return []


def event_line(event: JsonObject) -> str:
    kind = str(event.get("type", "?")).removeprefix(EVENT_TYPE_PREFIX)
    fields = [format_event_time(event.get("time")), kind, str(event.get("subject", "-"))]
    summary = summarize_event(event)
    actor = event_actor(event)
    if actor != "-":
        summary = f"{summary} (by {actor})" if summary else f"by {actor}"
    return "  ".join([*fields, summary] if summary else fields)


def event_actor(event: JsonObject) -> str:
    """Who caused a lifecycle event (the `actorname`/`actorid` extensions), `-` if no API
    call did."""
    name, actor_id = event.get("actorname"), event.get("actorid")
    if name and actor_id:
        return f"{name} ({actor_id})"
    return str(name or actor_id or "-")


def build_event(
    *,
    type: str,
    source: str,
    id: str,
    subject: str | None = None,
    data: str | None = None,
    extensions: Mapping[str, str] | None = None,
) -> JsonObject:
    """The structured-mode CloudEvent `publish` sends; `data` is JSON text. The gateway
    validates it (one set of rules, in one place)."""
    event: JsonObject = {"specversion": "1.0", "id": id, "source": source, "type": type}
    if subject is not None:
        event["subject"] = subject
    for name, value in (extensions or {}).items():
        if name in event or name in ("data", "data_base64", "datacontenttype"):
            raise UsageError(f"--ext {name}=... would replace the event's own '{name}'")
        event[name] = value
    if data is not None:
        try:
            event["data"] = json.loads(data)
        except ValueError as error:
            raise UsageError(f"--data is not valid JSON ({error})") from None
        event["datacontenttype"] = "application/json"
    return event


async def _events(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    kind = args.type
    if kind and not kind.startswith(EVENT_TYPE_PREFIX):
        kind = EVENT_TYPE_PREFIX + kind
    async with LambdabusClient.from_settings(settings) as client:
        stream = client.lifecycle(
            namespace=settings.namespace, function=args.function, type=kind, since=since
        )
        async for event in stream:
            if output != "table":
                print_item(output, event)
            else:
                print(event_line(event), flush=True)
    return 0


async def _publish(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    event = build_event(
        type=args.type,
        source=args.source,
        id=args.id or str(uuid.uuid4()),
        subject=args.subject,
        data=args.data,
        extensions=parse_assignments(args.ext, "--ext"),
    )
    async with LambdabusClient.from_settings(settings) as client:
        answer = await client.publish(event)
    if output != "table":
        print_data(output, answer)
    elif answer.get("duplicates"):
        print(
            f"Already stored: event {event['id']} from {event['source']} "
            "(same source and id); not stored again."
        )
    else:
        print(f"Published event {event['id']} ({event['type']}).")
    return 0
