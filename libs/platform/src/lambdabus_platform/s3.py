"""The S3 adapter: the one module that talks to aioboto3/botocore.

`S3BlobStore` keeps artifact blobs under `<prefix><sha256 hex>` in one bucket (AWS, MinIO, or
moto's server in tests), and turns botocore's errors into the platform's.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, cast

import aioboto3
import aiohttp
import botocore.exceptions
from aiobotocore.config import AioConfig

from lambdabus_platform.blobstore import (
    REFRESH_SECONDS,
    BlobInfo,
    BlobRef,
    CorruptBlob,
    not_found,
    validate_sha256,
    verified,
)
from lambdabus_platform.errors import NotFound, PermanentError, TemporaryError
from lambdabus_platform.settings import S3Settings

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.literals import BucketLocationConstraintType

_HEX = re.compile(r"[0-9a-f]{64}")
_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})
_TRANSIENT = frozenset(
    {
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ServiceUnavailable",
        "InternalError",
    }
)


@contextlib.contextmanager
def _s3_errors(action: str, key: str | None = None) -> Iterator[None]:
    """Re-raise botocore's errors as platform errors: NotFound, TemporaryError, PermanentError."""
    what = f"S3 {action}" + (f" of {key}" if key else "")
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        error: Any = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        details = {"s3_code": code, "s3_status": status}
        if code in _MISSING:
            raise NotFound(f"{what}: not found", details=details) from exc
        if code in _TRANSIENT or status >= 500:
            raise TemporaryError(f"{what} failed ({code}); retry", details=details) from exc
        raise PermanentError(
            f"{what} failed: {code}: {error.get('Message', '')}; check the S3 settings",
            code="storage_error",
            details=details,
        ) from exc
    except botocore.exceptions.FlexibleChecksumError as exc:
        raise CorruptBlob(
            f"{what}: the bytes S3 returned fail their stored checksum; upload the blob again",
            details={"key": key},
        ) from exc
    except (
        botocore.exceptions.ConnectionError,
        botocore.exceptions.HTTPClientError,
        botocore.exceptions.IncompleteReadError,
        aiohttp.ClientError,
        TimeoutError,
    ) as exc:
        raise TemporaryError(f"{what} failed: cannot reach S3: {exc}; retry") from exc
    except botocore.exceptions.NoCredentialsError as exc:
        raise PermanentError(
            f"{what} failed: no S3 credentials; set LAMBDABUS_S3_ACCESS_KEY_ID and "
            "LAMBDABUS_S3_SECRET_ACCESS_KEY or provide an AWS credential source",
            code="storage_error",
        ) from exc


