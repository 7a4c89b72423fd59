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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

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
    GitSource,
    GitSourceState,
    Runtime,
    SourceRef,
)
from lambdabus_gateway.quotas import Quotas
from lambdabus_gateway.revisions import Revisions
from lambdabus_gateway.uploads import Upload, parse_config, parse_spec, refuse_platform_fields
from lambdabus_platform.archive import ArchiveLimits, build_inline_archive, inspect_archive
from lambdabus_platform.blobstore import BlobStore
from lambdabus_platform.bus import Bus
from lambdabus_platform.dependencies import DEPENDENCY_FILE_LIMITS, check_dependency_files
from lambdabus_platform.errors import (
    AlreadyExists,
    Conflict,
    InvalidName,
    InvalidRequest,
    InvalidSpec,
    NotFound,
    PreconditionFailed,
)
from lambdabus_platform.httpauth import CURRENT_ACTOR
from lambdabus_platform.registry import Registry, Versioned
from lambdabus_platform.uploadformats import handler_modules, to_zip, with_dependencies

if TYPE_CHECKING:
    from lambdabus_gateway.gitsync import GitSources

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
    new_source = source is not None and (
        build_failed
        or source.sha256 != current.source.sha256
        or _git_spec(source) != _git_spec(current.source)
    )
    # Another handler is called from another build (the builder checks it and records it).
    new_handler = config.handler != current.spec.handler
    # LUNA's user_docker_commands go into the image (kubernetes backend): another build.
    new_recipe = config.user_docker_commands != current.spec.user_docker_commands
    if new_source or new_handler or new_recipe or config.runtime != current.spec.runtime:
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


def parse_label_selectors(values: list[str]) -> list[tuple[str, str | None]]:
    """`?label=k=v` (equal) or `?label=k` (present), each given once per `label`. Pure."""
    selectors: list[tuple[str, str | None]] = []
    for value in values:
        key, eq, wanted = value.partition("=")
        if not key:
            raise InvalidRequest(
                f"label selector {value!r} has no key: use ?label=key=value or ?label=key",
                code="invalid_label_selector",
            )
        selectors.append((key, wanted if eq else None))
    return selectors


def labels_match(labels: dict[str, str], selectors: list[tuple[str, str | None]]) -> bool:
    """Whether `labels` satisfy every selector. Pure."""
    return all(
        key in labels and (wanted is None or labels[key] == wanted) for key, wanted in selectors
    )


def _git_spec(source: SourceRef) -> GitSource | None:
    return source.git.source() if source.git is not None else None


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


class BackendUnsupported(InvalidSpec):
    code = "backend_unsupported"


