"""The `lambdabus` command line: deploy, list, inspect and remove functions, tail lifecycle events,
and (`lambdabus up`) run the whole platform locally.

Every command talks to the gateway over HTTP through `LambdabusClient`. Expected failures end
with one line on stderr, `error: <code>: <message>`, and exit status 1 (the API said no, or could
not be reached) or 2 (the command line itself is wrong). Rendering is done by pure functions
(`render_table`, `format_age`, `summarize_event`) so it can be tested without I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from lambdabus_client.client import ApiError, ClientSettings, JsonObject, LambdabusClient
from lambdabus_client.packaging import PackagingError, load_archive

EVENT_TYPE_PREFIX = "io.lambdabus."
_GLOBAL_OPTIONS_WITH_VALUE = frozenset({"--url", "--namespace", "-n", "--output", "-o"})
_DURATION = re.compile(r"^(\d+)([smhd])$")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class UsageError(Exception):
    """The command line is wrong (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# -- pure rendering ------------------------------------------------------------------------------


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, headers first; no trailing whitespace."""
    width = len(headers)
    for row in rows:
        if len(row) != width:
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, expected {width}")
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for row in (headers, *rows):
        cells = [str(cell).ljust(size) for cell, size in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_age(created_at: str | None, now: datetime) -> str:
    """`created_at` (RFC 3339) as a short age such as `42s`, `5m`, `3h` or `12d`."""
    created = _parse_time(created_at)
    if created is None:
        return "-"
    seconds = max(0, int((now - created).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_event_time(value: object) -> str:
    moment = _parse_time(value)
    if moment is None:
        return str(value) if value else "-"
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def summarize_event(event: JsonObject) -> str:
    """A few words on what a lifecycle CloudEvent says, chosen by its type."""
    kind = str(event.get("type", "")).removeprefix(EVENT_TYPE_PREFIX)
    raw = event.get("data")
    data: JsonObject = raw if isinstance(raw, dict) else {}
    generation = f"generation {data['generation']}" if "generation" in data else ""
    if kind == "function.updated" and data.get("changes"):
        return f"{generation} ({', '.join(map(str, data['changes']))} changed)".strip()
    if kind == "build.succeeded":
        took = data.get("duration_seconds")
        parts = [generation, f"built in {took:.1f}s" if isinstance(took, int | float) else ""]
        if data.get("dependencies_cached"):
            parts.append("dependencies cached")
        return ", ".join(part for part in parts if part)
    if kind.startswith("build."):
        parts = [generation, str(data.get("runtime", ""))]
        return ", ".join(part for part in parts if part) + _reason(data)
    if kind.startswith("deployment."):
        ready = f"{data.get('ready_replicas', '?')}/{data.get('replicas', '?')} ready"
        return ", ".join(part for part in (generation, ready) if part) + _reason(data)
    if kind.startswith("trigger."):
        return f"trigger {data.get('name', '?')} -> function {data.get('function', '?')}"
    if kind == "delivery.deadlettered":
        return (
            f"{data.get('event_type', '?')} to {data.get('function', '?')} "
            f"after {data.get('attempts', '?')} attempts: {data.get('reason', '')}"
        ).rstrip(": ")
    return generation


def event_line(event: JsonObject) -> str:
    kind = str(event.get("type", "?")).removeprefix(EVENT_TYPE_PREFIX)
    fields = [format_event_time(event.get("time")), kind, str(event.get("subject", "-"))]
    summary = summarize_event(event)
    return "  ".join([*fields, summary] if summary else fields)


def parse_since(value: str, now: datetime) -> str:
    """`--since`: an RFC 3339 time, or a duration back from now such as `10m`, `2h`, `1d`."""
    duration = _DURATION.fullmatch(value.strip())
    if duration is not None:
        amount, unit = int(duration.group(1)), duration.group(2)
        moment = now - timedelta(**{_DURATION_UNITS[unit]: amount})
    else:
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise UsageError(
                f"--since {value!r} is neither an RFC 3339 time nor a duration like 10m or 2h"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise UsageError(f"--env {pair!r} is not KEY=VALUE")
        env[key] = value
    return env


def _reason(data: JsonObject) -> str:
    reason, message = str(data.get("reason") or ""), str(data.get("message") or "")
    text = ": ".join(part for part in (reason, message) if part)
    return f" ({text})" if text else ""


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # The global options are accepted before and after the command; SUPPRESS keeps a command's
    # parser from overwriting a value given before it.
    common = _Parser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help="gateway URL (env LAMBDABUS_URL)")
    common.add_argument(
        "-n",
        "--namespace",
        default=argparse.SUPPRESS,
        help="namespace to act on (env LAMBDABUS_NAMESPACE)",
    )
    common.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default=argparse.SUPPRESS,
        help="'json' prints the API's JSON instead of tables",
    )
    parser = _Parser(prog="lambdabus", description="Lambdabus functions", parents=[common])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser(
        "up", help="run the whole platform locally (see 'lambdabus up --help')", add_help=False
    ).add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    deploy = commands.add_parser(
        "deploy", parents=[common], help="create or update a function from a directory or zip"
    )
    deploy.add_argument("source", metavar="DIR|ZIP", type=Path)
    deploy.add_argument("--name", required=True, help="function name (an RFC 1035 label)")
    deploy.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="repeatable"
    )
    deploy.add_argument("--runtime", help="python3.11 or nodejs20")
    deploy.add_argument("--replicas", type=int)
    deploy.add_argument("--timeout", type=float, help="seconds per invocation")
    deploy.add_argument("--memory", help="MiB, or a quantity such as 256Mi or 1Gi")
    deploy.add_argument("--description")

    commands.add_parser("ls", parents=[common], help="list the functions of a namespace")

    status = commands.add_parser("status", parents=[common], help="show a function's status")
    status.add_argument("name")

    remove = commands.add_parser("rm", parents=[common], help="delete a function")
    remove.add_argument("name")

    events = commands.add_parser("events", parents=[common], help="tail lifecycle events")
    events.add_argument("--function", help="only events of this function")
    events.add_argument("--type", help="only this type, e.g. build.failed")
    events.add_argument("--since", help="replay from an RFC 3339 time or a duration like 10m")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    up_arguments = _up_arguments(arguments)
    if up_arguments is not None:
        return _up(up_arguments)

    try:
        args = build_parser().parse_args(arguments)
    except UsageError as error:
        return _fail("usage", str(error), 2)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0

    overrides = {key: getattr(args, key) for key in ("url", "namespace") if hasattr(args, key)}
    try:
        settings = ClientSettings().model_copy(update=overrides)
    except ValidationError as error:
        problems = [
            f"LAMBDABUS_{'_'.join(map(str, item['loc'])).upper()}: {item['msg']}"
            for item in error.errors()
        ]
        return _fail("invalid_settings", "; ".join(problems), 2)
    output = getattr(args, "output", "table")

    if args.command == "up":  # only reached through unusual spellings; `up` parses its own
        return _up(args.rest)
    command = _COMMANDS[args.command]
    try:
        return asyncio.run(command(settings, args, output))
    except ApiError as error:
        return _fail(error.code, error.message, 1)
    except (UsageError, PackagingError) as error:
        code = "usage" if isinstance(error, UsageError) else "invalid_source"
        return _fail(code, str(error), 2)
    except KeyboardInterrupt:
        return 0 if args.command == "events" else 130
    except BrokenPipeError:
        # The reader went away (`lambdabus events | head`): not an error, and the flush at
        # interpreter exit must not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _up(arguments: list[str]) -> int:
    # Imported here: `up` pulls in the platform runner, which no other command needs.
    from lambdabus_client.up import main as up_main  # type: ignore[import-not-found,unused-ignore]

    status: int = up_main(arguments)
    return status


def _up_arguments(arguments: list[str]) -> list[str] | None:
    """The arguments after `up` when the command is `up` (they belong to `up`'s own parser)."""
    index = 0
    while index < len(arguments):
        token = arguments[index]
        if token in ("-h", "--help"):
            return None
        if token in _GLOBAL_OPTIONS_WITH_VALUE:
            index += 2
        elif token.startswith("-"):
            index += 1
        else:
            return arguments[index + 1 :] if token == "up" else None
    return None


def _fail(code: str, message: str, status: int) -> int:
    print(f"error: {code}: {_one_line(message)}", file=sys.stderr)
    return status


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# -- commands ------------------------------------------------------------------------------------

Command = Callable[[ClientSettings, argparse.Namespace, str], Coroutine[Any, Any, int]]


async def _deploy(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    spec: JsonObject = {"name": args.name}
    if args.env:
        spec["env"] = parse_env(args.env)
    for key in ("runtime", "replicas", "timeout", "memory", "description"):
        value = getattr(args, key)
        if value is not None:
            spec[key] = value
    archive = await asyncio.to_thread(load_archive, args.source, warn=_warn)
    async with LambdabusClient.from_settings(settings) as client:
        action, record = await client.deploy_function(settings.namespace, spec, archive)
        status: JsonObject | None = None
        status_error = ""
        try:
            status = await client.function_status(settings.namespace, args.name)
        except ApiError as error:
            status_error = f"{error.code}: {error.message}"
    if output == "json":
        _print_json({"action": action, "function": record, "status": status})
        return 0
    source = record.get("source") or {}
    print(
        f"{action.capitalize()} {record.get('namespace')}/{record.get('name')}: "
        f"generation {record.get('generation')}, "
        f"sha256 {str(source.get('sha256', ''))[:12]}, "
        f"entrypoint {source.get('entrypoint', '-')}"
    )
    if status is not None:
        print(f"Image: {status.get('image_status')}  Status: {status.get('status')}")
    else:
        print(f"Status: unknown ({_one_line(status_error)})")
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
            if output == "json":
                print(json.dumps(event), flush=True)
            else:
                print(event_line(event), flush=True)
    return 0


_COMMANDS: dict[str, Command] = {
    "deploy": _deploy,
    "ls": _ls,
    "status": _status,
    "rm": _rm,
    "events": _events,
}
