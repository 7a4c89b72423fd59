"""The EVENTS group commit against a real nats-server (`sync_interval: always`): concurrent
publishes are stored as atomic batches, each caller's ack names its own message, duplicates are
still recognised one by one, and a stream without atomic batches still stores everything."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from lambdabus_platform.bus import Bus
from lambdabus_platform.groupcommit import GroupCommit

SUBJECT = "lambdabus.events.t.test-group-commit"


async def test_concurrent_publishes_share_atomic_batches(bus: Bus) -> None:
    run = uuid.uuid4().hex
    before = bus.group_batches("EVENTS")
    acks = await asyncio.gather(
        *(
            bus.publish_grouped("EVENTS", SUBJECT, f"{run}-{n}".encode(), msg_id=f"{run}-{n}")
            for n in range(200)
        )
    )
    assert bus.group_batches("EVENTS") > before  # some went as an atomic batch
    sequences = [ack.sequence for ack in acks]
    assert len(set(sequences)) == 200
    assert not any(ack.duplicate for ack in acks)
    # Each ack's sequence holds that very message.
    for n in (0, 57, 199):
        stored = await bus.get_message("EVENTS", sequences[n])
        assert stored is not None
        assert stored.data == f"{run}-{n}".encode()


async def test_duplicates_in_a_batch_are_recognised_one_by_one(bus: Bus) -> None:
    run = uuid.uuid4().hex
    first = await asyncio.gather(
        *(
            bus.publish_grouped("EVENTS", SUBJECT, b"first", msg_id=f"{run}-{n}")
            for n in range(0, 40, 2)
        )
    )
    # Half of these were stored already: the server refuses such an atomic batch as a whole,
    # and the group commit publishes it again message by message.
    again = await asyncio.gather(
        *(bus.publish_grouped("EVENTS", SUBJECT, b"again", msg_id=f"{run}-{n}") for n in range(40))
    )
    assert [ack.duplicate for ack in again] == [n % 2 == 0 for n in range(40)]
    assert [again[n].sequence for n in range(0, 40, 2)] == [ack.sequence for ack in first]
    stored = await bus.get_message("EVENTS", again[1].sequence)
    assert stored is not None
    assert stored.data == b"again"


async def test_the_same_id_twice_at_once_is_stored_once(bus: Bus) -> None:
    run = uuid.uuid4().hex
    acks = await asyncio.gather(
        *(bus.publish_grouped("EVENTS", SUBJECT, b"x", msg_id=f"{run}-{n % 10}") for n in range(30))
    )
    assert len({ack.sequence for ack in acks}) == 10
    assert sum(1 for ack in acks if not ack.duplicate) == 10


async def test_a_stream_without_atomic_batches_stores_one_by_one(bus: Bus) -> None:
    # DLQ is declared without `allow_atomic`.
    group = GroupCommit(bus._nc, bus._js, "DLQ", timeout=5.0)
    run = uuid.uuid4().hex
    acks = await asyncio.gather(
        *(
            group.publish(
                f"lambdabus.dlq.test-group-commit.gc{n}", b"x", {"Nats-Msg-Id": f"{run}-{n}"}
            )
            for n in range(20)
        )
    )
    assert len({ack.sequence for ack in acks}) == 20
    assert group.batches == 0
    await group.close()


@pytest.mark.parametrize("count", [1, 3])
async def test_few_publishes_go_alone(bus: Bus, count: int) -> None:
    """Below `min_batch`, messages are ordinary publishes (an atomic batch costs more)."""
    run = uuid.uuid4().hex
    before = bus.group_batches("EVENTS")
    acks = await asyncio.gather(
        *(bus.publish_grouped("EVENTS", SUBJECT, b"x", msg_id=f"{run}-{n}") for n in range(count))
    )
    assert len({ack.sequence for ack in acks}) == count
    assert bus.group_batches("EVENTS") == before
