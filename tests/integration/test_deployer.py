"""The deployer in-process against a real nats-server, running real instances of real functions
with the real runtime SDK (`python -m lambdabus_runtime`): endpoints in the KV answer HTTP,
logs reach the LOGS stream, crashes become CrashLoop, rollouts have no gap, deletion leaves no
process, and a deployer killed with SIGKILL cleans up after itself when it starts again.

Each test has a nats-server of its own (the deployer reconciles *every* function in the KV),
its store under the test's `.lambdabus`, laid out as `lambdabus up` lays it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp
import pytest

from lambdabus_deployer.__main__ import make_setup
from lambdabus_deployer.cgroups import detect_cgroups
from lambdabus_deployer.local import stop_all_instances
from lambdabus_deployer.process_table import ProcessTable, is_running
from lambdabus_deployer.settings import DeployerSettings
from lambdabus_events.catalog import (
    BuildSucceeded,
    BuildSucceededData,
    FunctionDeleted,
    FunctionDeletedData,
    FunctionSpecSummary,
    FunctionUpdated,
    FunctionUpdatedData,
    LifecycleEvent,
    lifecycle_event,
    parse_lifecycle,
)
from lambdabus_events.models import (
    ArtifactManifest,
    BuildState,
    DeploymentState,
    FunctionConfig,
    FunctionRecord,
    LogLine,
    Runtime,
    SourceRef,
)
from lambdabus_platform.bus import Bus
from lambdabus_platform.envdigest import tree_digest
from lambdabus_platform.natsserver import NatsServer, run_nats_server
from lambdabus_platform.registry import Registry
from lambdabus_platform.sandbox import detect_sandbox
from lambdabus_platform.service import serve
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.status import compute_status
from lambdabus_platform.subjects import (
    BUILDS_BUCKET,
    DEPLOYMENTS_BUCKET,
    FUNCTIONS_BUCKET,
    function_key,
    lifecycle_filter,
    logs_subject,
)
from lambdabus_testing.endpoints import endpoint_session

WAIT = 20.0
T = TypeVar("T")

PROBE = """\
import errno, os, sys

print("probe imported", flush=True)
if os.environ.get("CRASH_AT_IMPORT"):
    raise RuntimeError("asked to crash at import")
print("probe says hello on stderr", file=sys.stderr, flush=True)


def _attempt(action):
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "ok"


def _write(path):
    with open(path, "w") as f:
        f.write("x")


async def main(request):
    platform = os.environ.get("PLATFORM_DIR", "")
    secret = os.path.join(platform, "nats", "secret.txt")
    host_tmp_file = os.environ.get("HOST_TMP_FILE", "")
    scratch_file = os.path.join(os.environ["HOME"], "note.txt")
    return {
        "greeting": os.environ.get("GREETING", ""),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "env": sorted(os.environ),
        "home": os.environ["HOME"],
        "cwd": os.getcwd(),
        "write_root": _attempt(lambda: _write("/lambdabus-probe")),
        "write_code": _attempt(lambda: _write(os.path.join(os.path.dirname(__file__), "x"))),
        "write_scratch": _attempt(lambda: _write(scratch_file)),
        "write_tmp": _attempt(lambda: _write(os.environ["TMP_PROBE"]))
        if "TMP_PROBE" in os.environ
        else "skipped",
        "sees_secret": os.path.exists(secret),
        "sees_host_tmp_file": os.path.exists(host_tmp_file),
        "pid": os.getpid(),
        "sid": os.getsid(0),
        "status": {
            key: value.strip()
            for key, _, value in (line.partition(":") for line in open("/proc/self/status"))
            if key.startswith("Cap") or key in ("NoNewPrivs", "Groups", "Uid", "Gid")
        },
    }
"""

CRASH = """\
print("about to fail", flush=True)
raise RuntimeError("the config is missing: boom-at-import")
"""

EXIT_ON_CALL = """\
import os


async def main(request):
    os._exit(7)
"""

HANG_ON_CALL = """\
import time


async def main(request):
    time.sleep(60)  # blocks the runtime's event loop: /healthz goes unanswered
"""

FLOOD = """\
import sys

print("L" * 50000)
for i in range(20000):
    print(f"flood line {i}")
sys.stdout.flush()


async def main(request):
    return {"ok": True}
"""


def closing(iterator: AsyncIterator[T]) -> contextlib.aclosing[AsyncGenerator[T, None]]:
    """The Bus's iterators are async generators: close them (and their NATS subscriptions)."""
    return contextlib.aclosing(cast(AsyncGenerator[T, None], iterator))


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    store = tmp_path / ".lambdabus" / "nats"
    async with run_nats_server(store, log_path=tmp_path / "nats.log") as server:
        yield server


@pytest.fixture(scope="module")
def bubblewrap() -> bool:
    return asyncio.run(detect_sandbox("auto")).enabled


@pytest.fixture(scope="module")
def cgroups() -> bool:
    return detect_cgroups("lambdabus")[0] is not None


