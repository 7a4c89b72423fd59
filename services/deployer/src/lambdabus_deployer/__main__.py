"""`python -m lambdabus_deployer`: run the deployer service.

It turns every function with a successful build into running instances (the local backend:
sandboxed processes), keeps them healthy, rolls out new revisions without a gap, and records
what runs (endpoints included) in the `deployments` KV bucket for the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import aiohttp

from lambdabus_deployer.deployer import Deployer
from lambdabus_deployer.leader import ROLE, Elector, Role, replica_id
from lambdabus_deployer.local import open_local_backend, stop_all_instances
from lambdabus_deployer.logship import open_log_shipper
from lambdabus_deployer.metrics import DeployerMetrics
from lambdabus_deployer.plan import use_key_salt
from lambdabus_deployer.runtime import locate_runtime
from lambdabus_deployer.scaling import Scaling
from lambdabus_deployer.settings import DeployerSettings
from lambdabus_deployer.state import DeploymentStates
from lambdabus_events.catalog import LifecycleEvent
from lambdabus_platform.eventapi import SUBSCRIPTIONS
from lambdabus_platform.sandbox import detect_sandbox, install_egress_rules
from lambdabus_platform.secretbox import open_secret_box
from lambdabus_platform.secretstore import SecretStore
from lambdabus_platform.service import (
    Redeliver,
    ServiceContext,
    Setup,
    run,
    stop_tasks,
    subscribe_lifecycle,
)
from lambdabus_platform.subjects import (
    LEASES_BUCKET,
    REVISIONS_BUCKET,
    SECRETS_BUCKET,
    WAKE_PREFIX,
    starting_subject,
)

log = logging.getLogger("lambdabus.deployer")


def make_setup(settings: DeployerSettings) -> Setup:
    @contextlib.asynccontextmanager
    async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
        if settings.backend == "kubernetes":
            async with kubernetes_setup(settings, ctx):
                yield
            return
        sandbox = await detect_sandbox(
            settings.sandbox,
            uid_base=settings.sandbox_uid_base,
            uid_count=settings.sandbox_uid_count,
        )
        if sandbox.enabled:
            log.info(
                "instances run in a bubblewrap sandbox",
                extra={
                    "bwrap": sandbox.bwrap,
                    "slirp4netns": sandbox.slirp4netns,
                    "uid_switch": sandbox.switch_uid,
                    "note": sandbox.reason,
                },
            )
            if sandbox.outbound:
                firewall = await install_egress_rules(sandbox)
                log.info("egress rules for sandboxed traffic", extra={"result": firewall})
        else:
            log.warning("instances run UNSANDBOXED", extra={"reason": sandbox.reason})
        use_key_salt(settings.state_dir / "key-salt")
        runtime = locate_runtime(settings)
        if runtime.pythonpath is None:
            log.warning("the runtime SDK (lambdabus_runtime) was not found; python functions fail")
        secrets, metrics, elector, leader = _elect(settings, ctx)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            open_log_shipper(ctx.bus) as shipper,
        ):

            async def lead() -> None:
                """Act while leading: adopt the instances, reconcile; on a lost lease, stop
                acting at once (the instances go on, for the next leader)."""
                states = DeploymentStates(ctx.bus)
                async with open_local_backend(
                    settings,
                    sandbox=sandbox,
                    runtime=runtime,
                    http=http,
                    report=states.observe,
                    logs=shipper.publish,
                    metrics=metrics,
                    stop_instances=lambda: False,
                    announce=lambda notice: ctx.bus.publish_nowait(
                        starting_subject(notice.namespace, notice.name),
                        notice.model_dump_json().encode(),
                    ),
                ) as backend:
                    deployer = Deployer(
                        bus=ctx.bus,
                        backend=backend,
                        states=states,
                        secrets=secrets,
                        after_first_pass=backend.collect_orphans,
                    )
                    scaling = Scaling(
                        ctx.bus,
                        deployer,
                        tick=settings.autoscale_tick_seconds,
                        stable_window=settings.autoscale_stable_window_seconds,
                        panic_window=settings.autoscale_panic_window_seconds,
                        sample_max_age=settings.autoscale_sample_max_age_seconds,
                    )

                    async def wake(subject: str, payload: bytes) -> None:
                        await scaling.wake(subject, payload)

                    async with (
                        _acting(deployer, states, leader, ctx, settings, scaling.run()),
                        ctx.bus.listening(f"{WAKE_PREFIX}.>", wake),
                    ):
                        await elector.lost.wait()

            shutting = asyncio.Event()
            acting = False

            async def manage() -> None:
                nonlocal acting
                while not shutting.is_set():
                    await elector.leading.wait()
                    acting = True
                    try:
                        await lead()
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        log.exception("leading failed; trying again")
                        await asyncio.sleep(1)
                    finally:
                        acting = False

            electing = asyncio.create_task(elector.run())
            managing = asyncio.create_task(manage())
            try:
                yield
            finally:
                # A graceful stop (an upgrade): stop acting, leave every instance running and
                # its endpoints in place, then hand the lease over.
                electing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await electing
                shutting.set()
                elector.lost.set()
                if not acting:
                    managing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await managing
                await elector.release()

    return setup


@contextlib.asynccontextmanager
async def kubernetes_setup(settings: DeployerSettings, ctx: ServiceContext) -> AsyncIterator[None]:
    """`LAMBDABUS_BACKEND=kubernetes`: functions run as Deployments in the cluster; the
    deployer replicas elect a leader as with the local backend, and the leader applies and
    watches."""
    # Here, not at the top: the Kubernetes client's models cost a deployer ~65 MiB of memory,
    # and every fork it makes (each sandbox it starts) copies the page tables that map them.
    from lambdabus_deployer.kube import open_kubernetes_backend
    from lambdabus_platform.kube.client import KubeClient

    secrets, _, elector, leader = _elect(settings, ctx)

    async def lead() -> None:
        states = DeploymentStates(ctx.bus)
        async with (
            KubeClient.connect(settings.kube_api) as kube,
            open_log_shipper(ctx.bus) as shipper,
            open_kubernetes_backend(
                kube,
                settings.kube,
                states.observe,
                create_namespaces=settings.kube_create_namespaces,
                logs=shipper.publish,
            ) as backend,
        ):
            deployer = Deployer(bus=ctx.bus, backend=backend, states=states, secrets=secrets)
            async with _acting(deployer, states, leader, ctx, settings):
                await elector.lost.wait()

    async def manage() -> None:
        while True:
            await elector.leading.wait()
            try:
                await lead()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("leading failed; trying again")
                await asyncio.sleep(1)

    electing = asyncio.create_task(elector.run())
    managing = asyncio.create_task(manage())
    try:
        yield
    finally:
        await stop_tasks((electing, managing))
        await elector.release()


async def _watch_revisions(deployer: Deployer, ctx: ServiceContext, retry: float) -> None:
    """A changed route starts or stops the revisions it names; a broken watch starts again."""
    while True:
        try:
            await deployer.watch_revisions(ctx.bus.kv(REVISIONS_BUCKET).watch(">"))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("watching the revisions bucket failed; watching again")
        await asyncio.sleep(retry)


async def _watch_secrets(deployer: Deployer, ctx: ServiceContext, retry: float) -> None:
    """A changed secret rolls out the functions that use it; a broken watch starts again (the
    periodic reconcile covers the gap)."""
    while True:
        try:
            await deployer.watch_secrets(ctx.bus.kv(SECRETS_BUCKET).watch(">"))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("watching the secrets failed; watching again")
        await asyncio.sleep(retry)


def _elect(
    settings: DeployerSettings, ctx: ServiceContext
) -> tuple[SecretStore, DeployerMetrics, Elector, Leadership]:
    """What every backend's deployer replica has: the secret store, the metrics, the election
    of the leader, and the subscriptions that hand events to the leader's deployer (a standby
    has them redelivered)."""
    secrets = SecretStore(
        ctx.bus.kv(SECRETS_BUCKET), open_secret_box(settings.secrets, settings.state_dir.parent)
    )
    metrics = DeployerMetrics.create(ctx.metrics.registry)

    def on_role(role: Role) -> None:
        # what /metrics and the registry of replicas (`GET /v1/replicas`) show
        metrics.leader.set(1 if role == "leader" else 0)
        ctx.heartbeat.set_role(role)

    ctx.heartbeat.set_role("standby")  # until the lease says otherwise
    elector = Elector(
        ctx.bus.kv(LEASES_BUCKET), replica_id(), duration=settings.lease_seconds, on_role=on_role
    )
    leader = Leadership(elector)
    ROLE.update(elector=elector)

    async def on_event(event: LifecycleEvent) -> None:
        deployer = leader.deployer
        if deployer is None:
            raise Redeliver("this deployer replica is a standby")
        await deployer.on_event(event)

    subscribe_lifecycle(ctx, SUBSCRIPTIONS["deployer-builds"], handler=on_event)
    subscribe_lifecycle(ctx, SUBSCRIPTIONS["deployer-functions"], handler=on_event)
    return secrets, metrics, elector, leader


@contextlib.asynccontextmanager
async def _acting(
    deployer: Deployer,
    states: DeploymentStates,
    leader: Leadership,
    ctx: ServiceContext,
    settings: DeployerSettings,
    *more: Coroutine[Any, Any, None],
) -> AsyncIterator[None]:
    """The leader's work while it leads: `deployer` takes the events, reconciles, follows
    secrets and routes (and runs `more`); on exit every task stops and events go back to
    being redelivered."""
    interval = settings.reconcile_interval
    work = (
        deployer.reconcile_forever(interval),
        _watch_secrets(deployer, ctx, interval),
        _watch_revisions(deployer, ctx, interval),
        *more,
    )
    tasks = [asyncio.create_task(job) for job in work]
    leader.deployer = deployer
    try:
        yield
    finally:
        leader.deployer = None
        await stop_tasks(tasks)
        states.stop()


class Leadership:
    """The deployer that acts while this replica leads (None while it is a standby)."""

    def __init__(self, elector: Elector) -> None:
        self.elector = elector
        self.deployer: Deployer | None = None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    settings = DeployerSettings()
    if args == ["--stop-instances"]:
        # The launcher's deliberate stop (`lambdabus down`): every instance goes, whoever
        # started it (the deployer replicas are stopped first; a graceful stop leaves them).
        stopped = asyncio.run(stop_all_instances(settings))
        print(json.dumps({"msg": "instances stopped", "count": stopped}), file=sys.stderr)
        return 0
    if args:
        print("usage: python -m lambdabus_deployer [--stop-instances]", file=sys.stderr)
        return 2
    return run("deployer", settings, make_setup(settings))


if __name__ == "__main__":
    raise SystemExit(main())
