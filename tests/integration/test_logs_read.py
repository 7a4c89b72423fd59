"""`Bus.read`, the bounded read the logs service is built on, against a real nats-server:
the newest N of a subject wherever they sit in the stream, from a time or a sequence, and
never following."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime

import pytest

from lambdabus_platform.bus import Bus


def subject(tag: str, name: str) -> str:
    return f"lambdabus.logs.runtime.{tag}.{name}"


async def publish(bus: Bus, subj: str, payloads: list[bytes]) -> None:
    for p in payloads:
        await bus.publish(subj, p)


@pytest.fixture
def tag() -> str:
    return f"r{uuid.uuid4().hex[:10]}"


async def test_newest_matches_a_full_read_wherever_the_lines_sit(bus: Bus, tag: str) -> None:
    rng = random.Random(7)
    ours = subject(tag, "ours")
    expected: list[bytes] = []
    # Sparse lines, then a burst, then sparse again, between lines of other functions.
    for i in range(400):
        burst = 150 <= i < 170
        if burst or rng.random() < 0.05:
            payload = f"ours {i}".encode()
            expected.append(payload)
            await bus.publish(ours, payload)
        else:
            await bus.publish(subject(tag, f"other{i % 3}"), b"x")
    full = await bus.read("LOGS", ours, limit=10_000)
    assert [m.data for m in full] == expected
    for n in (1, 2, 5, 17, len(expected) - 1, len(expected), len(expected) + 5):
        newest = await bus.read("LOGS", ours, limit=n, newest=True)
        assert [m.data for m in newest] == expected[-n:], n
        oldest = await bus.read("LOGS", ours, limit=n)
        assert [m.data for m in oldest] == expected[:n], n


async def test_from_a_sequence_or_a_time(bus: Bus, tag: str) -> None:
    ours = subject(tag, "fn")
    await publish(bus, ours, [b"a", b"b"])
    middle = datetime.now(UTC)
    await publish(bus, ours, [b"c", b"d", b"e"])
    since = await bus.read("LOGS", ours, since=middle, limit=100)
    assert [m.data for m in since] == [b"c", b"d", b"e"]
    assert all(m.time is not None and m.time >= middle for m in since)
    assert [m.data for m in await bus.read("LOGS", ours, since=middle, limit=2, newest=True)] == [
        b"d",
        b"e",
    ]
    assert [m.data for m in await bus.read("LOGS", ours, since=middle, limit=2)] == [b"c", b"d"]
    from_seq = await bus.read("LOGS", ours, start_seq=since[1].sequence, limit=100)
    assert [m.data for m in from_seq] == [b"d", b"e"]


async def test_nothing_stored_reads_nothing_at_once(bus: Bus, tag: str) -> None:
    started = asyncio.get_running_loop().time()
    assert await bus.read("LOGS", subject(tag, "empty"), limit=10) == []
    assert await bus.read("LOGS", subject(tag, "empty"), limit=10, newest=True) == []
    assert await bus.read("LOGS", subject(tag, "empty"), since=datetime.now(UTC), limit=10) == []
    assert await bus.read("LOGS", subject(tag, "empty"), limit=0) == []
    assert asyncio.get_running_loop().time() - started < 2


async def test_a_read_leaves_no_consumer_behind(bus: Bus, tag: str) -> None:
    ours = subject(tag, "fn")
    await publish(bus, ours, [b"1", b"2", b"3"])
    before = await bus.count("LOGS", ours)
    for _ in range(3):
        await bus.read("LOGS", ours, limit=1, newest=True)
    assert await bus.count("LOGS", ours) == before
    assert await consumers_on(bus, ours) == 0


async def consumers_on(bus: Bus, filter_subject: str) -> int:
    # The one peek at server state this test needs, through the adapter's JetStream context.
    infos = await bus._js.consumers_info("LOGS")
    return sum(1 for info in infos if info.config.filter_subject == filter_subject)


async def test_newest_behind_a_burst_reads_little_more_than_it_returns(bus: Bus, tag: str) -> None:
    """A burst of the subject's own lines far back: the seek narrows down to the last lines
    rather than reading the whole burst."""
    ours = subject(tag, "bursty")
    for i in range(600):
        await bus.publish_nowait(ours, f"burst {i}".encode())
    for _ in range(1500):
        await bus.publish_nowait(subject(tag, "other"), b"x")
    for i in range(3):
        await bus.publish(ours, f"late {i}".encode())  # acked: everything before is stored
    newest = await bus.read("LOGS", ours, limit=5, newest=True)
    assert [m.data for m in newest] == [b"burst 598", b"burst 599", b"late 0", b"late 1", b"late 2"]
