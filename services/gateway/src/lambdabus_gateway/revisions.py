"""Revisions and traffic of a function: the gateway owns the `revisions` KV bucket (one key per
function, written with compare-and-set), reads what the deployer says of each revision
(`revision-deployments`, `deployments`) for readiness, and answers the revisions and traffic
routes. The pure rules are `lambdabus_events.traffic`'s.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from lambdabus_events.models import (
    DeploymentState,
    FunctionRecord,
    FunctionRevisions,
    RevisionDeployment,
    TrafficTarget,
)
from lambdabus_events.traffic import (
    Route,
    TrafficError,
    check_traffic,
    effective,
    referenced,
    with_record,
)
from lambdabus_platform.bus import Bus
from lambdabus_platform.errors import AlreadyExists, Conflict, InvalidRequest, NotFound
from lambdabus_platform.registry import Registry, Versioned
from lambdabus_platform.subjects import (
    DEPLOYMENTS_BUCKET,
    REVISION_DEPLOYMENTS_BUCKET,
    REVISIONS_BUCKET,
    function_key,
)

log = logging.getLogger("lambdabus.gateway.revisions")


class RevisionInUse(AlreadyExists):
    code = "revision_in_use"


class Revisions:
    def __init__(self, bus: Bus, keep: int = 20) -> None:
        self._bus = bus
        self._keep = keep
        self._docs = Registry(bus.kv(REVISIONS_BUCKET), FunctionRevisions)
        self._deployments = Registry(bus.kv(DEPLOYMENTS_BUCKET), DeploymentState)

    async def record(self, record: FunctionRecord) -> FunctionRevisions:
        """Make the revision `record` runs, unless it exists (idempotent; compare-and-set)."""
        for _ in range(10):
            found = await self._docs.get(record.namespace, record.name)
            doc = with_record(
                found.value if found else None, record, datetime.now(UTC), keep=self._keep
            )
            if found is not None and doc == found.value:
                return doc
            try:
                if found is None:
                    await self._docs.create(record.namespace, record.name, doc)
                else:
                    await self._docs.update(record.namespace, record.name, doc, found.revision)
            except (Conflict, AlreadyExists):
                continue
            if doc.revisions and (found is None or len(doc.revisions) > len(found.value.revisions)):
                log.info(
                    "revision created",
                    extra={
                        "namespace": record.namespace,
                        "function": record.name,
                        "revision": doc.revisions[-1].name,
                    },
                )
            return doc
        raise Conflict("the function's revisions are being changed concurrently; retry")

    async def forget(self, namespace: str, name: str) -> None:
        await self._docs.delete(namespace, name)

    async def _doc(self, record: FunctionRecord) -> Versioned[FunctionRevisions]:
        await self.record(record)
        found = await self._docs.get(record.namespace, record.name)
        if found is None:
            raise Conflict("the function's revisions were removed meanwhile; retry")
        return found

    async def _readiness(self, doc: FunctionRevisions) -> tuple[str | None, set[str]]:
        """The latest ready revision and every ready one, as the deployer reports them."""
        state, pinned = await asyncio.gather(
            self._deployments.get(doc.namespace, doc.name),
            self._bus.kv(REVISION_DEPLOYMENTS_BUCKET).values(
                f"{function_key(doc.namespace, doc.name)}.*"
            ),
        )
        ready: set[str] = set()
        latest: str | None = None
        value = state.value if state is not None else None
        if value is not None and value.uid == doc.uid and value.endpoints and value.revision:
            latest = value.revision
            ready.add(latest)
        for entry in pinned:
            item = RevisionDeployment.model_validate_json(entry.value)
            if item.uid == doc.uid and item.ready and item.endpoints:
                ready.add(item.revision)
        return latest, ready

    def _items(self, doc: FunctionRevisions, route: Route, ready: set[str]) -> list[dict[str, Any]]:
        tags: dict[str, list[str]] = {}
        for target in doc.traffic or ():
            if target.tag and target.revision:
                tags.setdefault(target.revision, []).append(target.tag)
        for tag, name in route.tags.items():
            if tag not in tags.get(name, []):
                tags.setdefault(name, []).append(tag)
        return [
            {
                "name": r.name,
                "generation": r.generation,
                "created": r.created.isoformat(),
                "ready": r.name in ready,
                "status": "ready" if r.name in ready else "not_ready",
                "image_status": "completed" if r.name in ready else "pending",
                "runtime": r.spec.runtime,
                "source_sha256": r.source.sha256,
                "traffic_percent": route.weights.get(r.name, 0),
                "tags": sorted(tags.get(r.name, [])),
            }
            for r in doc.revisions
        ]

    async def listing(self, record: FunctionRecord) -> list[dict[str, Any]]:
        doc = (await self._doc(record)).value
        latest, ready = await self._readiness(doc)
        return self._items(doc, effective(doc.traffic, latest, ready), ready)

    async def one(self, record: FunctionRecord, revision: str) -> dict[str, Any]:
        for item in await self.listing(record):
            if item["name"] == revision:
                return item
        raise NotFound(
            f"revision {revision} of {record.namespace}/{record.name} does not exist",
            code="revision_not_found",
        )

    async def delete(self, record: FunctionRecord, revision: str) -> dict[str, Any]:
        for _ in range(10):
            found = await self._doc(record)
            doc = found.value
            if revision not in {r.name for r in doc.revisions}:
                raise NotFound(
                    f"revision {revision} of {record.namespace}/{record.name} does not exist",
                    code="revision_not_found",
                )
            reasons = referenced(doc).get(revision)
            if reasons:
                raise RevisionInUse(
                    f"revision {revision} is in the route ({', '.join(reasons)}); "
                    "move its traffic and tags first"
                )
            if doc.revisions[-1].name == revision:
                raise RevisionInUse(
                    f"revision {revision} is the latest revision of the function; "
                    "only older ones can be deleted"
                )
            if doc.traffic is None:
                latest, _ready = await self._readiness(doc)
                if latest == revision:
                    raise RevisionInUse(f"revision {revision} has all the traffic")
            kept = [r for r in doc.revisions if r.name != revision]
            try:
                await self._docs.update(
                    doc.namespace,
                    doc.name,
                    doc.model_copy(update={"revisions": kept}),
                    found.revision,
                )
            except Conflict:
                continue
            log.info(
                "revision deleted",
                extra={"namespace": doc.namespace, "function": doc.name, "revision": revision},
            )
            return {"name": revision, "deleted": True}
        raise Conflict("the function's revisions are being changed concurrently; retry")

    async def traffic(self, record: FunctionRecord, router_url: str) -> dict[str, Any]:
        doc = (await self._doc(record)).value
        latest, ready = await self._readiness(doc)
        route = effective(doc.traffic, latest, ready)
        targets = doc.traffic or [TrafficTarget(latest=True, percent=100)]
        base = f"{router_url.rstrip('/')}/{doc.namespace}/{doc.name}"
        urls = {"default": base}
        for target in targets:
            if target.tag:
                urls[target.tag] = (
                    f"{router_url.rstrip('/')}/{doc.namespace}/{doc.name}@{target.tag}"
                )
        assigned = route.all_assigned
        return {
            "traffic": [
                {
                    **t.model_dump(exclude_none=True, exclude_defaults=False),
                    "resolved": route.tags.get(t.tag or "", None)
                    if t.tag
                    else (latest if t.latest else t.revision),
                }
                for t in targets
            ],
            "effective": dict(route.weights),
            "latest_created_revision": doc.revisions[-1].name if doc.revisions else None,
            "latest_ready_revision": latest,
            "urls": urls,
            "conditions": [
                {
                    "type": "AllTrafficAssigned",
                    "status": "True" if assigned else "False",
                    "reason": "" if assigned else "RevisionNotReady",
                    "message": ""
                    if assigned
                    else "not ready yet: "
                    + ", ".join(route.unassigned)
                    + "; their percent goes to the ready revisions meanwhile",
                }
            ],
        }

    async def set_traffic(self, record: FunctionRecord, body: object) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("traffic"), list):
            raise InvalidRequest(
                'the body is {"traffic": [{"revision" | "latest", "percent", "tag"}, ...]}',
                code="invalid_traffic",
            )
        try:
            targets = [TrafficTarget.model_validate(t) for t in body["traffic"]]
        except ValueError as exc:
            raise InvalidRequest(f"invalid traffic entry: {exc}", code="invalid_traffic") from None
        for _ in range(10):
            found = await self._doc(record)
            doc = found.value
            try:
                check_traffic(targets, {r.name for r in doc.revisions})
            except TrafficError as exc:
                raise InvalidRequest(str(exc), code=exc.code) from None
            try:
                await self._docs.update(
                    doc.namespace,
                    doc.name,
                    doc.model_copy(update={"traffic": targets}),
                    found.revision,
                )
            except Conflict:
                continue
            log.info(
                "traffic set",
                extra={
                    "namespace": doc.namespace,
                    "function": doc.name,
                    "traffic": [t.model_dump(exclude_none=True) for t in targets],
                },
            )
            return
        raise Conflict("the function's revisions are being changed concurrently; retry")