@dataclass
class World:
    bus: Bus
    tmp: Path
    nats: NatsSettings
    http: aiohttp.ClientSession
    ns: str = field(default_factory=lambda: f"t{secrets.token_hex(3)}")

    @property
    def platform(self) -> Path:
        return self.tmp / ".lambdabus"

    @property
    def functions(self) -> Registry[FunctionRecord]:
        return Registry(self.bus.kv(FUNCTIONS_BUCKET), FunctionRecord)

    @property
    def builds(self) -> Registry[BuildState]:
        return Registry(self.bus.kv(BUILDS_BUCKET), BuildState)

    @property
    def deployments(self) -> Registry[DeploymentState]:
        return Registry(self.bus.kv(DEPLOYMENTS_BUCKET), DeploymentState)

    def settings(self, **overrides: Any) -> DeployerSettings:
        values: dict[str, Any] = {
            "port": 0,
            "nats": self.nats,
            "state_dir": self.platform / "deployer",
            "health_interval": 0.1,
            "health_timeout": 1.0,
            "start_timeout": 15.0,
            "restart_base_delay": 0.05,
            "restart_max_delay": 0.2,
            "crashloop_restarts": 3,
            "reconcile_interval": 0.5,
            "drain_seconds": 0.3,
            "stop_grace_seconds": 3.0,
            "shutdown_grace_seconds": 2.0,
        }
        values.update(overrides)
        return DeployerSettings(**values)

    def artifact(self, name: str, uid: str, generation: int, source: str, runtime: Runtime) -> str:
        """Lay an artifact out as the local builder does; return its `file://` reference."""
        base = self.platform / "builder" / "artifacts" / self.ns / name / f"{uid}-{generation}"
        code = base / "code"
        code.mkdir(parents=True)
        entrypoint = "handler.js" if runtime == "nodejs20" else "lambda_main.py"
        (code / entrypoint).write_text(source)
        env = self.platform / "builder" / "envs" / runtime
        if runtime == "nodejs20":
            (env / "node_modules").mkdir(parents=True, exist_ok=True)
        elif not env.exists():
            (env / "bin").mkdir(parents=True)
            (env / "bin" / "python").symlink_to(os.path.realpath(sys.executable))
        manifest = ArtifactManifest(
            runtime=runtime,
            entrypoint=entrypoint,
            style="node" if runtime == "nodejs20" else "luna",
            code_dir=str(code),
            env_dir=str(env),
            source_sha256="0" * 64,
            deps_key=runtime,
            env_digest=tree_digest(env),
        )
        (base / "manifest.json").write_text(manifest.model_dump_json())
        return f"file://{base / 'manifest.json'}"

    async def create(
        self,
        name: str,
        source: str,
        *,
        env: dict[str, str] | None = None,
        replicas: int = 1,
        publish: bool = True,
        runtime: Runtime = "python3.11",
        memory: int = 256,
        **config: Any,
    ) -> FunctionRecord:
        """A function record, its succeeded build, and (unless told not to) `build.succeeded`.
        A full core unless told otherwise (Kyma's default preset M allows 100m): these tests are
        about restarts and rollouts, not about a throttled start."""
        config.setdefault("cpu", 1000)
        now = datetime.now(UTC)
        uid = str(uuid.uuid4())
        record = FunctionRecord(
            namespace=self.ns,
            name=name,
            uid=uid,
            generation=1,
            spec=FunctionConfig(
                env=env or {},
                replicas=replicas,
                timeout=10,
                runtime=runtime,
                memory=memory,
                **config,
            ),
            source=SourceRef(
                sha256="0" * 64, size=1, kind="inline", entrypoint="lambda_main.py", files=1
            ),
            created_at=now,
            updated_at=now,
        )
        artifact = self.artifact(name, uid, 1, source, runtime)
        await self.functions.put(self.ns, name, record)
        await self.builds.put(
            self.ns,
            name,
            BuildState(
                namespace=self.ns,
                name=name,
                uid=uid,
                generation=1,
                phase="succeeded",
                artifact=artifact,
                updated_at=now,
            ),
        )
        if publish:
            data = BuildSucceededData(
                namespace=self.ns,
                name=name,
                uid=uid,
                generation=1,
                source_sha256="0" * 64,
                runtime=runtime,
                artifact=artifact,
                duration_seconds=0.1,
                dependencies_cached=True,
            )
            await self.bus.publish_lifecycle(
                lifecycle_event(
                    BuildSucceeded,
                    data,
                    service="builder",
                    subject=f"{self.ns}/{name}",
                    key=f"{uid}:1:succeeded",
                )
            )
        return record

    async def update_config(self, record: FunctionRecord, **config: Any) -> FunctionRecord:
        spec = record.spec.model_copy(update=config)
        updated = record.model_copy(
            update={
                "spec": spec,
                "generation": record.generation + 1,
                "updated_at": datetime.now(UTC),
            }
        )
        await self.functions.put(self.ns, record.name, updated)
        data = FunctionUpdatedData(
            namespace=self.ns,
            name=record.name,
            uid=record.uid,
            generation=updated.generation,
            spec=FunctionSpecSummary.of(spec, salt=record.env_salt),
            source=record.source,
            changes=["config"],
        )
        await self.bus.publish_lifecycle(
            lifecycle_event(
                FunctionUpdated,
                data,
                service="gateway",
                subject=f"{self.ns}/{record.name}",
                key=f"{record.uid}:{updated.generation}",
            )
        )
        return updated

    async def delete(self, record: FunctionRecord) -> None:
        await self.functions.delete(self.ns, record.name)
        data = FunctionDeletedData(
            namespace=self.ns, name=record.name, uid=record.uid, generation=record.generation
        )
        await self.bus.publish_lifecycle(
            lifecycle_event(
                FunctionDeleted,
                data,
                service="gateway",
                subject=f"{self.ns}/{record.name}",
                key=f"{record.uid}:deleted",
            )
        )

    async def wait_state(
        self, name: str, predicate: Callable[[DeploymentState | None], bool], timeout: float = WAIT
    ) -> DeploymentState | None:
        """Follow the function's deployment state in the KV until `predicate` holds."""
        seen: list[DeploymentState | None] = []
        try:
            watch = self.bus.kv(DEPLOYMENTS_BUCKET).watch(function_key(self.ns, name))
            async with asyncio.timeout(timeout), closing(watch) as entries:
                async for entry in entries:
                    state = (
                        DeploymentState.model_validate_json(entry.value) if entry.value else None
                    )
                    seen.append(state)
                    if predicate(state):
                        return state
        except TimeoutError:
            last = seen[-1] if seen else None
            raise AssertionError(
                f"deployment of {self.ns}/{name} did not get there; last state: {last!r}"
            ) from None
        raise AssertionError("the KV watch ended")

    async def events(self, name: str, until: str, timeout: float = WAIT) -> list[LifecycleEvent]:
        """Lifecycle events of the function from the start, up to one of type `until`."""
        events: list[LifecycleEvent] = []
        replay = self.bus.replay(
            "LIFECYCLE", lifecycle_filter(namespace=self.ns, name=name), deliver_all=True
        )
        async with asyncio.timeout(timeout), closing(replay) as messages:
            async for message in messages:
                events.append(parse_lifecycle(message.data))
                if events[-1].type == until:
                    return events
        raise AssertionError("the replay ended")

    async def logs(
        self, name: str, predicate: Callable[[list[LogLine]], bool], timeout: float = WAIT
    ) -> list[LogLine]:
        lines: list[LogLine] = []
        try:
            replay = self.bus.replay(
                "LOGS", logs_subject("runtime", self.ns, name), deliver_all=True
            )
            async with asyncio.timeout(timeout), closing(replay) as messages:
                async for message in messages:
                    lines.append(LogLine.model_validate_json(message.data))
                    if predicate(lines):
                        return lines
        except TimeoutError:
            tail = "\n".join(f"{x.stream} {x.instance}: {x.line[:200]}" for x in lines[-30:])
            raise AssertionError(f"log lines did not arrive; last ones:\n{tail}") from None
        raise AssertionError("the replay ended")

    async def call(self, endpoint: str) -> dict[str, Any]:
        async with (
            endpoint_session(endpoint) as (http, base),
            http.get(f"{base}/", timeout=aiohttp.ClientTimeout(total=5)) as r,
        ):
            assert r.status == 200, await r.text()
            body: dict[str, Any] = await r.json()
            return body

    def table(self) -> ProcessTable:
        return ProcessTable(self.platform / "deployer" / "instances.json")


