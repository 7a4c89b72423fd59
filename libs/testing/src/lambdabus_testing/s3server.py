"""pytest fixtures: moto's S3 server over real HTTP on an ephemeral port, one per test session,
and `S3Settings` pointing at it with a fresh bucket per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from moto.server import ThreadedMotoServer
from pydantic import SecretStr

from lambdabus_platform.settings import S3Settings


@pytest.fixture(scope="session")
def moto_s3_url() -> Iterator[str]:
    """The base URL of a moto server; `start()` returns once its socket is bound."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_settings(moto_s3_url: str) -> S3Settings:
    return S3Settings(
        endpoint_url=moto_s3_url,
        region="us-east-1",
        bucket=f"test-{uuid.uuid4().hex[:20]}",
        access_key_id="testing",
        secret_access_key=SecretStr("testing"),
        prefix="sha256/",
    )
