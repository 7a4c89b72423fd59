"""The heartbeat registry on the real nats-server of the session, as the services' own NATS
users: each replica writes its beat and withdraws it, the gateway lists the live ones, and no
service can write another's beat or read the registry."""

from __future__ import annotations

import asyncio
import uuid

import nats.errors
import pytest

from lambdabus_platform.bus import Bus
from lambdabus_platform.natsserver import NatsServer
from lambdabus_platform.replicas import REPLICAS_BUCKET, Heartbeat, Replica, beating, list_replicas
from tests.integration.test_natsauth import connected

pytestmark = pytest.mark.timeout(60)


async def _listed(gateway: Bus, ids: set[str]) -> dict[str, Replica]:
    return {r.id: r for r in await list_replicas(gateway.kv(REPLICAS_BUCKET)) if r.id in ids}


async def _until(gateway: Bus, ids: set[str], check: object, what: str) -> dict[str, Replica]:
    for _ in range(200):
        found = await _listed(gateway, ids)
        if callable(check) and check(found):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {what}: {found}")


async def test_replicas_beat_under_their_own_users_and_the_gateway_lists_them(
    nats_server: NatsServer, bus: Bus
) -> None:
    router_id, deployer_id = f"r-{uuid.uuid4().hex[:8]}", f"d-{uuid.uuid4().hex[:8]}"
    ids = {router_id, deployer_id}
    async with (
        Bus.connect(nats_server.settings("router"), name="router") as router,
        Bus.connect(nats_server.settings("deployer"), name="deployer") as deployer,
        Bus.connect(nats_server.settings("gateway"), name="gateway") as gateway,
    ):
        router_beat = Heartbeat(router.kv(REPLICAS_BUCKET), "router", router_id, interval=0.2)
        deployer_beat = Heartbeat(
            deployer.kv(REPLICAS_BUCKET), "deployer", deployer_id, interval=0.2
        )
        async with beating(router_beat):
            async with beating(deployer_beat):
                found = await _until(gateway, ids, lambda f: len(f) == 2, "both listed")
                assert {r.role for r in found.values()} == {"active"}
                assert found[router_id].service == "router"
                assert 0 <= found[router_id].heartbeat_age < 2
                # the role API: the next beat says it at once
                deployer_beat.set_role("leader")
                found = await _until(
                    gateway, ids, lambda f: f[deployer_id].role == "leader", "the leader role"
                )
                assert found[router_id].role == "active"
            # a clean stop withdraws its beat; the other replica stays
            found = await _until(gateway, ids, lambda f: set(f) == {router_id}, "withdrawn")
    assert router_id in found


async def test_a_service_writes_only_its_own_heartbeat(nats_server: NatsServer, bus: Bus) -> None:
    victim = f"v-{uuid.uuid4().hex[:8]}"
    async with connected(nats_server, "router") as router:
        forged = f"$KV.{REPLICAS_BUCKET}.gateway.{victim}"
        with pytest.raises(nats.errors.TimeoutError):
            await router.js.publish(forged, b'{"forged": true}')
        assert await router.violation("publish", forged)
        # nor does it read the registry: only the gateway does
        get = f"$JS.API.STREAM.MSG.GET.KV_{REPLICAS_BUCKET}"
        with pytest.raises(nats.errors.TimeoutError):
            await router.js.get_msg(f"KV_{REPLICAS_BUCKET}", subject=forged)
        assert await router.violation("publish", get)
    assert await bus.kv(REPLICAS_BUCKET).get(f"gateway.{victim}") is None
