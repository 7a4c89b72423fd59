"""Token records in the `tokens` KV bucket, and the cache every gateway and router replica
checks requests against.

The cache is fed by a KV watch, so a revoked (deleted) token is refused everywhere as soon as
the watch delivers the deletion (milliseconds; the tests hold it to 1 s). A token not in the
cache is looked up in KV once, so a token minted on another replica works at once too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from lambdabus_platform.bus import Kv
from lambdabus_platform.errors import AlreadyExists, Conflict, NotFound
from lambdabus_platform.tokens import (
    BOOTSTRAP_KEY,
    Minted,
    Role,
    TokenRecord,
    is_token_id,
    mint,
    parse_token,
    secret_matches,
    utcnow,
)

log = logging.getLogger("lambdabus.tokens")


@dataclass(frozen=True)
class Verdict:
    """The outcome of checking a presented token: its record, or why it is refused."""

    record: TokenRecord | None
    problem: str = ""


def _decode(value: bytes) -> TokenRecord | None:
    if not value:
        return None
    try:
        return TokenRecord.model_validate_json(value)
    except ValidationError:
        return None


class TokenStore:
    """The `tokens` bucket: create, list, revoke, and verify through a watched cache."""

    def __init__(self, kv: Kv) -> None:
        self._kv = kv
        self._cache: dict[str, TokenRecord] = {}
        # Revoked here, their deletion not yet seen by the watch: a lagging watch may still
        # deliver the token's earlier record, which must not bring it back.
        self._revoked: set[str] = set()
        self._ready = asyncio.Event()

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[TokenStore]:
        """Keep the cache current for the life of the context."""
        task = asyncio.create_task(self._follow())
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), 10)
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self) -> None:
        delay = 0.1
        while True:
            try:
                seen: dict[str, TokenRecord] = {}
                for entry in await self._kv.values(">"):
                    record = _decode(entry.value)
                    if record is not None and record.id == entry.key:
                        seen[entry.key] = record
                self._revoked &= set(seen)  # the others' deletions are read
                self._cache = seen
                self._ready.set()
                async for entry in self._kv.watch(">"):
                    self._apply(entry.key, entry.value)
                    delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("token watch failed; re-opening", extra={"error": repr(exc)})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _apply(self, key: str, value: bytes) -> None:
        record = _decode(value)
        if record is None or record.id != key:
            self._cache.pop(key, None)
            self._revoked.discard(key)  # its deletion, in order: nothing older comes after
        elif key not in self._revoked:
            self._cache[key] = record

    async def verify(self, token: str) -> Verdict:
        """Check a presented token: well-formed, known, its secret right, not expired."""
        parsed = parse_token(token)
        if parsed is None:
            return Verdict(None, "the token is malformed (expected lbt_<id>_<secret>)")
        token_id, secret = parsed
        if token_id in self._revoked:
            return Verdict(None, "the token is unknown or revoked")
        record = self._cache.get(token_id)
        if record is None:
            entry = await self._kv.get(token_id)
            record = _decode(entry.value) if entry is not None else None
            if record is not None and record.id != token_id:
                record = None
        if not secret_matches(record, secret) or record is None:
            return Verdict(None, "the token is unknown or revoked")
        if record.expired(utcnow()):
            return Verdict(None, "the token has expired")
        return Verdict(record)

    async def create(
        self,
        name: str,
        role: Role,
        namespaces: list[str] | tuple[str, ...],
        *,
        expires_in: float | None = None,
        created_by: str | None = None,
    ) -> Minted:
        minted = mint(
            name, role, namespaces, now=utcnow(), expires_in=expires_in, created_by=created_by
        )
        await self._kv.create(minted.record.id, minted.record.model_dump_json().encode())
        self._cache[minted.record.id] = minted.record
        return minted

    async def list(self) -> list[TokenRecord]:
        records = [
            r
            for e in await self._kv.values(">")
            if (r := _decode(e.value)) is not None and r.id == e.key
        ]
        return sorted(records, key=lambda r: (r.created_at, r.id))

    async def revoke(self, token_id: str) -> TokenRecord:
        entry = await self._kv.get(token_id) if is_token_id(token_id) else None
        record = _decode(entry.value) if entry is not None else None
        if entry is None or record is None:
            raise NotFound(f"no token {token_id!r}", code="token_not_found")
        await self._forget(token_id)
        return record

    async def _forget(self, token_id: str) -> None:
        """Delete a token: refused here at once, whatever the watch still has to deliver."""
        self._revoked.add(token_id)  # refused here even if the delete's answer is lost
        self._cache.pop(token_id, None)
        await self._kv.delete(token_id)

    async def bootstrap_admin(self, path: Path, *, renew: bool = False) -> bool:
        """On a platform's first start, mint an admin token for every namespace and write it to
        `path` (mode 0600). Only one replica ever does (compare-and-set on a bootstrap record);
        nothing happens when `path` exists or the bootstrap happened before, unless `renew`
        (the operator lost the file: a new one is minted, the old bootstrap token revoked).
        True if it minted."""
        if path.exists():
            return False
        before = await self._kv.get(BOOTSTRAP_KEY)
        if before is not None and not renew:
            log.warning(
                "the admin token was bootstrapped before but its file is gone; mint another "
                "with an admin token (`lambdabus token create`), or restart with "
                "`lambdabus up --renew-admin-token`",
                extra={"path": str(path)},
            )
            return False
        minted = await self.create("bootstrap-admin", "admin", ["*"])
        try:
            if before is None:
                await self._kv.create(BOOTSTRAP_KEY, minted.record.id.encode())
            else:
                await self._kv.update(BOOTSTRAP_KEY, minted.record.id.encode(), before.revision)
        except (AlreadyExists, Conflict):  # another replica won: it writes the file
            await self._forget(minted.record.id)
            return False
        if before is not None:
            old = before.value.decode(errors="replace")
            if is_token_id(old):
                await self._forget(old)
        write_secret_file(path, minted.token + "\n")
        log.info("bootstrapped an admin token", extra={"path": str(path), "id": minted.record.id})
        return True


def write_secret_file(path: Path, text: str) -> None:
    """Write `text` to `path` readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
