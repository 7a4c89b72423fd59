"""The `lambdabus` command line: deploy (and watch the build), invoke (now or asynchronously),
list, inspect and remove functions, read their logs and history, tail lifecycle events, publish
CloudEvents, manage triggers and dead letters, and (`lambdabus up`) run the whole platform
locally.

Every command talks to the gateway over HTTP through `LambdabusClient`. Expected failures end
with one line on stderr, `error: <code>: <message>`, and exit status 1 (the API said no, or could
not be reached) or 2 (the command line itself is wrong). Rendering and decisions are pure
functions (`render_table`, `summarize_event`, `format_log_line`, `deploy_progress`, ...) so they
can be tested without I/O.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import uuid
from collections.abc import Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from lambdabus_client.client import (
    ApiError,
    ClientSettings,
    DeployAction,
    Invocation,
    JsonObject,
    LambdabusClient,
)
from lambdabus_client.packaging import PackagingError, load_archive

EVENT_TYPE_PREFIX = "io.lambdabus."
_GLOBAL_OPTIONS_WITH_VALUE = frozenset({"--url", "--namespace", "-n", "--output", "-o"})
_DURATION = re.compile(r"^(\d+)([smhd])$")
_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
# How far before the upload a deploy replays lifecycle events and build logs from; what is
# older than the upload is told apart by uid and generation, so this only absorbs clock skew.
FOLLOW_MARGIN = timedelta(seconds=2)
# Build log lines that failed builds show when they were not streamed already.
BUILD_TAIL_LINES = 20
# After the outcome, how long build log lines already on their way may still be printed.
LOG_DRAIN_SECONDS = 0.2
BUILD_LOG_PREFIX = "  \u2502 "


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


def _event_data(event: JsonObject) -> JsonObject:
    data = event.get("data")
    return data if isinstance(data, dict) else {}


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


def parse_env_from(pairs: Sequence[str]) -> dict[str, dict[str, str]]:
    """`--env-from VAR=SECRET:KEY` values as the spec's `env_from`."""
    refs: dict[str, dict[str, str]] = {}
    for pair in pairs:
        var, separator, ref = pair.partition("=")
        secret, colon, key = ref.partition(":")
        if not separator or not var or not colon or not secret or not key:
            raise UsageError(f"--env-from {pair!r} is not VAR=SECRET:KEY")
        refs[var] = {"secret": secret, "key": key}
    return refs


def secret_data(literals: Sequence[str], files: Sequence[str]) -> dict[str, str]:
    """A secret's data from `--from-literal KEY=VALUE` and `--from-file KEY=PATH` (as kubectl)."""
    data: dict[str, str] = {}
    for pair in literals:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise UsageError(f"--from-literal {pair!r} is not KEY=VALUE")
        data[key] = value
    for pair in files:
        key, separator, path = pair.partition("=")
        if not separator or not key or not path:
            raise UsageError(f"--from-file {pair!r} is not KEY=PATH")
        try:
            data[key] = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--from-file {key}: cannot read {path} as text: {exc}") from exc
    if not data:
        raise UsageError("a secret needs at least one --from-literal or --from-file")
    return data


def parse_headers(pairs: Sequence[str]) -> dict[str, str]:
    """`--header K:V` values as a header mapping (split on the first colon, trimmed)."""
    headers: dict[str, str] = {}
    for pair in pairs:
        key, separator, value = pair.partition(":")
        if not separator or not key.strip():
            raise UsageError(f"--header {pair!r} is not NAME:VALUE")
        headers[key.strip()] = value.strip()
    return headers


def parse_assignments(pairs: Sequence[str], option: str) -> dict[str, str]:
    """`KEY=VALUE` values of a repeatable option (split on the first `=`)."""
    values: dict[str, str] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise UsageError(f"{option} {pair!r} is not KEY=VALUE")
        values[key] = value
    return values


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


FINISHED = frozenset({"succeeded", "failed"})


