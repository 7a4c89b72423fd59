"""The deployer resolves a function's secrets into what it runs (`DesiredRevision.secret_files`
and `secret_env`), against a real nats-server and secrets written through the real gateway over
HTTP: a missing secret or key leaves the function pending with SecretNotFound (no crash loop),
and a changed secret rolls the function out with the new value. Mounting them inside the
sandbox is the sandbox's part; here a backend in memory records what it was asked to run."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from lambdabus_deployer.backend import Reporter
from lambdabus_deployer.deployer import Deployer
from lambdabus_deployer.plan import DesiredRevision, Observation
from lambdabus_deployer.state import DeploymentStates
from lambdabus_events.models import BuildState, DeploymentState, FunctionRecord
from lambdabus_platform.bus import Bus
from lambdabus_platform.registry import Registry
from lambdabus_platform.secretbox import SecretBox
from lambdabus_platform.secretstore import SecretStore
from lambdabus_platform.status import compute_status
from lambdabus_platform.subjects import (
    BUILDS_BUCKET,
    DEPLOYMENTS_BUCKET,
    FUNCTIONS_BUCKET,
    SECRETS_BUCKET,
    lifecycle_filter,
)
from tests.integration.conftest import SESSION_SECRETS_KEY, RunningGateway

NS = "dep-secrets"
ENDPOINT = "http://127.0.0.1:9"
HELLO = "async def main(request):\n    return {}\n"


class MemoryBackend:
    """A DeployBackend that runs nothing and remembers every revision it was given."""

    def __init__(self, report: Reporter | None = None) -> None:
        self.report = report
        self.running: dict[tuple[str, str], DesiredRevision] = {}
        self.applied: list[DesiredRevision] = []
        self.changed = asyncio.Event()

    def functions(self) -> set[tuple[str, str]]:
        return set(self.running)

    def current(self, namespace: str, name: str) -> DesiredRevision | None:
        return self.running.get((namespace, name))

    async def apply(self, desired: DesiredRevision) -> None:
        self.running[(desired.namespace, desired.name)] = desired
        self.applied.append(desired)
        self.changed.set()
        if self.report is not None:  # it runs at once, on one endpoint nobody calls
            await self.report(
                Observation(
                    revision=desired, instances=(), endpoints=(ENDPOINT,) * desired.replicas
                )
            )

    async def remove(self, namespace: str, name: str) -> None:
        self.running.pop((namespace, name), None)


async def _until(check: Callable[[], Any], what: str, timeout: float = 10) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def deployer(bus: Bus) -> AsyncIterator[tuple[Deployer, MemoryBackend]]:
    states = DeploymentStates(bus)
    backend = MemoryBackend(states.observe)
    store = SecretStore(bus.kv(SECRETS_BUCKET), SecretBox(base64.b64decode(SESSION_SECRETS_KEY)))
    deployer = Deployer(bus=bus, backend=backend, states=states, secrets=store)
    # Only this test's namespace: the session's nats-server is shared with other tests.
    watching = asyncio.create_task(deployer.watch_secrets(bus.kv(SECRETS_BUCKET).watch(f"{NS}.*")))
    try:
        yield deployer, backend
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching


async def _function_with_a_build(gw: RunningGateway, name: str, **spec: Any) -> FunctionRecord:
    resp = await gw.http.post(
        f"/v1/namespaces/{NS}/functions",
        json={"name": name, **spec, "source": {"files": {"lambda_main.py": HELLO}}},
    )
    assert resp.status == 202, await resp.text()
    record = FunctionRecord.model_validate(await resp.json())
    build = BuildState(
        namespace=NS,
        name=name,
        uid=record.uid,
        generation=record.generation,
        phase="succeeded",
        source_sha256=record.source.sha256,
        runtime=record.spec.runtime,
        artifact="file:///nowhere/manifest.json",
        updated_at=datetime.now(UTC),
    )
    await Registry(gw.bus.kv(BUILDS_BUCKET), BuildState).put(NS, name, build)
    return record


async def _status(bus: Bus, record: FunctionRecord) -> tuple[str, str, str]:
    found = await Registry(bus.kv(DEPLOYMENTS_BUCKET), DeploymentState).get(NS, record.name)
    current = await Registry(bus.kv(FUNCTIONS_BUCKET), FunctionRecord).get(NS, record.name)
    assert current is not None
    builds = await Registry(bus.kv(BUILDS_BUCKET), BuildState).get(NS, record.name)
    status = compute_status(
        current.value, builds.value if builds else None, found.value if found else None
    )
    running = status.conditions[2]
    return status.status, running.reason, running.message


async def test_missing_secret_pends_then_a_put_rolls_out_the_new_value(
    gateway: RunningGateway, deployer: tuple[Deployer, MemoryBackend]
) -> None:
    gw, (dep, backend) = gateway, deployer
    first, second = "pw-" + secrets.token_hex(8), "pw-" + secrets.token_hex(8)
    record = await _function_with_a_build(
        gw,
        "uses-db",
        secrets=["db"],
        env_from={"DB_PASSWORD": {"secret": "db", "key": "password"}},
    )

    # No secret: nothing starts, the status says why, naming the secret.
    await dep.reconcile_one(NS, "uses-db")
    assert backend.applied == []
    status, reason, message = await _status(gw.bus, record)
    assert (status, reason) == ("pending", "SecretNotFound")
    assert "secret db does not exist" in message

    # The secret without the key env_from needs: still pending, naming the key.
    resp = await gw.http.post(
        f"/v1/namespaces/{NS}/secrets", json={"name": "db", "data": {"user": "app"}}
    )
    assert resp.status == 201
    await dep.reconcile_one(NS, "uses-db")
    status, reason, message = await _status(gw.bus, record)
    assert (status, reason) == ("pending", "SecretNotFound")
    assert "secret db has no key password" in message
    assert "user" in message
    assert backend.applied == []

    # With the key, the watch on the secrets rolls it out with the values.
    put = await gw.http.put(
        f"/v1/namespaces/{NS}/secrets/db", json={"data": {"user": "app", "password": first}}
    )
    assert put.status == 200
    one = await _until(lambda: backend.current(NS, "uses-db"), "the first revision")
    assert one.secret_env == (("DB_PASSWORD", first),)
    assert one.secret_files == (("db", (("password", first.encode()), ("user", b"app"))),)
    assert first not in repr(one)

    # Changing the secret changes the revision key: a rollout with the new value.
    put = await gw.http.put(f"/v1/namespaces/{NS}/secrets/db", json={"data": {"password": second}})
    assert put.status == 200
    two = await _until(
        lambda: (r := backend.current(NS, "uses-db")) and r.secret_env != one.secret_env and r,
        "the new value",
    )
    assert two.secret_env == (("DB_PASSWORD", second),)
    assert two.secret_files == (("db", (("password", second.encode()),)),)
    assert two.key != one.key

    # Deleting it leaves what runs running (no crash loop); it is still what was applied,
    # and the status says why nothing newer can start.
    assert (await _status(gw.bus, record))[0] == "running"
    assert (await gw.http.delete(f"/v1/namespaces/{NS}/secrets/db")).status == 200
    await dep.reconcile_one(NS, "uses-db")
    assert backend.current(NS, "uses-db") == two
    status, reason, message = await _status(gw.bus, record)
    assert (status, reason) == ("pending", "SecretNotFound")
    assert message.endswith(f"generation {record.generation} keeps serving")
    serving = await Registry(gw.bus.kv(DEPLOYMENTS_BUCKET), DeploymentState).get(NS, "uses-db")
    assert serving is not None
    assert serving.value.endpoints == [ENDPOINT]

    # No value reached the lifecycle stream or the deployment state.
    stream = await gw.bus.read("LIFECYCLE", lifecycle_filter(namespace=NS), limit=1000)
    text = "\n".join(m.data.decode() for m in stream)
    assert "io.lambdabus.secret.updated" in text
    state = await gw.bus.kv(DEPLOYMENTS_BUCKET).get(f"{NS}.uses-db")
    assert state is not None
    for value in (first, second):
        assert value not in text
        assert value.encode() not in state.value


async def test_a_function_without_secrets_is_untouched_by_them(
    gateway: RunningGateway, deployer: tuple[Deployer, MemoryBackend]
) -> None:
    dep, backend = deployer
    await _function_with_a_build(gateway, "plain")
    await dep.reconcile_one(NS, "plain")
    revision = backend.current(NS, "plain")
    assert revision is not None
    assert (revision.secret_files, revision.secret_env) == ((), ())


async def test_a_deployer_with_another_key_says_so_and_starts_nothing(
    gateway: RunningGateway, bus: Bus
) -> None:
    gw = gateway
    resp = await gw.http.post(
        f"/v1/namespaces/{NS}/secrets", json={"name": "tls", "data": {"cert": "C"}}
    )
    assert resp.status == 201
    record = await _function_with_a_build(gw, "wrong-key", secrets=["tls"])
    backend = MemoryBackend()
    other = SecretStore(bus.kv(SECRETS_BUCKET), SecretBox(secrets.token_bytes(32)))
    dep = Deployer(bus=bus, backend=backend, states=DeploymentStates(bus), secrets=other)
    await dep.reconcile_one(NS, "wrong-key")
    assert backend.applied == []
    status, reason, message = await _status(bus, record)
    assert (status, reason) == ("pending", "SecretUnreadable")
    assert "secret tls cannot be decrypted" in message
