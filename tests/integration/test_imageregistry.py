"""`lambdabus_platform.imageregistry` against an OCI distribution API over real HTTP
(`tests.fakeregistry`): an image tagged into another repository by blob mounts and a manifest
put, with basic auth and with a bearer-token challenge; a blob that cannot be mounted fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lambdabus_platform.imageregistry import ImageName, ImageRegistry, RegistryError, docker_auths
from tests.fakeregistry import FakeRegistry


def auth_file(tmp_path: Path, host: str, user: str = "pusher", password: str = "secret") -> Path:
    import base64

    path = tmp_path / "config.json"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


@pytest.mark.parametrize("bearer", [False, True])
async def test_tag_into_another_repository(tmp_path: Path, bearer: bool) -> None:
    async with FakeRegistry(bearer=bearer).serve() as fake:
        fake.push("ns-one", "abc", [b"layer-1", b"layer-2"])
        source = ImageName.parse(f"{fake.host}/ns-one:abc")
        target = ImageName.parse(f"{fake.host}/ns-two:abc")
        async with ImageRegistry.open(
            insecure=[fake.host], auth_file=auth_file(tmp_path, fake.host)
        ) as registry:
            assert await registry.exists(source)
            assert not await registry.exists(target)
            await registry.tag(source, target)
            assert await registry.exists(target)
        assert fake.manifests[("ns-two", "abc")] == fake.manifests[("ns-one", "abc")]
        mounts = [path for method, path in fake.requests if method == "POST"]
        assert len(mounts) == 3  # the config and two layers
        assert all("from=ns-one" in path for path in mounts)


async def test_wrong_credentials_and_unmountable_blobs_fail(tmp_path: Path) -> None:
    async with FakeRegistry().serve() as fake:
        fake.push("ns-one", "abc", [b"layer"])
        source = ImageName.parse(f"{fake.host}/ns-one:abc")
        target = ImageName.parse(f"{fake.host}/ns-two:abc")
        wrong = auth_file(tmp_path, fake.host, password="nope")
        async with ImageRegistry.open(insecure=[fake.host], auth_file=wrong) as registry:
            with pytest.raises(RegistryError, match="no manifest"):
                await registry.tag(source, target)
        fake.blobs["ns-one"].clear()  # the blobs are gone: nothing to mount
        right = auth_file(tmp_path, fake.host)
        async with ImageRegistry.open(insecure=[fake.host], auth_file=right) as registry:
            with pytest.raises(RegistryError, match="not mounted"):
                await registry.tag(source, target)
        assert ("ns-two", "abc") not in fake.manifests


def test_names_and_auths() -> None:
    assert ImageName.parse("r.io:5000/ns-fn:abc") == ImageName("r.io:5000", "ns-fn", "abc")
    with pytest.raises(ValueError, match="not <registry>"):
        ImageName.parse("ns-fn")
    auths = docker_auths({"auths": {"https://r.io/v1/": {"username": "u", "password": "p"}}})
    assert auths["r.io"] == "Basic dTpw"
