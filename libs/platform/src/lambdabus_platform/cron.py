"""When a schedule fires: a five-field cron expression (or `@hourly`, `@daily`...) read in a time
zone, or `@every <duration>` (`@every 30s`, `@every 1h30m`). Pure: no I/O, no clock.

Every replica of the router computes the same ticks: cron ticks are wall-clock times of the
zone (croniter, DST included), and `@every` ticks are the multiples of the interval since the
Unix epoch, so `@every 2s` fires on even seconds wherever it runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

EVERY_MIN = timedelta(seconds=1)
EVERY_MAX = timedelta(days=366)
EXPRESSION_MAX = 200
_EVERY = re.compile(r"^@every\s+((?:\d{1,7}(?:h|m|s))+)$")
_EVERY_PART = re.compile(r"(\d+)(h|m|s)")
_UNITS = {"h": 3600, "m": 60, "s": 1}
_NICKNAMES = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
_FIELDS = ("minute", "hour", "day of month", "month", "day of week")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class ScheduleProblem(ValueError):
    """What is wrong with a schedule's `cron` or `timezone`; `field` names the request field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Timing:
    """The ticks of one schedule. `every` is set for `@every`, else `cron` is a croniter
    expression read in `zone`."""

    cron: str
    zone: ZoneInfo
    every: timedelta | None = None

    def latest(self, now: datetime) -> datetime:
        """The newest tick at or before `now` (aware), in UTC."""
        if self.every is not None:
            step = int(self.every.total_seconds())
            seconds = int((now - _EPOCH).total_seconds()) // step * step
            return _EPOCH + timedelta(seconds=seconds)
        local = now.astimezone(self.zone)
        tick: datetime = croniter(self.cron, local + timedelta(seconds=1)).get_prev(datetime)
        while tick > local:  # croniter works in whole seconds
            tick = croniter(self.cron, tick).get_prev(datetime)
        return tick.astimezone(UTC)

    def next_after(self, moment: datetime) -> datetime:
        """The first tick strictly after `moment` (aware), in UTC."""
        if self.every is not None:
            return self.latest(moment) + self.every
        local = moment.astimezone(self.zone)
        tick: datetime = croniter(self.cron, local).get_next(datetime)
        while tick <= local:
            tick = croniter(self.cron, tick).get_next(datetime)
        return tick.astimezone(UTC)


def parse_every(text: str) -> timedelta:
    """The interval of `@every 1h30m`; ScheduleProblem if it is not one."""
    match = _EVERY.fullmatch(text.strip())
    if match is None:
        raise ScheduleProblem(
            "cron",
            f"{text!r} is not an interval: write '@every' and a duration of hours, minutes and "
            "seconds, e.g. '@every 30s' or '@every 1h30m'",
        )
    seconds = sum(int(n) * _UNITS[unit] for n, unit in _EVERY_PART.findall(match.group(1)))
    every = timedelta(seconds=seconds)
    if not EVERY_MIN <= every <= EVERY_MAX:
        raise ScheduleProblem(
            "cron", f"{text!r}: the interval must be between 1 s and 366 days, not {every}"
        )
    return every


def _cron_problem(expression: str) -> str | None:
    """What is wrong with a five-field cron expression, naming the field; None if nothing."""
    fields = expression.split()
    if len(fields) != len(_FIELDS):
        return (
            f"{expression!r} has {len(fields)} fields; a cron expression has five "
            "(minute hour day-of-month month day-of-week), e.g. '*/5 * * * *'"
        )
    for index, (name, value) in enumerate(zip(_FIELDS, fields, strict=True)):
        if value.upper().startswith("R"):  # croniter's random values (no name starts so)
            return f"field {index + 1} ({name}) {value!r}: random values would differ per router"
        probe = ["*"] * len(_FIELDS)
        probe[index] = value
        if not croniter.is_valid(" ".join(probe)):
            return f"field {index + 1} ({name}) {value!r} is not valid there"
    if not croniter.is_valid(expression):
        return f"{expression!r} is not a valid cron expression"
    return None


def parse_timing(cron: str, timezone: str = "UTC") -> Timing:
    """The ticks of `cron` in `timezone`; ScheduleProblem naming the bad field otherwise."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleProblem(
            "timezone",
            f"unknown time zone {timezone!r}: use an IANA name, e.g. 'UTC' or 'Europe/Berlin'",
        ) from None
    text = cron.strip()
    if not text:
        raise ScheduleProblem("cron", "cron is empty: e.g. '*/5 * * * *' or '@every 30s'")
    if len(text) > EXPRESSION_MAX:
        raise ScheduleProblem("cron", f"cron is longer than {EXPRESSION_MAX} characters")
    if text.startswith("@every"):
        return Timing(text, zone, parse_every(text))
    if text.startswith("@"):
        if text.lower() not in _NICKNAMES:
            raise ScheduleProblem(
                "cron",
                f"{text!r} is not a known shorthand: use one of "
                f"{', '.join(sorted(_NICKNAMES))} or '@every <duration>'",
            )
        return Timing(text.lower(), zone)
    problem = _cron_problem(text)
    if problem is not None:
        raise ScheduleProblem("cron", problem)
    try:  # what is_valid let through must also iterate
        croniter(text, datetime.now(zone)).get_next(datetime)
    except (CroniterError, ValueError) as exc:
        raise ScheduleProblem("cron", f"{text!r} is not a valid cron expression: {exc}") from None
    return Timing(text, zone)
