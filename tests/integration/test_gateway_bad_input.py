"""Every class of bad upload is refused with a 4xx, a stable code and a message that says what
to fix — and nothing is stored: no record, no blob, no lifecycle event."""

from __future__ import annotations

import asyncio
import hashlib
import json
import stat
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from lambdabus_platform.blobstore import NatsBlobStore
from tests.integration.conftest import RunningGateway
from tests.zips import info, make_entries, make_zip, rename_bytes, set_flag_bits, zip_bomb

ENTRY = ("lambda_main.py", "async def main(request):\n    return {}\n")
NS = "bad-input"


async def _lifecycle_total(gw: RunningGateway) -> int:
    return await gw.bus.count("LIFECYCLE", "lambdabus.lifecycle.>")


async def _upload(
    gw: RunningGateway, archive: bytes, spec: dict[str, Any] | str, ns: str = NS
) -> aiohttp.ClientResponse:
    form = aiohttp.FormData()
    form.add_field(
        "spec", spec if isinstance(spec, str) else json.dumps(spec), content_type="application/json"
    )
    form.add_field("archive", archive, filename="fn.zip", content_type="application/zip")
    return await gw.http.post(f"/v1/namespaces/{ns}/functions", data=form)


async def _assert_refused(
    gw: RunningGateway,
    resp: aiohttp.ClientResponse,
    *,
    status: int,
    code: str,
    mentions: str | None = None,
    archive: bytes | None = None,
    before: int,
) -> None:
    body = await resp.json()
    assert resp.status == status, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"], body
    if mentions is not None:
        assert mentions in body["error"]["message"], body
    # nothing stored: no record, no blob, no event
    listing = await (await gw.http.get(f"/v1/namespaces/{NS}/functions")).json()
    assert listing["items"] == []
    if archive is not None:
        assert not await NatsBlobStore(gw.bus).exists(hashlib.sha256(archive).hexdigest())
    assert await _lifecycle_total(gw) == before


SPEC = {"name": "fn"}

ARCHIVES: list[tuple[str, bytes, int, str, str | None]] = [
    ("not a zip", b"this is not a zip file at all", 400, "not_a_zip", None),
    ("zip magic only", b"PK\x03\x04", 400, "not_a_zip", None),
    ("truncated zip", make_zip(dict([ENTRY]))[:-30], 400, "not_a_zip", None),
    (
        "encrypted entry",
        set_flag_bits(make_entries([ENTRY, ("secret.py", "x")]), "secret.py", 0x1),
        400,
        "encrypted_entry",
        "secret.py",
    ),
    ("dot-dot path", make_entries([ENTRY, ("../escape.py", "x")]), 400, "unsafe_path", "escape.py"),
    (
        "nested dot-dot",
        make_entries([ENTRY, ("lib/../../escape.py", "x")]),
        400,
        "unsafe_path",
        "escape.py",
    ),
    ("absolute path", make_entries([ENTRY, ("/etc/cron.d/x", "x")]), 400, "unsafe_path", "cron.d"),
    ("backslash", make_entries([ENTRY, ("lib\\evil.py", "x")]), 400, "unsafe_path", "evil.py"),
    (
        "NUL in name",
        rename_bytes(make_entries([ENTRY, ("evil\x01.py", "x")]), b"evil\x01.py", b"evil\x00.py"),
        400,
        "unsafe_path",
        "evil",
    ),
    (
        "symlink",
        make_entries([ENTRY, info("link", mode=stat.S_IFLNK | 0o777)]),
        400,
        "special_entry",
        "link",
    ),
    (
        "fifo",
        make_entries([ENTRY, info("pipe", mode=stat.S_IFIFO | 0o644)]),
        400,
        "special_entry",
        "pipe",
    ),
    (
        "device",
        make_entries([ENTRY, info("dev", mode=stat.S_IFCHR | 0o644)]),
        400,
        "special_entry",
        "dev",
    ),
    (
        "duplicate names",
        make_entries([ENTRY, ("a.py", "1"), ("a.py", "2")]),
        400,
        "duplicate_entry",
        "a.py",
    ),
    (
        "too many entries",
        make_entries([ENTRY, *[(f"f/{i}.py", "") for i in range(10_000)]]),
        400,
        "too_many_entries",
        "10000",
    ),
    (
        "no entry point",
        make_zip({"main.py": "print(1)"}),
        400,
        "missing_entrypoint",
        "lambda_main.py",
    ),
    (
        "entry point in a folder",
        make_zip({"src/lambda_main.py": "x"}),
        400,
        "missing_entrypoint",
        None,
    ),
    (
        "docs html without yml",
        make_zip({**dict([ENTRY]), "docs/lambda.html": "<p>"}),
        400,
        "incomplete_docs",
        "lambda.yml",
    ),
    (
        "docs yml without html",
        make_zip({**dict([ENTRY]), "docs/lambda.yml": "a: 1"}),
        400,
        "incomplete_docs",
        "lambda.html",
    ),
]