def invocation_lines(record: JsonObject) -> list[str]:
    """What `lambdabus invocation` prints about an asynchronous invocation."""
    lines = [
        f"Invocation:  {record.get('id', '-')}",
        f"Function:    {record.get('namespace', '-')}/{record.get('function', '-')}",
        f"Status:      {record.get('status', '-')}",
        f"Attempts:    {record.get('attempts', 0)}",
    ]
    if record.get("result_status") is not None:
        lines.append(f"HTTP status: {record['result_status']}")
    if record.get("error"):
        lines.append(f"Error:       {_one_line(str(record['error']))}")
    result = record.get("result")
    if result is not None:
        text = result if isinstance(result, str) else json.dumps(result, indent=2)
        lines.append("Result:")
        lines.extend(f"  {line}" for line in text.splitlines() or [""])
    return lines


def next_poll(delay: float) -> float:
    """The wait before the next status poll: from 0.2 s, growing by half, at most 2 s."""
    return min(max(delay, 0.1) * 1.5, 2.0)


def json_body(text: str) -> bytes:
    """`--data`: it must be JSON, sent as the compact UTF-8 text the user wrote."""
    try:
        json.loads(text)
    except ValueError as error:
        raise UsageError(f"--data is not valid JSON ({error})") from None
    return text.encode()


def guess_content_type(body: bytes) -> str:
    """The type of a `--data-file`: JSON if it parses, text if it is UTF-8, else bytes."""
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return "application/octet-stream"
    try:
        json.loads(text)
    except ValueError:
        return "text/plain; charset=utf-8"
    return "application/json"


def is_json_type(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def platform_error(answer: Invocation) -> tuple[str, str] | None:
    """`(code, message)` when the platform itself refused (no such function, no ready instance,
    timeout, ...), rather than the function answering an error: the platform marks its own
    answers with the `X-Lambdabus-Error` header."""
    if answer.status < 400 or "X-Lambdabus-Error" not in answer.headers:
        return None
    try:
        body = json.loads(answer.body)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(error, dict) and isinstance(error.get("code"), str)):
        return None
    message = str(error.get("message", ""))
    retry_after = answer.headers.get("Retry-After")
    if retry_after:
        message = f"{message} (retry after {retry_after} s)"
    return error["code"], message


def render_body(body: bytes, content_type: str | None) -> str | bytes:
    """What `invoke` prints: JSON pretty-printed, other UTF-8 text as is, anything else as the
    raw bytes."""
    if is_json_type(content_type):
        try:
            return json.dumps(json.loads(body), indent=2, ensure_ascii=False) + "\n"
        except ValueError:
            pass  # claims JSON but is not: show what came
    try:
        return body.decode()
    except UnicodeDecodeError:
        return body


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


def belongs_to(item: JsonObject, uid: str, generation: int) -> bool:
    """Whether a log line or event data is about function `uid` at `generation` or later."""
    item_generation = item.get("generation")
    return (
        item.get("uid") == uid
        and isinstance(item_generation, int)
        and not isinstance(item_generation, bool)
        and item_generation >= generation
    )


def log_key(entry: JsonObject) -> tuple[object, ...]:
    return tuple(entry.get(key) for key in ("ts", "stream", "instance", "line"))


def unseen(entries: Iterable[JsonObject], seen: Collection[tuple[object, ...]]) -> list[JsonObject]:
    return [entry for entry in entries if log_key(entry) not in seen]


def follow_since(record: Mapping[str, Any], before_upload: datetime) -> str:
    """Where a deploy replays events and build logs from: a moment before the upload, by the
    gateway's clock (the record's `updated_at`) when it says, else by ours."""
    moment = min(_parse_time(record.get("updated_at")) or before_upload, before_upload)
    return (moment - FOLLOW_MARGIN).astimezone(UTC).isoformat().replace("+00:00", "Z")


def function_url(router_url: str, namespace: str, name: str) -> str:
    return f"{router_url.rstrip('/')}/{namespace}/{name}"


def upload_line(action: DeployAction, record: JsonObject) -> str:
    source = record.get("source") or {}
    line = (
        f"{action.capitalize()} {record.get('namespace')}/{record.get('name')}: "
        f"generation {record.get('generation')}, "
        f"sha256 {str(source.get('sha256', ''))[:12]}, "
        f"entrypoint {source.get('entrypoint', '-')}"
    )
    return line + (" (nothing changed, nothing to deploy)" if action == "unchanged" else "")


@dataclass(frozen=True, slots=True)
class Progress:
    """What one lifecycle event means for a deploy being watched."""

    line: str = ""  # what to print; nothing when empty
    done: bool = False
    exit_code: int = 0
    show_build_tail: bool = False  # print the build's last log lines not yet shown