class S3BlobStore:
    """Blobs as objects `<prefix><hex>` in one bucket, through one aioboto3 client."""

    def __init__(self, client: S3Client, bucket: str, prefix: str) -> None:
        self._client = client
        self._bucket = bucket
        self._prefix = prefix

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: S3Settings) -> AsyncIterator[S3BlobStore]:
        """A client for the context's lifetime; creates the bucket if it does not exist."""
        async with _client(settings) as client:
            store = cls(client, settings.bucket, settings.prefix)
            await _ensure_bucket(client, settings.bucket, settings.region)
            yield store

    def key(self, sha256: str) -> str:
        return f"{self._prefix}{validate_sha256(sha256)}"

    async def put(self, data: bytes) -> BlobRef:
        digest = hashlib.sha256(data).digest()
        ref = BlobRef(digest.hex(), len(data))
        key = self.key(ref.sha256)
        modified = await self._modified(key)
        if modified is not None and time.time() - modified <= REFRESH_SECONDS:
            return ref
        with _s3_errors("put", key):
            await self._client.put_object(
                Bucket=self._bucket,
                Key=key,
                Body=data,
                ContentType="application/octet-stream",
                # S3 rejects the upload if what arrives does not hash to this.
                ChecksumSHA256=base64.b64encode(digest).decode(),
            )
        return ref

    async def get(self, sha256: str) -> bytes:
        key = self.key(sha256)
        try:
            with _s3_errors("get", key):
                response = await self._client.get_object(Bucket=self._bucket, Key=key)
                async with response["Body"] as body:
                    data = await body.read()
        except NotFound:
            raise not_found(sha256) from None
        return verified(sha256, data)

    async def exists(self, sha256: str) -> bool:
        key = self.key(sha256)
        try:
            with _s3_errors("head", key):
                await self._client.head_object(Bucket=self._bucket, Key=key)
        except NotFound:
            return False
        return True

    async def delete(self, sha256: str) -> None:
        key = self.key(sha256)
        with _s3_errors("delete", key):
            await self._client.delete_object(Bucket=self._bucket, Key=key)

    async def _modified(self, key: str) -> float | None:
        try:
            with _s3_errors("head", key):
                head = await self._client.head_object(Bucket=self._bucket, Key=key)
        except NotFound:
            return None
        return head["LastModified"].timestamp()

    async def list(self) -> list[BlobInfo]:
        found: list[BlobInfo] = []
        with _s3_errors("list"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=self._prefix
            )
            async for page in pages:
                for item in page.get("Contents", []):
                    digest = item.get("Key", "").removeprefix(self._prefix)
                    if _HEX.fullmatch(digest):
                        found.append(
                            BlobInfo(
                                digest,
                                item.get("Size", 0),
                                item["LastModified"].timestamp()
                                if "LastModified" in item
                                else time.time(),
                            )
                        )
        return found


@contextlib.asynccontextmanager
async def _client(settings: S3Settings) -> AsyncIterator[S3Client]:
    credentials: dict[str, str] = {}
    if settings.access_key_id is not None:
        credentials["aws_access_key_id"] = settings.access_key_id
    if settings.secret_access_key is not None:
        credentials["aws_secret_access_key"] = settings.secret_access_key.get_secret_value()
    config = AioConfig(
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        # MinIO and other self-hosted endpoints rarely resolve virtual-host bucket names.
        s3={"addressing_style": "path"} if settings.endpoint_url else None,
    )
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        config=config,
        **credentials,
    ) as client:
        yield client


async def _ensure_bucket(client: S3Client, bucket: str, region: str) -> None:
    try:
        with _s3_errors("head bucket", bucket):
            await client.head_bucket(Bucket=bucket)
        return
    except NotFound:
        pass
    try:
        with _s3_errors("create bucket", bucket):
            if region == "us-east-1":
                await client.create_bucket(Bucket=bucket)
            else:
                await client.create_bucket(
                    Bucket=bucket,
                    CreateBucketConfiguration={
                        "LocationConstraint": cast("BucketLocationConstraintType", region)
                    },
                )
    except PermanentError as exc:
        # Another replica created it between our head and create: that is what we wanted.
        if exc.details.get("s3_code") != "BucketAlreadyOwnedByYou":
            raise


class S3Objects:
    """Objects by key in one bucket (the kubernetes builder's build contexts, which Kaniko
    reads as `s3://<bucket>/<key>`)."""

    def __init__(self, client: S3Client, bucket: str) -> None:
        self._client = client
        self.bucket = bucket

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: S3Settings, bucket: str) -> AsyncIterator[S3Objects]:
        """A client for the context's lifetime (S3 endpoint and credentials from `settings`,
        bucket `bucket`, created when missing)."""
        async with _client(settings) as client:
            await _ensure_bucket(client, bucket, settings.region)
            yield cls(client, bucket)

    async def put(self, key: str, data: bytes, content_type: str = "application/gzip") -> None:
        digest = hashlib.sha256(data).digest()
        with _s3_errors("put", key):
            await self._client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=data,
                ContentType=content_type,
                ChecksumSHA256=base64.b64encode(digest).decode(),
            )

    async def get(self, key: str) -> bytes:
        with _s3_errors("get", key):
            response = await self._client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                return await body.read()

    async def delete(self, key: str) -> None:
        with _s3_errors("delete", key):
            await self._client.delete_object(Bucket=self.bucket, Key=key)