@pytest.mark.parametrize(
    ("archive", "status", "code", "mentions"),
    [pytest.param(a, s, c, m, id=i) for i, a, s, c, m in ARCHIVES],
)
async def test_hostile_archives(
    gateway: RunningGateway, archive: bytes, status: int, code: str, mentions: str | None
) -> None:
    before = await _lifecycle_total(gateway)
    resp = await _upload(gateway, archive, SPEC)
    await _assert_refused(
        gateway, resp, status=status, code=code, mentions=mentions, archive=archive, before=before
    )


async def test_nodejs_needs_handler_js(gateway: RunningGateway) -> None:
    before = await _lifecycle_total(gateway)
    archive = make_zip(dict([ENTRY]))
    resp = await _upload(gateway, archive, {"name": "fn", "runtime": "nodejs20"})
    await _assert_refused(
        gateway,
        resp,
        status=400,
        code="missing_entrypoint",
        mentions="handler.js",
        archive=archive,
        before=before,
    )


@pytest.mark.timeout(120)
async def test_zip_bomb_stops_at_the_real_uncompressed_size(gateway: RunningGateway) -> None:
    archive = await asyncio.to_thread(zip_bomb, 260 * 1024 * 1024)
    assert len(archive) < 2 * 1024 * 1024  # small on the wire, huge unpacked
    before = await _lifecycle_total(gateway)
    resp = await _upload(gateway, archive, SPEC)
    await _assert_refused(
        gateway, resp, status=413, code="archive_too_large", archive=archive, before=before
    )


