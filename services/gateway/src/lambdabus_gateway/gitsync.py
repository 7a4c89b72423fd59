"""Git-sourced functions: fetching a reference's commit as the function's source archive at
create/replace, and polling the reference afterwards (every `git_poll_interval` seconds, or when
`POST .../functions/{name}/sync` asks).

A new commit becomes a new source archive in the artifact store and a new generation of the
record, written with compare-and-set: the record holds the last commit seen, so gateway
replicas polling together write it once (the loser's retry finds the commit already there and
changes nothing), and the builder builds it through the ordinary `function.updated` path. A
failed poll changes no generation: it records `SourceUpdateFailed` and why in the record's
`source.git`, which the status shows as the `ConfigurationReady` condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from lambdabus_events.models import GitSource, GitSourceState
from lambdabus_platform.errors import InvalidRequest, InvalidSpec, PermanentError
from lambdabus_platform.gitsource import GitClient, GitCredentials, GitPolicy, check_url
from lambdabus_platform.secretbox import SecretKeyError
from lambdabus_platform.secretstore import SecretStore

if TYPE_CHECKING:
    from lambdabus_events.models import FunctionRecord
    from lambdabus_gateway.functions import Functions
    from lambdabus_platform.registry import Versioned

log = logging.getLogger("lambdabus.gateway.git")

_PARALLEL_POLLS = 4
_NEEDS: dict[str, tuple[str, ...]] = {"basic": ("username", "password"), "key": ("key",)}


class GitSources:
    """Fetches git sources for the gateway: the API's URL check, the secret's credentials, and
    the commit's base_dir as a zip."""

    def __init__(self, *, policy: GitPolicy, secrets: SecretStore | None) -> None:
        self._policy = policy
        self._client = GitClient(policy)
        self._secrets = secrets

    async def check(self, source: GitSource) -> None:
        """400 for a URL of a refused form or host (checked again at every fetch)."""
        await check_url(source, self._policy)

    async def credentials(self, namespace: str, source: GitSource) -> GitCredentials | None:
        if source.auth is None:
            return None
        found = await self._secrets.get(namespace, source.auth.secret) if self._secrets else None
        if found is None or self._secrets is None:
            raise InvalidSpec(
                f"source.git.auth.secret: no secret {source.auth.secret!r} in namespace "
                f"{namespace}; create it first",
                code="secret_not_found",
            )
        try:
            values = self._secrets.values(found.secret)
        except SecretKeyError as exc:
            raise InvalidSpec(
                f"the secret {source.auth.secret!r} cannot be read: {exc}",
                code="secret_unreadable",
            ) from None
        missing = [k for k in _NEEDS[source.auth.type] if k not in values]
        if missing:
            raise InvalidSpec(
                f"the secret {source.auth.secret!r} has no key {', '.join(missing)}: "
                f"{source.auth.type} auth needs {', '.join(_NEEDS[source.auth.type])}",
                code="invalid_git_secret",
            )
        return GitCredentials(source.auth.type, values)

    async def resolve(self, namespace: str, source: GitSource) -> str:
        """The commit the reference names now."""
        return await self._client.resolve(source, await self.credentials(namespace, source))

    async def fetch(
        self, namespace: str, source: GitSource, commit: str | None = None
    ) -> tuple[bytes, GitSourceState]:
        """The archive of base_dir at `commit` (default: what the reference names now), and
        the source's state to store with it."""
        credentials = await self.credentials(namespace, source)
        if commit is None:
            commit = await self._client.resolve(source, credentials)
        fetched = await self._client.fetch(source, commit, credentials)
        return fetched.archive, updated(source, fetched.commit)


def updated(source: GitSource, commit: str, now: datetime | None = None) -> GitSourceState:
    """The state of a source whose reference was just found at `commit`. Pure."""
    return GitSourceState(
        **source.model_dump(),
        commit=commit,
        reason="SourceUpdated",
        message=f"{source.reference} is at commit {commit[:12]}",
        checked_at=now or datetime.now(UTC),
    )


def update_failed(state: GitSourceState, error: str, now: datetime) -> GitSourceState:
    """The state after a poll that failed: the commit stays, the reason says why. Pure."""
    return state.model_copy(
        update={
            "reason": "SourceUpdateFailed",
            "message": f"cannot update from {state.reference}: {error}"[:2048],
            "checked_at": now,
        }
    )


class GitSync:
    """Polls every git-sourced function's reference; `sync_one` is also the sync route."""

    def __init__(self, *, functions: Functions, sources: GitSources, interval: float) -> None:
        self._functions = functions
        self._sources = sources
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._poll_forever(), name="git-sync")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sync_all()
            except Exception:
                log.exception("polling git sources failed; trying again at the next interval")

    async def sync_all(self) -> None:
        """Poll every git-sourced function, a few at a time (one slow server does not hold
        up the others for longer than its timeout)."""
        slots = asyncio.Semaphore(_PARALLEL_POLLS)

        async def poll(namespace: str, name: str) -> None:
            async with slots:
                try:
                    await self.sync_one(namespace, name)
                except Exception:
                    log.exception(
                        "cannot poll a git source",
                        extra={"namespace": namespace, "function": name},
                    )

        await asyncio.gather(
            *(
                poll(item.value.namespace, item.value.name)
                for item in await self._functions.everywhere()
                if item.value.source.git is not None
            )
        )

    async def sync_one(self, namespace: str, name: str) -> Versioned[FunctionRecord]:
        """Look at the function's reference now; a new commit becomes a new generation."""
        current = await self._functions.get(namespace, name)
        state = current.value.source.git
        if state is None:
            raise InvalidRequest(
                f"function {namespace}/{name} is not git-sourced: nothing to sync",
                code="not_git_sourced",
                status=409,
            )
        source = state.source()
        now = datetime.now(UTC)
        try:
            commit = await self._sources.resolve(namespace, source)
            if commit == state.commit:
                return await self._functions.record_git_state(
                    namespace, name, state, updated(source, commit, now)
                )
            archive, new_state = await self._sources.fetch(namespace, source, commit)
            result = await self._functions.sync_git_source(
                namespace, name, state, archive, new_state
            )
        except PermanentError as exc:
            failed = update_failed(state, exc.message, now)
            if (state.reason, state.message) != (failed.reason, failed.message):
                log.warning(  # once per new failure, not at every poll
                    "git source update failed",
                    extra={"namespace": namespace, "function": name, "error": exc.message},
                )
            return await self._functions.record_git_state(namespace, name, state, failed)
        log.info(
            "git source synced",
            extra={"namespace": namespace, "function": name, "commit": new_state.commit[:12]},
        )
        return result
