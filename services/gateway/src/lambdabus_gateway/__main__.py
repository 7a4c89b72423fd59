"""`python -m lambdabus_gateway`: run the gateway service."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from lambdabus_events.models import BuildState, DeploymentState, FunctionRecord
from lambdabus_gateway.api import GATEWAY, Gateway, add_routes
from lambdabus_gateway.auth import AUTH, TOKENS, authenticate
from lambdabus_gateway.deadletters import DeadLetters
from lambdabus_gateway.functions import Functions
from lambdabus_gateway.gitsync import GitSources, GitSync
from lambdabus_gateway.invocations import Invocations
from lambdabus_gateway.invoke import Invoker
from lambdabus_gateway.quotas import Quotas
from lambdabus_gateway.revisions import Revisions
from lambdabus_gateway.schedules import Schedules
from lambdabus_gateway.secrets import Secrets
from lambdabus_gateway.settings import GatewaySettings
from lambdabus_gateway.triggers import Triggers
from lambdabus_platform.archive import ArchiveLimits
from lambdabus_platform.blobstore import open_blob_store
from lambdabus_platform.errors import LambdabusError
from lambdabus_platform.gitsource import GitPolicy
from lambdabus_platform.httpauth import Authenticator
from lambdabus_platform.registry import Registry
from lambdabus_platform.secretbox import open_secret_box
from lambdabus_platform.secretstore import SecretStore
from lambdabus_platform.service import ServiceContext, run
from lambdabus_platform.subjects import (
    BUILDS_BUCKET,
    DEPLOYMENTS_BUCKET,
    FUNCTIONS_BUCKET,
    INVOCATIONS_BUCKET,
    QUOTAS_BUCKET,
    SCHEDULES_BUCKET,
    SECRETS_BUCKET,
    TOKENS_BUCKET,
    TRIGGERS_BUCKET,
)
from lambdabus_platform.tokens import FailureLimiter
from lambdabus_platform.tokenstore import TokenStore

log = logging.getLogger("lambdabus.gateway")


def make_setup(settings: GatewaySettings):  # type: ignore[no-untyped-def]
    @contextlib.asynccontextmanager
    async def setup(ctx: ServiceContext) -> AsyncIterator[None]:
        invoker = Invoker(settings.router_url, settings.max_invoke_body_bytes)
        box = open_secret_box(settings.secrets, settings.state_dir)
        records = Registry(ctx.bus.kv(FUNCTIONS_BUCKET), FunctionRecord)
        quotas = Quotas(kv=ctx.bus.kv(QUOTAS_BUCKET), functions=records, settings=settings.quota)
        tokens = TokenStore(ctx.bus.kv(TOKENS_BUCKET))
        limiter = FailureLimiter(settings.auth_max_failures, settings.auth_failure_window_seconds)
        ctx.app[TOKENS] = tokens
        ctx.app[AUTH] = Authenticator(tokens, limiter)
        ctx.app.middlewares.append(authenticate)
        secret_store = SecretStore(ctx.bus.kv(SECRETS_BUCKET), box)
        git_sources = GitSources(
            policy=GitPolicy(
                allow_private=settings.git_allow_private, timeout=settings.git_timeout
            ),
            secrets=secret_store,
        )
        async with open_blob_store(settings.store, ctx.bus) as blobs, tokens.watching():
            if settings.bootstrap_token_file is not None:
                await tokens.bootstrap_admin(
                    settings.bootstrap_token_file, renew=settings.bootstrap_renew
                )
            revisions = Revisions(ctx.bus, keep=settings.revisions_kept)
            functions = Functions(
                bus=ctx.bus,
                records=records,
                blobs=blobs,
                limits=ArchiveLimits(
                    max_entries=settings.max_archive_entries,
                    max_uncompressed=settings.max_uncompressed_bytes,
                ),
                quotas=quotas,
                allow_unsafe_requirements=settings.allow_unsafe_requirements,
                builds=Registry(ctx.bus.kv(BUILDS_BUCKET), BuildState),
                git=git_sources,
                revisions=revisions,
                backend=settings.backend,
            )
            git_sync = GitSync(
                functions=functions, sources=git_sources, interval=settings.git_poll_interval
            )
            triggers = Triggers(bus=ctx.bus, kv=ctx.bus.kv(TRIGGERS_BUCKET), functions=functions)
            schedules = Schedules(bus=ctx.bus, kv=ctx.bus.kv(SCHEDULES_BUCKET), functions=functions)
            ctx.app[GATEWAY] = Gateway(
                settings=settings,
                bus=ctx.bus,
                functions=functions,
                builds=Registry(ctx.bus.kv(BUILDS_BUCKET), BuildState),
                deployments=Registry(ctx.bus.kv(DEPLOYMENTS_BUCKET), DeploymentState),
                stopping=ctx.stopping,
                revisions=revisions,
                invoker=invoker,
                triggers=triggers,
                deadletters=DeadLetters(bus=ctx.bus, triggers=triggers),
                invocations=Invocations(
                    bus=ctx.bus,
                    kv=ctx.bus.kv(INVOCATIONS_BUCKET),
                    max_body=settings.max_invoke_body_bytes,
                ),
                secrets=Secrets(bus=ctx.bus, store=secret_store),
                quotas=quotas,
                schedules=schedules,
                git_sync=git_sync,
            )
            add_routes(ctx.app)
            try:
                await triggers.reconcile()
            except LambdabusError as exc:  # the next start tries again
                log.warning("could not reconcile triggers", extra={"error": exc.message})
            try:
                await schedules.reconcile()
            except LambdabusError as exc:  # the next start tries again
                log.warning("could not reconcile schedules", extra={"error": exc.message})
            await invoker.start()
            await git_sync.start()
            try:
                yield
            finally:
                await git_sync.close()
                await invoker.close()

    return setup


def main() -> int:
    settings = GatewaySettings()
    # aiohttp's own cap sits above ours so that our reader answers 413 with the JSON error shape.
    return run(
        "gateway",
        settings,
        make_setup(settings),
        client_max_size=settings.max_upload_bytes + 1024**2,
    )


if __name__ == "__main__":
    raise SystemExit(main())
