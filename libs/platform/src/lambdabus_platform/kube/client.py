"""The one adapter to the Kubernetes API (kubernetes-asyncio): apply, get, patch, delete, list,
watch and pod logs on plain dicts, as the renderers produce them.

Faults are handled here once: an API server that is unreachable or answers 5xx/429 is retried
with back-off for `retry_for` seconds, then `KubeUnavailable` (reason `ClusterUnavailable`); a
409 on create re-reads the object and patches it (the re-read's resourceVersion as precondition,
so a concurrent writer makes it read and try again); a 403 is `KubeForbidden` naming the verb and
resource the platform's service account lacks; a watch that expires (410 Gone) lists again and
resumes — the consumer gets the whole list (`SYNC`) and cannot miss a transition.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config

from lambdabus_platform.errors import LambdabusError, PermanentError, TemporaryError
from lambdabus_platform.kube.settings import KubeApiSettings

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Propagation = Literal["Foreground", "Background", "Orphan"]
EventType = Literal["ADDED", "MODIFIED", "DELETED", "SYNC", "UNAVAILABLE"]

REASON_UNAVAILABLE = "ClusterUnavailable"


# -- resources ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resource:
    """A kind of object and where the API serves it."""

    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    @property
    def base(self) -> str:
        return (
            f"/api/{self.api_version}"
            if "/" not in self.api_version
            else (f"/apis/{self.api_version}")
        )

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        parts = [self.base]
        if self.namespaced and namespace is not None:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        return "/".join(parts)

    def describe(self) -> str:
        group = self.api_version.rpartition("/")[0]
        return f"{self.plural}.{group}" if group else self.plural


NAMESPACES = Resource("v1", "Namespace", "namespaces", namespaced=False)
SECRETS = Resource("v1", "Secret", "secrets")
SERVICES = Resource("v1", "Service", "services")
PODS = Resource("v1", "Pod", "pods")
CONFIGMAPS = Resource("v1", "ConfigMap", "configmaps")
EVENTS = Resource("v1", "Event", "events")
DEPLOYMENTS = Resource("apps/v1", "Deployment", "deployments")
JOBS = Resource("batch/v1", "Job", "jobs")
HPAS = Resource("autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers")
NETWORK_POLICIES = Resource("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies")
ROLE_BINDINGS = Resource("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings")
ROLES = Resource("rbac.authorization.k8s.io/v1", "Role", "roles")
LEASES = Resource("coordination.k8s.io/v1", "Lease", "leases")

RESOURCES: dict[tuple[str, str], Resource] = {
    (r.api_version, r.kind): r
    for r in (
        NAMESPACES,
        SECRETS,
        SERVICES,
        PODS,
        CONFIGMAPS,
        EVENTS,
        DEPLOYMENTS,
        JOBS,
        HPAS,
        NETWORK_POLICIES,
        ROLE_BINDINGS,
        ROLES,
        LEASES,
    )
}


def resource_of(obj: Mapping[str, Any]) -> Resource:
    """The resource of a rendered object (by its apiVersion and kind)."""
    key = (str(obj.get("apiVersion", "")), str(obj.get("kind", "")))
    try:
        return RESOURCES[key]
    except KeyError:
        raise KubeError(f"unknown Kubernetes kind {key[1]!r} of {key[0]!r}") from None


def selector_string(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def matches(obj: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether an object carries all `labels` (the server filters too; this keeps a stream that
    does not — or an emulator — from feeding foreign objects to the consumer)."""
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(key) == value for key, value in labels.items())


# -- errors ---------------------------------------------------------------------------------


class KubeError(LambdabusError):
    """The Kubernetes API refused or failed a request."""

    status = 502
    code = "kubernetes_error"

    def __init__(self, message: str, *, reason: str = "", http_status: int = 0, **kw: Any):
        super().__init__(message, **kw)
        self.reason = reason
        self.http_status = http_status


class KubeUnavailable(TemporaryError):
    """The API server could not be reached or answered 5xx/429 for longer than `retry_for`."""

    code = "cluster_unavailable"
    reason = REASON_UNAVAILABLE


class KubeForbidden(KubeError, PermanentError):
    """RBAC refused a request: `verb` on `resource` (in `namespace`) must be granted to the
    platform's service account."""

    status = 502
    code = "kubernetes_forbidden"

    def __init__(self, verb: str, resource: str, namespace: str | None, detail: str) -> None:
        where = f" in namespace {namespace!r}" if namespace else " (cluster-wide)"
        super().__init__(
            f"the platform's service account may not {verb} {resource}{where}: grant "
            f"'{verb}' on '{resource}' to it (deploy/kubernetes/rbac.yaml); the API server "
            f"said: {detail}",
            reason="Forbidden",
            http_status=403,
            details={"verb": verb, "resource": resource, "namespace": namespace},
        )
        self.verb = verb
        self.resource = resource
        self.namespace = namespace


