"""The autoscaler's loop, run by the deployer leader: every tick it reads the routers' load
samples (`function-load`), feeds each function with `spec.scale` to its `Autoscaler` (the pure
KPA decision), and when the decision differs from the count it asked last, it publishes
`deployment.scaled` (from, to, reason) and has the deployer converge the function on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime

from lambdabus_deployer.autoscale import Autoscaler, Decision, ScalePolicy
from lambdabus_deployer.deployer import Deployer
from lambdabus_deployer.state import Key
from lambdabus_events.catalog import DeploymentScaled, DeploymentScaledData, lifecycle_event
from lambdabus_events.models import FunctionRecord, ScaleSpec
from lambdabus_platform.bus import Bus
from lambdabus_platform.load import LoadReader
from lambdabus_platform.subjects import FUNCTION_LOAD_BUCKET

log = logging.getLogger("lambdabus.deployer.scaling")


class Scaling:
    def __init__(
        self,
        bus: Bus,
        deployer: Deployer,
        *,
        tick: float,
        stable_window: float,
        panic_window: float,
        sample_max_age: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._bus = bus
        self._deployer = deployer
        self._every = tick
        self._stable = stable_window
        self._panic = panic_window
        self._clock = clock
        self._wall = wall
        self._reader = LoadReader(max_age=sample_max_age)
        self._scalers: dict[Key, tuple[str, ScaleSpec, Autoscaler]] = {}
        # A tick and a wake-up decide one function at a time; a wake never waits for a tick's
        # work on other functions (their scale-downs take round trips: tens of milliseconds).
        self._locks: defaultdict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._ticking = asyncio.Lock()  # one tick at a time

    def _policy(self, scale: ScaleSpec) -> ScalePolicy:
        return ScalePolicy(
            min=scale.min,
            max=scale.max,
            target=scale.target,
            idle_seconds=scale.idle_seconds,
            stable_window=self._stable,
            panic_window=self._panic,
        )

    async def tick(self) -> list[tuple[Key, int, Decision]]:
        """One pass over every autoscaled function; the changes it made (key, from, decision)."""
        async with self._ticking:
            return await self._tick()

    async def wake(self, subject: str, _: bytes = b"") -> bool:
        """A router holds a request for a function with no instance (`lambdabus.wake.<ns>.<fn>`):
        scale it from 0 to at least one instance at once. True when it did."""
        parts = subject.split(".")
        if len(parts) != 4:
            return False
        key = (parts[2], parts[3])
        log.debug("wake request", extra={"function": f"{key[0]}/{key[1]}"})
        if key not in self._deployer.scaled_records:
            return False  # not autoscaled (nor a function): no lock made for it
        async with self._locks[key]:
            if self._deployer.autoscaled.get(key) != 0:
                return False  # running or starting already (or not autoscaled)
            record = self._deployer.scaled_records.get(key)
            if record is None:
                return False
            scale = record.spec.scale
            if scale is None:
                return False
            now = self._clock()
            known = self._scalers.get(key)
            if known is not None:
                known[2].last_request = now  # demand now: not idle for idle_seconds
            to = max(1, scale.min)
            message = f"0 -> {to} instances (Woken): a request waits in a router"
            await self._apply(record, 0, Decision(to, "Woken", message, 0.0, 0.0, False))
            return True

    async def _tick(self) -> list[tuple[Key, int, Decision]]:
        now = self._clock()
        records = dict(self._deployer.scaled_records)
        entries = await self._bus.kv(FUNCTION_LOAD_BUCKET).values(">")
        load = self._reader.read(((e.key, e.value) for e in entries), self._wall())
        for key in set(self._scalers) - set(records):
            del self._scalers[key]
            self._locks.pop(key, None)
        changes = []
        for key, record in sorted(records.items()):
            async with self._locks[key]:
                change = await self._tick_one(key, record, now, load.get(key, (0.0, 0)))
            if change is not None:
                changes.append((key, *change))
        return changes

    async def _tick_one(
        self, key: Key, record: FunctionRecord, now: float, load: tuple[float, int]
    ) -> tuple[int, Decision] | None:
        scale = record.spec.scale
        assert scale is not None
        known = self._scalers.get(key)
        if known is None or known[0] != record.uid or known[1] != scale:
            scaler = Autoscaler(self._policy(scale), started=now)
            if known is not None and known[0] == record.uid:
                scaler.last_request = known[2].last_request  # a changed policy, same demand
            self._scalers[key] = (record.uid, scale, scaler)
        else:
            scaler = known[2]
        concurrency, requests = load
        scaler.observe(now, concurrency, requests)
        current = self._deployer.autoscaled.get(key)
        if current is None:
            return None  # not deployed yet (nothing built): nothing to scale
        decision = scaler.decide(now, current)
        if decision.desired == current:
            return None
        await self._apply(record, current, decision)
        return current, decision

    async def _apply(self, record: FunctionRecord, current: int, decision: Decision) -> None:
        key = (record.namespace, record.name)
        log.info(
            "autoscaling",
            extra={"function": f"{key[0]}/{key[1]}", "decision": decision.message},
        )
        self._deployer.autoscaled[key] = decision.desired
        # Converge first: a woken function's instance starts before any other round trip
        # (`Deployer.wake`: without reading its records; the reconcile then confirms).
        if decision.reason == "Woken":
            await self._deployer.wake(*key, decision.desired)
        await self._deployer.reconcile_one(*key)
        state = await self._deployer.state(*key)
        data = DeploymentScaledData(
            namespace=record.namespace,
            name=record.name,
            uid=record.uid,
            generation=record.generation,
            replicas=decision.desired,
            ready_replicas=state.ready_replicas if state is not None else 0,
            reason=decision.reason,
            message=decision.message,
            from_replicas=current,
            to_replicas=decision.desired,
        )
        event = lifecycle_event(
            DeploymentScaled,
            data,
            service="deployer",
            subject=f"{record.namespace}/{record.name}",
            key=f"{record.uid}:autoscaled:{time.time_ns()}",
            time=datetime.now(UTC),
        )
        await self._bus.publish_lifecycle(event)

    async def run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._every)
            try:
                await self.tick()
                failing = False
            except Exception:
                if not failing:
                    log.exception("autoscaling pass failed; tried again at the next tick")
                failing = True
