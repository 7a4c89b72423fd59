"""Creating, replacing, patching and deleting function records: the gateway's write path.

Order of every transition: validate everything, store the source blob, write the record with
compare-and-set, then publish the lifecycle event with its deterministic id. A retried publish
is deduplicated by JetStream; a lost one is reconciled by the consumers from KV.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from lambdabus_events import presets
from lambdabus_events.catalog import (
    FunctionCreated,
    FunctionCreatedData,
    FunctionDeleted,
    FunctionDeletedData,
    FunctionSpecSummary,
    FunctionUpdated,
    FunctionUpdatedData,
    LifecycleEvent,
    lifecycle_event,
)
from lambdabus_events.models import (
    BuildState,
    FunctionConfig,
    FunctionRecord,
    Runtime,
    SourceRef,
)
from lambdabus_gateway.quotas import Quotas
from lambdabus_gateway.uploads import Upload, parse_config, parse_spec, refuse_platform_fields
from lambdabus_platform.archive import ArchiveLimits, build_inline_archive, inspect_archive
from lambdabus_platform.blobstore import BlobStore
from lambdabus_platform.bus import Bus
from lambdabus_platform.dependencies import DEPENDENCY_FILE_LIMITS, check_dependency_files
from lambdabus_platform.errors import (
    AlreadyExists,
    Conflict,
    InvalidName,
    InvalidSpec,
    NotFound,
    PreconditionFailed,
)
from lambdabus_platform.httpauth import CURRENT_ACTOR
from lambdabus_platform.registry import Registry, Versioned

log = logging.getLogger("lambdabus.gateway.functions")

Change = Literal["source", "config"]


@dataclass(frozen=True)
class Source:
    data: bytes
    ref: SourceRef


def next_record(
    current: FunctionRecord,
    config: FunctionConfig,
    source: SourceRef | None,
    now: datetime,
    *,
    build_failed: bool = False,
) -> tuple[FunctionRecord, list[Change]]:
    """The record after an update, and what changed. Pure. The same source sent again after
    its build failed (`build_failed`) is a change: the build may have failed for a passing
    reason (the network), and a redeploy is how a user asks for another try."""
    changes: list[Change] = []
    # Another runtime means another build of the same source.
    new_source = source is not None and (build_failed or source.sha256 != current.source.sha256)
    if new_source or config.runtime != current.spec.runtime:
        changes.append("source")
    if config != current.spec:
        changes.append("config")
    if not changes:
        return current, []
    updated = current.model_copy(
        update={
            "spec": config,
            "source": source if source is not None else current.source,
            "generation": current.generation + 1,
            "updated_at": now,
        }
    )
    return updated, changes


def merge_patch(current: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch. Pure."""
    merged = dict(current)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_patch(merged[key], value)
        else:
            merged[key] = value
    return merged


def patched_spec(current: FunctionConfig, patch: dict[str, Any]) -> dict[str, Any]:
    """The spec (as JSON) after a merge patch. Pure. A preset-governed field the patch sets
    becomes an override; one it sets to null follows its preset again; the others keep
    following theirs (a changed preset moves them)."""
    merged = merge_patch(current.model_dump(mode="json"), patch)
    explicit = set(current.preset_overrides)
    for key, value in patch.items():
        if key in presets.GOVERNED:
            (explicit.discard if value is None else explicit.add)(key)
    merged[presets.OVERRIDES_KEY] = sorted(explicit)
    return merged


def check_if_match(if_match: str | None, current: Versioned[FunctionRecord]) -> None:
    if if_match is None or if_match.strip() == "*":
        return
    tags = {t.strip().removeprefix("W/") for t in if_match.split(",")}
    if current.etag not in tags:
        raise PreconditionFailed(
            f"the function changed: If-Match {if_match} but the current ETag is {current.etag}; "
            "read it again and retry",
            details={"etag": current.etag},
        )


async def publish_lifecycle(bus: Bus, event: LifecycleEvent) -> None:
    """Publish a lifecycle event (`Bus.publish_lifecycle` retries a missing ack; the id dedups),
    naming the API caller whose request caused it."""
    actor = CURRENT_ACTOR.get()
    await bus.publish_lifecycle(event, actor=(actor.id, actor.name) if actor else None)


