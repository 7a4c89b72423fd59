"""`deploy`: upload a function, then follow its build and rollout until it is ready."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import sys
import zipfile
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from pydantic import ValidationError

from lambdabus_client.client import (
    ApiError,
    ClientSettings,
    DeployAction,
    JsonObject,
    LambdabusClient,
)
from lambdabus_client.commands.common import (
    EVENT_TYPE_PREFIX,
    UsageError,
    _event_data,
    _fail,
    _one_line,
    _parse_time,
    _reason,
    _reason_text,
    _warn,
    parse_env,
    parse_env_from,
    parse_labels,
    print_data,
)
from lambdabus_client.packaging import load_archive, source_names
from lambdabus_events import presets
from lambdabus_events.models import FunctionConfig, FunctionSpec
from lambdabus_platform.kube import render
from lambdabus_platform.kube.render import KubeFunction
from lambdabus_platform.kube.settings import KubeSettings

# How far before the upload a deploy replays lifecycle events and build logs from; what is
# older than the upload is told apart by uid and generation, so this only absorbs clock skew.
FOLLOW_MARGIN = timedelta(seconds=2)


# Build log lines that failed builds show when they were not streamed already.
BUILD_TAIL_LINES = 20


# After the outcome, how long build log lines already on their way may still be printed.
LOG_DRAIN_SECONDS = 0.2


BUILD_LOG_PREFIX = "  \u2502 "


def belongs_to(item: JsonObject, uid: str, generation: int) -> bool:
    """Whether a log line or event data is about function `uid` at `generation` or later."""
    item_generation = item.get("generation")
    return (
        item.get("uid") == uid
        and isinstance(item_generation, int)
        and not isinstance(item_generation, bool)
        and item_generation >= generation
    )


def log_key(entry: JsonObject) -> tuple[object, ...]:
    return tuple(entry.get(key) for key in ("ts", "stream", "instance", "line"))


def unseen(entries: Iterable[JsonObject], seen: Collection[tuple[object, ...]]) -> list[JsonObject]:
    return [entry for entry in entries if log_key(entry) not in seen]


def follow_since(record: Mapping[str, Any], before_upload: datetime) -> str:
    """Where a deploy replays events and build logs from: a moment before the upload, by the
    gateway's clock (the record's `updated_at`) when it says, else by ours."""
    moment = min(_parse_time(record.get("updated_at")) or before_upload, before_upload)
    return (moment - FOLLOW_MARGIN).astimezone(UTC).isoformat().replace("+00:00", "Z")


def function_url(router_url: str, namespace: str, name: str) -> str:
    return f"{router_url.rstrip('/')}/{namespace}/{name}"


def upload_line(action: DeployAction, record: JsonObject) -> str:
    source = record.get("source") or {}
    line = (
        f"{action.capitalize()} {record.get('namespace')}/{record.get('name')}: "
        f"generation {record.get('generation')}, "
        f"sha256 {str(source.get('sha256', ''))[:12]}, "
        f"entrypoint {source.get('entrypoint', '-')}"
    )
    return line + (" (nothing changed, nothing to deploy)" if action == "unchanged" else "")


@dataclass(frozen=True, slots=True)
class Progress:
    """What one lifecycle event means for a deploy being watched."""

    line: str = ""  # what to print; nothing when empty
    done: bool = False
    exit_code: int = 0
    show_build_tail: bool = False  # print the build's last log lines not yet shown


def deploy_progress(event: JsonObject, uid: str, generation: int, *, url: str) -> Progress:
    """The step a lifecycle event is in deploying generation `generation` (or a later one) of
    the function `uid`; `url` is where the function answers once it is ready."""
    data = _event_data(event)
    if not belongs_to(data, uid, generation):
        return Progress()
    kind = str(event.get("type", "")).removeprefix(EVENT_TYPE_PREFIX)
    reason = _reason_text(data)
    replicas = f"{data.get('ready_replicas', '?')}/{data.get('replicas', '?')} replicas ready"
    changes = data.get("changes")
    match kind:
        case "function.updated" if isinstance(changes, list) and "source" not in changes:
            return Progress("configuration changed, no build needed")
        case "function.deleted":
            return Progress("function deleted while deploying", done=True, exit_code=1)
        case "build.queued" | "build.started":
            return Progress(kind.replace(".", " "))
        case "build.succeeded":
            seconds = data.get("duration_seconds")
            took = f" in {seconds:.1f}s" if isinstance(seconds, int | float) else ""
            cached = " (dependencies cached)" if data.get("dependencies_cached") else ""
            return Progress(f"build succeeded{took}{cached}")
        case "build.failed":
            return Progress(
                f"build failed: {reason or 'no reason given'}",
                done=True,
                exit_code=1,
                show_build_tail=True,
            )
        case "deployment.started" | "deployment.scaled":
            return Progress(f"{kind.replace('.', ' ')} ({replicas})")
        case "deployment.ready":
            return Progress(f"ready: {url}", done=True)
        case "deployment.failed":
            return Progress(
                f"deployment failed: {reason or 'no reason given'}", done=True, exit_code=1
            )
        case "deployment.stopped":
            return Progress(f"deployment stopped{_reason(data)}")
    return Progress()


# Build log lines that are noise to someone deploying (uv's hint about its venv).
NOISE = ("Activate with:",)


def is_noise(line: str) -> bool:
    return line.strip().startswith(NOISE)


def detect_runtime(names: Collection[str]) -> tuple[str, str]:
    """The runtime of a function's files (top-level names) and why: `handler.js` or
    `package.json` mean nodejs20, and so do JavaScript sources without a Python one (Kubeless's
    `index.js`); anything else python3.11."""
    for marker in ("handler.js", "package.json"):
        if marker in names:
            return "nodejs20", f"found {marker}"
    scripts = sorted(n for n in names if n.endswith((".js", ".cjs", ".mjs")))
    if scripts and not any(n.endswith(".py") for n in names):
        return "nodejs20", f"found {scripts[0]} and no .py file"
    return "python3.11", "no handler.js or package.json"


def archive_names(archive: bytes) -> set[str]:
    """The top-level file names of a zip archive."""
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        return {name for name in opened.namelist() if "/" not in name.rstrip("/")}


def merged_spec(current: JsonObject | None, given: JsonObject, *, replace: bool) -> JsonObject:
    """What a deploy uploads: the settings given on the command line over the function's current
    ones (so a redeploy without --env keeps the env), or only the given ones with --replace."""
    if current is None or replace:
        return dict(given)
    kept = current.get("spec") if isinstance(current.get("spec"), dict) else {}
    # What follows a preset is left to it (a changed preset moves it); the overrides stay.
    kept = presets.for_user(kept or {})
    return {**{k: v for k, v in kept.items() if v is not None}, **given}


def given_spec(args: argparse.Namespace) -> JsonObject:
    """The settings a deploy's command line gives (the spec it uploads before merging)."""
    spec: JsonObject = {"name": args.name}
    if args.env:
        spec["env"] = parse_env(args.env)
    if args.env_from:
        spec["env_from"] = parse_env_from(args.env_from)
    if args.labels:
        spec["labels"] = parse_labels(args.labels)
    for key in (
        "handler",
        "runtime",
        "replicas",
        "timeout",
        "memory",
        "description",
        "secrets",
        "invoke_auth",
        "network",
        "cpu",
        "max_concurrency",
        "resources_preset",
        "replicas_preset",
        "build_preset",
    ):
        value = getattr(args, key)
        if value is not None:
            spec[key] = value
    return spec


