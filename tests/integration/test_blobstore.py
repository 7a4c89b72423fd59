"""The artifact store's contract, run against every backend: NATS (a real nats-server), S3
(moto's server over real HTTP) and the in-memory store."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aioboto3
import pytest

from lambdabus_platform import blobstore, s3
from lambdabus_platform.blobstore import (
    BlobRef,
    BlobStore,
    CorruptBlob,
    MemoryBlobStore,
    NatsBlobStore,
    open_blob_store,
)
from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import InvalidRequest, LambdabusError, NotFound, TemporaryError
from lambdabus_platform.s3 import S3BlobStore
from lambdabus_platform.settings import S3Settings, StoreSettings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client


@dataclass
class Backend:
    """A store plus two ways around it, straight to the backend: overwrite the bytes under a
    blob's key, and count how many times a blob's key was written."""

    store: BlobStore
    tamper: Callable[[str, bytes], Awaitable[None]]
    writes: Callable[[str], Awaitable[int]]


@pytest.fixture
async def memory_backend() -> Backend:
    store = MemoryBlobStore()

    async def tamper(sha256: str, data: bytes) -> None:
        store.blobs[sha256] = data

    async def writes(sha256: str) -> int:
        return store.writes

    return Backend(store, tamper, writes)


@pytest.fixture
async def nats_backend(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> Backend:
    written: Counter[str] = Counter()
    object_put = bus.object_put

    async def counting_put(name: str, data: bytes) -> None:
        written[name] += 1
        await object_put(name, data)

    monkeypatch.setattr(bus, "object_put", counting_put)

    async def tamper(sha256: str, data: bytes) -> None:
        await object_put(NatsBlobStore.object_name(sha256), data)

    async def writes(sha256: str) -> int:
        return written[NatsBlobStore.object_name(sha256)]

    return Backend(NatsBlobStore(bus), tamper, writes)


def _raw_client(settings: S3Settings) -> AbstractAsyncContextManager[S3Client]:
    """A client of its own, bypassing the store."""
    assert settings.secret_access_key is not None
    client: AbstractAsyncContextManager[S3Client] = aioboto3.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key.get_secret_value(),
    )
    return client


@pytest.fixture
async def s3_backend(s3_settings: S3Settings) -> AsyncIterator[Backend]:
    bucket = s3_settings.bucket
    async with S3BlobStore.open(s3_settings) as store, _raw_client(s3_settings) as raw:
        # Every write of a key becomes a version of it: "stored once" is then countable.
        await raw.put_bucket_versioning(
            Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
        )

        async def tamper(sha256: str, data: bytes) -> None:
            await raw.put_object(Bucket=bucket, Key=store.key(sha256), Body=data)

        async def writes(sha256: str) -> int:
            listing = await raw.list_object_versions(Bucket=bucket, Prefix=store.key(sha256))
            return len(listing.get("Versions", []))

        yield Backend(store, tamper, writes)


@pytest.fixture(params=["memory", "nats", "s3"])
def backend(request: pytest.FixtureRequest) -> Backend:
    fixture: Backend = request.getfixturevalue(f"{request.param}_backend")
    return fixture


def _unknown_sha() -> str:
    return hashlib.sha256(os.urandom(32)).hexdigest()


async def test_put_is_content_addressed(backend: Backend) -> None:
    data = os.urandom(1000)
    ref = await backend.store.put(data)
    assert ref == BlobRef(hashlib.sha256(data).hexdigest(), 1000)
    assert await backend.store.exists(ref.sha256)
    assert await backend.store.get(ref.sha256) == data


async def test_put_twice_stores_once(backend: Backend) -> None:
    data = os.urandom(2000)
    first = await backend.store.put(data)
    second = await backend.store.put(data)
    assert first == second
    assert await backend.writes(first.sha256) == 1
    assert await backend.store.get(first.sha256) == data


async def test_list_shows_every_blob_with_its_size_and_write_time(backend: Backend) -> None:
    """What the garbage collector sweeps: every blob, its size, when it was written."""
    before = time.time() - 5  # S3 keeps whole seconds; clocks of a server may lag a little
    one, two = await backend.store.put(os.urandom(300)), await backend.store.put(b"x" * 40)
    listed = {info.sha256: info for info in await backend.store.list()}
    for ref in (one, two):
        assert listed[ref.sha256].size == ref.size
        assert before <= listed[ref.sha256].modified <= time.time() + 5
    await backend.store.delete(one.sha256)
    assert one.sha256 not in {info.sha256 for info in await backend.store.list()}


async def test_put_of_an_old_blob_writes_it_again(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob about to be referenced again is young for the garbage collector."""
    ref = await backend.store.put(os.urandom(500))
    assert await backend.writes(ref.sha256) == 1
    monkeypatch.setattr(blobstore, "REFRESH_SECONDS", -1.0)
    monkeypatch.setattr(s3, "REFRESH_SECONDS", -1.0)
    await backend.store.put(await backend.store.get(ref.sha256))
    assert await backend.writes(ref.sha256) == 2


