"""The deployer's control loop: desired state from the `functions` and `builds` KV buckets,
applied to a backend on every relevant event and, level-triggered, on start and periodically,
so a lost or duplicated event never leaves a function stuck. Every step is idempotent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from pydantic import ValidationError

from lambdabus_deployer.backend import DeployBackend
from lambdabus_deployer.plan import (
    SECRET_UNREADABLE,
    DesiredRevision,
    Failure,
    ResolvedSecrets,
    desired_instances,
    pinned_desired,
    resolve_secrets,
)
from lambdabus_deployer.state import DeploymentStates, Key
from lambdabus_events.catalog import (
    BuildSucceeded,
    FunctionDeleted,
    FunctionUpdated,
    LifecycleEvent,
)
from lambdabus_events.models import (
    BuildState,
    DeploymentState,
    FunctionRecord,
    FunctionRevisions,
)
from lambdabus_events.traffic import referenced, revision_of
from lambdabus_platform.bus import Bus, KvEntry
from lambdabus_platform.registry import Registry
from lambdabus_platform.secretbox import SecretKeyError
from lambdabus_platform.secretstore import SecretStore
from lambdabus_platform.subjects import (
    BUILDS_BUCKET,
    FUNCTIONS_BUCKET,
    REVISIONS_BUCKET,
    namespace_pattern,
)

log = logging.getLogger("lambdabus.deployer")


class Deployer:
    def __init__(
        self,
        *,
        bus: Bus,
        backend: DeployBackend,
        states: DeploymentStates,
        secrets: SecretStore | None = None,
        after_first_pass: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._after_first_pass = after_first_pass
        self._bus = bus
        self._backend = backend
        self._states = states
        self._secrets = secrets
        self._functions = Registry(bus.kv(FUNCTIONS_BUCKET), FunctionRecord)
        self._builds = Registry(bus.kv(BUILDS_BUCKET), BuildState)
        self._revisions = Registry(bus.kv(REVISIONS_BUCKET), FunctionRevisions)
        self._locks: defaultdict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Instances the autoscaler wants, per function with `spec.scale` (see `scaling`).
        self.autoscaled: dict[Key, int] = {}
        # Their records as last reconciled: what the autoscaler decides on (no KV read a tick).
        self.scaled_records: dict[Key, FunctionRecord] = {}
        # the revisions last kept per function: their records are swept only when it changes
        self._kept: dict[Key, frozenset[str]] = {}
        # functions whose records cannot be read, with why: said once, not every pass
        self._unreadable: dict[Key, str] = {}

    async def state(self, namespace: str, name: str) -> DeploymentState | None:
        return await self._states.get(namespace, name)

    async def autoscaled_count(
        self, record: FunctionRecord, running: DesiredRevision | None
    ) -> int:
        """The instances of a function with `spec.scale`: the autoscaler's last decision; else
        what runs, or what the deployment state says (a new leader goes on from where the last
        one left it); else `replicas`; always within scale.min and scale.max."""
        scale = record.spec.scale
        assert scale is not None
        key = (record.namespace, record.name)
        count = self.autoscaled.get(key)
        if count is None:
            state = await self._states.get(*key)
            if running is not None and running.uid == record.uid:
                count = running.replicas
            elif state is not None and state.uid == record.uid and state.phase != "stopped":
                count = state.replicas
            else:
                count = record.spec.replicas
            # The autoscaler may have decided while the state was read: its count wins.
            count = self.autoscaled.get(key, count)
        count = min(scale.max, max(scale.min, count))
        self.autoscaled[key] = count
        self.scaled_records[key] = record
        return count

    async def on_event(self, event: LifecycleEvent) -> None:
        """build.succeeded, function.updated / deleted: converge that function on its records."""
        if isinstance(event, BuildSucceeded | FunctionUpdated | FunctionDeleted):
            await self.reconcile_one(event.namespace, event.name)

    async def wake(self, namespace: str, name: str, replicas: int) -> bool:
        """Scale a function from zero at once, without reading its records again: when what
        runs is the last reconciled record's autoscaled revision at 0 instances, it is asked for
        `replicas` (the reconcile that follows finds it so). False: not that case."""
        key = (namespace, name)
        async with self._locks[key]:
            record = self.scaled_records.get(key)
            running = self._backend.current(namespace, name)
            if (
                record is None
                or running is None
                or not running.autoscaled
                or running.replicas != 0
                or (running.uid, running.generation) != (record.uid, record.generation)
            ):
                return False
            await self._backend.apply(dataclasses.replace(running, replicas=replicas))
            return True

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
            resolved = await self._resolve(record)
            if isinstance(resolved, Failure):
                if running is not None:
                    # What runs keeps running (as with a failed build); the new revision waits.
                    await self._states.blocked(record, resolved, serving=True)
                    return
                if desired_instances(record, build.value if build else None) is None:
                    await self._states.idle(namespace, name, record.generation)
                    return
                await self._states.blocked(record, resolved)
                return
            desired = desired_instances(record, build.value if build else None, running, resolved)
            revisions = await self._revisions.get(namespace, name)
            doc = revisions.value if revisions and revisions.value.uid == record.uid else None
            if doc is not None:
                await self._states.announce_created(doc)
            if desired is not None and doc is not None:
                named = revision_of(doc, desired.generation)
                if named is not None:
                    desired = replace(desired, revision=named.name)
                    await self._states.record_revision(desired, endpoints=[])
            await self._pin(record, doc, desired)
            if desired is None:
                await self._states.idle(namespace, name, record.generation)
                return
            if record.spec.scale is not None and desired.uid == record.uid:
                count = await self.autoscaled_count(record, running)
                desired = dataclasses.replace(desired, replicas=count, autoscaled=True)
            else:
                self.autoscaled.pop((namespace, name), None)
                self.scaled_records.pop((namespace, name), None)
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

    async def _pin(
        self,
        record: FunctionRecord,
        doc: FunctionRevisions | None,
        latest: DesiredRevision | None,
    ) -> None:
        """Run apart every revision a route names that is not the latest one; stop those no
        route names any more."""
        ns, name = record.namespace, record.name
        wanted: dict[str, DesiredRevision] = {}
        named = referenced(doc) if doc is not None else {}
        for revision in doc.revisions if doc is not None else ():
            if revision.name not in named or (latest and latest.revision == revision.name):
                continue
            known = await self._states.revision(ns, name, revision.name)
            if known is None or known.uid != record.uid or not known.artifact:
                log.warning(
                    "a route names a revision whose artifact the deployer never ran",
                    extra={"namespace": ns, "function": name, "revision": revision.name},
                )
                continue
            pinned_record = record.model_copy(
                update={"spec": revision.spec, "source": revision.source}
            )
            resolved = await self._resolve(pinned_record)
            if isinstance(resolved, Failure):
                continue
            wanted[revision.name] = replace(
                pinned_desired(pinned_record, known.artifact, known.build_generation, resolved),
                generation=revision.generation,
                replicas=max(record.spec.replicas, 1),
                revision=revision.name,
                pinned=True,
            )
        prefix = f"{name}@"
        for runner_ns, runner in self._backend.functions():
            if (
                runner_ns == ns
                and runner.startswith(prefix)
                and runner.removeprefix(prefix) not in wanted
            ):
                await self._backend.remove(ns, runner)
        for desired in wanted.values():
            await self._backend.apply(desired)
        keep = set(wanted) | ({latest.revision} if latest is not None else set())
        keep |= {r.name for r in doc.revisions} if doc is not None else set()
        if self._kept.get((ns, name)) != frozenset(keep):
            await self._states.forget_revisions(ns, name, keep)
            self._kept[(ns, name)] = frozenset(keep)

    async def on_revisions_change(self, key: str) -> None:
        namespace, _, name = key.partition(".")
        await self.reconcile_one(namespace, name)

    async def watch_revisions(self, changes: AsyncIterator[KvEntry]) -> None:
        """Follow the `revisions` KV: a route that changed starts or stops revisions."""
        async for entry in changes:
            try:
                await self.on_revisions_change(entry.key)
            except Exception:
                log.exception(
                    "reconcile after a route change failed; retried at the next pass",
                    extra={"key": entry.key},
                )

    async def _resolve(self, record: FunctionRecord) -> ResolvedSecrets | Failure:
        """The function's secrets, decrypted and resolved (see `resolve_secrets`); a secret the
        deployer cannot decrypt (its key is not the gateway's) fails it the same way."""
        names = record.spec.secret_names()
        if not names or self._secrets is None:
            return resolve_secrets(record.namespace, record.spec, {})
        found: dict[str, dict[str, str]] = {}
        for name in sorted(names):
            item = await self._secrets.get(record.namespace, name)
            if item is None:
                continue
            try:
                found[name] = self._secrets.values(item.secret)
            except SecretKeyError:
                log.error(
                    "cannot decrypt a secret: the deployer's secrets key is not the gateway's",
                    extra={"namespace": record.namespace, "secret": name},
                )
                return Failure(
                    SECRET_UNREADABLE,
                    f"secret {name} cannot be decrypted by the deployer: its secrets key is not "
                    "the one the gateway sealed it with (an operator must give both the same "
                    "LAMBDABUS_SECRETS_KEY or key file)",
                )
        return resolve_secrets(record.namespace, record.spec, found)

    async def on_secret_change(self, namespace: str, secret: str) -> None:
        """A secret was created, replaced or deleted: converge every function that uses it (a
        changed value changes the revision key, so they roll out)."""
        entries = await self._bus.kv(FUNCTIONS_BUCKET).values(namespace_pattern(namespace))
        for entry in entries:
            record = FunctionRecord.model_validate_json(entry.value)
            if secret in record.spec.secret_names():
                await self.reconcile_one(namespace, record.name)

    async def watch_secrets(self, changes: AsyncIterator[KvEntry]) -> None:
        """Follow the secrets KV (its first pass replays the current values) and converge the
        functions of every secret that changes."""
        async for entry in changes:
            namespace, _, secret = entry.key.partition(".")
            try:
                await self.on_secret_change(namespace, secret)
            except Exception:
                log.exception(
                    "reconcile after a secret change failed; retried at the next pass",
                    extra={"namespace": namespace, "secret": secret},
                )

    async def _remove(self, namespace: str, name: str) -> None:
        if (namespace, name) not in self._backend.functions() and (
            await self._states.get(namespace, name) is None
        ):
            return
        log.info("stopping a deleted function", extra={"namespace": namespace, "function": name})
        self.autoscaled.pop((namespace, name), None)
        self.scaled_records.pop((namespace, name), None)
        for runner_ns, runner in self._backend.functions():
            if runner_ns == namespace and runner.startswith(f"{name}@"):
                await self._backend.remove(namespace, runner)
        await self._states.forget_revisions(namespace, name, set())
        self._kept.pop((namespace, name), None)
        await self._states.withdraw(namespace, name)
        await self._backend.remove(namespace, name)
        await self._states.forget(namespace, name)

    async def reconcile_all(self) -> None:
        records = await self._bus.kv(FUNCTIONS_BUCKET).values(">")
        keys: set[Key] = {(ns, name) for ns, _, name in (e.key.partition(".") for e in records)}
        keys |= await self._states.keys()
        keys |= {(ns, n) for ns, n in self._backend.functions() if "@" not in n}
        for namespace, name in sorted(keys):
            try:
                await self.reconcile_one(namespace, name)
                self._unreadable.pop((namespace, name), None)
            except ValidationError as exc:
                # A record this deployer cannot read (written by hand, or by a newer version):
                # nothing of it is touched; said again only when the reason changes.
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"]) or "the value"
                reason = (
                    f"{exc.error_count()} validation error(s) for {exc.title}, the first at "
                    f"{where}: {first['msg']}"
                )
                if self._unreadable.get((namespace, name)) != reason:
                    self._unreadable[(namespace, name)] = reason
                    log.error(
                        "a record of the function cannot be read; it is left as it is",
                        extra={"namespace": namespace, "function": name, "error": reason},
                    )
            except Exception:
                log.exception(
                    "reconcile failed; retried at the next pass",
                    extra={"namespace": namespace, "function": name},
                )

    async def reconcile_forever(self, interval: float) -> None:
        while True:
            try:
                await self.reconcile_all()
                if self._after_first_pass is not None:
                    # e.g. stop the instances a previous leader left that nothing desires now
                    after, self._after_first_pass = self._after_first_pass, None
                    await after()
            except Exception:
                log.exception("reconcile pass failed; retried at the next pass")
            await asyncio.sleep(interval)