async def _deploy(settings: ClientSettings, args: argparse.Namespace, output: str) -> int:
    spec = given_spec(args)
    if args.dry_run:
        return await _dry_run(settings, args, spec, output)
    if args.wait_timeout <= 0:
        raise UsageError("--wait-timeout must be more than 0 seconds")
    archive = await asyncio.to_thread(load_archive, args.source, warn=_warn)
    filename = "function.zip" if args.source.is_dir() else args.source.name
    dependencies: bytes | None = None
    if args.dependencies is not None:
        try:
            dependencies = await asyncio.to_thread(args.dependencies.read_bytes)
        except OSError as exc:
            raise UsageError(f"--dependencies {args.dependencies}: {exc.strerror or exc}") from None
    namespace = settings.namespace
    async with LambdabusClient.from_settings(settings) as client:
        current: JsonObject | None = None
        try:
            current = await client.get_function(namespace, args.name)
        except ApiError as error:
            if error.status != 404:
                raise
        spec = merged_spec(current, spec, replace=args.replace)
        if "runtime" not in spec:
            runtime, why = detect_runtime(source_names(archive, filename))
            spec["runtime"] = runtime
            if output == "table":
                print(f"runtime {runtime} ({why}; --runtime chooses)", flush=True)
        # Asked first: if it fails, nothing has been uploaded yet.
        info = await client.info() if args.wait else {}
        before_upload = datetime.now(UTC)
        action, record = await client.deploy_function(
            namespace, spec, archive, filename=filename, dependencies=dependencies
        )
        if output == "table":
            print(upload_line(action, record), flush=True)
        if not args.wait:
            return await _deploy_status(client, namespace, action, record, output)
        if action != "unchanged":
            watch = _DeployWatch(
                client,
                namespace,
                args.name,
                uid=str(record.get("uid")),
                generation=int(record.get("generation") or 0),
                since=follow_since(record, before_upload),
                url=function_url(str(info.get("router_url", "")), namespace, args.name),
                echo=output == "table",
            )
            try:
                async with asyncio.timeout(args.wait_timeout):
                    code = await watch.run()
            except TimeoutError:
                return _fail(
                    "timeout",
                    f"{namespace}/{args.name} generation {record.get('generation')} was not "
                    f"ready after {args.wait_timeout:g} s; it may still become ready "
                    f"(see 'lambdabus status {args.name}' and 'lambdabus logs {args.name}')",
                    1,
                )
            if code != 0:
                return code
        if output != "table":
            status = await client.function_status(namespace, args.name)
            print_data(output, {"action": action, "function": record, "status": status})
    return 0


