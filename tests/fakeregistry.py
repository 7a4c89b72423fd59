"""An OCI distribution API (registry v2) in-process over real HTTP, for the image tagging tests:
manifests by tag and digest, blobs per repository, cross-repository mounts, and auth as a
registry asks it (basic, or a bearer-token challenge). It keeps no layer bytes: a test "pushes"
an image by naming its blobs, as Kaniko's push would leave them."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class FakeRegistry:
    user: str = "pusher"
    password: str = "secret"
    bearer: bool = False  # challenge with a token realm instead of basic auth
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, set[str]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    host: str = ""

    def push(self, repository: str, tag: str, layers: list[bytes]) -> str:
        """An image as a push leaves it: its blobs in the repository, its manifest tagged."""
        config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}
        blobs = [json.dumps(config).encode(), *layers]
        digests = ["sha256:" + hashlib.sha256(b).hexdigest() for b in blobs]
        self.blobs.setdefault(repository, set()).update(digests)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digests[0],
                "size": len(blobs[0]),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": d,
                    "size": len(b),
                }
                for d, b in zip(digests[1:], blobs[1:], strict=True)
            ],
        }
        body = json.dumps(manifest).encode()
        self._store(repository, tag, body, MANIFEST)
        return "sha256:" + hashlib.sha256(body).hexdigest()

    def _store(self, repository: str, ref: str, body: bytes, media_type: str) -> None:
        self.manifests[(repository, ref)] = (body, media_type)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.manifests[(repository, digest)] = (body, media_type)

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        if self.bearer:
            return header == "Bearer fake-token"
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return header == f"Basic {expected}"

    def _challenge(self) -> web.Response:
        if self.bearer:
            value = f'Bearer realm="http://{self.host}/token",service="fake"'
        else:
            value = 'Basic realm="fake"'
        return web.Response(status=401, headers={"WWW-Authenticate": value})

    async def _token(self, request: web.Request) -> web.Response:
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {expected}":
            return web.Response(status=401)
        return web.json_response({"token": "fake-token"})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        repository, ref = request.match_info["repo"], request.match_info["ref"]
        self.requests.append((request.method, request.path_qs))
        if not self._authorized(request):
            return self._challenge()
        if request.method == "PUT":
            body = await request.read()
            manifest = json.loads(body)
            names = [
                manifest["config"]["digest"],
                *(layer["digest"] for layer in manifest["layers"]),
            ]
            missing = [n for n in names if n not in self.blobs.get(repository, set())]
            if missing:
                return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=400)
            self._store(repository, ref, body, request.headers["Content-Type"])
            return web.Response(status=201)
        found = self.manifests.get((repository, ref))
        if found is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        body, media_type = found
        if request.method == "HEAD":
            return web.Response(status=200, headers={"Content-Type": media_type})
        return web.Response(status=200, body=body, headers={"Content-Type": media_type})

    async def _upload(self, request: web.Request) -> web.Response:
        repository = request.match_info["repo"]
        self.requests.append((request.method, request.path_qs))
        if not self._authorized(request):
            return self._challenge()
        digest, source = request.query.get("mount"), request.query.get("from")
        if digest and source and digest in self.blobs.get(source, set()):
            self.blobs.setdefault(repository, set()).add(digest)
            return web.Response(status=201)
        return web.Response(status=202, headers={"Location": f"/v2/{repository}/blobs/uploads/x"})

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[FakeRegistry]:
        app = web.Application()
        app.router.add_route("*", r"/v2/{repo:.+}/manifests/{ref}", self._manifest)
        app.router.add_post(r"/v2/{repo:.+}/blobs/uploads/", self._upload)
        app.router.add_get("/token", self._token)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.host = f"127.0.0.1:{port}"
        try:
            yield self
        finally:
            await runner.cleanup()
