"""The console's static files (`lambdabus_gateway.console`) over real HTTP: the policy headers,
pre-compressed bundles, nothing outside the directory, and a clear 404 when it is not built."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from lambdabus_gateway.console import add_console_routes


@pytest.fixture
def built(tmp_path: Path) -> Path:
    ui = tmp_path / "ui"
    ui.mkdir()
    (ui / "index.html").write_text('<!doctype html><script type="module" src="app.js"></script>')
    (ui / "app.js").write_text("export const x = 1;\n" * 100)
    (ui / "app.js.gz").write_bytes(gzip.compress((ui / "app.js").read_bytes()))
    (ui / ".env").write_text("SECRET=1")
    (tmp_path / "secret.txt").write_text("outside")
    (ui / "link.js").symlink_to(tmp_path / "secret.txt")
    return ui


async def _client(directory: Path) -> TestClient[web.Request, web.Application]:
    app = web.Application()
    add_console_routes(app, directory)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def client(built: Path) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    client = await _client(built)
    yield client
    await client.close()


async def test_the_page_comes_with_a_strict_policy(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.get("/ui/")
    assert response.status == 200
    assert response.content_type == "text/html"
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp
    assert "default-src 'none'" in csp
    assert "unsafe" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert response.headers["Cache-Control"] == "no-cache"
    moved = await client.get("/ui", allow_redirects=False)
    assert (moved.status, moved.headers["Location"]) == (308, "/ui/")


async def test_a_bundle_is_sent_compressed_to_a_browser_that_takes_gzip(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.get("/ui/app.js", headers={"Accept-Encoding": "gzip"})
    assert response.status == 200
    assert response.headers["Content-Encoding"] == "gzip"
    assert response.content_type in ("text/javascript", "application/javascript")
    assert (await response.text()).startswith("export const x")
    plain = await client.get("/ui/app.js", headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers


@pytest.mark.parametrize(
    "path",
    [
        "/ui/.env",
        "/ui/..%2Fsecret.txt",
        "/ui/%2e%2e/secret.txt",
        "/ui/x/../../secret.txt",
        "/ui/nothing.js",
        "/ui/a/b",
    ],
)
async def test_nothing_outside_the_console_files_is_served(
    client: TestClient[web.Request, web.Application], path: str
) -> None:
    response = await client.get(path)
    assert response.status == 404
    assert "outside" not in await response.text()
    assert "SECRET" not in await response.text()


async def test_a_symlink_out_of_the_directory_is_not_followed(
    client: TestClient[web.Request, web.Application],
) -> None:
    response = await client.get("/ui/link.js")
    assert response.status == 404
    assert "outside" not in await response.text()


async def test_a_gateway_without_the_built_console_says_how_to_build_it(tmp_path: Path) -> None:
    client = await _client(tmp_path)
    try:
        response = await client.get("/ui/")
        assert response.status == 404
        error = json.loads(await response.text())["error"]
        assert error["code"] == "console_not_built"
        assert "make console" in error["message"]
    finally:
        await client.close()
