"""Per-function call statistics that add up across router replicas. Pure: no I/O, no clock.

Each router counts the calls of each function in 10-second slots: calls, errors (5xx: the
function failed, timed out or could not be reached), throttles (429), cold starts (the first
call an instance served, as its runtime says with `X-Lambdabus-Cold-Start`) and a histogram of
durations on fixed log-scale buckets (each 10 % wider than the one before, from 0.5 ms). Every
router writes its slots of the last hour to the `function-metrics` KV bucket under
`<ns>.<function>.<router id>`; the gateway merges the slots of every router (counts and
histograms add up) and reads the windows off them (`summarize`), percentiles included, within
the bucket's 10 %.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SLOT_SECONDS = 10
WINDOWS: dict[str, int] = {"1m": 60, "5m": 300, "1h": 3600}
KEEP_SECONDS = 3600
_BASE = 0.0005  # seconds: the top of bucket 0
_GROWTH = 1.1
_BUCKETS = 200  # up to ~24 h; slower calls land in the last bucket


class Slot(BaseModel):
    """What one router saw of one function in one 10-second slot."""

    model_config = ConfigDict(extra="forbid")

    calls: int = 0
    errors: int = 0
    throttles: int = 0
    cold_starts: int = 0
    durations: dict[int, int] = Field(default_factory=dict, description="bucket → calls")


class RouterStats(BaseModel):
    """A router's slots of one function, by slot start (Unix seconds), in the KV bucket."""

    model_config = ConfigDict(extra="forbid")

    slots: dict[int, Slot] = Field(default_factory=dict)


def bucket_of(seconds: float) -> int:
    if seconds <= _BASE:
        return 0
    return min(_BUCKETS - 1, math.ceil(math.log(seconds / _BASE, _GROWTH)))


def bucket_top(index: int) -> float:
    return _BASE * _GROWTH**index


def slot_of(unix: float) -> int:
    return int(unix) // SLOT_SECONDS * SLOT_SECONDS


def record(
    stats: RouterStats, unix: float, status: int, seconds: float, *, cold: bool = False
) -> None:
    """Count one call (its answer's status and how long it took) in its slot."""
    start = slot_of(unix)
    slot = stats.slots.get(start)
    if slot is None:  # (not setdefault: that would build a Slot on every call)
        slot = stats.slots[start] = Slot()
    slot.calls += 1
    if status == 429:
        slot.throttles += 1
    elif status >= 500:
        slot.errors += 1
    if cold:
        slot.cold_starts += 1
    index = bucket_of(seconds)
    slot.durations[index] = slot.durations.get(index, 0) + 1


def prune(stats: RouterStats, unix: float) -> None:
    """Forget the slots older than an hour."""
    oldest = slot_of(unix) - KEEP_SECONDS
    for start in [s for s in stats.slots if s < oldest]:
        del stats.slots[start]


def percentile(histogram: Mapping[int, int], q: float) -> float | None:
    """The q-quantile (0 < q < 1) of a histogram, in seconds: geometric interpolation within
    the bucket it falls in; None when empty."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index in sorted(histogram):
        count = histogram[index]
        if seen + count >= rank:
            low = bucket_top(index - 1) if index > 0 else 0.0
            high = bucket_top(index)
            share = (rank - seen) / count
            if low == 0.0:
                return high * share
            return float(low * (high / low) ** share)
        seen += count
    return bucket_top(max(histogram))


def summarize(routers: Iterable[RouterStats], now: float) -> dict[str, Any]:
    """Every router's slots merged, read per window: calls, errors, throttles, cold starts and
    p50/p95/p99 in milliseconds (None without calls)."""
    merged: dict[int, Slot] = {}
    for stats in routers:
        for start, slot in stats.slots.items():
            into = merged.setdefault(start, Slot())
            into.calls += slot.calls
            into.errors += slot.errors
            into.throttles += slot.throttles
            into.cold_starts += slot.cold_starts
            for index, count in slot.durations.items():
                into.durations[index] = into.durations.get(index, 0) + count
    current = slot_of(now)
    result: dict[str, Any] = {}
    for name, seconds in WINDOWS.items():
        first = current - seconds + SLOT_SECONDS  # the current slot and the ones before it
        slots = [slot for start, slot in merged.items() if first <= start <= current]
        histogram: dict[int, int] = {}
        for slot in slots:
            for index, count in slot.durations.items():
                histogram[index] = histogram.get(index, 0) + count
        result[name] = {
            "calls": sum(s.calls for s in slots),
            "errors": sum(s.errors for s in slots),
            "throttles": sum(s.throttles for s in slots),
            "cold_starts": sum(s.cold_starts for s in slots),
            **{
                f"p{q}_ms": (
                    None if (p := percentile(histogram, q / 100)) is None else round(p * 1000, 3)
                )
                for q in (50, 95, 99)
            },
        }
    return result
