"""The deployer's own records: `DeploymentState` in the `deployments` KV bucket, and the
`deployment.*` lifecycle events, each published after the state it announces is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from lambdabus_deployer.plan import (
    DesiredRevision,
    Failure,
    Observation,
    blocked_state,
    deployment_event,
    idle_state,
    next_deployment_state,
    stopped_state,
    withdrawn_state,
)
from lambdabus_events.catalog import (
    LifecycleEvent,
    RevisionCreated,
    RevisionData,
    RevisionDeleted,
    RevisionReady,
    lifecycle_event,
)
from lambdabus_events.models import (
    DeploymentState,
    FunctionRecord,
    FunctionRevisions,
    RevisionDeployment,
)
from lambdabus_platform.bus import Bus
from lambdabus_platform.registry import Registry
from lambdabus_platform.subjects import (
    DEPLOYMENTS_BUCKET,
    REVISION_DEPLOYMENTS_BUCKET,
    function_key,
)

log = logging.getLogger("lambdabus.deployer.state")

Key = tuple[str, str]
_REVISION_EVENTS: dict[str, type[LifecycleEvent]] = {
    "created": RevisionCreated,
    "ready": RevisionReady,
    "deleted": RevisionDeleted,
}


class DeploymentStates:
    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._registry = Registry(bus.kv(DEPLOYMENTS_BUCKET), DeploymentState)
        self._last: dict[Key, DeploymentState] = {}
        self._locks: defaultdict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._gone: set[Key] = set()  # being removed: late observations must not revive them
        self._closed = False
        self._revisions: dict[str, RevisionDeployment] = {}
        # What an observation announces, per function, published in order off the caller's
        # path: the state (what the router acts on) is written at once; a slow JetStream ack
        # must not hold the next state (an instance's endpoint) behind it.
        self._announcing: dict[Key, asyncio.Task[None]] = {}

    async def get(self, namespace: str, name: str) -> DeploymentState | None:
        found = await self._registry.get(namespace, name)
        return found.value if found is not None else None

    async def keys(self) -> set[Key]:
        entries = await self._bus.kv(DEPLOYMENTS_BUCKET).values(">")
        return {(ns, name) for ns, _, name in (e.key.partition(".") for e in entries)}

    async def _previous(self, key: Key) -> DeploymentState | None:
        if key in self._last:
            return self._last[key]
        return await self.get(*key)

    def _write(self, key: Key, state: DeploymentState) -> asyncio.Future[Any]:
        """Send the write of a state now (a task: started in the order writes are asked for,
        so they reach NATS in that order, whoever awaits their acks when)."""
        return asyncio.ensure_future(self._registry.put(*key, state))

    async def _publish(self, event: LifecycleEvent) -> None:
        await self._bus.publish_lifecycle(event)  # retries itself; the Msg-Id dedups

    def _announce_later(
        self,
        key: Key,
        event: LifecycleEvent | None,
        ready_revision: str | None,
        written: asyncio.Future[Any] | None = None,
    ) -> None:
        """Publish `event`, then announce `ready_revision` ready, after what this function
        announced before (in order) and once the state they announce is `written`, in the
        background (not at all when it could not be written: the next observation is)."""
        before = self._announcing.get(key)

        async def _go() -> None:
            if before is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await before
            if written is not None:
                try:
                    await asyncio.shield(written)
                except Exception:
                    return
            try:
                if event is not None:
                    await self._publish(event)
                if ready_revision is not None:
                    await self.announce_ready(key[0], key[1], ready_revision)
            except Exception as exc:
                log.warning(
                    "could not announce a deployment change",
                    extra={"function": f"{key[0]}/{key[1]}", "error": str(exc)},
                )

        task = asyncio.create_task(_go())
        self._announcing[key] = task
        task.add_done_callback(
            lambda done: (
                self._announcing.pop(key, None) if self._announcing.get(key) is done else None
            )
        )

    async def announced(self, key: Key | None = None) -> None:
        """Wait until what observations announced (for `key`, or all) is published."""
        while True:
            tasks = [
                t for k, t in self._announcing.items() if (key is None or k == key) and not t.done()
            ]
            if not tasks:
                return
            await asyncio.gather(*tasks, return_exceptions=True)

    async def observe(self, obs: Observation) -> None:
        """Fold a backend's observation into the state; write it, then announce a transition
        (in the background, in order: see `_announce_later`). Raises when the state cannot be
        written: the backend reports again."""
        if obs.revision.pinned:
            await self.pinned(obs)
            return
        key = (obs.revision.namespace, obs.revision.name)
        async with self._locks[key]:
            if self._closed or key in self._gone:
                return
            previous = await self._previous(key)
            decision = next_deployment_state(previous, obs, datetime.now(UTC))
            state = decision.state
            # The write is sent at once, the ack awaited outside the lock: the next observation
            # (an instance that now listens) is sent right behind it on the same connection, in
            # order, instead of after this one's round trip.
            writing = self._write(key, state) if decision.write else None
            self._last[key] = state
            ready = state.revision if state.revision and state.endpoints else None
            if decision.event is not None or ready is not None:
                self._announce_later(key, decision.event, ready, writing)
        if writing is not None:
            try:
                await writing
            except BaseException:
                if self._last.get(key) is state:
                    self._last.pop(key, None)  # unknown what is stored: read it next time
                raise

    async def pinned(self, obs: Observation) -> None:
        """A revision run apart (a route names it): its endpoints, in `revision-deployments`."""
        rev = obs.revision
        key = (rev.namespace, rev.runner_name)
        async with self._locks[key]:
            if self._closed or key in self._gone:
                return
            await self.record_revision(rev, endpoints=list(obs.endpoints))

    async def record_revision(self, rev: DesiredRevision, endpoints: list[str]) -> None:
        """Write what the deployer knows of a revision (its artifact, its endpoints when run
        apart), unless the stored record says the same; announce it ready the first time."""
        current = await self.revision(rev.namespace, rev.name, rev.revision)
        announced = list(current.announced) if current and current.uid == rev.uid else []
        record = RevisionDeployment(
            namespace=rev.namespace,
            name=rev.name,
            uid=rev.uid,
            revision=rev.revision,
            generation=rev.generation,
            build_generation=rev.build_generation,
            artifact=rev.artifact,
            endpoints=endpoints,
            ready=bool(endpoints),
            updated_at=datetime.now(UTC),
            announced=announced,
        )
        await self._store_revision(current, record)
        if endpoints:
            await self.announce_ready(rev.namespace, rev.name, rev.revision)

    async def _store_revision(
        self, current: RevisionDeployment | None, record: RevisionDeployment
    ) -> None:
        if current is not None and current.model_dump(exclude={"updated_at"}) == record.model_dump(
            exclude={"updated_at"}
        ):
            return
        key = f"{function_key(record.namespace, record.name)}.{record.revision}"
        await self._bus.kv(REVISION_DEPLOYMENTS_BUCKET).put(key, record.model_dump_json().encode())
        self._revisions[key] = record

    async def _announce(self, record: RevisionDeployment, verb: str) -> RevisionDeployment:
        data = RevisionData(
            namespace=record.namespace,
            name=record.name,
            uid=record.uid,
            generation=record.generation,
            revision=record.revision,
        )
        await self._publish(
            lifecycle_event(
                _REVISION_EVENTS[verb],
                data,
                service="deployer",
                subject=f"{record.namespace}/{record.name}",
                key=f"{record.uid}:{record.revision}",
            )
        )
        if verb == "deleted":
            return record
        announced = [*record.announced, verb]
        return record.model_copy(update={"announced": announced})

    async def announce_created(self, doc: FunctionRevisions) -> None:
        """`revision.created`, once, for each revision of the function the deployer has not
        announced yet (its record remembers it, across deployer restarts)."""
        for revision in doc.revisions:
            current = await self.revision(doc.namespace, doc.name, revision.name)
            if current is not None and current.uid == doc.uid and "created" in current.announced:
                continue
            record = (
                current
                if current is not None and current.uid == doc.uid
                else RevisionDeployment(
                    namespace=doc.namespace,
                    name=doc.name,
                    uid=doc.uid,
                    revision=revision.name,
                    generation=revision.generation,
                    build_generation=0,
                    updated_at=datetime.now(UTC),
                )
            )
            await self._store_revision(current, await self._announce(record, "created"))

    async def announce_ready(self, namespace: str, name: str, revision: str) -> None:
        current = await self.revision(namespace, name, revision)
        if current is None or "ready" in current.announced:
            return
        await self._store_revision(current, await self._announce(current, "ready"))

    async def revision(self, namespace: str, name: str, revision: str) -> RevisionDeployment | None:
        key = f"{function_key(namespace, name)}.{revision}"
        if key in self._revisions:
            return self._revisions[key]
        entry = await self._bus.kv(REVISION_DEPLOYMENTS_BUCKET).get(key)
        if entry is None or not entry.value:
            return None
        found = RevisionDeployment.model_validate_json(entry.value)
        self._revisions[key] = found
        return found

    async def forget_revisions(self, namespace: str, name: str, keep: set[str]) -> None:
        """Delete the revision records of a function but those in `keep`."""
        kv = self._bus.kv(REVISION_DEPLOYMENTS_BUCKET)
        for entry in await kv.values(f"{function_key(namespace, name)}.*"):
            revision = entry.key.rsplit(".", 1)[-1]
            if revision not in keep and entry.value:
                with contextlib.suppress(ValidationError):
                    await self._announce(
                        RevisionDeployment.model_validate_json(entry.value), "deleted"
                    )
                await kv.delete(entry.key)
                self._revisions.pop(entry.key, None)

    async def idle(self, namespace: str, name: str, generation: int) -> None:
        """Nothing runs for the function, and nothing can yet: clear endpoints it may list."""
        key = (namespace, name)
        async with self._locks[key]:
            previous = await self._previous(key)
            if previous is None or not (previous.endpoints or previous.instances):
                return
            state = idle_state(previous, generation, datetime.now(UTC))
            await self._write(key, state)
            await self.announced(key)
            if state.phase != previous.phase:
                await self._publish(deployment_event(state))
            self._last[key] = state

    async def blocked(
        self, record: FunctionRecord, failure: Failure, *, serving: bool = False
    ) -> None:
        """The function cannot start (a secret it names is missing): say so, once. `serving`:
        an older revision runs on (its endpoints stay)."""
        key = (record.namespace, record.name)
        async with self._locks[key]:
            if self._closed or key in self._gone:
                return
            previous = await self._previous(key)
            state = blocked_state(previous, record, failure, datetime.now(UTC), serving=serving)
            if previous is not None and previous.model_dump(
                exclude={"updated_at"}
            ) == state.model_dump(exclude={"updated_at"}):
                return
            await self._write(key, state)
            await self.announced(key)
            if previous is None or (previous.phase, previous.generation, previous.reason) != (
                state.phase,
                state.generation,
                state.reason,
            ):
                await self._publish(deployment_event(state))
            self._last[key] = state

    async def withdraw(self, namespace: str, name: str) -> None:
        """First step of a removal: `stopped`, no endpoints, so the router stops sending."""
        key = (namespace, name)
        async with self._locks[key]:
            self._gone.add(key)
            previous = await self._previous(key)
            if previous is not None and previous.phase != "stopped":
                state = stopped_state(previous, datetime.now(UTC))
                await self._write(key, state)
                self._last[key] = state

    async def forget(self, namespace: str, name: str) -> None:
        """Last step of a removal, once the instances are gone: announce it, delete the key."""
        key = (namespace, name)
        async with self._locks[key]:
            previous = await self._previous(key)
            await self.announced(key)
            if previous is not None:
                if previous.phase != "stopped":
                    previous = stopped_state(previous, datetime.now(UTC))
                await self._publish(deployment_event(previous))
                await asyncio.ensure_future(self._registry.delete(*key))  # in order (`_write`)
            self._last.pop(key, None)
            self._gone.discard(key)

    def stop(self) -> None:
        """This replica stops acting: no later observation is written (the endpoints stay,
        the instances serve on for the next leader)."""
        self._closed = True

    async def close(self) -> None:
        """The deployer stops: no state names an endpoint of an instance about to stop."""
        self._closed = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.announced(), 5)
        now = datetime.now(UTC)
        for key, state in list(self._last.items()):
            if state.endpoints or state.instances:
                async with self._locks[key]:
                    await self._write(key, withdrawn_state(state, now))