def deploy_progress(event: JsonObject, uid: str, generation: int, *, url: str) -> Progress:
    """The step a lifecycle event is in deploying generation `generation` (or a later one) of
    the function `uid`; `url` is where the function answers once it is ready."""
    data = _event_data(event)
    if not belongs_to(data, uid, generation):
        return Progress()
    kind = str(event.get("type", "")).removeprefix(EVENT_TYPE_PREFIX)
    reason = _reason_text(data)
    replicas = f"{data.get('ready_replicas', '?')}/{data.get('replicas', '?')} replicas ready"
    changes = data.get("changes")
    match kind:
        case "function.updated" if isinstance(changes, list) and "source" not in changes:
            return Progress("configuration changed, no build needed")
        case "function.deleted":
            return Progress("function deleted while deploying", done=True, exit_code=1)
        case "build.queued" | "build.started":
            return Progress(kind.replace(".", " "))
        case "build.succeeded":
            seconds = data.get("duration_seconds")
            took = f" in {seconds:.1f}s" if isinstance(seconds, int | float) else ""
            cached = " (dependencies cached)" if data.get("dependencies_cached") else ""
            return Progress(f"build succeeded{took}{cached}")
        case "build.failed":
            return Progress(
                f"build failed: {reason or 'no reason given'}",
                done=True,
                exit_code=1,
                show_build_tail=True,
            )
        case "deployment.started" | "deployment.scaled":
            return Progress(f"{kind.replace('.', ' ')} ({replicas})")
        case "deployment.ready":
            return Progress(f"ready: {url}", done=True)
        case "deployment.failed":
            return Progress(
                f"deployment failed: {reason or 'no reason given'}", done=True, exit_code=1
            )
        case "deployment.stopped":
            return Progress(f"deployment stopped{_reason(data)}")
    return Progress()


def _reason(data: JsonObject) -> str:
    text = _reason_text(data)
    return f" ({text})" if text else ""