async def test_oversized_upload_refused_before_it_is_read(gateway: RunningGateway) -> None:
    """A declared 60 MB body gets its 413 while the client has sent only a few bytes of it."""
    before = await _lifecycle_total(gateway)
    url = urlsplit(gateway.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    declared = 60 * 1024 * 1024
    writer.write(
        (
            f"POST /v1/namespaces/{NS}/functions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {gateway.token}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {declared}\r\n\r\n--b\r\n"
        ).encode()
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 413"), status_line
    headers = dict(h.split(b": ", 1) for h in head.strip().split(b"\r\n") if b": " in h)
    length = int({k.lower(): v for k, v in headers.items()}[b"content-length"])
    body = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
    assert body["error"]["code"] == "payload_too_large"
    await _assert_refused_nothing_stored(gateway, before)


async def test_oversized_chunked_upload_refused(gateway: RunningGateway) -> None:
    """Without a Content-Length the limit is enforced while reading."""
    before = await _lifecycle_total(gateway)

    async def body() -> Any:
        yield b'--b\r\nContent-Disposition: form-data; name="archive"; filename="f.zip"\r\n\r\n'
        chunk = bytes(1024 * 1024)
        for _ in range(52):
            yield chunk

    resp = await gateway.http.post(
        f"/v1/namespaces/{NS}/functions",
        data=body(),
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"
    await _assert_refused_nothing_stored(gateway, before)


async def _assert_refused_nothing_stored(gw: RunningGateway, before: int) -> None:
    listing = await (await gw.http.get(f"/v1/namespaces/{NS}/functions")).json()
    assert listing["items"] == []
    assert await _lifecycle_total(gw) == before


BAD_NAMES = [
    "Upper",
    "has.dot",
    "star*",
    "gt>",
    "with space",
    "a" * 64,
    "-lead",
    "trail-",
    "1digit",
    "",
]


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_function_names(gateway: RunningGateway, name: str) -> None:
    before = await _lifecycle_total(gateway)
    archive = make_zip(dict([ENTRY]))
    resp = await _upload(gateway, archive, {"name": name})
    await _assert_refused(
        gateway,
        resp,
        status=400,
        code="invalid_name",
        mentions="spec.name",
        archive=archive,
        before=before,
    )


@pytest.mark.parametrize("ns", ["Upper", "has.dot", "star*", "gt%3E", "with%20space", "a" * 64])
async def test_bad_namespaces(gateway: RunningGateway, ns: str) -> None:
    before = await _lifecycle_total(gateway)
    archive = make_zip(dict([ENTRY]))
    resp = await _upload(gateway, archive, SPEC, ns=ns)
    await _assert_refused(
        gateway,
        resp,
        status=400,
        code="invalid_name",
        mentions="namespace",
        archive=archive,
        before=before,
    )
    listed = await gateway.http.get(f"/v1/namespaces/{ns}/functions")
    assert listed.status == 400


@pytest.mark.parametrize(
    ("spec", "code", "mentions"),
    [
        ("{not json", "malformed_json", "not valid JSON"),
        ("[1, 2]", "malformed_json", "JSON object"),
        ({"name": "fn", "colour": "red"}, "invalid_spec", "spec.colour"),
        ({"name": "fn", "replicas": "many"}, "invalid_spec", "spec.replicas"),
        ({"name": "fn", "timeout": -1}, "invalid_spec", "spec.timeout"),
        ({"name": "fn", "env": {"A": 1}}, "invalid_spec", "spec.env.A"),
        ({"name": "fn", "env": {"1BAD": "x"}}, "invalid_spec", "spec.env"),
        ({"name": "fn", "memory": "lots"}, "invalid_spec", "spec.memory"),
        ({"runtime": "python3.11"}, "invalid_name", "spec.name"),
        ({"name": "fn", "runtime": "python2.7"}, "unsupported_runtime", "python3.11, nodejs20"),
        # env names the runtime and the sandbox depend on, and oversized values
        ({"name": "fn", "env": {"LD_PRELOAD": "/code/x.so"}}, "invalid_spec", "LD_PRELOAD"),
        ({"name": "fn", "env": {"PATH": "/code"}}, "invalid_spec", "PATH"),
        ({"name": "fn", "env": {"PYTHONPATH": "/code"}}, "invalid_spec", "PYTHONPATH"),
        ({"name": "fn", "env": {"NODE_OPTIONS": "-r x"}}, "invalid_spec", "NODE_OPTIONS"),
        ({"name": "fn", "env": {"LAMBDABUS_NATS_URL": "x"}}, "invalid_spec", "LAMBDABUS_NATS_URL"),
        ({"name": "fn", "env": {"BIG": "x" * 40_000}}, "invalid_spec", "at most 32768 bytes"),
        (
            {"name": "fn", "env": {f"V{i}": "x" * 30_000 for i in range(9)}},
            "invalid_spec",
            "at most 262144",
        ),
        (
            {"name": "fn", "env_from": {"LD_PRELOAD": {"secret": "db", "key": "k"}}},
            "invalid_spec",
            "LD_PRELOAD",
        ),
        ({"name": "fn", "secrets": ["Not_A_Label"]}, "invalid_spec", "spec.secrets"),
        ({"name": "fn", "network": "host"}, "invalid_spec", "spec.network"),
        ({"name": "fn", "pids": 1}, "invalid_spec", "spec.pids"),
        # what only the kubernetes backend runs (issue 10), on a local platform
        ({"name": "fn", "image": "ghcr.io/x/app:v1"}, "backend_unsupported", "kubernetes"),
        ({"name": "fn", "gpu": 1}, "backend_unsupported", "LAMBDABUS_BACKEND=kubernetes"),
    ],
)
async def test_bad_specs(
    gateway: RunningGateway, spec: dict[str, Any] | str, code: str, mentions: str
) -> None:
    before = await _lifecycle_total(gateway)
    archive = make_zip(dict([ENTRY]))
    resp = await _upload(gateway, archive, spec)
    await _assert_refused(
        gateway, resp, status=400, code=code, mentions=mentions, archive=archive, before=before
    )


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"name": "fn"}, "missing_source"),
        ({"name": "fn", "source": {"files": {"lambda_main.py": 1}}}, "invalid_source"),
        ({"name": "fn", "source": "print(1)"}, "invalid_source"),
        (
            {"name": "fn", "source": {"files": {"../x.py": "x", "lambda_main.py": "x"}}},
            "unsafe_path",
        ),
        ({"name": "fn", "source": {"files": {"helper.py": "x"}}}, "missing_entrypoint"),
        ({"name": "fn", "source": {"files": {}}}, "empty_source"),
    ],
)
async def test_bad_inline_sources(gateway: RunningGateway, body: dict[str, Any], code: str) -> None:
    before = await _lifecycle_total(gateway)
    resp = await gateway.http.post(f"/v1/namespaces/{NS}/functions", json=body)
    await _assert_refused(gateway, resp, status=400, code=code, before=before)