@pytest.fixture
async def world(tmp_path: Path, nats_settings: NatsSettings, bus: Bus) -> AsyncIterator[World]:
    async with aiohttp.ClientSession() as http:
        yield World(bus=bus, tmp=tmp_path, nats=nats_settings, http=http)


@contextlib.asynccontextmanager
async def running_deployer(settings: DeployerSettings) -> AsyncIterator[str]:
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve("deployer", settings, make_setup(settings), stop=stop, on_ready=ready.set_result)
    )
    waiters: set[asyncio.Future[Any]] = {task, ready}
    done, _ = await asyncio.wait(waiters, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    url = await asyncio.wait_for(ready, 1)
    try:
        yield url
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        # A stopped deployer leaves its instances to the next leader: the launcher's `down`
        # stops them (as here, after every test).
        await stop_all_instances(settings)
        await reaped()


async def reaped(timeout: float = 10) -> None:
    """Until no sandbox process this test started is left to reap (bubblewrap, slirp4netns end
    with their instance): the loop must not close with children it still waits for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = stat.read_text()
                name = text[text.index("(") + 1 : text.rindex(")")]
                if int(text.rsplit(")", 1)[1].split()[1]) == os.getpid() and name in (
                    "bwrap",
                    "slirp4netns",
                ):
                    left.append(name)
        if not left:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)  # the child watcher's callbacks run


def ready_with(replicas: int, generation: int = 1) -> Callable[[DeploymentState | None], bool]:
    def check(state: DeploymentState | None) -> bool:
        return (
            state is not None
            and state.phase == "ready"
            and state.generation == generation
            and len(state.endpoints) == replicas
        )

    return check


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


async def test_replicas_run_and_their_endpoints_answer(world: World) -> None:
    async with running_deployer(world.settings()):
        record = await world.create("hello", PROBE, replicas=2, env={"GREETING": "hi"})
        state = await world.wait_state("hello", ready_with(2))
        assert state is not None
        assert len(set(state.endpoints)) == 2
        answers = [await world.call(endpoint) for endpoint in state.endpoints]
        assert [a["greeting"] for a in answers] == ["hi", "hi"]
        ids = {i.id for i in state.instances}
        # a scratch dir each (a fresh start's under instances/, a pre-started runtime's under
        # pool/), written by its instance (as root it is a tmpfs that only the instance's own
        # mount namespace holds, so the host sees an empty dir)
        scratch = {r.scratch for r in world.table().load() if r.instance in ids}
        assert len(scratch) == 2
        assert all(Path(d).is_dir() for d in scratch)
        assert [a["write_scratch"] for a in answers] == ["ok", "ok"]
        assert state.ready_replicas == 2
        assert state.timeout == 10
        assert {i.phase for i in state.instances} == {"ready"}

        lines = await world.logs(
            "hello",
            lambda ls: (
                {x.instance for x in ls if x.line == "probe imported"} == ids
                and {x.instance for x in ls if x.line == "probe says hello on stderr"} == ids
            ),
        )
        said = [x for x in lines if x.line == "probe imported"]
        assert {x.stream for x in said} == {"stdout"}
        assert {(x.kind, x.uid, x.generation) for x in said} == {("runtime", record.uid, 1)}
        assert {x.stream for x in lines if x.line == "probe says hello on stderr"} == {"stderr"}
        assert not any("listening" in x.line and x.stream == "stdout" for x in lines)

        events = await world.events("hello", "io.lambdabus.deployment.ready")
        types = [e.type for e in events]
        assert types.index("io.lambdabus.deployment.started") < types.index(
            "io.lambdabus.deployment.ready"
        )
        built = await world.builds.get(world.ns, "hello")
        assert built is not None
        assert compute_status(record, built.value, state).status == "running"


@pytest.mark.parametrize("fork", [False, True], ids=["started", "forked"])
async def test_sandbox_hides_the_platform_and_drops_privileges(
    world: World, bubblewrap: bool, fork: bool
) -> None:
    """The same for a runtime bubblewrap starts and one forked from the zygote into the
    sandbox bubblewrap made (`pool_fork`)."""
    if not bubblewrap:
        pytest.skip("bubblewrap cannot make a sandbox on this machine")
    secret = world.platform / "nats" / "secret.txt"
    secret.write_text("the platform's")
    host_tmp_file = Path("/tmp") / f"lambdabus-host-{secrets.token_hex(4)}"
    host_tmp_file.write_text("the host's")
    tmp_probe = Path("/tmp") / f"lambdabus-probe-{secrets.token_hex(4)}"
    try:
        async with running_deployer(world.settings(sandbox="bubblewrap", pool_fork=fork)):
            await world.create(
                "probe",
                PROBE,
                env={
                    "PLATFORM_DIR": str(world.platform),
                    "HOST_TMP_FILE": str(host_tmp_file),
                    "TMP_PROBE": str(tmp_probe),
                },
            )
            state = await world.wait_state("probe", ready_with(1))
            assert state is not None
            assert state.sandboxed
            seen = await world.call(state.endpoints[0])
            forked = _forked_runtimes()
    finally:
        host_tmp_file.unlink()
    # (a forked runtime is a child of a keeper, a child of the zygote: not of bubblewrap)
    assert (len(forked) >= 1) == fork
    status = seen["status"]
    assert {status[k] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == {
        "0000000000000000"
    }
    assert status["NoNewPrivs"] == "1"
    assert seen["sid"] != 0  # a session of its own in the sandbox (not one outside it)
    assert status["Groups"] == ""
    assert status["Uid"].split() == [str(seen["uid"])] * 4
    assert status["Gid"].split() == [str(seen["gid"])] * 4
    assert seen["uid"] != 0
    assert seen["uid"] == seen["gid"]
    if os.geteuid() == 0:  # each function has its own unprivileged uid on the host
        assert 1000 <= seen["uid"] != os.getuid()
    assert seen["write_root"] in ("EROFS", "EACCES")
    assert seen["write_code"] in ("EROFS", "EACCES")
    assert seen["write_scratch"] == "ok"
    assert seen["write_tmp"] == "ok"
    assert not seen["sees_secret"]
    assert not seen["sees_host_tmp_file"]
    assert not tmp_probe.exists()  # its /tmp is its own
    assert seen["home"] == seen["cwd"] == "/tmp"  # its scratch dir
    assert seen["pid"] < 10  # a pid namespace of its own


def _forked_runtimes() -> list[int]:
    """The runtimes on this machine forked from a zygote (grandchildren of one)."""
    children: dict[int, list[int]] = {}
    zygotes = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(
                    int(entry.name)
                )
                if b"lambdabus_runtime.zygote" in (entry / "cmdline").read_bytes():
                    zygotes.append(int(entry.name))
    return [g for z in zygotes for k in children.get(z, []) for g in children.get(k, [])]


def _launchers() -> list[int]:
    """bubblewrap and slirp4netns processes on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(os.readlink(entry / "exe")).name in ("bwrap", "slirp4netns"):
                    found.append(int(entry.name))
    return found


async def test_the_functions_env_reaches_the_runtime_only_inside_the_sandbox(
    world: World, bubblewrap: bool
) -> None:
    """The function's env is in no argv and no environment of the launcher (bubblewrap,
    slirp4netns): the runtime reads it from a file inside the sandbox."""
    if not bubblewrap:
        pytest.skip("bubblewrap cannot make a sandbox on this machine")
    value = f"env-value-{secrets.token_hex(6)}"
    async with running_deployer(world.settings(sandbox="bubblewrap")):
        await world.create("envy", PROBE, env={"GREETING": value})
        state = await world.wait_state("envy", ready_with(1))
        assert state is not None
        seen = await world.call(state.endpoints[0])
        launchers = _launchers()
        exposed = []
        for pid in launchers:
            with contextlib.suppress(OSError):
                for part in ("environ", "cmdline"):
                    if value.encode() in Path(f"/proc/{pid}/{part}").read_bytes():
                        exposed.append((pid, part))
    assert seen["greeting"] == value
    assert "LAMBDABUS_ENV_FILE" not in seen["env"]  # read, then gone
    assert launchers  # bubblewrap (and slirp4netns) were looked at
    assert exposed == []


async def test_without_bubblewrap_it_runs_unsandboxed_and_says_so(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMBDABUS_TEST_SECRET", "must not leak")
    async with running_deployer(world.settings(sandbox="none")):
        await world.create("plain", PROBE, env={"GREETING": "plain"})
        state = await world.wait_state("plain", ready_with(1))
        assert state is not None
        assert not state.sandboxed
        assert "unsandboxed" in state.message
        seen = await world.call(state.endpoints[0])
        lines = await world.logs("plain", lambda ls: any("UNSANDBOXED" in x.line for x in ls))
    assert any(x.stream == "system" and "UNSANDBOXED" in x.line for x in lines)
    assert seen["greeting"] == "plain"
    assert seen["uid"] == os.getuid()
    # Nothing of the platform's environment but PATH: no settings, no credentials.
    allowed = {"PATH", "LANG", "HOME", "TMPDIR", "PYTHONPATH", "PYTHONUNBUFFERED"}
    allowed |= {"PYTHONDONTWRITEBYTECODE", "MALLOC_ARENA_MAX", "GREETING"}
    assert set(seen["env"]) <= allowed
    assert seen["home"] == seen["cwd"]


async def test_a_crash_at_import_is_a_crash_loop(world: World) -> None:
    async with running_deployer(world.settings()):
        record = await world.create("broken", CRASH)
        state = await world.wait_state("broken", lambda s: s is not None and s.phase == "failed")
        assert state is not None
        events = await world.events("broken", "io.lambdabus.deployment.failed")
        lines = await world.logs("broken", lambda ls: any("boom-at-import" in x.line for x in ls))
    assert state.reason == "CrashLoop"
    assert "exited with code 3 before it was ready" in state.message
    assert "RuntimeError: the config is missing: boom-at-import" in state.message
    assert "about to fail" in state.message
    assert state.endpoints == []
    assert events[-1].data.reason == "CrashLoop"  # type: ignore[attr-defined]
    assert any(x.stream == "stderr" and "Traceback" in x.line for x in lines)
    build = await world.builds.get(world.ns, "broken")
    assert build is not None
    assert compute_status(record, build.value, state).status == "terminated"
    assert state.instances[0].restarts == 2  # crashloop_restarts=3: three exits, two restarts


async def test_an_unreadable_record_is_reported_once_and_the_others_are_served(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A record the deployer cannot parse (written by hand, by a newer version) is left alone,
    said once at error level, not at every reconcile pass, and holds no other function up."""
    garbled = world.bus.kv(FUNCTIONS_BUCKET)
    await garbled.put(f"{world.ns}.garbled", b'{"env": "not a record"}')
    caplog.set_level(logging.ERROR, logger="lambdabus.deployer")
    try:
        async with running_deployer(world.settings(reconcile_interval=0.1)):
            await world.create("fine", PROBE)
            await world.wait_state("fine", ready_with(1))
            await asyncio.sleep(0.5)  # five passes more
        assert await garbled.get(f"{world.ns}.garbled") is not None
    finally:
        await garbled.delete(f"{world.ns}.garbled")
    said = [r for r in caplog.records if getattr(r, "function", None) == "garbled"]
    assert [r.getMessage() for r in said] == [
        "a record of the function cannot be read; it is left as it is"
    ]
    assert "validation error(s) for FunctionRecord" in said[0].error  # type: ignore[attr-defined]
    assert said[0].exc_info is None  # no traceback: the reason is the whole story


async def test_an_environment_changed_after_its_build_is_never_run(world: World) -> None:
    await world.create("tampered", PROBE)
    env = world.platform / "builder" / "envs" / "python3.11"
    (env / "evil.pth").write_text("import os; os.system('echo pwned')\n")  # after the build
    async with running_deployer(world.settings()):
        state = await world.wait_state("tampered", lambda s: s is not None and s.phase == "failed")
    assert state is not None
    assert state.reason == "EnvironmentTampered"
    assert str(env) in state.message
    assert "rebuild" in state.message
    assert state.endpoints == []
    assert not any(i.phase in ("starting", "ready") for i in state.instances)


async def test_a_config_update_rolls_out_without_a_gap(world: World) -> None:
    async with running_deployer(world.settings()):
        record = await world.create("roll", PROBE, env={"GREETING": "one"})
        first = await world.wait_state("roll", ready_with(1))
        assert first is not None
        old = await world.call(first.endpoints[0])
        assert old["greeting"] == "one"
        old_processes = world.table().load()
        assert len(old_processes) == 1

        states: list[DeploymentState | None] = []

        def watching(state: DeploymentState | None) -> bool:
            states.append(state)
            return ready_with(1, generation=2)(state)

        follow = asyncio.create_task(world.wait_state("roll", watching))
        await asyncio.sleep(0)
        await world.update_config(record, env={"GREETING": "two"})
        second = await follow
        assert second is not None
        assert second.endpoints != first.endpoints
        new = await world.call(second.endpoints[0])
        assert new["greeting"] == "two"
        assert all(s is not None and s.endpoints for s in states)  # never without endpoints
        assert {s.phase for s in states if s is not None} >= {"started", "ready"}

        # The old instance drains, then stops (and says so).
        gone = f"instance {old_processes[0].instance} stopped: it exited with code 0"
        await world.logs("roll", lambda ls: any(x.line == gone for x in ls))
        assert not is_running(old_processes[0])
        with pytest.raises(aiohttp.ClientConnectionError):
            await world.call(first.endpoints[0])


async def test_scaling_changes_the_instance_count_in_place(world: World) -> None:
    async with running_deployer(world.settings()):
        record = await world.create("scale", PROBE)
        first = await world.wait_state("scale", ready_with(1))
        assert first is not None
        record = await world.update_config(record, replicas=3)
        state = await world.wait_state(
            "scale", lambda s: s is not None and s.phase == "scaled" and len(s.endpoints) == 3
        )
        assert state is not None
        assert first.endpoints[0] in state.endpoints  # the running instance stays
        await world.update_config(record, replicas=0)
        state = await world.wait_state(
            "scale", lambda s: s is not None and s.phase == "scaled" and s.replicas == 0
        )
        assert state is not None
        assert state.endpoints == []
        await world.logs("scale", lambda ls: sum("stopped: it" in x.line for x in ls) == 3)
        assert world.table().load() == []


async def test_delete_stops_every_instance_and_removes_the_state(world: World) -> None:
    async with running_deployer(world.settings()):
        record = await world.create("doomed", PROBE, replicas=2)
        await world.wait_state("doomed", ready_with(2))
        pids = [r.pid for r in world.table().load()]
        assert len(pids) == 2
        assert all(alive(pid) for pid in pids)
        await world.delete(record)
        await world.wait_state("doomed", lambda s: s is None)
        events = await world.events("doomed", "io.lambdabus.deployment.stopped")
        assert not any(alive(pid) for pid in pids)
        assert world.table().load() == []
        assert list((world.platform / "deployer" / "instances").iterdir()) == []
        lines = await world.logs("doomed", lambda ls: sum("stopped: it" in x.line for x in ls) == 2)
    assert events[-1].data.replicas == 0  # type: ignore[attr-defined]
    # SIGTERM reached the runtime (inside the sandbox too), which exited cleanly.
    assert [x.line.split(": it ")[1] for x in lines if "stopped: it" in x.line] == [
        "exited with code 0"
    ] * 2


async def test_functions_in_the_kv_run_without_any_event(world: World) -> None:
    await world.create("quiet", PROBE, publish=False)
    async with running_deployer(world.settings()):
        state = await world.wait_state("quiet", ready_with(1))
        assert state is not None
        await world.call(state.endpoints[0])


async def test_a_flood_of_output_is_cut_and_rate_limited(world: World) -> None:
    settings = world.settings(log_rate_lines_per_second=200, log_line_max_bytes=1024)
    async with running_deployer(settings):
        await world.create("noisy", FLOOD)
        state = await world.wait_state("noisy", ready_with(1))
        assert state is not None
        await world.call(state.endpoints[0])
        lines = await world.logs(
            "noisy",
            lambda ls: (
                any(x.stream == "system" and x.line.startswith("dropped") for x in ls)
                and any("[truncated" in x.line for x in ls)
            ),
        )
    floods = [x for x in lines if x.line.startswith("flood line")]
    assert 0 < len(floods) < 200  # the long line took one of the 200
    cut = next(x for x in lines if "[truncated" in x.line)
    assert cut.line.startswith("L" * 1024)
    assert "48976 more bytes" in cut.line
    assert len(cut.line) < 1200


async def test_a_deployer_killed_with_sigkill_leaves_instances_the_next_one_adopts(
    world: World, nats_server: NatsServer
) -> None:
    """Instances belong to the platform: they outlive a SIGKILLed deployer (sandboxed too),
    keep serving, and the next deployer adopts them: the same pids, the same endpoints."""
    settings = world.settings()
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        **nats_server.env("deployer"),  # the deployer's own least-privilege user
        "LAMBDABUS_DEPLOYER_PORT": "0",
        "LAMBDABUS_DEPLOYER_STATE_DIR": str(settings.state_dir),
        "LAMBDABUS_DEPLOYER_HEALTH_INTERVAL": "0.1",
        "LAMBDABUS_DEPLOYER_RECONCILE_INTERVAL": "0.5",
        "LAMBDABUS_DEPLOYER_LEASE_SECONDS": "3",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lambdabus_deployer",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await world.create("survivor", TALKER, replicas=2)
        before = await world.wait_state("survivor", ready_with(2))
        assert before is not None
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    left = world.table().load()
    assert len(left) == 2
    assert all(is_running(r) for r in left)
    for endpoint in before.endpoints:
        # still serving, with no deployer at all; what they print meanwhile is shipped later
        assert (await world.call(endpoint))["said"] == "orphaned"

    async with running_deployer(settings.model_copy(update={"lease_seconds": 3.0})):
        await world.logs(
            "survivor", lambda lines: sum("adopted (pid" in x.line for x in lines) == 2
        )
        after = await world.wait_state("survivor", ready_with(2))
        assert after is not None
        assert sorted(after.endpoints) == sorted(before.endpoints)
        current = world.table().load()
        assert {(r.pid, r.start_time) for r in current} == {(r.pid, r.start_time) for r in left}
        assert all(is_running(r) for r in current)
        assert {i.id for i in after.instances} == {i.id for i in before.instances}
        # the new leader ships their output: what they printed while no deployer ran, then
        # what they print now
        for endpoint in after.endpoints:
            assert (await world.call(endpoint))["said"] == "adopted"
        lines = await world.logs(
            "survivor",
            lambda lines: sum(x.line.startswith("said ") for x in lines) >= 4,
        )
        said = sorted((x.instance, x.line) for x in lines if x.line.startswith("said "))
        assert said == sorted(
            (i.id, line)
            for i in before.instances
            for line in ("said orphaned #1", "said adopted #2")
        )
    # `--stop-instances` (the launcher's down) stops them all, whoever started them.
    assert not any(is_running(r) for r in current)
    assert world.table().load() == []


async def test_a_function_changed_while_no_deployer_ran_rolls_out_without_a_gap(
    world: World, nats_server: NatsServer
) -> None:
    """The instances a killed deployer left serve on until the next one has the new revision
    ready; then they are stopped."""
    settings = world.settings()
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        **nats_server.env("deployer"),
        "LAMBDABUS_DEPLOYER_PORT": "0",
        "LAMBDABUS_DEPLOYER_STATE_DIR": str(settings.state_dir),
        "LAMBDABUS_DEPLOYER_HEALTH_INTERVAL": "0.1",
        "LAMBDABUS_DEPLOYER_RECONCILE_INTERVAL": "0.5",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lambdabus_deployer",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        record = await world.create("changing", PROBE, replicas=1, env={"GREETING": "old"})
        before = await world.wait_state("changing", ready_with(1))
        assert before is not None
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    (old,) = world.table().load()
    await world.update_config(record, env={"GREETING": "new"})

    seen: list[list[str]] = []

    def settled(state: DeploymentState | None) -> bool:
        if state is not None:
            seen.append(list(state.endpoints))
        return (
            ready_with(1, generation=2)(state)
            and state is not None
            and (state.endpoints != before.endpoints)
        )

    async with running_deployer(settings):
        after = await world.wait_state("changing", settled)
        assert after is not None
        assert (await world.call(after.endpoints[0]))["greeting"] == "new"
        assert all(seen), f"a state without endpoints: {seen}"
        await asyncio.wait_for(_gone(old), 30)


async def _gone(record: Any) -> None:
    while is_running(record):  # noqa: ASYNC110 (a process we did not start)
        await asyncio.sleep(0.1)


TALKER = """\
import itertools

calls = itertools.count(1)
word = iter(["orphaned", "adopted"])


async def main(request):
    said = next(word, "more")
    print(f"said {said} #{next(calls)}", flush=True)
    return {"said": said}
"""


NODE_HANDLER = """\
console.log('node handler loaded');
module.exports = {
  main: (event, context) => ({ greeting: process.env.GREETING, runtime: context.runtime }),
};
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_a_node_function_runs(world: World) -> None:
    async with running_deployer(world.settings()):
        await world.create("js", NODE_HANDLER, env={"GREETING": "from node"}, runtime="nodejs20")
        state = await world.wait_state("js", ready_with(1))
        assert state is not None
        assert await world.call(state.endpoints[0]) == {
            "greeting": "from node",
            "runtime": "nodejs20",
        }
        await world.logs("js", lambda ls: any(x.line == "node handler loaded" for x in ls))


async def test_a_failed_rollout_leaves_the_old_revision_serving(world: World) -> None:
    async with running_deployer(world.settings()):
        record = await world.create("steady", PROBE, env={"GREETING": "one"})
        first = await world.wait_state("steady", ready_with(1))
        assert first is not None
        await world.update_config(record, env={"GREETING": "two", "CRASH_AT_IMPORT": "1"})
        failed = await world.wait_state("steady", lambda s: s is not None and s.phase == "failed")
        assert failed is not None
        assert failed.reason == "CrashLoop"
        assert "asked to crash at import" in failed.message
        assert "generation 1 keeps serving" in failed.message
        assert failed.endpoints == first.endpoints
        assert (await world.call(failed.endpoints[0]))["greeting"] == "one"


async def test_an_instance_that_exits_is_restarted(world: World) -> None:
    async with running_deployer(world.settings()):
        await world.create("fragile", EXIT_ON_CALL)
        first = await world.wait_state("fragile", ready_with(1))
        assert first is not None
        with pytest.raises(aiohttp.ClientError):
            await world.call(first.endpoints[0])
        again = await world.wait_state(
            "fragile",
            lambda s: ready_with(1)(s) and s is not None and s.endpoints != first.endpoints,
        )
        assert again is not None
        assert again.instances[0].restarts == 1
        assert again.instances[0].last_exit == "exited with code 7"
        assert again.instances[0].id == first.instances[0].id  # the same slot, restarted


async def test_an_instance_that_stops_answering_its_health_check_is_restarted(
    world: World,
) -> None:
    async with running_deployer(world.settings(health_timeout=0.2, health_failures=3)):
        await world.create("stuck", HANG_ON_CALL)
        first = await world.wait_state("stuck", ready_with(1))
        assert first is not None
        call = asyncio.create_task(world.call(first.endpoints[0]))
        unhealthy = await world.wait_state(
            "stuck", lambda s: s is not None and s.instances[0].phase == "unhealthy"
        )
        assert unhealthy is not None
        assert unhealthy.endpoints == []  # out of rotation while it does not answer
        again = await world.wait_state(
            "stuck", lambda s: ready_with(1)(s) and s is not None and s.instances[0].restarts == 1
        )
        assert again is not None
        assert again.instances[0].last_exit == (
            "failed 3 health checks in a row; it was killed by SIGKILL"
        )
        with pytest.raises(aiohttp.ClientError):
            await call


GREEDY = """\
hoard = bytearray(200 * 1024 * 1024)


async def main(request):
    return {"hoard": len(hoard)}
"""


async def test_memory_is_limited(world: World, cgroups: bool) -> None:
    async with running_deployer(world.settings(crashloop_restarts=1)):
        record = await world.create("greedy", GREEDY, memory=512)
        roomy = await world.wait_state("greedy", ready_with(1))
        assert roomy is not None
        await world.update_config(record, memory=128)
        failed = await world.wait_state(
            "greedy", lambda s: s is not None and s.phase == "failed" and s.generation == 2
        )
        assert failed is not None
        if cgroups:  # the memory cgroup's OOM killer, for the whole instance
            assert failed.reason == "OOMKilled"
            assert "OOMKilled: it used more than its 128 MiB of memory" in failed.message
        else:  # RLIMIT_AS: the allocation fails in Python
            assert "MemoryError" in failed.message
        assert failed.endpoints == roomy.endpoints


def _failing_launch(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[BaseException | None]:
    """Make the first `failures` sandbox launches fail as a sandbox torn down under us does;
    returns what each launch did (None: started)."""
    from lambdabus_platform.sandbox import SandboxStartError
    from lambdabus_platform.sandbox import launch as real

    attempts: list[BaseException | None] = []

    async def launch(*args: Any, **kwargs: Any) -> Any:
        if len(attempts) < failures:
            error = SandboxStartError("the sandbox ended (bubblewrap exit status 1) before …")
            attempts.append(error)
            raise error
        attempts.append(None)
        return await real(*args, **kwargs)

    monkeypatch.setattr("lambdabus_deployer.local.launch", launch)
    return attempts


async def test_a_sandbox_that_fails_to_start_once_is_retried(
    world: World, monkeypatch: pytest.MonkeyPatch, bubblewrap: bool
) -> None:
    if not bubblewrap:
        pytest.skip("bubblewrap is not installed")
    attempts = _failing_launch(monkeypatch, failures=1)
    # (no pool: what is retried is an instance's own start, not a pre-started runtime's)
    async with running_deployer(world.settings(start_attempts=3, pool_size=0)):
        await world.create("retried", EXIT_ON_CALL)
        state = await world.wait_state("retried", ready_with(1))
        assert state is not None
        assert [a is None for a in attempts[:2]] == [False, True]  # failed, then started


async def test_a_sandbox_that_never_starts_fails_the_deployment_after_its_attempts(
    world: World, monkeypatch: pytest.MonkeyPatch, bubblewrap: bool
) -> None:
    if not bubblewrap:
        pytest.skip("bubblewrap is not installed")
    attempts = _failing_launch(monkeypatch, failures=100)
    async with running_deployer(world.settings(start_attempts=3, pool_size=0)):
        await world.create("doomed", EXIT_ON_CALL)
        state = await world.wait_state("doomed", lambda s: s is not None and s.phase == "failed")
        assert state is not None
        assert state.reason == "StartFailed"
        assert "before" in state.message
        assert len(attempts) == 3
