"""Putting endpoints in front of a running router, as the deployer would."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from lambdabus_events.models import DeploymentState
from lambdabus_platform.bus import Bus
from lambdabus_platform.registry import Registry
from lambdabus_platform.subjects import DEPLOYMENTS_BUCKET
from lambdabus_router.proxy import Router


async def deploy_endpoints(
    bus: Bus,
    router: Router,
    namespace: str,
    name: str,
    endpoints: list[str],
    *,
    timeout: float = 30.0,
    revision: str = "",
) -> None:
    """Write a ready `DeploymentState` with `endpoints` (serving `revision`, when given) and
    wait until the router has it."""
    state = DeploymentState(
        namespace=namespace,
        name=name,
        uid=f"uid-{name}",
        generation=1,
        phase="ready",
        replicas=len(endpoints),
        ready_replicas=len(endpoints),
        endpoints=endpoints,
        timeout=timeout,
        updated_at=datetime.now(UTC),
        revision=revision,
    )
    await Registry(bus.kv(DEPLOYMENTS_BUCKET), DeploymentState).put(namespace, name, state)
    fid = (namespace, name)
    await asyncio.wait_for(
        router.until(lambda r: fid in r.table and r.table[fid].endpoints == endpoints), 5
    )
