"""The artifact store: source archives and build artifacts, content-addressed by sha256.

`BlobStore` is the protocol; `NatsBlobStore` (the embedded default, over the bus's object store),
`S3BlobStore` (in `s3.py`) and `MemoryBlobStore` (for tests) implement it, and
`open_blob_store` picks one from `StoreSettings`.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import InvalidRequest, LambdabusError, NotFound
from lambdabus_platform.settings import StoreSettings

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class BlobRef:
    """The address of a stored blob: its sha256 (64 lowercase hex characters) and its size."""

    sha256: str
    size: int

    @classmethod
    def of(cls, data: bytes) -> BlobRef:
        return cls(hashlib.sha256(data).hexdigest(), len(data))


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob as a listing shows it: its address, size, and when it was last written
    (seconds since the epoch; `put` writes an old blob again, see `REFRESH_SECONDS`)."""

    sha256: str
    size: int
    modified: float


# `put` of bytes already stored writes them again when the stored copy is older than this, so
# that a blob about to be referenced again is young for the garbage collector (whose grace
# period must be longer than this plus an upload's time between storing and recording).
REFRESH_SECONDS = 60.0


class CorruptBlob(LambdabusError):
    """What the backend returned does not hash to the address it was stored under."""

    code = "corrupt_blob"


class BlobStore(Protocol):
    async def put(self, data: bytes) -> BlobRef:
        """Store `data` under its sha256; storing bytes already present writes nothing, unless
        the stored copy is older than `REFRESH_SECONDS` (then it is written again)."""
        ...

    async def get(self, sha256: str) -> bytes:
        """The blob's bytes, verified; NotFound if absent, CorruptBlob if they do not match."""
        ...

    async def exists(self, sha256: str) -> bool: ...

    async def delete(self, sha256: str) -> None:
        """Remove the blob; deleting an absent blob is not an error."""
        ...

    async def list(self) -> list[BlobInfo]:
        """Every blob stored (for the garbage collector)."""
        ...


def validate_sha256(sha256: str) -> str:
    """`sha256` if it is 64 lowercase hex characters; InvalidRequest otherwise."""
    if not _SHA256_HEX.fullmatch(sha256):
        raise InvalidRequest(
            "a blob address must be a sha256 digest of 64 lowercase hex characters",
            details={"sha256": sha256[:100]},
        )
    return sha256


def verified(sha256: str, data: bytes) -> bytes:
    """`data` if it hashes to `sha256`; CorruptBlob otherwise."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise CorruptBlob(
            f"blob {sha256} is corrupt in the store: its {len(data)} bytes hash to {actual}; "
            "upload it again",
            details={"sha256": sha256, "actual_sha256": actual, "size": len(data)},
        )
    return data


def not_found(sha256: str) -> NotFound:
    return NotFound(f"blob {sha256} not found", details={"sha256": sha256})


class NatsBlobStore:
    """Blobs in the NATS object store declared on `bus`, named `sha256/<hex>`."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    @staticmethod
    def object_name(sha256: str) -> str:
        return f"sha256/{validate_sha256(sha256)}"

    async def put(self, data: bytes) -> BlobRef:
        ref = BlobRef.of(data)
        name = self.object_name(ref.sha256)
        modified = await self._bus.object_modified(name)
        if modified is None or time.time() - modified > REFRESH_SECONDS:
            await self._bus.object_put(name, data)
        return ref

    async def get(self, sha256: str) -> bytes:
        name = self.object_name(sha256)
        try:
            data = await self._bus.object_get(name)
        except NotFound:
            raise not_found(sha256) from None
        return verified(sha256, data)

    async def exists(self, sha256: str) -> bool:
        return await self._bus.object_exists(self.object_name(sha256))

    async def delete(self, sha256: str) -> None:
        await self._bus.object_delete(self.object_name(sha256))

    async def list(self) -> list[BlobInfo]:
        return [
            BlobInfo(o.name.removeprefix("sha256/"), o.size, o.modified)
            for o in await self._bus.object_list()
            if o.name.startswith("sha256/") and _SHA256_HEX.fullmatch(o.name[7:])
        ]


class MemoryBlobStore:
    """A dict of blobs for unit tests; `blobs` and `writes` are there to be inspected."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.written: dict[str, float] = {}
        self.writes = 0

    async def put(self, data: bytes) -> BlobRef:
        ref = BlobRef.of(data)
        now = time.time()
        if ref.sha256 not in self.blobs or now - self.written[ref.sha256] > REFRESH_SECONDS:
            self.blobs[ref.sha256] = bytes(data)
            self.written[ref.sha256] = now
            self.writes += 1
        return ref

    async def get(self, sha256: str) -> bytes:
        try:
            data = self.blobs[validate_sha256(sha256)]
        except KeyError:
            raise not_found(sha256) from None
        return verified(sha256, data)

    async def exists(self, sha256: str) -> bool:
        return validate_sha256(sha256) in self.blobs

    async def delete(self, sha256: str) -> None:
        self.blobs.pop(validate_sha256(sha256), None)
        self.written.pop(sha256, None)

    async def list(self) -> list[BlobInfo]:
        return [BlobInfo(k, len(v), self.written[k]) for k, v in self.blobs.items()]


@contextlib.asynccontextmanager
async def open_blob_store(settings: StoreSettings, bus: Bus) -> AsyncIterator[BlobStore]:
    """The backend named by `settings.backend`, for the duration of the context.

    For `nats`, `bus` must have been declared (its object store is `ARTIFACTS_BUCKET`).
    """
    if settings.backend == "s3":
        from lambdabus_platform.s3 import S3BlobStore  # aioboto3 is imported only when used

        async with S3BlobStore.open(settings.s3) as store:
            yield store
    else:
        yield NatsBlobStore(bus)
