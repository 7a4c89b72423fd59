"""Leader election of deployer replicas against a real nats-server: one leader at a time, a
leader cut off from NATS stops acting before the standby takes over, a released lease is
taken at once."""

from __future__ import annotations

import asyncio
import time
import uuid

from lambdabus_deployer.leader import Elector, Role
from lambdabus_platform.bus import Bus, Kv, KvEntry
from lambdabus_platform.subjects import LEASES_BUCKET

DURATION = 3.0


class Partitioned(Kv):
    """A replica cut off from NATS: every request fails."""

    def __init__(self) -> None:  # no bucket behind it
        pass

    async def get(self, key: str) -> KvEntry | None:
        raise ConnectionError("partitioned")

    async def create(self, key: str, value: bytes) -> int:
        raise ConnectionError("partitioned")

    async def update(self, key: str, value: bytes, revision: int) -> int:
        raise ConnectionError("partitioned")


async def test_one_leader_at_a_time_and_a_cut_off_leader_stops_before_the_standby_leads(
    bus: Bus,
) -> None:
    kv = bus.kv(LEASES_BUCKET)
    key = f"test-{uuid.uuid4().hex[:8]}"
    timeline: list[tuple[float, str, Role]] = []

    def elector(name: str) -> Elector:
        return Elector(
            kv,
            name,
            duration=DURATION,
            key=key,
            poll=0.1,
            on_role=lambda role: timeline.append((time.monotonic(), name, role)),
        )

    a, b = elector("a"), elector("b")
    running = [asyncio.create_task(a.run())]
    try:
        await asyncio.wait_for(a.leading.wait(), 5)
        running.append(asyncio.create_task(b.run()))
        await asyncio.sleep(DURATION * 1.5)  # a renews meanwhile: b never leads
        assert a.leading.is_set()
        assert not b.leading.is_set()

        cut = time.monotonic()
        a.kv = Partitioned()
        await asyncio.wait_for(b.leading.wait(), DURATION * 3)
        took = time.monotonic() - cut
        a_stopped = next(t for t, who, role in timeline if who == "a" and role == "standby")
        b_leads = next(t for t, who, role in timeline if who == "b" and role == "leader")
        assert a_stopped < b_leads, timeline  # never two leaders
        assert took <= DURATION + 1.5
        assert not a.leading.is_set()

        # a graceful stop hands the lease over at once
        a.kv = kv
        running[1].cancel()
        await asyncio.gather(running[1], return_exceptions=True)
        released = time.monotonic()
        await b.release()
        await asyncio.wait_for(a.leading.wait(), 2)
        print(
            f"\ncut-off leader replaced after {took:.2f} s; "
            f"released lease taken after {time.monotonic() - released:.2f} s"
        )
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await a.release()
