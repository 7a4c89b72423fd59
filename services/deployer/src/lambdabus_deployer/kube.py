"""The kubernetes deploy backend (`LAMBDABUS_BACKEND=kubernetes`): each function becomes a
Deployment, a Service and a HorizontalPodAutoscaler in the Kubernetes namespace named like its
Lambdabus namespace (created, managed-by labelled, with the platform's RoleBindings and the
NetworkPolicy that lets only the router in), its env in a Secret, its Lambdabus secrets as
Secrets; all rendered by `lambdabus_platform.kube.render`, applied through the one adapter.

Statuses come from watching (never polling) the Deployments and Pods of every namespace the
backend deploys to; each change is folded (`kubestatus.fold`) and reported. The router's
endpoint is the Service's cluster DNS name. An API server out of reach leaves the function
`pending` (`ClusterUnavailable`) and the next reconcile applies again; a 403 fails it naming the
verb and resource the platform's service account lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from lambdabus_deployer.backend import LogSink, Reporter
from lambdabus_deployer.kubestatus import (
    REASON_CREATED,
    REASON_FORBIDDEN,
    REASON_HPA,
    REASON_SERVICE,
    REASON_UNSUPPORTED,
    REASON_UPDATED,
    fold,
)
from lambdabus_deployer.plan import FILE_ARTIFACT, IMAGE_ARTIFACT, DesiredRevision
from lambdabus_events.models import FunctionConfig, LogLine
from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.kube.client import (
    DEPLOYMENTS,
    HPAS,
    NETWORK_POLICIES,
    PODS,
    SECRETS,
    SERVICES,
    KubeClient,
    KubeError,
    KubeForbidden,
    KubeUnavailable,
    WatchEvent,
)
from lambdabus_platform.kube.render import (
    CONTAINER,
    LABEL_FUNCTION,
    LABEL_MANAGED_BY,
    LABEL_NAMESPACE,
    LABEL_UID,
    MANAGER,
    KubeFunction,
    Owner,
    identity_labels,
    object_name,
    render_deployment,
    render_env_secret,
    render_hpa,
    render_namespace,
    render_network_policy,
    render_no_network_policy,
    render_role_bindings,
    render_service,
    render_user_secret,
    service_endpoint,
)
from lambdabus_platform.kube.settings import KubeSettings

log = logging.getLogger("lambdabus.deployer.kube")

Obj = dict[str, Any]
Key = tuple[str, str]
MANAGED = {LABEL_MANAGED_BY: MANAGER}


@dataclass
class _Runner:
    desired: DesiredRevision
    fn: KubeFunction
    applied: bool = False
    reason: str = REASON_CREATED
    error: tuple[str, str] | None = None
    fresh: bool = False  # a step was just applied; the watch has not reported since
    deployment: Obj | None = None
    pods: dict[str, Obj] = field(default_factory=dict)


def image_of(desired: DesiredRevision) -> str | None:
    """The image a revision runs: the spec's prebuilt `image`, or the kubernetes builder's
    image reference; None for a local build (a directory on another machine)."""
    if desired.spec is not None and desired.spec.image:
        return desired.spec.image
    if desired.artifact.startswith(FILE_ARTIFACT):
        return None
    return desired.artifact.removeprefix(IMAGE_ARTIFACT) or None


def _spec(desired: DesiredRevision) -> FunctionConfig:
    if desired.spec is not None:
        return desired.spec
    return FunctionConfig(
        runtime=desired.runtime,
        env=dict(desired.env),
        replicas=desired.replicas,
        memory=desired.memory,
        timeout=desired.timeout,
        cpu=desired.cpu,
        tmp_size=desired.tmp_size,
        network=desired.network,
    )


class KubernetesBackend:
    """A `DeployBackend` over one cluster."""

    def __init__(
        self,
        kube: KubeClient,
        settings: KubeSettings,
        report: Reporter,
        *,
        create_namespaces: bool = True,
        logs: LogSink | None = None,
    ) -> None:
        self._logs = logs
        self._pinned_warned: set[Key] = set()
        self._following: dict[tuple[str, str, int], asyncio.Task[None]] = {}
        self._kube = kube
        self._settings = settings
        self._create_namespaces = create_namespaces
        self._report = report
        self._runners: dict[Key, _Runner] = {}
        self._namespaces: set[str] = set()  # prepared: namespace, RoleBindings, NetworkPolicy
        self._watches: dict[str, list[asyncio.Task[None]]] = {}
        self._unavailable: dict[str, str] = {}  # namespace → why its watch is away
        self._locks: defaultdict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)

    # -- DeployBackend ----------------------------------------------------------------------

    def functions(self) -> set[tuple[str, str]]:
        return set(self._runners)

    def current(self, namespace: str, name: str) -> DesiredRevision | None:
        runner = self._runners.get((namespace, name))
        return runner.desired if runner is not None else None

    async def apply(self, desired: DesiredRevision) -> None:
        key = (desired.namespace, desired.runner_name)
        if desired.pinned:
            # A revision run apart would need objects named per revision; not yet here.
            if key not in self._pinned_warned:
                self._pinned_warned.add(key)
                log.warning(
                    "revisions pinned by a route are not run apart on kubernetes",
                    extra={"namespace": desired.namespace, "function": desired.runner_name},
                )
            return
        async with self._locks[key]:
            runner = self._runners.get(key)
            if runner is not None and runner.applied and runner.desired == desired:
                return
            fn = KubeFunction(desired.namespace, desired.name, desired.uid, _spec(desired))
            if runner is None or runner.desired.uid != desired.uid:
                runner = _Runner(desired, fn)
                self._runners[key] = runner
            else:
                runner.desired, runner.fn = desired, fn
            runner.applied, runner.error = False, None
            image = image_of(desired)
            if image is None:
                runner.error = (
                    REASON_UNSUPPORTED,
                    f"artifact {desired.artifact!r} is a local build; the kubernetes backend "
                    "runs images (run the builder with LAMBDABUS_BACKEND=kubernetes)",
                )
                await self._publish(runner)
                return
            try:
                await self._apply_objects(runner, image)
            except KubeUnavailable as exc:
                self._unavailable.setdefault(desired.namespace, exc.message)
                log.warning(
                    "the Kubernetes API server is unavailable; the next reconcile applies again",
                    extra={
                        "namespace": desired.namespace,
                        "function": desired.name,
                        "error": exc.message,
                    },
                )
            except KubeForbidden as exc:
                runner.error = (REASON_FORBIDDEN, exc.message)
                log.error(exc.message, extra={"verb": exc.verb, "resource": exc.resource})
            except KubeError as exc:
                runner.error = (exc.reason or "KubernetesError", exc.message)
            else:
                runner.applied = True
            await self._publish(runner)

    async def remove(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        async with self._locks[key]:
            runner = self._runners.pop(key, None)
            if runner is not None:
                uids = {runner.desired.uid}
            else:  # not applied by this deployer (it started since): found by its labels
                found, _ = await self._kube.list(
                    DEPLOYMENTS, namespace, {LABEL_NAMESPACE: namespace, LABEL_FUNCTION: name}
                )
                uids = {
                    str(d["metadata"]["labels"][LABEL_UID])
                    for d in found
                    if LABEL_UID in ((d.get("metadata") or {}).get("labels") or {})
                }
            for uid in sorted(uids):
                await self._delete_objects(namespace, f"lambda-{uid}")

    async def _delete_objects(self, namespace: str, obj: str) -> None:
        await self._kube.delete(DEPLOYMENTS, namespace, obj, propagation="Foreground")
        # Owned objects go with the Deployment; delete them too, in case it never got a uid
        # to own them by (or the garbage collector is slow).
        for resource, name in (
            (SERVICES, obj),
            (HPAS, obj),
            (SECRETS, f"{obj}-env"),
            (NETWORK_POLICIES, f"{obj}-no-network"),
        ):
            await self._kube.delete(resource, namespace, name)

    async def close(self) -> None:
        tasks = [task for tasks in self._watches.values() for task in tasks]
        tasks += self._following.values()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watches.clear()

    # -- applying ---------------------------------------------------------------------------

    async def _prepare_namespace(self, namespace: str) -> None:
        if namespace in self._namespaces:
            return
        if self._create_namespaces:
            await self._kube.ensure(render_namespace(namespace))
        for binding in render_role_bindings(namespace, self._settings):
            await self._kube.ensure(binding)
        await self._kube.apply(render_network_policy(namespace, self._settings))
        self._namespaces.add(namespace)
        self._watch(namespace)

    async def _apply_objects(self, runner: _Runner, image: str) -> None:
        desired, fn = runner.desired, runner.fn
        await self._prepare_namespace(fn.namespace)
        for secret, data in _user_secrets(desired, fn.spec).items():
            await self._kube.apply(
                render_user_secret(fn.namespace, secret, data, identity_labels(fn))
            )
        # The env Secret first (pods need it to start), owned once the Deployment exists.
        await self._kube.apply(render_env_secret(fn))
        deployment = render_deployment(fn, self._settings, image)
        deployment["spec"]["replicas"] = desired.replicas
        applied, created = await self._kube.upsert(deployment)
        runner.deployment = runner.deployment or applied
        runner.reason = REASON_CREATED if created else REASON_UPDATED
        runner.fresh = True
        await self._publish(runner)
        uid = (applied.get("metadata") or {}).get("uid")
        owner = Owner("apps/v1", "Deployment", object_name(fn), str(uid)) if uid else None
        await self._kube.apply(render_env_secret(fn, owner))
        _, created = await self._kube.upsert(render_service(fn, self._settings, owner))
        if created:
            runner.reason, runner.fresh = REASON_SERVICE, True
            await self._publish(runner)
        hpa = render_hpa(fn, self._settings, owner)
        if hpa is None or desired.autoscaled:
            # stopped, or scaled by the platform's own autoscaler: no HPA to fight it
            await self._kube.delete(HPAS, fn.namespace, object_name(fn))
        else:
            _, created = await self._kube.upsert(hpa)
            if created:
                runner.reason, runner.fresh = REASON_HPA, True
                await self._publish(runner)
        isolated = render_no_network_policy(fn, owner)
        if isolated is not None:
            await self._kube.apply(isolated)
        else:
            await self._kube.delete(NETWORK_POLICIES, fn.namespace, f"{object_name(fn)}-no-network")

    # -- watching ---------------------------------------------------------------------------

    def _watch(self, namespace: str) -> None:
        if namespace in self._watches:
            return
        self._watches[namespace] = [
            asyncio.create_task(self._follow(namespace, DEPLOYMENTS.kind)),
            asyncio.create_task(self._follow(namespace, PODS.kind)),
        ]

    async def _follow(self, namespace: str, kind: str) -> None:
        resource = DEPLOYMENTS if kind == DEPLOYMENTS.kind else PODS
        events: AsyncIterator[WatchEvent] = self._kube.watch(resource, namespace, MANAGED)
        try:
            async for event in events:
                try:
                    await self._on_event(namespace, kind, event)
                except LambdabusError:
                    log.exception("reporting a Kubernetes change failed")
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()  # type: ignore[attr-defined]

    def _runner_of(self, obj: Obj) -> _Runner | None:
        uid = ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_UID)
        for runner in self._runners.values():
            if runner.desired.uid == uid:
                return runner
        return None

    async def _on_event(self, namespace: str, kind: str, event: WatchEvent) -> None:
        touched: list[_Runner] = []
        in_ns = [r for r in self._runners.values() if r.fn.namespace == namespace]
        if event.type == "UNAVAILABLE":
            if not self._unavailable.get(namespace):
                self._unavailable[namespace] = event.message
                touched = in_ns
        elif event.type == "SYNC":
            self._unavailable.pop(namespace, None)
            for runner in in_ns:
                if kind == PODS.kind:
                    runner.pods = {}
                else:
                    runner.deployment = None
            for obj in event.items:
                self._remember(kind, obj, deleted=False)
            touched = in_ns
        else:
            changed = self._remember(kind, event.object, deleted=event.type == "DELETED")
            touched = [changed] if changed is not None else []
        for runner in touched:
            await self._publish(runner)

    def _remember(self, kind: str, obj: Obj, *, deleted: bool) -> _Runner | None:
        runner = self._runner_of(obj)
        if runner is None:
            return None
        runner.fresh = False
        name = str((obj.get("metadata") or {}).get("name", ""))
        if kind == PODS.kind:
            if deleted:
                runner.pods.pop(name, None)
            else:
                runner.pods[name] = obj
                self._follow_logs(runner, obj)
        elif name == object_name(runner.fn):
            runner.deployment = None if deleted else obj
        return runner

    # -- runtime logs ------------------------------------------------------------------------

    def _follow_logs(self, runner: _Runner, pod: Obj) -> None:
        """Follow the function container's log of a pod once it runs: anew after each restart
        (the log of the container that runs now)."""
        if self._logs is None:
            return
        name = str((pod.get("metadata") or {}).get("name", ""))
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            if container.get("name") != CONTAINER or not (container.get("state") or {}).get(
                "running"
            ):
                continue
            key = (runner.fn.namespace, name, int(container.get("restartCount") or 0))
            if key not in self._following:
                self._following[key] = asyncio.create_task(self._ship_logs(runner, name))

    async def _ship_logs(self, runner: _Runner, pod: str) -> None:
        assert self._logs is not None
        rev = runner.desired
        try:
            async for text in self._kube.logs(rev.namespace, pod, container=CONTAINER, follow=True):
                line = LogLine(
                    ts=datetime.now(UTC),
                    kind="runtime",
                    namespace=rev.namespace,
                    name=rev.name,
                    uid=rev.uid,
                    generation=rev.generation,
                    stream="stdout",
                    instance=pod,
                    line=text,
                )
                await self._logs(line)
        except (KubeError, KubeUnavailable) as exc:
            log.info("following a pod's log ended", extra={"pod": pod, "error": str(exc)})

    async def _publish(self, runner: _Runner) -> None:
        if self._runners.get((runner.desired.namespace, runner.desired.runner_name)) is not runner:
            return  # removed meanwhile: no report follows a remove
        observation = fold(
            runner.desired,
            runner.deployment,
            runner.pods.values(),
            endpoint=service_endpoint(runner.fn),
            applied=runner.reason,
            unavailable=self._unavailable.get(runner.fn.namespace, ""),
            error=runner.error,
            fresh=runner.fresh,
        )
        await self._report(observation)


def _user_secrets(desired: DesiredRevision, spec: FunctionConfig) -> dict[str, dict[str, str]]:
    """The Lambdabus secrets a revision uses, as the Kubernetes Secrets its pods read: mounted
    ones whole, and the keys `env_from` takes."""
    secrets: dict[str, dict[str, str]] = {
        name: {key: value.decode() for key, value in items} for name, items in desired.secret_files
    }
    values = dict(desired.secret_env)
    for var, ref in spec.env_from.items():
        if var in values:
            secrets.setdefault(ref.secret, {})[ref.key] = values[var]
    return secrets


@contextlib.asynccontextmanager
async def open_kubernetes_backend(
    kube: KubeClient,
    settings: KubeSettings,
    report: Reporter,
    *,
    create_namespaces: bool = True,
    logs: LogSink | None = None,
) -> AsyncIterator[KubernetesBackend]:
    backend = KubernetesBackend(
        kube, settings, report, create_namespaces=create_namespaces, logs=logs
    )
    try:
        yield backend
    finally:
        await backend.close()