class Functions:
    def __init__(
        self,
        *,
        bus: Bus,
        records: Registry[FunctionRecord],
        blobs: BlobStore,
        limits: ArchiveLimits,
        quotas: Quotas | None = None,
        allow_unsafe_requirements: bool = False,
        builds: Registry[BuildState] | None = None,
    ) -> None:
        self._bus = bus
        self._builds = builds
        self._records = records
        self._blobs = blobs
        self._limits = limits
        self._quotas = quotas
        self._allow_unsafe_requirements = allow_unsafe_requirements

    async def _prepare_source(self, upload: Upload, runtime: Runtime) -> Source | None:
        if upload.archive is not None:
            data, kind = upload.archive, "archive"
        elif upload.inline_files is not None:
            data, kind = build_inline_archive(upload.inline_files), "inline"
        else:
            return None
        # Decompressing up to the limit is CPU work: keep it off the event loop.
        info = await asyncio.to_thread(
            inspect_archive, data, runtime, self._limits, DEPENDENCY_FILE_LIMITS
        )
        check_dependency_files(runtime, info.kept, allow_unsafe=self._allow_unsafe_requirements)
        ref = SourceRef(
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            kind=kind,  # type: ignore[arg-type]
            entrypoint=info.entrypoint,
            files=info.files,
        )
        return Source(data, ref)

    async def _store(self, source: Source) -> None:
        stored = await self._blobs.put(source.data)
        assert stored.sha256 == source.ref.sha256

    async def _publish(self, event: LifecycleEvent) -> None:
        await publish_lifecycle(self._bus, event)

    async def get(self, namespace: str, name: str) -> Versioned[FunctionRecord]:
        current = await self._records.get(namespace, name)
        if current is None:
            raise NotFound(f"function {namespace}/{name} does not exist", code="function_not_found")
        return current

    async def source_archive(self, record: FunctionRecord) -> bytes:
        """The function's source archive as stored (LUNA docs are read from it)."""
        return await self._blobs.get(record.source.sha256)

    async def in_namespace(self, namespace: str) -> list[Versioned[FunctionRecord]]:
        return await self._records.in_namespace(namespace)

    async def create(self, namespace: str, upload: Upload) -> Versioned[FunctionRecord]:
        spec = parse_spec(upload.fields)
        if await self._records.get(namespace, spec.name) is not None:
            raise AlreadyExists(
                f"function {namespace}/{spec.name} already exists; use PUT to replace it",
                code="function_exists",
            )
        if self._quotas is not None:
            await self._quotas.check(
                namespace, spec.name, adds_function=True, replicas=spec.replicas
            )
        source = await self._prepare_source(upload, spec.runtime)
        assert source is not None  # read_upload(require_source=True) guarantees one
        await self._store(source)
        now = datetime.now(UTC)
        record = FunctionRecord(
            namespace=namespace,
            name=spec.name,
            uid=str(uuid.uuid4()),
            generation=1,
            spec=FunctionConfig.model_validate(spec.model_dump(exclude={"name"})),
            source=source.ref,
            created_at=now,
            updated_at=now,
            env_salt=secrets.token_hex(16),
        )
        try:
            stored = await self._records.create(namespace, spec.name, record)
        except AlreadyExists as exc:
            raise AlreadyExists(
                f"function {namespace}/{spec.name} already exists; use PUT to replace it",
                code="function_exists",
            ) from exc
        data = FunctionCreatedData(
            namespace=namespace,
            name=spec.name,
            uid=record.uid,
            generation=1,
            spec=FunctionSpecSummary.of(record.spec, salt=record.env_salt),
            source=record.source,
        )
        await self._publish(
            lifecycle_event(
                FunctionCreated,
                data,
                service="gateway",
                subject=f"{namespace}/{spec.name}",
                key=f"{record.uid}:1",
            )
        )
        log.info(
            "function created",
            extra={"namespace": namespace, "function": spec.name, "uid": record.uid},
        )
        return stored

    async def replace(
        self, namespace: str, name: str, upload: Upload, if_match: str | None
    ) -> tuple[Versioned[FunctionRecord], list[Change]]:
        fields = dict(upload.fields)
        given = fields.setdefault("name", name)
        if given != name:
            raise InvalidName(
                f"spec.name {given!r} does not match the function {name!r} in the path"
            )
        spec = parse_spec(fields)
        config = FunctionConfig.model_validate(spec.model_dump(exclude={"name"}))
        source = await self._prepare_source(upload, spec.runtime)
        return await self._update(namespace, name, if_match, lambda _: config, source)

    async def patch(
        self, namespace: str, name: str, patch: dict[str, Any], if_match: str | None
    ) -> tuple[Versioned[FunctionRecord], list[Change]]:
        if "name" in patch and patch["name"] != name:
            raise InvalidName("a function cannot be renamed; create a new one")
        patch = {k: v for k, v in patch.items() if k != "name"}

        refuse_platform_fields(patch)

        def apply(current: FunctionRecord) -> FunctionConfig:
            return parse_config(patched_spec(current.spec, patch))

        current = await self.get(namespace, name)
        apply(current.value)  # validate before anything else
        return await self._update(namespace, name, if_match, apply, None)

    async def _build_failed(self, record: FunctionRecord) -> bool:
        """Whether the build of the function's current source failed."""
        if self._builds is None:
            return False
        found = await self._builds.get(record.namespace, record.name)
        return (
            found is not None
            and found.value.phase == "failed"
            and found.value.uid == record.uid
            and found.value.source_sha256 == record.source.sha256
        )

    async def _update(
        self,
        namespace: str,
        name: str,
        if_match: str | None,
        config_of: Any,
        source: Source | None,
    ) -> tuple[Versioned[FunctionRecord], list[Change]]:
        stored_source = False
        for _ in range(5):
            current = await self.get(namespace, name)
            check_if_match(if_match, current)
            config: FunctionConfig = config_of(current.value)
            if source is None and config.runtime != current.value.spec.runtime:
                raise InvalidSpec(
                    "changing the runtime needs new source: send the archive with the new runtime",
                    code="runtime_needs_source",
                )
            record, changes = next_record(
                current.value,
                config,
                source.ref if source else None,
                datetime.now(UTC),
                build_failed=source is not None and await self._build_failed(current.value),
            )
            if not changes:
                return current, []
            if not record.env_salt:  # a record made before env digests were keyed
                record = record.model_copy(update={"env_salt": secrets.token_hex(16)})
            grows = config.replicas > current.value.spec.replicas
            if self._quotas is not None and grows:
                await self._quotas.check(
                    namespace, name, adds_function=False, replicas=config.replicas
                )
            if source is not None and "source" in changes and not stored_source:
                await self._store(source)
                stored_source = True
            try:
                stored = await self._records.update(namespace, name, record, current.revision)
            except Conflict:
                if if_match is not None:
                    raise PreconditionFailed(
                        "the function changed while this update was applied; read it again and retry"
                    ) from None
                continue
            data = FunctionUpdatedData(
                namespace=namespace,
                name=name,
                uid=record.uid,
                generation=record.generation,
                spec=FunctionSpecSummary.of(record.spec, salt=record.env_salt),
                source=record.source,
                changes=changes,
            )
            await self._publish(
                lifecycle_event(
                    FunctionUpdated,
                    data,
                    service="gateway",
                    subject=f"{namespace}/{name}",
                    key=f"{record.uid}:{record.generation}",
                )
            )
            log.info(
                "function updated",
                extra={
                    "namespace": namespace,
                    "function": name,
                    "generation": record.generation,
                    "changes": changes,
                },
            )
            return stored, changes
        raise Conflict("the function is being changed concurrently; retry")

    async def delete(self, namespace: str, name: str, if_match: str | None) -> FunctionRecord:
        for _ in range(5):
            current = await self.get(namespace, name)
            check_if_match(if_match, current)
            try:
                await self._records.delete(namespace, name, current.revision)
            except Conflict:
                if if_match is not None:
                    raise PreconditionFailed(
                        "the function changed; read it again and retry"
                    ) from None
                continue
            record = current.value
            data = FunctionDeletedData(
                namespace=namespace, name=name, uid=record.uid, generation=record.generation
            )
            await self._publish(
                lifecycle_event(
                    FunctionDeleted,
                    data,
                    service="gateway",
                    subject=f"{namespace}/{name}",
                    key=f"{record.uid}:deleted",
                )
            )
            log.info("function deleted", extra={"namespace": namespace, "function": name})
            return record
        raise Conflict("the function is being changed concurrently; retry")