def _reason_text(data: JsonObject) -> str:
    reason, message = str(data.get("reason") or ""), str(data.get("message") or "")
    return _one_line(": ".join(part for part in (reason, message) if part))


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
    # `token create` has its own repeatable --namespace: it cannot take the global one.
    common_no_namespace = _Parser(add_help=False)
    common_no_namespace.add_argument("--url", default=argparse.SUPPRESS, help="gateway URL")
    common_no_namespace.add_argument(
        "-o", "--output", choices=("table", "json"), default=argparse.SUPPRESS
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
    deploy.add_argument(
        "--secret",
        dest="secrets",
        action="append",
        metavar="NAME",
        help="mount a secret of the namespace at /secrets/NAME/<key> (repeatable)",
    )
    deploy.add_argument(
        "--env-from",
        action="append",
        metavar="VAR=SECRET:KEY",
        help="set env var VAR from a key of a secret (repeatable)",
    )
    deploy.add_argument(
        "--invoke-auth", choices=("none", "token"), help="token: callers need a bearer token"
    )
    deploy.add_argument("--network", choices=("outbound", "none"), help="default: outbound")
    deploy.add_argument("--cpu", type=int, metavar="MILLICORES", help="default: 1000")
    deploy.add_argument(
        "--max-concurrency", type=int, metavar="N", help="at most N invocations at once"
    )
    deploy.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="return once uploaded instead of following the build and deployment",
    )
    deploy.add_argument(
        "--wait-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for the function to be ready (default 300)",
    )

    invoke = commands.add_parser(
        "invoke", parents=[common], help="call a function and print its answer"
    )
    invoke.add_argument("name")
    body = invoke.add_mutually_exclusive_group()
    body.add_argument("--data", metavar="JSON", help="a JSON request body")
    body.add_argument("--data-file", metavar="FILE", help="send this file's bytes ('-': stdin)")
    invoke.add_argument(
        "--header", action="append", default=[], metavar="NAME:VALUE", help="repeatable"
    )
    invoke.add_argument(
        "--async",
        dest="run_async",
        action="store_true",
        help="queue it and print the invocation id (see 'lambdabus invocation ID')",
    )
    invoke.add_argument(
        "--callback-url", metavar="URL", help="with --async: where the result is posted"
    )

    invocation = commands.add_parser(
        "invocation",
        parents=[common],
        help="show an asynchronous invocation (exit status 1 when it failed)",
    )
    invocation.add_argument("id")
    invocation.add_argument("--wait", action="store_true", help="wait until it succeeded or failed")
    invocation.add_argument(
        "--wait-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long --wait waits (default 300)",
    )

    publish = commands.add_parser(
        "publish", parents=[common], help="publish a CloudEvent for triggers to deliver"
    )
    publish.add_argument("--type", required=True, help="e.g. com.example.order.created")
    publish.add_argument("--source", required=True, help="a URI-reference, e.g. /shop")
    publish.add_argument("--id", help="the event id (default: a new UUID)")
    publish.add_argument("--subject")
    publish.add_argument("--data", metavar="JSON", help="the event's data, as JSON")
    publish.add_argument(
        "--ext", action="append", default=[], metavar="NAME=VALUE", help="an extension attribute"
    )

    triggers = commands.add_parser(
        "triggers", parents=[common], help="list, create and remove triggers"
    )
    trigger_actions = triggers.add_subparsers(dest="action", metavar="ACTION", required=True)
    trigger_actions.add_parser("ls", parents=[common], help="list the namespace's triggers")
    create = trigger_actions.add_parser(
        "create", parents=[common], help="deliver matching events to a function"
    )
    create.add_argument("name")
    create.add_argument("--function", required=True)
    create.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="ATTRIBUTE=VALUE",
        help="repeatable; a value ending in * matches by prefix (default: every event)",
    )
    create.add_argument("--retries", type=int, help="attempts after the first (default 3)")
    create.add_argument("--backoff", choices=("exponential", "linear"))
    create.add_argument("--backoff-delay", type=float, metavar="SECONDS")
    create.add_argument("--timeout", type=float, metavar="SECONDS", help="per attempt")
    create.add_argument("--max-in-flight", type=int, metavar="N")
    trigger_rm = trigger_actions.add_parser("rm", parents=[common], help="delete a trigger")
    trigger_rm.add_argument("name")

    deadletters = commands.add_parser(
        "deadletters", parents=[common], help="list and redrive dead-lettered events"
    )
    deadletter_actions = deadletters.add_subparsers(dest="action", metavar="ACTION", required=True)
    deadletter_ls = deadletter_actions.add_parser(
        "ls", parents=[common], help="list dead letters, oldest first"
    )
    deadletter_ls.add_argument("--trigger", help="only this trigger's")
    deadletter_ls.add_argument("--after", metavar="ID", help="only those after this id")
    deadletter_ls.add_argument("--limit", type=int, metavar="N", help="at most N (default 100)")
    redrive = deadletter_actions.add_parser(
        "redrive", parents=[common], help="send a dead letter's event to its trigger again"
    )
    redrive.add_argument("id")

    logs = commands.add_parser("logs", parents=[common], help="show a function's log lines")
    logs.add_argument("name")
    logs.add_argument("--build", action="store_true", help="the build's logs, not the runtime's")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    logs.add_argument("--since", help="from an RFC 3339 time or a duration like 10m")

    history = commands.add_parser(
        "history", parents=[common], help="show a function's lifecycle events"
    )
    history.add_argument("name")

    commands.add_parser("ls", parents=[common], help="list the functions of a namespace")

    status = commands.add_parser("status", parents=[common], help="show a function's status")
    status.add_argument("name")

    remove = commands.add_parser("rm", parents=[common], help="delete a function")
    remove.add_argument("name")

    token = commands.add_parser(
        "token", parents=[common], help="mint, list and revoke API tokens (admin)"
    )
    token_actions = token.add_subparsers(dest="action", metavar="ACTION", required=True)
    token_create = token_actions.add_parser(
        "create", parents=[common_no_namespace], help="mint a token; prints its secret once"
    )
    token_create.add_argument("name")
    token_create.add_argument(
        "--role", required=True, choices=("admin", "developer", "viewer", "invoker", "auditor")
    )
    token_create.add_argument(
        "--namespace",
        "--ns",
        dest="token_namespaces",
        action="append",
        required=True,
        metavar="NS",
        help="repeatable; '*' for every namespace",
    )
    token_create.add_argument(
        "--expires-in", type=int, metavar="SECONDS", help="default: never expires"
    )
    token_actions.add_parser("ls", parents=[common], help="list tokens (never their secrets)")
    token_rm = token_actions.add_parser("rm", parents=[common], help="revoke a token")
    token_rm.add_argument("id")

    secret = commands.add_parser(
        "secret", parents=[common], help="create, replace, list and delete secrets"
    )
    secret_actions = secret.add_subparsers(dest="action", metavar="ACTION", required=True)
    for verb, text in (
        ("create", "create a secret (values are never shown again)"),
        ("set", "replace a secret's data; the functions using it roll out"),
    ):
        writer = secret_actions.add_parser(verb, parents=[common], help=text)
        writer.add_argument("name")
        writer.add_argument(
            "--from-literal", action="append", default=[], metavar="KEY=VALUE", dest="literals"
        )
        writer.add_argument(
            "--from-file", action="append", default=[], metavar="KEY=PATH", dest="files"
        )
    secret_actions.add_parser("ls", parents=[common], help="list secrets (key names only)")
    secret_rm = secret_actions.add_parser("rm", parents=[common], help="delete a secret")
    secret_rm.add_argument("name")

    credentials = commands.add_parser(
        "credentials", parents=[common], help="credentials for outside clients"
    )
    credential_kinds = credentials.add_subparsers(dest="kind", metavar="KIND", required=True)
    audit = credential_kinds.add_parser(
        "audit",
        parents=[common],
        help="the NATS URL and the auditor's key file: reads the LIFECYCLE stream, nothing else",
    )
    audit.add_argument(
        "--data-dir", type=Path, help="the data dir of 'lambdabus up' (default .lambdabus)"
    )
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
        return _fail(error.code, error.message + auth_hint(error.status, settings), 1)
    except (UsageError, PackagingError) as error:
        code = "usage" if isinstance(error, UsageError) else "invalid_source"
        return _fail(code, str(error), 2)
    except KeyboardInterrupt:
        # Ending a tail is how a tail is meant to end.
        return 0 if args.command == "events" or getattr(args, "follow", False) else 130
    except BrokenPipeError:
        # The reader went away (`lambdabus events | head`): not an error, and the flush at
        # interpreter exit must not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def auth_hint(status: int, settings: ClientSettings) -> str:
    """What to do about a 401 or 403, said after the gateway's own message."""
    if status == 401:
        if settings.resolved_token() is None:
            return (
                f" (no token: set LAMBDABUS_TOKEN, or run where {settings.token_file} is, "
                "as `lambdabus up` writes it)"
            )
        return " (the token in LAMBDABUS_TOKEN or the token file was refused)"
    if status == 403:
        return " (ask an admin for a token with that role and namespace)"
    return ""


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
    if args.env_from:
        spec["env_from"] = parse_env_from(args.env_from)
    for key in (
        "runtime",
        "replicas",
        "timeout",
        "memory",
        "description",
        "secrets",
        "invoke_auth",
        "network",
        "cpu",
        "max_concurrency",
    ):
        value = getattr(args, key)
        if value is not None:
            spec[key] = value
    if args.wait_timeout <= 0:
        raise UsageError("--wait-timeout must be more than 0 seconds")
    archive = await asyncio.to_thread(load_archive, args.source, warn=_warn)
    namespace = settings.namespace
    async with LambdabusClient.from_settings(settings) as client:
        # Asked first: if it fails, nothing has been uploaded yet.
        info = await client.info() if args.wait else {}
        before_upload = datetime.now(UTC)
        action, record = await client.deploy_function(namespace, spec, archive)
        if output != "json":
            print(upload_line(action, record), flush=True)
        if not args.wait:
            return await _deploy_status(client, namespace, action, record, output)
        if action != "unchanged":
            watch = _DeployWatch(
                client,
                namespace,
                args.name,
                uid=str(record.get("uid")),
                generation=int(record.get("generation") or 0),
                since=follow_since(record, before_upload),
                url=function_url(str(info.get("router_url", "")), namespace, args.name),
                echo=output != "json",
            )
            try:
                async with asyncio.timeout(args.wait_timeout):
                    code = await watch.run()
            except TimeoutError:
                return _fail(
                    "timeout",
                    f"{namespace}/{args.name} generation {record.get('generation')} was not "
                    f"ready after {args.wait_timeout:g} s; it may still become ready "
                    f"(see 'lambdabus status {args.name}' and 'lambdabus logs {args.name}')",
                    1,
                )
            if code != 0:
                return code
        if output == "json":
            status = await client.function_status(namespace, args.name)
            _print_json({"action": action, "function": record, "status": status})
    return 0