async def test_empty_blob_round_trips(backend: Backend) -> None:
    ref = await backend.store.put(b"")
    assert ref == BlobRef(hashlib.sha256(b"").hexdigest(), 0)
    assert await backend.store.get(ref.sha256) == b""


async def test_large_blob_round_trips(backend: Backend) -> None:
    data = os.urandom(5 * 1024 * 1024)  # many NATS object store chunks
    ref = await backend.store.put(data)
    assert ref.size == len(data)
    assert await backend.store.get(ref.sha256) == data


async def test_get_of_unknown_blob_is_not_found(backend: Backend) -> None:
    sha = _unknown_sha()
    assert not await backend.store.exists(sha)
    with pytest.raises(NotFound) as caught:
        await backend.store.get(sha)
    assert caught.value.details == {"sha256": sha}


async def test_delete_is_idempotent(backend: Backend) -> None:
    ref = await backend.store.put(os.urandom(100))
    await backend.store.delete(ref.sha256)
    assert not await backend.store.exists(ref.sha256)
    with pytest.raises(NotFound):
        await backend.store.get(ref.sha256)
    await backend.store.delete(ref.sha256)
    await backend.store.delete(_unknown_sha())


async def test_put_after_delete_stores_again(backend: Backend) -> None:
    data = os.urandom(100)
    ref = await backend.store.put(data)
    await backend.store.delete(ref.sha256)
    assert await backend.store.put(data) == ref
    assert await backend.store.get(ref.sha256) == data


@pytest.mark.parametrize(
    "sha",
    [
        "",
        "abc",
        "0" * 63,
        "0" * 65,
        "A" * 64,
        "g" * 64,
        "../" + "0" * 61,
        "0" * 64 + "\n",
    ],
)
async def test_invalid_address_is_invalid_request(backend: Backend, sha: str) -> None:
    with pytest.raises(InvalidRequest):
        await backend.store.get(sha)
    with pytest.raises(InvalidRequest):
        await backend.store.exists(sha)
    with pytest.raises(InvalidRequest):
        await backend.store.delete(sha)


async def test_tampered_blob_is_corrupt(backend: Backend) -> None:
    ref = await backend.store.put(os.urandom(300))
    await backend.tamper(ref.sha256, b"not what was stored")
    with pytest.raises(CorruptBlob) as caught:
        await backend.store.get(ref.sha256)
    error = caught.value
    assert isinstance(error, LambdabusError)
    assert error.code == "corrupt_blob"
    assert error.details["sha256"] == ref.sha256
    assert error.details["actual_sha256"] == hashlib.sha256(b"not what was stored").hexdigest()


async def test_open_blob_store_picks_nats(bus: Bus) -> None:
    async with open_blob_store(StoreSettings(backend="nats"), bus) as store:
        assert isinstance(store, NatsBlobStore)
        ref = await store.put(b"via nats")
        assert await bus.object_exists(NatsBlobStore.object_name(ref.sha256))


async def test_open_blob_store_picks_s3(bus: Bus, s3_settings: S3Settings) -> None:
    async with open_blob_store(StoreSettings(backend="s3", s3=s3_settings), bus) as store:
        assert isinstance(store, S3BlobStore)
        ref = await store.put(b"via s3")
    assert not await bus.object_exists(NatsBlobStore.object_name(ref.sha256))
    async with S3BlobStore.open(s3_settings) as again:
        assert await again.get(ref.sha256) == b"via s3"


async def test_s3_bucket_creation_is_idempotent(s3_settings: S3Settings) -> None:
    # Outside us-east-1 a second create of one's own bucket is BucketAlreadyOwnedByYou.
    settings = s3_settings.model_copy(update={"region": "eu-west-1"})

    async def open_and_put(data: bytes) -> BlobRef:
        async with S3BlobStore.open(settings) as store:
            return await store.put(data)

    refs = await asyncio.gather(*(open_and_put(bytes([i])) for i in range(3)))
    refs.append(await open_and_put(b"later"))
    async with S3BlobStore.open(settings) as store:
        for ref in refs:
            assert await store.exists(ref.sha256)


async def test_s3_unreachable_is_temporary(s3_settings: S3Settings) -> None:
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = s3_settings.model_copy(
        update={
            "endpoint_url": f"http://127.0.0.1:{port}",
            "max_attempts": 1,
            "connect_timeout": 1.0,
        }
    )
    with pytest.raises(TemporaryError):
        async with S3BlobStore.open(settings):
            pass
