"""The deployer's control loop: desired state from the `functions` and `builds` KV buckets,
applied to a backend on every relevant event and, level-triggered, on start and periodically,
so a lost or duplicated event never leaves a function stuck. Every step is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

from lambdabus_deployer.backend import DeployBackend
from lambdabus_deployer.plan import desired_instances
from lambdabus_deployer.state import DeploymentStates, Key
from lambdabus_events.catalog import (
    BuildSucceeded,
    FunctionDeleted,
    FunctionUpdated,
    LifecycleEvent,
)
from lambdabus_events.models import BuildState, FunctionRecord
from lambdabus_platform.bus import Bus
from lambdabus_platform.registry import Registry
from lambdabus_platform.subjects import BUILDS_BUCKET, FUNCTIONS_BUCKET

log = logging.getLogger("lambdabus.deployer")


class Deployer:
    def __init__(self, *, bus: Bus, backend: DeployBackend, states: DeploymentStates) -> None:
        self._bus = bus
        self._backend = backend
        self._states = states
        self._functions = Registry(bus.kv(FUNCTIONS_BUCKET), FunctionRecord)
        self._builds = Registry(bus.kv(BUILDS_BUCKET), BuildState)
        self._locks: defaultdict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def on_event(self, event: LifecycleEvent) -> None:
        """build.succeeded, function.updated / deleted: converge that function on its records."""
        if isinstance(event, BuildSucceeded | FunctionUpdated | FunctionDeleted):
            await self.reconcile_one(event.namespace, event.name)

    async def reconcile_one(self, namespace: str, name: str) -> None:
        async with self._locks[(namespace, name)]:
            found = await self._functions.get(namespace, name)
            if found is None:
                await self._remove(namespace, name)
                return
            record = found.value
            running = self._backend.current(namespace, name)
            if running is not None and running.uid != record.uid:  # deleted and created anew
                await self._remove(namespace, name)
                running = None
            build = await self._builds.get(namespace, name)
            desired = desired_instances(record, build.value if build else None, running)
            if desired is None:
                await self._states.idle(namespace, name, record.generation)
                return
            if running is None:
                current = await self._states.get(namespace, name)
                if (
                    current is not None
                    and current.phase == "failed"
                    and current.uid == record.uid
                    and current.generation == desired.generation
                ):
                    # It failed before this deployer started; a new generation tries again.
                    return
            await self._backend.apply(desired)

    async def _remove(self, namespace: str, name: str) -> None:
        if (namespace, name) not in self._backend.functions() and (
            await self._states.get(namespace, name) is None
        ):
            return
        log.info("stopping a deleted function", extra={"namespace": namespace, "function": name})
        await self._states.withdraw(namespace, name)
        await self._backend.remove(namespace, name)
        await self._states.forget(namespace, name)

    async def reconcile_all(self) -> None:
        records = await self._bus.kv(FUNCTIONS_BUCKET).values(">")
        keys: set[Key] = {(ns, name) for ns, _, name in (e.key.partition(".") for e in records)}
        keys |= await self._states.keys()
        keys |= self._backend.functions()
        for namespace, name in sorted(keys):
            try:
                await self.reconcile_one(namespace, name)
            except Exception:
                log.exception(
                    "reconcile failed; retried at the next pass",
                    extra={"namespace": namespace, "function": name},
                )

    async def reconcile_forever(self, interval: float) -> None:
        while True:
            try:
                await self.reconcile_all()
            except Exception:
                log.exception("reconcile pass failed; retried at the next pass")
            await asyncio.sleep(interval)