async def _deploy_status(
    client: LambdabusClient, namespace: str, action: str, record: JsonObject, output: str
) -> int:
    """`deploy --no-wait`: the function's status right after the upload."""
    status: JsonObject | None = None
    status_error = ""
    try:
        status = await client.function_status(namespace, str(record.get("name")))
    except ApiError as error:
        status_error = f"{error.code}: {error.message}"
    if output == "json":
        _print_json({"action": action, "function": record, "status": status})
    elif status is not None:
        print(f"Image: {status.get('image_status')}  Status: {status.get('status')}")
    else:
        print(f"Status: unknown ({_one_line(status_error)})")
    return 0


@dataclass
class _DeployWatch:
    """Follows a deploy after its upload: the function's lifecycle events decide (through
    `deploy_progress`), while its build log lines are printed as they come."""

    client: LambdabusClient
    namespace: str
    name: str
    uid: str
    generation: int
    since: str
    url: str
    echo: bool
    shown: set[tuple[object, ...]] = field(default_factory=set, init=False)

    async def run(self) -> int:
        """The exit status: 0 once ready, 1 when the build or the deployment failed."""
        build_logs = asyncio.create_task(self._print_build_logs())
        try:
            progress = await self._outcome()
            # Lines already on their way still belong before the verdict.
            await asyncio.wait([build_logs], timeout=LOG_DRAIN_SECONDS)
        finally:
            build_logs.cancel()
            await asyncio.gather(build_logs, return_exceptions=True)
        if progress.show_build_tail and self.echo:
            await self._print_build_tail()
        if progress.exit_code != 0:
            print(progress.line, file=sys.stderr, flush=True)
        elif self.echo:
            print(progress.line, flush=True)
        return progress.exit_code

    async def _outcome(self) -> Progress:
        events = self.client.lifecycle(
            namespace=self.namespace, function=self.name, since=self.since
        )
        async with contextlib.aclosing(events):
            async for event in events:
                progress = deploy_progress(event, self.uid, self.generation, url=self.url)
                if progress.done:
                    return progress
                if progress.line and self.echo:
                    print(progress.line, flush=True)
        raise ApiError(
            0, "stream_closed", "the gateway ended the lifecycle stream before the deploy finished"
        )

    async def _print_build_logs(self) -> None:
        if not self.echo:
            return
        entries = self.client.logs(
            self.namespace, self.name, build=True, since=self.since, follow=True
        )
        try:
            async with contextlib.aclosing(entries):
                async for entry in entries:
                    self._print_build_line(entry)
        except ApiError as error:  # the outcome does not depend on the logs
            _warn(f"build logs unavailable: {error.code}: {_one_line(error.message)}")

    async def _print_build_tail(self) -> None:
        try:
            entries = [
                entry
                async for entry in self.client.logs(
                    self.namespace, self.name, build=True, since=self.since, tail=BUILD_TAIL_LINES
                )
            ]
        except ApiError as error:
            _warn(f"build logs unavailable: {error.code}: {_one_line(error.message)}")
            return
        for entry in unseen(entries, self.shown):
            self._print_build_line(entry)

    def _print_build_line(self, entry: JsonObject) -> None:
        if belongs_to(entry, self.uid, self.generation):
            self.shown.add(log_key(entry))
            print(f"{BUILD_LOG_PREFIX}{entry.get('line', '')}", flush=True)


