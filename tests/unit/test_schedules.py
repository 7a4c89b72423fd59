"""When schedules fire (pure): cron ticks in a time zone (DST included), `@every` ticks on
multiples of the interval, the tick due after downtime, and the CloudEvent of a tick."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lambdabus_events.models import DeliveryPolicy, ScheduleRecord
from lambdabus_platform.cron import ScheduleProblem, parse_timing
from lambdabus_platform.subjects import schedule_consumer
from lambdabus_router.schedules import delivery_record, due_tick, fired_event, orphans
from lambdabus_router.triggers import parse_consumer as trigger_consumer_of

NOW = datetime(2026, 12, 1, 2, 47, 30, tzinfo=UTC)


def _record(**changes: object) -> ScheduleRecord:
    fields: dict[str, object] = {
        "namespace": "default",
        "name": "nightly",
        "uid": "0c4d0ea4-5f2c-4a59-9d57-3c2f7c1d2e11",
        "function": "report",
        "cron": "*/5 * * * *",
        "timezone": "UTC",
        "data": {"k": "v"},
        "delivery": DeliveryPolicy(),
        "created_at": NOW - timedelta(hours=1),
    }
    return ScheduleRecord.model_validate({**fields, **changes})


def test_cron_ticks_latest_and_next() -> None:
    timing = parse_timing("*/5 * * * *")
    assert timing.latest(NOW) == datetime(2026, 12, 1, 2, 45, tzinfo=UTC)
    assert timing.next_after(NOW) == datetime(2026, 12, 1, 2, 50, tzinfo=UTC)
    on_tick = datetime(2026, 12, 1, 2, 45, tzinfo=UTC)
    assert timing.latest(on_tick) == on_tick  # a tick is due at its own instant
    assert timing.next_after(on_tick) == datetime(2026, 12, 1, 2, 50, tzinfo=UTC)


def test_cron_is_read_in_its_time_zone_across_dst() -> None:
    timing = parse_timing("30 2 * * *", "Europe/Berlin")
    winter = datetime(2026, 12, 1, 12, tzinfo=UTC)
    assert timing.latest(winter) == datetime(2026, 12, 1, 1, 30, tzinfo=UTC)  # CET = UTC+1
    summer = datetime(2026, 7, 1, 12, tzinfo=UTC)
    assert timing.latest(summer) == datetime(2026, 7, 1, 0, 30, tzinfo=UTC)  # CEST = UTC+2


def test_every_ticks_on_multiples_of_the_interval() -> None:
    timing = parse_timing("@every 2s")
    assert timing.latest(NOW) == NOW  # :30 is even
    assert timing.next_after(NOW) == NOW + timedelta(seconds=2)
    assert parse_timing("@every 1h30m").every == timedelta(minutes=90)
    assert parse_timing("@every 1h30m").latest(NOW) == datetime(2026, 12, 1, 1, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("cron", "zone", "field", "says"),
    [
        ("61 * * * *", "UTC", "cron", "field 1 (minute)"),
        ("* 24 * * *", "UTC", "cron", "field 2 (hour)"),
        ("* * 0 * *", "UTC", "cron", "field 3 (day of month)"),
        ("* * * 13 *", "UTC", "cron", "field 4 (month)"),
        ("* * * * funday", "UTC", "cron", "field 5 (day of week)"),
        ("R * * * *", "UTC", "cron", "random"),
        ("* * * * * *", "UTC", "cron", "6 fields"),
        ("@every 1d", "UTC", "cron", "not an interval"),
        ("@every 400000h", "UTC", "cron", "366 days"),
        ("@reboot", "UTC", "cron", "shorthand"),
        ("", "UTC", "cron", "empty"),
        ("@daily", "Nowhere/City", "timezone", "unknown time zone"),
        ("@daily", "../../etc/passwd", "timezone", "unknown time zone"),
    ],
)
def test_what_does_not_parse_names_the_field(cron: str, zone: str, field: str, says: str) -> None:
    with pytest.raises(ScheduleProblem) as caught:
        parse_timing(cron, zone)
    assert caught.value.field == field
    assert says in caught.value.message


def test_the_newest_missed_tick_is_due_once() -> None:
    timing = parse_timing("@every 2s")
    created = NOW - timedelta(minutes=10)
    fired = NOW - timedelta(minutes=5)  # down for five minutes: 150 ticks missed
    assert due_tick(timing, created, fired, NOW) == NOW
    assert due_tick(timing, created, NOW, NOW + timedelta(seconds=1)) is None  # done already
    assert due_tick(timing, created, None, NOW) == NOW  # never fired
    # A schedule made after the newest tick fires nothing until its next tick.
    assert due_tick(timing, NOW + timedelta(seconds=1), None, NOW + timedelta(seconds=1)) is None


def test_the_event_of_a_tick() -> None:
    record = _record()
    tick = datetime(2026, 12, 1, 2, 45, tzinfo=UTC)
    event = fired_event(record, tick)
    assert event["type"] == "io.lambdabus.schedule.fired"
    assert (event["subject"], event["time"]) == ("default/nightly", "2026-12-01T02:45:00Z")
    assert event["data"] == {"k": "v"}
    assert fired_event(record, tick)["id"] == event["id"]  # the same from every replica
    assert fired_event(record, tick + timedelta(minutes=5))["id"] != event["id"]
    trigger = delivery_record(record)
    assert trigger.filter["subject"] == "default/nightly"
    assert trigger.filter["type"] == event["type"]


def test_schedule_consumers_are_apart_from_trigger_consumers() -> None:
    record = _record()
    name = schedule_consumer(record.namespace, record.name, record.uid)
    assert trigger_consumer_of(name) is None  # the trigger sweep leaves it alone
    assert orphans([name, "trigger_default_x_abc"], [record]) == []
    assert orphans([name], []) == [name]
