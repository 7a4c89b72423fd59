"""What every command shares: usage errors, the one-line error contract, tables, times, and
the parsing of KEY=VALUE options."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import yaml

from lambdabus_client.client import (
    ClientSettings,
    JsonObject,
)

EVENT_TYPE_PREFIX = "io.lambdabus."


_GLOBAL_OPTIONS_WITH_VALUE = frozenset({"--url", "--namespace", "-n", "--output", "-o"})


_DURATION = re.compile(r"^(\d+)([smhd])$")


_DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class UsageError(Exception):
    """The command line is wrong (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


TABLE_WIDTH = 80
# The narrowest a column is squeezed to when a table is wider than the terminal.
MIN_COLUMN = 6
# How narrow a column that gives first (a detail, a message) becomes before others give.
LAST_COLUMN = 12
ELLIPSIS = "\u2026"
_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    max_width: int = TABLE_WIDTH,
    shrink_first: Sequence[int] = (),
) -> str:
    """Left-aligned columns two spaces apart, headers first; no trailing whitespace. A table
    wider than `max_width` has its widest columns narrowed, their long cells cut with '…'."""
    width = len(headers)
    for row in rows:
        if len(row) != width:
            raise ValueError(f"row {list(row)!r} has {len(row)} cells, expected {width}")
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    widths = fit_widths(widths, max_width, shrink_first)
    lines = []
    for row in (headers, *rows):
        cells = [
            truncate(str(cell), size).ljust(size) for cell, size in zip(row, widths, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def fit_widths(
    widths: Sequence[int], max_width: int, shrink_first: Sequence[int] = ()
) -> list[int]:
    """Column widths whose table (two spaces between columns) fits `max_width`: the columns of
    `shrink_first` give first (in that order, down to `LAST_COLUMN`), then the last column, then
    the widest; never below `MIN_COLUMN` (a table of many columns may stay wider)."""
    fitted = list(widths)
    excess = sum(fitted) + 2 * (len(fitted) - 1) - max_width
    for index in (*shrink_first, len(fitted) - 1):
        if excess <= 0 or not fitted:
            break
        give = min(excess, max(fitted[index] - LAST_COLUMN, 0))
        fitted[index] -= give
        excess -= give
    while excess > 0:
        widest = max(range(len(fitted)), key=lambda index: fitted[index])
        if fitted[widest] <= MIN_COLUMN:
            break
        fitted[widest] -= 1
        excess -= 1
    return fitted


def truncate(text: str, width: int) -> str:
    """`text` cut to `width` characters, the last one '…' when anything was cut."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + ELLIPSIS


def function_name(value: str) -> str:
    """An argparse type: a function name must be an RFC 1035 label (checked before any request,
    so a wrong one is a usage error)."""
    if not _LABEL.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a valid name: 1-63 lowercase letters, digits or '-', "
            "starting with a letter and not ending with '-' (RFC 1035 label)"
        )
    return value


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


def _event_data(event: JsonObject) -> JsonObject:
    data = event.get("data")
    return data if isinstance(data, dict) else {}


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
    return parse_assignments(pairs, "--env")


def parse_labels(pairs: Sequence[str]) -> dict[str, str]:
    """`--label k=v` values as the spec's `labels` (the gateway checks the keys)."""
    return parse_assignments(pairs, "--label")


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


def _fail(code: str, message: str, status: int) -> int:
    print(f"error: {code}: {_one_line(message)}", file=sys.stderr)
    return status


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def print_data(output: str, value: object) -> None:
    """A read command's answer as `-o json` or `-o yaml` asks."""
    if output == "yaml":
        print(yaml.safe_dump(value, sort_keys=False, allow_unicode=True), end="")
    else:
        _print_json(value)


def print_record(output: str, record: object, message: str) -> None:
    """A write command's answer: the record as `-o json|yaml` asks, else one sentence."""
    if output != "table":
        print_data(output, record)
    else:
        print(message)


def print_listing(
    output: str,
    items: list[JsonObject],
    *,
    what: str,
    namespace: str,
    headers: Sequence[str],
    row: Callable[[JsonObject, datetime], list[str]],
) -> None:
    """A list command's answer: `{"items": [...]}` as `-o json|yaml` asks, else a table of one
    `row(item, now)` per item, or `No <what> in namespace <namespace>.`"""
    if output != "table":
        print_data(output, {"items": items})
        return
    if not items:
        print(f"No {what} in namespace {namespace}.")
        return
    now = datetime.now(UTC)
    print(render_table(headers, [row(item, now) for item in items]))


def print_item(output: str, value: object) -> None:
    """One item of a stream (logs, events): a JSON line, or a YAML document."""
    if output == "yaml":
        print(
            "---\n" + yaml.safe_dump(value, sort_keys=False, allow_unicode=True), end="", flush=True
        )
    else:
        print(json.dumps(value), flush=True)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


Command = Callable[[ClientSettings, argparse.Namespace, str], Coroutine[Any, Any, int]]