class KubeNotFound(KubeError):
    status = 404
    code = "kubernetes_not_found"


class KubeConflict(KubeError):
    status = 409
    code = "kubernetes_conflict"


class KubeInvalid(KubeError):
    """The API server rejected the object (400/422): a renderer or spec bug, not transient."""

    status = 422
    code = "kubernetes_invalid"


class WatchGone(KubeError):
    """The watch's resourceVersion is too old (410 Gone): list again."""

    code = "kubernetes_gone"


def _status_body(body: Any) -> Obj:
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if isinstance(body, str):
        try:
            parsed = json.loads(body)
        except ValueError:
            return {"message": body[:500]}
        return parsed if isinstance(parsed, dict) else {}
    return body if isinstance(body, dict) else {}


def _error(
    http_status: int, body: Any, verb: str, resource: Resource, namespace: str | None
) -> LambdabusError:
    status = _status_body(body)
    reason = str(status.get("reason") or "")
    message = str(status.get("message") or reason or f"HTTP {http_status}")
    what = f"{verb} {resource.describe()}" + (f" in {namespace}" if namespace else "")
    if http_status == 403:
        return KubeForbidden(verb, resource.describe(), namespace, message)
    if http_status == 404:
        return KubeNotFound(f"{what}: {message}", reason=reason, http_status=404)
    if http_status == 409:
        return KubeConflict(f"{what}: {message}", reason=reason, http_status=409)
    if http_status == 410:
        return WatchGone(f"{what}: {message}", reason=reason, http_status=410)
    if http_status in (400, 422):
        return KubeInvalid(f"{what}: {message}", reason=reason, http_status=http_status)
    if http_status == 429 or http_status >= 500 or http_status == 0:
        return KubeUnavailable(f"{what}: the API server answered {http_status}: {message}")
    return KubeError(f"{what}: {message}", reason=reason, http_status=http_status)


_CONNECTION_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, OSError)