async def _invoke(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    headers = parse_headers(args.header)
    if args.callback_url is not None and not args.run_async:
        raise UsageError("--callback-url needs --async")
    body, content_type = b"", None
    if args.data is not None:
        body, content_type = json_body(args.data), "application/json"
    elif args.data_file is not None:
        body = await asyncio.to_thread(_read_data_file, args.data_file)
        content_type = guess_content_type(body)
    if args.run_async:
        async with LambdabusClient.from_settings(settings) as client:
            queued = await client.invoke_async(
                settings.namespace, args.name, body, content_type, headers, args.callback_url
            )
        if output == "json":
            _print_json(queued)
        else:
            print(queued.get("invocation_id", ""))
        return 0
    async with LambdabusClient.from_settings(settings) as client:
        answer = await client.invoke(settings.namespace, args.name, body, content_type, headers)
    error = platform_error(answer)
    if error is not None:
        return _fail(error[0], error[1] + auth_hint(answer.status, settings), 1)
    rendered = render_body(answer.body, answer.headers.get("Content-Type"))
    if isinstance(rendered, bytes):
        sys.stdout.flush()
        sys.stdout.buffer.write(rendered)
        sys.stdout.buffer.flush()
    elif rendered:
        print(rendered, end="" if rendered.endswith("\n") else "\n")
    if answer.status >= 400:
        sys.stdout.flush()
        return _fail(
            "function_error", f"{settings.namespace}/{args.name} answered {answer.status}", 1
        )
    return 0


def _read_data_file(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise UsageError(f"--data-file {path}: {error.strerror or error}") from None


async def _logs(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    if args.tail is not None and args.tail < 1:
        raise UsageError("--tail must be at least 1")
    since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    async with LambdabusClient.from_settings(settings) as client:
        entries = client.logs(
            settings.namespace,
            args.name,
            build=args.build,
            tail=args.tail,
            since=since,
            follow=args.follow,
        )
        async with contextlib.aclosing(entries):
            async for entry in entries:
                line = json.dumps(entry) if output == "json" else format_log_line(entry)
                print(line, flush=args.follow)
    return 0


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
    summary = status.get("summary") or f"{status.get('status', '-')} ({replicas})"
    lines = [
        f"Function:    {settings.namespace}/{args.name}",
        f"Generation:  {status.get('generation', '-')}",
        f"Image:       {status.get('image_status', '-')}",
        f"Status:      {summary}",
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


async def _invocation(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    if args.wait_timeout <= 0:
        raise UsageError("--wait-timeout must be more than 0 seconds")
    async with LambdabusClient.from_settings(settings) as client:
        record = await client.get_invocation(settings.namespace, args.id)
        if args.wait:
            delay = 0.2
            try:
                async with asyncio.timeout(args.wait_timeout):
                    while record.get("status") not in FINISHED:
                        await asyncio.sleep(delay)
                        delay = next_poll(delay)
                        record = await client.get_invocation(settings.namespace, args.id)
            except TimeoutError:
                return _fail(
                    "timeout",
                    f"invocation {args.id} is still {record.get('status')} after "
                    f"{args.wait_timeout:g} s",
                    1,
                )
    if output == "json":
        _print_json(record)
    else:
        print("\n".join(invocation_lines(record)))
    if record.get("status") == "failed":
        sys.stdout.flush()
        return _fail("invocation_failed", str(record.get("error") or "it failed"), 1)
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
    if output == "json":
        _print_json(answer)
    elif answer.get("duplicates"):
        print(
            f"Already stored: event {event['id']} from {event['source']} "
            "(same source and id); not stored again."
        )
    else:
        print(f"Published event {event['id']} ({event['type']}).")
    return 0


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
            if output == "json":
                _print_json(record)
            else:
                print(
                    f"Created trigger {namespace}/{args.name}: "
                    f"{format_filter(record.get('filter'))} -> function {args.function} "
                    f"({format_delivery(record.get('delivery'))})."
                )
            return 0
        if args.action == "rm":
            record = await client.delete_trigger(namespace, args.name)
            if output == "json":
                _print_json(record)
            else:
                print(f"Deleting trigger {namespace}/{args.name}.")
            return 0
        items = await client.list_triggers(namespace)
    if output == "json":
        _print_json({"items": items})
        return 0
    if not items:
        print(f"No triggers in namespace {namespace}.")
        return 0
    now = datetime.now(UTC)
    rows = [
        [
            str(item.get("name", "?")),
            str(item.get("function", "?")),
            format_filter(item.get("filter")),
            format_delivery(item.get("delivery")),
            format_age(item.get("created_at"), now),
        ]
        for item in items
    ]
    print(render_table(["NAME", "FUNCTION", "FILTER", "DELIVERY", "AGE"], rows))
    return 0


async def _deadletters(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    namespace = settings.namespace
    async with LambdabusClient.from_settings(settings) as client:
        if args.action == "redrive":
            answer = await client.redrive(namespace, args.id)
            if output == "json":
                _print_json(answer)
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
    if output == "json":
        _print_json(page)
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


def token_rows(items: Sequence[JsonObject], now: datetime) -> list[list[str]]:
    rows = []
    for item in items:
        expires = item.get("expires")
        rows.append(
            [
                str(item.get("id", "?")),
                str(item.get("name", "?")),
                str(item.get("role", "?")),
                ",".join(map(str, item.get("namespaces") or [])),
                format_age(item.get("created"), now),
                "expired"
                if item.get("expired")
                else (format_event_time(expires) if expires else "never"),
            ]
        )
    return rows


async def _token(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    async with LambdabusClient.from_settings(settings) as client:
        if args.action == "create":
            if args.expires_in is not None and args.expires_in < 1:
                raise UsageError("--expires-in must be at least 1 second")
            minted = await client.create_token(
                args.name, args.role, args.token_namespaces, args.expires_in
            )
            if output == "json":
                _print_json(minted)
            else:
                print(
                    f"Created token {minted.get('id')} ({minted.get('role')} for "
                    f"{', '.join(map(str, minted.get('namespaces') or []))}"
                    f"{', expires ' + str(minted['expires']) if minted.get('expires') else ''}).",
                    file=sys.stderr,
                )
                print("Its secret is shown this once; keep it safe:", file=sys.stderr)
                print(minted.get("token", ""))
            return 0
        if args.action == "rm":
            record = await client.delete_token(args.id)
            if output == "json":
                _print_json(record)
            else:
                print(f"Revoked token {args.id} ({record.get('name', '?')}).")
            return 0
        items = await client.list_tokens()
    if output == "json":
        _print_json({"items": items})
        return 0
    if not items:
        print("No tokens.")
        return 0
    rows = token_rows(items, datetime.now(UTC))
    print(render_table(["ID", "NAME", "ROLE", "NAMESPACES", "AGE", "EXPIRES"], rows))
    return 0


async def _secret(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    namespace = settings.namespace
    async with LambdabusClient.from_settings(settings) as client:
        if args.action in ("create", "set"):
            data = secret_data(args.literals, args.files)
            if args.action == "create":
                info = await client.create_secret(namespace, args.name, data)
            else:
                info = await client.replace_secret(namespace, args.name, data)
            if output == "json":
                _print_json(info)
            else:
                verb = "Created" if args.action == "create" else "Replaced"
                keys = ", ".join(map(str, info.get("keys") or []))
                print(f"{verb} secret {namespace}/{args.name} (keys: {keys}).")
            return 0
        if args.action == "rm":
            await client.delete_secret(namespace, args.name)
            if output != "json":
                print(f"Deleted secret {namespace}/{args.name}.")
            return 0
        items = await client.list_secrets(namespace)
    if output == "json":
        _print_json({"items": items})
        return 0
    if not items:
        print(f"No secrets in namespace {namespace}.")
        return 0
    rows = [[str(i.get("name", "")), ", ".join(map(str, i.get("keys") or []))] for i in items]
    print(render_table(["NAME", "KEYS"], rows))
    return 0


async def _credentials(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    from lambdabus_client.credentials import NoCredentials, audit_access
    from lambdabus_platform.launcher import UpSettings

    data_dir = args.data_dir if args.data_dir is not None else UpSettings().data_dir
    try:
        access = audit_access(data_dir)
    except NoCredentials as error:
        return _fail("no_credentials", str(error), 1)
    if output == "json":
        _print_json({"url": access.url, "nkey_seed_file": str(access.nkey_seed_file)})
        return 0
    print(f"url   {access.url}")
    print(f"nkey  {access.nkey_seed_file}")
    return 0


_COMMANDS: dict[str, Command] = {
    "secret": _secret,
    "token": _token,
    "credentials": _credentials,
    "deploy": _deploy,
    "invoke": _invoke,
    "logs": _logs,
    "history": _history,
    "ls": _ls,
    "status": _status,
    "rm": _rm,
    "events": _events,
    "invocation": _invocation,
    "publish": _publish,
    "triggers": _triggers,
    "deadletters": _deadletters,
}