async def test_multipart_without_parts(gateway: RunningGateway) -> None:
    before = await _lifecycle_total(gateway)
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("spec", json.dumps(SPEC))
    resp = await gateway.http.post(f"/v1/namespaces/{NS}/functions", data=form)
    await _assert_refused(gateway, resp, status=400, code="missing_source", before=before)
    form = aiohttp.FormData()
    form.add_field("archive", make_zip(dict([ENTRY])), filename="f.zip")
    resp = await gateway.http.post(f"/v1/namespaces/{NS}/functions", data=form)
    await _assert_refused(gateway, resp, status=400, code="missing_spec", before=before)
    resp = await gateway.http.post(
        f"/v1/namespaces/{NS}/functions", data=b"x", headers={"Content-Type": "text/plain"}
    )
    await _assert_refused(gateway, resp, status=415, code="unsupported_media_type", before=before)


DEPENDENCIES: list[tuple[str, dict[str, str], str, str]] = [
    ("-r", {"requirements.txt": "ok\n-r /etc/shadow\n"}, "python3.11", "requirements.txt:2"),
    ("-e", {"requirements.txt": "-e ./pkg\n"}, "python3.11", "requirements.txt:1"),
    ("-c", {"requirements.txt": "-c /etc/passwd\n"}, "python3.11", "-c /etc/passwd"),
    (
        "--index-url",
        {"requirements.txt": "--index-url http://127.0.0.1:8080/simple\nx\n"},
        "python3.11",
        "--index-url",
    ),
    ("-f", {"requirements.txt": "-f /root\n"}, "python3.11", "-f /root"),
    ("git+file", {"requirements.txt": "git+file:///tmp/repo\n"}, "python3.11", "VCS"),
    ("file:", {"requirements.txt": "file:///etc/passwd\n"}, "python3.11", "file: URL"),
    ("local path", {"requirements.txt": "../pkg\n"}, "python3.11", "local path"),
    ("name @ url", {"requirements.txt": "x @ https://e.com/x.whl\n"}, "python3.11", "x @"),
    (
        "npm file:",
        {"package.json": '{"dependencies": {"x": "file:/etc"}}'},
        "nodejs20",
        "dependencies.x",
    ),
    (
        "npm github",
        {"package.json": '{"dependencies": {"x": "user/repo"}}'},
        "nodejs20",
        "GitHub",
    ),
]


