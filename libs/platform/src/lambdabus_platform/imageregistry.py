"""A small client of the OCI distribution API (the Docker Registry HTTP API v2): enough to give
an image that exists in one repository a tag in another without pulling it — each blob mounted
across repositories (`POST /v2/<to>/blobs/uploads/?mount=<digest>&from=<from>`), then the
manifest put under the new tag. The kubernetes builder uses it so that the same content built
for one function is tagged for another without a build Job.

Credentials come from a Docker `config.json` (the registry's `kubernetes.io/dockerconfigjson`
Secret, mounted): basic auth, and the bearer-token exchange a registry asks for with
`WWW-Authenticate: Bearer realm=...`. Registries named in `insecure` are reached over HTTP.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from lambdabus_platform.errors import LambdabusError

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(LambdabusError):
    """The registry refused or failed a request (the caller builds the image instead)."""

    code = "registry_error"


@dataclass(frozen=True, slots=True)
class ImageName:
    """`<registry>/<repository>:<tag>`."""

    registry: str
    repository: str
    tag: str

    @classmethod
    def parse(cls, ref: str) -> ImageName:
        host, _, rest = ref.partition("/")
        repository, colon, tag = rest.rpartition(":")
        if not host or not rest or not colon or not repository or "@" in ref:
            raise ValueError(f"not <registry>/<repository>:<tag>: {ref!r}")
        return cls(host, repository, tag)

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"


def docker_auths(config: Mapping[str, Any]) -> dict[str, str]:
    """The `Authorization` header (basic) per registry host from a Docker `config.json`'s
    `auths`."""
    found: dict[str, str] = {}
    for host, entry in (config.get("auths") or {}).items():
        if not isinstance(entry, dict):
            continue
        user, password = entry.get("username"), entry.get("password")
        if entry.get("auth"):
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        if user:
            name = re.sub(r"^https?://", "", str(host)).split("/")[0]
            found[name] = aiohttp.encode_basic_auth(str(user), str(password or ""))
    return found


def referenced_blobs(manifest: Mapping[str, Any]) -> list[str]:
    """The blobs an image manifest names (its config and layers)."""
    blobs = []
    config = manifest.get("config") or {}
    if config.get("digest"):
        blobs.append(str(config["digest"]))
    blobs += [str(layer["digest"]) for layer in manifest.get("layers") or [] if layer.get("digest")]
    return blobs


def child_manifests(manifest: Mapping[str, Any]) -> list[str]:
    """The per-platform manifests an index (manifest list) names."""
    return [str(m["digest"]) for m in manifest.get("manifests") or [] if m.get("digest")]


class ImageRegistry:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        insecure: Iterable[str] = (),
        auths: Mapping[str, str] | None = None,
    ) -> None:
        self._session = session
        self._insecure = set(insecure)
        self._auths = dict(auths or {})
        self._tokens: dict[tuple[str, str], str] = {}

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, *, insecure: Iterable[str] = (), auth_file: Path | None = None, timeout: float = 30
    ) -> AsyncIterator[ImageRegistry]:
        auths = docker_auths(json.loads(auth_file.read_text())) if auth_file else {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            yield cls(session, insecure=insecure, auths=auths)

    def _url(self, host: str, path: str) -> str:
        scheme = "http" if host in self._insecure else "https"
        return f"{scheme}://{host}/v2/{path}"

    async def _request(
        self,
        method: str,
        host: str,
        path: str,
        scope: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One request, authenticated as the registry asks (basic, or a bearer token)."""
        for attempt in range(2):
            sent = dict(headers or {})
            token = self._tokens.get((host, scope))
            if token:
                sent["Authorization"] = f"Bearer {token}"
            elif host in self._auths:
                sent["Authorization"] = self._auths[host]
            try:
                async with self._session.request(
                    method, self._url(host, path), headers=sent, data=data
                ) as response:
                    body = await response.read()
                    if response.status == 401 and attempt == 0:
                        challenge = response.headers.get("WWW-Authenticate", "")
                        if challenge.lower().startswith("bearer "):
                            await self._token(host, scope, challenge)
                            continue
                    return response.status, response.headers, body
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise RegistryError(f"registry {host}: {method} {path}: {exc!r}") from exc
        raise RegistryError(f"registry {host}: {method} {path}: still unauthorized")

    async def _token(self, host: str, scope: str, challenge: str) -> None:
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.pop("realm", "")
        if not realm:
            raise RegistryError(f"registry {host}: a bearer challenge without a realm")
        params["scope"] = scope
        try:
            basic = {"Authorization": self._auths[host]} if host in self._auths else {}
            async with self._session.get(realm, params=params, headers=basic) as got:
                if got.status != 200:
                    raise RegistryError(f"registry {host}: token refused ({got.status})")
                body = await got.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise RegistryError(f"registry {host}: token: {exc!r}") from exc
        token = body.get("token") or body.get("access_token")
        if not token:
            raise RegistryError(f"registry {host}: the token answer has no token")
        self._tokens[(host, scope)] = str(token)

    async def exists(self, image: ImageName) -> bool:
        status, _, _ = await self._request(
            "HEAD",
            image.registry,
            f"{image.repository}/manifests/{image.tag}",
            f"repository:{image.repository}:pull",
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )
        return status == 200

    async def tag(self, source: ImageName, target: ImageName) -> None:
        """Give `source`'s manifest the name `target` (same registry): every blob mounted into
        the target repository, then the manifest (an index's children first) put there."""
        if source.registry != target.registry:
            raise RegistryError("tagging across registries needs a copy, not a mount")
        host = source.registry
        scope = f"repository:{target.repository}:pull,push repository:{source.repository}:pull"
        body, media_type = await self._manifest(host, source.repository, source.tag, scope)
        manifest = json.loads(body)
        for child in child_manifests(manifest):
            child_body, child_type = await self._manifest(host, source.repository, child, scope)
            await self._mount_all(host, source, target, json.loads(child_body), scope)
            await self._put_manifest(host, target.repository, child, child_body, child_type, scope)
        await self._mount_all(host, source, target, manifest, scope)
        await self._put_manifest(host, target.repository, target.tag, body, media_type, scope)

    async def _manifest(
        self, host: str, repository: str, ref: str, scope: str
    ) -> tuple[bytes, str]:
        status, headers, body = await self._request(
            "GET",
            host,
            f"{repository}/manifests/{ref}",
            scope,
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )
        if status != 200:
            raise RegistryError(f"registry {host}: no manifest {repository}:{ref} ({status})")
        media_type = headers.get("Content-Type") or json.loads(body).get("mediaType") or ""
        return body, media_type.split(";")[0]

    async def _mount_all(
        self,
        host: str,
        source: ImageName,
        target: ImageName,
        manifest: Mapping[str, Any],
        scope: str,
    ) -> None:
        for digest in referenced_blobs(manifest):
            status, headers, _ = await self._request(
                "POST",
                host,
                f"{target.repository}/blobs/uploads/?mount={digest}&from={source.repository}",
                scope,
            )
            if status == 201:
                continue
            if status == 202 and headers.get("Location"):  # not mounted: give the upload up
                location = headers["Location"]
                path = location.split("/v2/", 1)[-1]
                with contextlib.suppress(RegistryError):
                    await self._request("DELETE", host, path, scope)
            raise RegistryError(
                f"registry {host}: blob {digest} not mounted from {source.repository} ({status})"
            )

    async def _put_manifest(
        self, host: str, repository: str, ref: str, body: bytes, media_type: str, scope: str
    ) -> None:
        status, _, answer = await self._request(
            "PUT",
            host,
            f"{repository}/manifests/{ref}",
            scope,
            headers={"Content-Type": media_type},
            data=body,
        )
        if status not in (200, 201):
            raise RegistryError(
                f"registry {host}: manifest {repository}:{ref} refused ({status}): "
                f"{answer[:200].decode(errors='replace')}"
            )
