"""The gateway with Kubeless uploads: tars and single files turned into the stored zip, the
`dependencies` part, handlers, labels and their filter — and refusals that store nothing."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from typing import Any

import aiohttp

from lambdabus_platform.blobstore import NatsBlobStore
from tests.integration.conftest import RunningGateway

NS = "kubeless"
HELLOGET = b'def foo(event, context):\n    return "hello world"\n'


def tar_gz(files: dict[str, bytes], *, link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return gzip.compress(buffer.getvalue())


async def upload(
    gw: RunningGateway,
    spec: dict[str, Any],
    archive: bytes | None,
    filename: str,
    dependencies: bytes | None = None,
    method: str = "POST",
) -> tuple[int, dict[str, Any]]:
    form = aiohttp.FormData()
    form.add_field("spec", json.dumps(spec), content_type="application/json")
    if archive is not None:
        form.add_field("archive", archive, filename=filename)
    if dependencies is not None:
        form.add_field("dependencies", dependencies, filename="requirements.txt")
    path = f"/v1/namespaces/{NS}/functions"
    if method == "PUT":
        path += f"/{spec['name']}"
    async with gw.http.request(method, path, data=form) as resp:
        return resp.status, await resp.json()


async def stored_files(gw: RunningGateway, record: dict[str, Any]) -> dict[str, bytes]:
    blob = await NatsBlobStore(gw.bus).get(record["source"]["sha256"])
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


async def names(gw: RunningGateway, query: str = "") -> list[str]:
    async with gw.http.get(f"/v1/namespaces/{NS}/functions{query}") as resp:
        body = await resp.json()
        assert resp.status == 200, body
        return sorted(item["name"] for item in body["items"])


async def test_a_single_file_is_stored_under_the_handlers_module(gateway: RunningGateway) -> None:
    spec = {"name": "get-python", "handler": "helloget.foo", "labels": {"tier": "web"}}
    status, record = await upload(gateway, spec, HELLOGET, "hello-loop.py")
    assert status == 202, record
    assert record["source"]["entrypoint"] == "helloget.py"
    assert record["spec"]["handler"] == "helloget.foo"
    assert await stored_files(gateway, record) == {"helloget.py": HELLOGET}

    # labels filter the list
    other = {"name": "other", "handler": "helloget.foo", "labels": {"tier": "db"}}
    assert (await upload(gateway, other, HELLOGET, "helloget.py"))[0] == 202
    assert await names(gateway, "?label=tier=web") == ["get-python"]
    assert await names(gateway, "?label=tier") == ["get-python", "other"]
    assert await names(gateway, "?label=tier=web&label=tier=db") == []
    async with gateway.http.get(f"/v1/namespaces/{NS}/functions?label==x") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_label_selector"


async def test_a_tar_with_dependencies_replacing_its_own(gateway: RunningGateway) -> None:
    archive = tar_gz({"./hellowithdeps.py": HELLOGET, "requirements.txt": b"nonexistent\n"})
    spec = {"name": "deps", "handler": "hellowithdeps.foo"}
    status, record = await upload(gateway, spec, archive, "f.bin", dependencies=b"humanize\n")
    assert status == 202, record
    files = await stored_files(gateway, record)
    assert files == {"hellowithdeps.py": HELLOGET, "requirements.txt": b"humanize\n"}

    # a refused dependency line is refused in the part too, naming it
    spec = {"name": "deps-bad", "handler": "hellowithdeps.foo"}
    status, body = await upload(gateway, spec, archive, "f.tgz", dependencies=b"-r /etc/passwd\n")
    assert status == 400, body
    assert body["error"]["code"] == "invalid_dependencies"


async def test_the_handler_cannot_move_to_another_module_without_source(
    gateway: RunningGateway,
) -> None:
    spec = {"name": "moving", "handler": "helloget.foo"}
    assert (await upload(gateway, spec, HELLOGET, "helloget.py"))[0] == 202
    patch = f"/v1/namespaces/{NS}/functions/moving"
    headers = {"Content-Type": "application/merge-patch+json"}
    async with gateway.http.patch(patch, json={"handler": "other.foo"}, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 400, body
        assert body["error"]["code"] == "handler_needs_source"
    # another function of the same module: a new build of the same source
    async with gateway.http.patch(patch, json={"handler": "helloget.bar"}, headers=headers) as resp:
        body = await resp.json()
        assert resp.status == 202, body
        assert body["generation"] == 2


async def test_bad_kubeless_uploads_store_nothing(gateway: RunningGateway) -> None:
    good = {"name": "bad", "handler": "helloget.foo"}
    cases: list[tuple[dict[str, Any], bytes | None, str, bytes | None, str]] = [
        (good, tar_gz({"../helloget.py": HELLOGET}), "f.tgz", None, "unsafe_path"),
        (good, tar_gz({"/helloget.py": HELLOGET}), "f.tgz", None, "unsafe_path"),
        (good, tar_gz({"helloget.py": HELLOGET}, link="x.py"), "f.tgz", None, "special_entry"),
        (good, HELLOGET, "notes.txt", None, "not_a_source_file"),
        (good, tar_gz({"hello.py": HELLOGET}), "f.tgz", None, "missing_handler_module"),
        ({"name": "bad", "handler": "foo"}, HELLOGET, "helloget.py", None, "invalid_spec"),
        (good, None, "", b"humanize\n", "missing_source"),
        ({"name": "bad", "labels": {"-x": "y"}}, HELLOGET, "lambda_main.py", None, "invalid_spec"),
    ]
    before = await names(gateway)
    for spec, archive, filename, dependencies, code in cases:
        status, body = await upload(gateway, spec, archive, filename, dependencies)
        assert status == 400, (code, body)
        assert body["error"]["code"] == code, body
    assert "bad" not in before
    assert await names(gateway) == before