@pytest.mark.parametrize(
    ("files", "runtime", "mentions"),
    [pytest.param(f, r, m, id=i) for i, f, r, m in DEPENDENCIES],
)
async def test_refused_dependency_files(
    gateway: RunningGateway, files: dict[str, str], runtime: str, mentions: str
) -> None:
    entry = ("handler.js", "exports.main = () => 1;\n") if runtime == "nodejs20" else ENTRY
    archive = make_zip({**dict([entry]), **files})
    for upload in ("archive", "inline"):
        before = await _lifecycle_total(gateway)
        if upload == "archive":
            resp = await _upload(gateway, archive, {"name": "fn", "runtime": runtime})
        else:
            resp = await gateway.http.post(
                f"/v1/namespaces/{NS}/functions",
                json={
                    "name": "fn",
                    "runtime": runtime,
                    "source": {"files": {**dict([entry]), **files}},
                },
            )
        await _assert_refused(
            gateway,
            resp,
            status=400,
            code="invalid_dependencies",
            mentions=mentions,
            archive=archive if upload == "archive" else None,
            before=before,
        )


@pytest.mark.parametrize(
    ("name", "mentions"), [("a" * 256 + ".py", "259 bytes"), ("d/" * 600 + "x.py", "1204 bytes")]
)
async def test_names_too_long(gateway: RunningGateway, name: str, mentions: str) -> None:
    archive = make_zip({**dict([ENTRY]), name: "x = 1\n"})
    before = await _lifecycle_total(gateway)
    resp = await _upload(gateway, archive, SPEC)
    await _assert_refused(
        gateway,
        resp,
        status=400,
        code="path_too_long",
        mentions=mentions,
        archive=archive,
        before=before,
    )


# -- git sources and runtime custom (the gateway's default policy: no private addresses) -----


@pytest.mark.parametrize(
    ("git", "code", "mentions"),
    [
        ({"url": "http://127.0.0.1:9/r.git", "reference": "main"}, "git_url_refused", "loopback"),
        (
            {"url": "http://169.254.169.254/r.git", "reference": "main"},
            "git_url_refused",
            "link-local",
        ),
        ({"url": "https://10.0.0.8/r.git", "reference": "main"}, "git_url_refused", "private"),
        ({"url": "http://localhost/r.git", "reference": "main"}, "git_url_refused", "loopback"),
        ({"url": "file:///etc", "reference": "main"}, "git_url_refused", "file:///etc"),
        ({"url": "git@github.com:x/y.git", "reference": "-oProxy"}, "invalid_spec", "reference"),
        (
            {"url": "https://x.example/r.git", "reference": "main", "base_dir": "../up"},
            "invalid_spec",
            "base_dir",
        ),
    ],
)
async def test_refused_git_source_stores_nothing(
    gateway: RunningGateway, git: dict[str, str], code: str, mentions: str
) -> None:
    before = await _lifecycle_total(gateway)
    resp = await gateway.http.post(
        f"/v1/namespaces/{NS}/functions", json={"name": "fn", "source": {"git": git}}
    )
    await _assert_refused(gateway, resp, status=400, code=code, mentions=mentions, before=before)


@pytest.mark.parametrize("command", [["/bin/sh", "-c", "id"], ["../../bin/sh"], []])
async def test_custom_command_outside_the_archive_stores_nothing(
    gateway: RunningGateway, command: list[str]
) -> None:
    before = await _lifecycle_total(gateway)
    archive = make_zip({"server": "#!/bin/sh\n"})
    spec = {"name": "fn", "runtime": "custom", "command": command}
    resp = await _upload(gateway, archive, spec)
    await _assert_refused(
        gateway,
        resp,
        status=400,
        code="invalid_spec",
        mentions="command",
        archive=archive,
        before=before,
    )


async def test_sync_of_a_function_that_is_not_git_sourced_is_a_409(gateway: RunningGateway) -> None:
    resp = await _upload(gateway, make_zip(dict([ENTRY])), SPEC)
    assert resp.status == 202, await resp.text()
    resp = await gateway.http.post(f"/v1/namespaces/{NS}/functions/fn/sync")
    body = await resp.json()
    assert (resp.status, body["error"]["code"]) == (409, "not_git_sourced"), body