DRY_RUN_UID = "dry-run"


def kubernetes_objects(
    namespace: str, spec: JsonObject, archive: bytes, dependencies: bytes | None, kube: KubeSettings
) -> list[JsonObject]:
    """What `deploy --dry-run --backend kubernetes` prints: every object the function would
    become, rendered by the Kubernetes backend's renderers from the spec the deploy would
    upload (presets resolved). The image tag is the sha256 of what would be uploaded."""
    try:
        resolved = FunctionSpec.model_validate(spec)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, item['loc'])) or 'spec'}: {item['msg']}" for item in error.errors()
        )
        raise UsageError(f"invalid function spec: {problems}") from None
    config = FunctionConfig.model_validate(resolved.model_dump(exclude={"name"}))
    digest = hashlib.sha256(archive + (dependencies or b"")).hexdigest()
    fn = KubeFunction(namespace, resolved.name, DRY_RUN_UID, config)
    return render.render_all(fn, kube, digest)


async def _dry_run(
    settings: ClientSettings, args: argparse.Namespace, spec: JsonObject, output: str
) -> int:
    """`deploy --dry-run`: nothing is uploaded or applied. With the kubernetes backend, the
    Kubernetes objects the function would become; with the local one, the spec it would have."""
    archive = await asyncio.to_thread(load_archive, args.source, warn=_warn)
    filename = "function.zip" if args.source.is_dir() else args.source.name
    dependencies: bytes | None = None
    if args.dependencies is not None:
        try:
            dependencies = await asyncio.to_thread(args.dependencies.read_bytes)
        except OSError as exc:
            raise UsageError(f"--dependencies {args.dependencies}: {exc.strerror or exc}") from None
    if "runtime" not in spec:
        spec["runtime"], _ = detect_runtime(source_names(archive, filename))
    if args.backend != "kubernetes":
        try:
            resolved = FunctionSpec.model_validate(spec)
        except ValidationError as error:
            raise UsageError(f"invalid function spec: {error.errors()[0]['msg']}") from None
        _warn("the local backend makes no Kubernetes objects; --backend kubernetes shows them")
        print_data("yaml" if output == "table" else output, resolved.model_dump(mode="json"))
        return 0
    try:
        kube = KubeSettings()
    except ValidationError as error:
        raise UsageError(f"Kubernetes backend settings: {error.errors()[0]['msg']}") from None
    objects = kubernetes_objects(settings.namespace, spec, archive, dependencies, kube)
    if output == "json":
        print_data("json", {"apiVersion": "v1", "kind": "List", "items": objects})
    else:
        print(yaml.safe_dump_all(objects, sort_keys=False, allow_unicode=True), end="")
    return 0


