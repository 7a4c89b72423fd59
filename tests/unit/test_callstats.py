"""Call statistics that add up across routers (pure): slots, windows, merged percentiles."""

from __future__ import annotations

import pytest

from lambdabus_platform.callstats import (
    RouterStats,
    bucket_of,
    bucket_top,
    percentile,
    prune,
    record,
    summarize,
)

NOW = 1_800_000_005.0  # 5 s into a slot


def test_buckets_are_ten_percent_wide() -> None:
    for seconds in (0.0001, 0.001, 0.0123, 0.5, 3.0, 120.0):
        index = bucket_of(seconds)
        assert seconds <= bucket_top(index)
        if index:
            assert bucket_top(index - 1) < seconds
    assert bucket_top(10) / bucket_top(9) == pytest.approx(1.1)


def test_windows_count_what_they_hold() -> None:
    stats = RouterStats()
    record(stats, NOW, 200, 0.010, cold=True)  # now
    record(stats, NOW - 30, 500, 0.020)  # in 1m
    record(stats, NOW - 200, 429, 0.001)  # in 5m only
    record(stats, NOW - 2000, 200, 0.050)  # in 1h only
    record(stats, NOW - 4000, 200, 0.050)  # too old for every window
    w = summarize([stats], NOW)
    assert {
        k: (v["calls"], v["errors"], v["throttles"], v["cold_starts"]) for k, v in w.items()
    } == {
        "1m": (2, 1, 0, 1),
        "5m": (3, 1, 1, 1),
        "1h": (4, 1, 1, 1),
    }
    prune(stats, NOW)
    assert len(stats.slots) == 4


def test_two_routers_add_up_and_percentiles_come_from_the_merged_histogram() -> None:
    fast, slow = RouterStats(), RouterStats()
    for i in range(90):
        record(fast, NOW - i * 0.1, 200, 0.010)
    for i in range(10):
        record(slow, NOW - i * 0.1, 200, 1.0)
    merged = summarize([fast, slow], NOW)["1m"]
    assert merged["calls"] == 100
    assert merged["p50_ms"] == pytest.approx(10, rel=0.1)
    assert merged["p95_ms"] == pytest.approx(1000, rel=0.1)  # only the slow router saw these
    assert summarize([fast], NOW)["1m"]["p95_ms"] == pytest.approx(10, rel=0.1)
    empty = summarize([], NOW)["1h"]
    assert (empty["calls"], empty["p99_ms"]) == (0, None)
    assert percentile({}, 0.5) is None


def test_the_wire_form_round_trips() -> None:
    stats = RouterStats()
    record(stats, NOW, 200, 0.3)
    again = RouterStats.model_validate_json(stats.model_dump_json())
    assert summarize([again], NOW) == summarize([stats], NOW)
