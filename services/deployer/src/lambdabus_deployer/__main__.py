"""`python -m lambdabus_deployer`: run the deployer service.

It turns every function with a successful build into running instances (the local backend:
sandboxed processes), keeps them healthy, rolls out new revisions without a gap, and records
what runs (endpoints included) in the `deployments` KV bucket for the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiohttp

from lambdabus_deployer.deployer import Deployer
from lambdabus_deployer.local import open_local_backend
from lambdabus_deployer.logship import open_log_shipper
from lambdabus_deployer.metrics import DeployerMetrics
from lambdabus_deployer.runtime import locate_runtime
from lambdabus_deployer.settings import DeployerSettings
from lambdabus_deployer.state import DeploymentStates
from lambdabus_platform.eventapi import SUBSCRIPTIONS
from lambdabus_platform.sandbox import detect_sandbox, install_egress_rules
from lambdabus_platform.secretbox import open_secret_box
from lambdabus_platform.secretstore import SecretStore
from lambdabus_platform.service import ServiceContext, Setup, run, subscribe_lifecycle
from lambdabus_platform.subjects import SECRETS_BUCKET

log = logging.getLogger("lambdabus.deployer")


def make_setup(settings: DeployerSettings) -> Setup:
    @contextlib.asynccontextmanager
    async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
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
        runtime = locate_runtime(settings)
        if runtime.pythonpath is None:
            log.warning("the runtime SDK (lambdabus_runtime) was not found; python functions fail")
        states = DeploymentStates(ctx.bus)
        secrets = SecretStore(
            ctx.bus.kv(SECRETS_BUCKET), open_secret_box(settings.secrets, settings.state_dir.parent)
        )
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            open_log_shipper(ctx.bus) as shipper,
            open_local_backend(
                settings,
                sandbox=sandbox,
                runtime=runtime,
                http=http,
                report=states.observe,
                logs=shipper.publish,
                metrics=DeployerMetrics.create(ctx.metrics.registry),
            ) as backend,
        ):
            deployer = Deployer(bus=ctx.bus, backend=backend, states=states, secrets=secrets)
            subscribe_lifecycle(ctx, SUBSCRIPTIONS["deployer-builds"], handler=deployer.on_event)
            subscribe_lifecycle(ctx, SUBSCRIPTIONS["deployer-functions"], handler=deployer.on_event)
            reconciling = asyncio.create_task(
                deployer.reconcile_forever(settings.reconcile_interval)
            )
            watching = asyncio.create_task(
                _watch_secrets(deployer, ctx, settings.reconcile_interval)
            )
            try:
                yield
            finally:
                for task in (reconciling, watching):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                try:
                    await asyncio.wait_for(states.close(), 3)
                except Exception as exc:
                    log.warning("could not withdraw endpoints", extra={"error": repr(exc)})
            # Leaving open_local_backend stops every instance: nothing outlives the deployer.

    return setup


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


def main() -> int:
    settings = DeployerSettings()
    return run("deployer", settings, make_setup(settings))


if __name__ == "__main__":
    raise SystemExit(main())