async def _deploy_status(
    client: LambdabusClient, namespace: str, action: str, record: JsonObject, output: str
) -> int:
    """`deploy --no-wait`: the function's status right after the upload."""
    status: JsonObject | None = None
    status_error = ""
    try:
        status = await client.function_status(namespace, str(record.get("name")))
    except ApiError as error:
        status_error = f"{error.code}: {error.message}"
    if output != "table":
        print_data(output, {"action": action, "function": record, "status": status})
    elif status is not None:
        print(f"Image: {status.get('image_status')}  Status: {status.get('status')}")
    else:
        print(f"Status: unknown ({_one_line(status_error)})")
    return 0


@dataclass
class _DeployWatch:
    """Follows a deploy after its upload: the function's lifecycle events decide (through
    `deploy_progress`), while its build log lines are printed as they come."""

    client: LambdabusClient
    namespace: str
    name: str
    uid: str
    generation: int
    since: str
    url: str
    echo: bool
    shown: set[tuple[object, ...]] = field(default_factory=set, init=False)
    printed: set[str] = field(default_factory=set, init=False)
    build_done: bool = field(default=False, init=False)

    async def run(self) -> int:
        """The exit status: 0 once ready, 1 when the build or the deployment failed."""
        build_logs = asyncio.create_task(self._print_build_logs())
        try:
            progress = await self._outcome()
            # Lines already on their way still belong before the verdict.
            await asyncio.wait([build_logs], timeout=LOG_DRAIN_SECONDS)
        finally:
            build_logs.cancel()
            await asyncio.gather(build_logs, return_exceptions=True)
        if progress.show_build_tail and self.echo:
            await self._print_build_tail()
        if progress.exit_code != 0:
            print(progress.line, file=sys.stderr, flush=True)
        elif self.echo:
            print(progress.line, flush=True)
        return progress.exit_code

    async def _outcome(self) -> Progress:
        events = self.client.lifecycle(
            namespace=self.namespace, function=self.name, since=self.since
        )
        async with contextlib.aclosing(events):
            async for event in events:
                progress = deploy_progress(event, self.uid, self.generation, url=self.url)
                if progress.done:
                    return progress
                if not progress.line or progress.line in self.printed or not self.echo:
                    continue
                self.printed.add(progress.line)  # a replayed event does not print again
                building = progress.line.startswith(("build queued", "build started"))
                if not building and not self.build_done:
                    await self._drain_build_logs()
                print(progress.line, flush=True)
        raise ApiError(
            0, "stream_closed", "the gateway ended the lifecycle stream before the deploy finished"
        )

    async def _print_build_logs(self) -> None:
        if not self.echo:
            return
        entries = self.client.logs(
            self.namespace, self.name, build=True, since=self.since, follow=True
        )
        try:
            async with contextlib.aclosing(entries):
                async for entry in entries:
                    self._print_build_line(entry)
        except ApiError as error:  # the outcome does not depend on the logs
            _warn(f"build logs unavailable: {error.code}: {_one_line(error.message)}")

    async def _print_build_tail(self) -> None:
        try:
            entries = [
                entry
                async for entry in self.client.logs(
                    self.namespace, self.name, build=True, since=self.since, tail=BUILD_TAIL_LINES
                )
            ]
        except ApiError as error:
            _warn(f"build logs unavailable: {error.code}: {_one_line(error.message)}")
            return
        for entry in unseen(entries, self.shown):
            self._print_build_line(entry)

    def _print_build_line(self, entry: JsonObject) -> None:
        if not belongs_to(entry, self.uid, self.generation) or self.build_done:
            return
        key = log_key(entry)
        if key in self.shown:
            return
        self.shown.add(key)
        if not is_noise(str(entry.get("line", ""))):
            print(f"{BUILD_LOG_PREFIX}{entry.get('line', '')}", flush=True)

    async def _drain_build_logs(self) -> None:
        """Let build log lines already on their way print, then stop printing any: nothing of
        the build may appear after the progress has moved past it."""
        await asyncio.sleep(LOG_DRAIN_SECONDS)
        self.build_done = True