def check_backend(config: FunctionConfig, backend: str) -> None:
    """Refuse what the platform's backend cannot run: a prebuilt `image` or `gpu` on local."""
    if backend != "local":
        return
    if config.image:
        raise BackendUnsupported(
            f"spec.image {config.image!r} (a prebuilt image) runs only on the kubernetes "
            "backend (LAMBDABUS_BACKEND=kubernetes); this platform runs functions locally: "
            "send source to build instead"
        )
    if config.gpu:
        raise BackendUnsupported(
            f"spec.gpu {config.gpu} needs the kubernetes backend (LAMBDABUS_BACKEND=kubernetes); "
            "this platform runs functions locally, without GPUs"
        )


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
        git: GitSources | None = None,
        revisions: Revisions | None = None,
        backend: str = "local",
    ) -> None:
        self._backend = backend
        self._revisions = revisions
        self._git = git
        self._bus = bus
        self._builds = builds
        self._records = records
        self._blobs = blobs
        self._limits = limits
        self._quotas = quotas
        self._allow_unsafe_requirements = allow_unsafe_requirements
        self._namespaces: tuple[float, list[str]] | None = None

    async def _prepare_source(
        self, upload: Upload, runtime: Runtime, namespace: str, handler: str | None = None
    ) -> Source | None:
        if upload.git is not None:
            if self._git is None:
                raise InvalidSpec("this gateway takes no git sources", code="git_disabled")
            await self._git.check(upload.git)  # the URL's form and host first: a 400
            data, git = await self._git.fetch(namespace, upload.git)
            return await self._source_of(data, "git", runtime, git, upload, handler)
        if upload.archive is not None:
            data, kind = upload.archive, "archive"
        elif upload.inline_files is not None:
            data, kind = build_inline_archive(upload.inline_files), "inline"
        else:
            return None
        return await self._source_of(data, kind, runtime, None, upload, handler)

    async def _source_of(
        self,
        data: bytes,
        kind: str,
        runtime: Runtime,
        git: GitSourceState | None,
        upload: Upload | None,
        handler: str | None,
    ) -> Source:
        modules = handler_modules(runtime, handler) if handler is not None else None
        # Decompressing up to the limit is CPU work: keep it off the event loop.
        if kind == "archive":
            data, _ = await asyncio.to_thread(
                to_zip,
                data,
                runtime=runtime,
                handler=handler,
                filename=upload.archive_name if upload is not None else None,
                limits=self._limits,
            )
        info = await asyncio.to_thread(
            inspect_archive, data, runtime, self._limits, DEPENDENCY_FILE_LIMITS, modules
        )
        if upload is not None and upload.dependencies is not None:
            data = await asyncio.to_thread(
                with_dependencies, data, runtime, upload.dependencies, self._limits
            )
            info = await asyncio.to_thread(
                inspect_archive, data, runtime, self._limits, DEPENDENCY_FILE_LIMITS, modules
            )
        check_dependency_files(runtime, info.kept, allow_unsafe=self._allow_unsafe_requirements)
        ref = SourceRef(
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            kind=kind,  # type: ignore[arg-type]
            entrypoint=info.entrypoint,
            files=info.files,
            git=git,
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

    async def namespaces(self) -> list[str]:
        """Every namespace that holds a function; asked of NATS at most once a second (any
        token may ask, and the answer costs a consumer and a read of every key)."""
        now = time.monotonic()
        if self._namespaces is None or now - self._namespaces[0] > 1.0:
            self._namespaces = (now, sorted(await self._records.namespaces()))
        return self._namespaces[1]

    async def create(self, namespace: str, upload: Upload) -> Versioned[FunctionRecord]:
        spec = parse_spec(upload.fields)
        check_backend(spec, self._backend)
        if await self._records.get(namespace, spec.name) is not None:
            raise AlreadyExists(
                f"function {namespace}/{spec.name} already exists; use PUT to replace it",
                code="function_exists",
            )
        if self._quotas is not None:
            await self._quotas.check(
                namespace, spec.name, adds_function=True, replicas=spec.replicas
            )
        source = await self._prepare_source(upload, spec.runtime, namespace, spec.handler)
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
        if self._revisions is not None:
            await self._revisions.record(record)
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
        source = await self._prepare_source(upload, spec.runtime, namespace, spec.handler)
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
        guard: Callable[[FunctionRecord], bool] | None = None,
    ) -> tuple[Versioned[FunctionRecord], list[Change]]:
        stored_source = False
        for _ in range(5):
            current = await self.get(namespace, name)
            check_if_match(if_match, current)
            if guard is not None and not guard(current.value):
                return current, []
            config: FunctionConfig = config_of(current.value)
            check_backend(config, self._backend)
            if source is None and config.runtime != current.value.spec.runtime:
                raise InvalidSpec(
                    "changing the runtime needs new source: send the archive with the new runtime",
                    code="runtime_needs_source",
                )
            if (
                source is None
                and config.handler != current.value.spec.handler
                and current.value.source.entrypoint
                not in handler_modules(config.runtime, config.handler)
            ):
                raise InvalidSpec(
                    f"the handler {config.handler!r} names another module than the stored "
                    f"source's {current.value.source.entrypoint}: send the archive with it",
                    code="handler_needs_source",
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
                if self._revisions is not None:
                    await self._revisions.record(record)
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

    # -- git sources (the poller's writes; see gitsync.py) ------------------------------------

    async def everywhere(self) -> list[Versioned[FunctionRecord]]:
        return await self._records.everywhere()

    async def sync_git_source(
        self,
        namespace: str,
        name: str,
        seen: GitSourceState,
        archive: bytes,
        state: GitSourceState,
    ) -> Versioned[FunctionRecord]:
        """A new commit of a git source: its archive becomes the function's source (a new
        generation) unless the record's git source changed meanwhile. Compare-and-set: of two
        replicas that found the same commit, one writes it; the other finds no change."""
        current = await self.get(namespace, name)
        spec = current.value.spec
        source = await self._source_of(archive, "git", spec.runtime, state, None, spec.handler)

        def same_source(record: FunctionRecord) -> bool:
            return _git_spec(record.source) == seen.source()

        stored, changes = await self._update(
            namespace, name, None, lambda record: record.spec, source, guard=same_source
        )
        if changes:
            return stored
        # The same files at another commit (or moved meanwhile): record what was seen.
        return await self.record_git_state(namespace, name, seen, state)

    async def record_git_state(
        self, namespace: str, name: str, seen: GitSourceState, state: GitSourceState
    ) -> Versioned[FunctionRecord]:
        """Store a poll's outcome in the record's `source.git` (no new generation, no event),
        when the record still has the source polled and the outcome is news."""
        for _ in range(5):
            current = await self.get(namespace, name)
            git = current.value.source.git
            if git is None or git.source() != seen.source():
                return current
            if state.reason == "SourceUpdateFailed":
                state = git.model_copy(
                    update={
                        "reason": state.reason,
                        "message": state.message,
                        "checked_at": state.checked_at,
                    }
                )
            if (git.commit, git.reason, git.message) == (state.commit, state.reason, state.message):
                return current
            record = current.value.model_copy(
                update={"source": current.value.source.model_copy(update={"git": state})}
            )
            try:
                return await self._records.update(namespace, name, record, current.revision)
            except Conflict:
                continue
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
            if self._revisions is not None:
                await self._revisions.forget(namespace, name)
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