# -- watch events ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change of an object (ADDED/MODIFIED/DELETED); or `SYNC` — the complete current list
    (`items`), after the first list and after every re-list (410 Gone, a broken stream), so the
    consumer replaces its view and misses nothing that happened in between; or `UNAVAILABLE` —
    the API server cannot be reached now (`message`), the watch keeps trying."""

    type: EventType
    object: Obj = field(default_factory=dict)
    items: tuple[Obj, ...] = ()
    message: str = ""


# -- the client -----------------------------------------------------------------------------


class KubeClient:
    """Dict-in, dict-out access to one cluster. Use `async with KubeClient.connect(...)`."""

    def __init__(self, api: ApiClient, settings: KubeApiSettings | None = None) -> None:
        self._api = api
        self._settings = settings or KubeApiSettings()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, settings: KubeApiSettings | None = None, *, configuration: Configuration | None = None
    ) -> AsyncIterator[KubeClient]:
        """A client from `configuration`, else the kubeconfig (`KUBECONFIG`), else the
        in-cluster service account, else ~/.kube/config."""
        settings = settings or KubeApiSettings()
        config = configuration or await load_configuration(settings)
        api = ApiClient(configuration=config)
        try:
            yield cls(api, settings)
        finally:
            await api.close()

    @property
    def host(self) -> str:
        return str(self._api.configuration.host)

    # -- plumbing ---------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        verb: str,
        resource: Resource,
        namespace: str | None,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        retry: bool = True,
    ) -> Any:
        """One request, retried with back-off while the server is unavailable."""
        s = self._settings
        deadline = time.monotonic() + (s.retry_for if retry else 0.0)
        delay = s.backoff_initial
        while True:
            try:
                return await self._api.call_api(
                    path,
                    method,
                    query_params=list((query or {}).items()),
                    header_params={"Accept": "application/json", "Content-Type": content_type},
                    body=body,
                    response_types_map={200: "object", 201: "object", 202: "object"},
                    auth_settings=["BearerToken"],
                    _return_http_data_only=True,
                    _request_timeout=s.request_timeout,
                )
            except ApiException as exc:
                error = _error(int(exc.status or 0), exc.body, verb, resource, namespace)
            except _CONNECTION_ERRORS as exc:
                error = KubeUnavailable(
                    f"{verb} {resource.describe()}: cannot reach the API server at "
                    f"{self.host}: {exc!r}"
                )
            if not isinstance(error, KubeUnavailable) or time.monotonic() + delay > deadline:
                raise error
            log.debug("kubernetes: %s; retrying in %.1fs", error.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, s.backoff_max)

    @asynccontextmanager
    async def _stream(
        self,
        path: str,
        query: Mapping[str, str],
        *,
        verb: str,
        resource: Resource,
        namespace: str | None,
        read_timeout: float | None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streaming GET (watch, follow); raises the typed error for a non-2xx answer."""
        try:
            response: aiohttp.ClientResponse = await self._api.call_api(
                path,
                "GET",
                query_params=list(query.items()),
                header_params={"Accept": "application/json, */*"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(
                    connect=self._settings.request_timeout, sock_read=read_timeout
                ),
            )
        except _CONNECTION_ERRORS as exc:
            raise KubeUnavailable(
                f"{verb} {resource.describe()}: cannot reach the API server at {self.host}: {exc!r}"
            ) from exc
        try:
            if not 200 <= response.status <= 299:
                body = await response.read()
                raise _error(response.status, body, verb, resource, namespace)
            yield response
        finally:
            response.close()

    # -- objects ----------------------------------------------------------------------------

    async def get(self, resource: Resource, namespace: str | None, name: str) -> Obj | None:
        """The object, or None when there is none."""
        try:
            result = await self._call(
                "GET",
                resource.path(namespace, name),
                verb="get",
                resource=resource,
                namespace=namespace,
            )
        except KubeNotFound:
            return None
        return dict(result)

    async def create(self, obj: Mapping[str, Any]) -> Obj:
        resource = resource_of(obj)
        namespace = (obj.get("metadata") or {}).get("namespace")
        result = await self._call(
            "POST",
            resource.path(namespace),
            verb="create",
            resource=resource,
            namespace=namespace,
            body=dict(obj),
        )
        return dict(result)

    async def patch(
        self, resource: Resource, namespace: str | None, name: str, patch: Mapping[str, Any]
    ) -> Obj:
        """A JSON merge patch (RFC 7386: maps merge, lists are replaced)."""
        result = await self._call(
            "PATCH",
            resource.path(namespace, name),
            verb="patch",
            resource=resource,
            namespace=namespace,
            body=dict(patch),
            content_type="application/merge-patch+json",
        )
        return dict(result)

    async def apply(self, obj: Mapping[str, Any], *, attempts: int = 5) -> Obj:
        """Create the object, or bring the existing one to it: on 409 read it again and patch
        with its resourceVersion as precondition; a concurrent change (409) or delete (404)
        in between starts over."""
        result, _ = await self.upsert(obj, attempts=attempts)
        return result

    async def ensure(self, obj: Mapping[str, Any]) -> bool:
        """Create the object unless it exists (never changed: for objects the platform may
        create but not update, such as namespaces and RoleBindings). True when created."""
        try:
            await self.create(obj)
        except KubeConflict:
            return False
        return True

    async def upsert(self, obj: Mapping[str, Any], *, attempts: int = 5) -> tuple[Obj, bool]:
        """`apply`, also saying whether the object was created (True) or updated."""
        resource = resource_of(obj)
        meta = obj.get("metadata") or {}
        namespace, name = meta.get("namespace"), str(meta.get("name", ""))
        last: KubeError | None = None
        for _ in range(attempts):
            try:
                return await self.create(obj), True
            except KubeConflict as exc:
                last = exc
            current = await self.get(resource, namespace, name)
            if current is None:
                continue
            desired = json.loads(json.dumps(dict(obj)))
            version = (current.get("metadata") or {}).get("resourceVersion")
            if version:
                desired.setdefault("metadata", {})["resourceVersion"] = version
            try:
                return await self.patch(resource, namespace, name, desired), False
            except (KubeConflict, KubeNotFound) as exc:
                last = exc
        raise KubeConflict(
            f"apply {resource.describe()} {name!r}: still conflicting after {attempts} attempts"
            + (f" ({last.message})" if last is not None else "")
        )

    async def delete(
        self,
        resource: Resource,
        namespace: str | None,
        name: str,
        *,
        propagation: Propagation = "Background",
    ) -> bool:
        """Delete an object (its dependents by `propagation`); False when it was not there."""
        try:
            await self._call(
                "DELETE",
                resource.path(namespace, name),
                verb="delete",
                resource=resource,
                namespace=namespace,
                body={
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "propagationPolicy": propagation,
                },
            )
        except KubeNotFound:
            return False
        return True

    async def list(
        self,
        resource: Resource,
        namespace: str | None,
        labels: Mapping[str, str] | None = None,
        *,
        retry: bool = True,
    ) -> tuple[list[Obj], str]:
        """The objects carrying `labels`, and the list's resourceVersion (to watch from)."""
        query = {"labelSelector": selector_string(labels)} if labels else {}
        result = await self._call(
            "GET",
            resource.path(namespace),
            verb="list",
            resource=resource,
            namespace=namespace,
            query=query,
            retry=retry,
        )
        items = [dict(item) for item in result.get("items") or [] if matches(item, labels or {})]
        version = str((result.get("metadata") or {}).get("resourceVersion") or "")
        return items, version

    async def watch(
        self,
        resource: Resource,
        namespace: str | None,
        labels: Mapping[str, str] | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """List, then watch from the list's resourceVersion, forever: 410 Gone (or a broken
        stream) lists again and yields `SYNC`; an unavailable server yields `UNAVAILABLE` and is
        retried with back-off. Ends only when the consumer stops iterating."""
        s = self._settings
        labels = dict(labels or {})
        version: str | None = None
        delay = s.backoff_initial
        unavailable = False
        while True:
            try:
                if version is None:
                    items, version = await self.list(resource, namespace, labels, retry=False)
                    yield WatchEvent("SYNC", items=tuple(items))
                query = {
                    "watch": "true",
                    "allowWatchBookmarks": "true",
                    "timeoutSeconds": str(s.watch_timeout),
                }
                if labels:
                    query["labelSelector"] = selector_string(labels)
                if version:
                    query["resourceVersion"] = version
                async with self._stream(
                    resource.path(namespace),
                    query,
                    verb="watch",
                    resource=resource,
                    namespace=namespace,
                    read_timeout=s.watch_timeout + 30,
                ) as response:
                    delay = s.backoff_initial
                    unavailable = False
                    async for raw in response.content:
                        line = raw.strip()
                        if not line:
                            continue
                        event = json.loads(line)
                        kind = event.get("type")
                        obj = event.get("object") or {}
                        if kind == "ERROR":
                            code = int(obj.get("code") or 500)
                            raise _error(code, obj, "watch", resource, namespace)
                        new_version = (obj.get("metadata") or {}).get("resourceVersion")
                        if new_version:
                            version = str(new_version)
                        if kind in ("ADDED", "MODIFIED", "DELETED") and matches(obj, labels):
                            yield WatchEvent(kind, object=obj)
            except WatchGone:
                log.info("kubernetes: the watch of %s expired; listing again", resource.plural)
                version = None
            except (KubeUnavailable, *_CONNECTION_ERRORS) as exc:
                message = exc.message if isinstance(exc, LambdabusError) else repr(exc)
                if not unavailable:
                    log.warning("kubernetes: watch of %s: %s", resource.plural, message)
                unavailable = True
                version = None  # events may be lost while away: list again
                yield WatchEvent("UNAVAILABLE", message=message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, s.backoff_max)

    async def logs(
        self,
        namespace: str,
        pod: str,
        *,
        container: str | None = None,
        follow: bool = False,
        since_seconds: int | None = None,
        tail_lines: int | None = None,
    ) -> AsyncIterator[str]:
        """A pod's log lines (with `follow`, as they come, until the container ends)."""
        query = {"follow": "true" if follow else "false"}
        if container:
            query["container"] = container
        if since_seconds is not None:
            query["sinceSeconds"] = str(since_seconds)
        if tail_lines is not None:
            query["tailLines"] = str(tail_lines)
        resource = Resource("v1", "Pod", "pods/log")
        async with self._stream(
            f"{PODS.path(namespace, pod)}/log",
            query,
            verb="get",
            resource=resource,
            namespace=namespace,
            read_timeout=None if follow else self._settings.request_timeout,
        ) as response:
            try:
                async for raw in response.content:
                    yield raw.decode("utf-8", "replace").rstrip("\n")
            except _CONNECTION_ERRORS as exc:
                raise KubeUnavailable(
                    f"the log of pod {namespace}/{pod} broke off: {exc!r}"
                ) from exc


async def load_configuration(settings: KubeApiSettings) -> Configuration:
    """The client configuration: `KUBECONFIG`, else in-cluster, else ~/.kube/config."""
    config = Configuration()
    if settings.kubeconfig:
        await load_kube_config(
            config_file=settings.kubeconfig, context=settings.context, client_configuration=config
        )
        return config
    try:
        load_incluster_config(client_configuration=config)  # type: ignore[no-untyped-call]
    except ConfigException:
        try:
            await load_kube_config(context=settings.context, client_configuration=config)
        except (ConfigException, OSError) as exc:
            raise KubeError(
                "no Kubernetes configuration: set KUBECONFIG, or run the platform in a pod "
                f"with a service account ({exc})",
                code="kubernetes_not_configured",
            ) from exc
    return config
