"""The deployer's pure core: what should run, how an instance is started, restarts, and the
deployment state and events that follow from what a backend observes."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lambdabus_deployer.plan import (
    DesiredRevision,
    Failure,
    InstanceSpec,
    Observation,
    RuntimePaths,
    RuntimeUnavailable,
    backoff_delay,
    crash_message,
    desired_instances,
    env_file,
    event_key,
    function_env,
    idle_state,
    is_crashloop,
    next_deployment_state,
    render_sandbox,
    render_unsandboxed,
    runtime_command,
    runtime_env,
    secret_files,
    stopped_state,
    uses_rlimit_as,
    withdrawn_state,
)
from lambdabus_deployer.settings import DeployerSettings
from lambdabus_events.catalog import (
    DeploymentFailed,
    DeploymentReady,
    DeploymentScaled,
    DeploymentStarted,
)
from lambdabus_events.models import (
    ArtifactManifest,
    BuildState,
    DeploymentState,
    FunctionConfig,
    FunctionRecord,
    InstanceState,
    SourceRef,
)
from lambdabus_platform.sandbox import (
    LAUNCHER_ENV,
    Bind,
    DataFile,
    Identity,
    Sandbox,
    bwrap_args,
    slirp_args,
)

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
UID = "5f0c7a43-9b64-4c55-8f44-6c9d8a2d3e10"
ARTIFACT = "file:///srv/.lambdabus/builder/artifacts/default/hello/x-1/manifest.json"
NO_SANDBOX = Sandbox("none", reason="bubblewrap (bwrap) is not installed")
RUNTIME = RuntimePaths(
    pythonpath="/opt/lambdabus/runtime/src",
    node_server="/opt/lambdabus/runtime/src/lambdabus_runtime/node/server.js",
    node="/usr/bin/node",
)


def record(generation: int = 1, uid: str = UID, **config: Any) -> FunctionRecord:
    return FunctionRecord(
        namespace="default",
        name="hello",
        uid=uid,
        generation=generation,
        spec=FunctionConfig(**config),
        source=SourceRef(
            sha256="a" * 64, size=10, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=NOW,
        updated_at=NOW,
    )


def build(
    phase: str = "succeeded", generation: int = 1, uid: str = UID, artifact: str | None = ARTIFACT
) -> BuildState:
    return BuildState(
        namespace="default",
        name="hello",
        uid=uid,
        generation=generation,
        source_sha256="a" * 64,
        phase=phase,  # type: ignore[arg-type]
        artifact=artifact if phase == "succeeded" else None,
        updated_at=NOW,
    )


def manifest(runtime: str = "python3.11") -> ArtifactManifest:
    node = runtime == "nodejs20"
    return ArtifactManifest(
        runtime=runtime,  # type: ignore[arg-type]
        entrypoint="handler.js" if node else "lambda_main.py",
        style="node" if node else "luna",
        code_dir="/srv/.lambdabus/builder/artifacts/default/hello/x-1/code",
        env_dir="/srv/.lambdabus/builder/envs/abc",
        source_sha256="a" * 64,
        deps_key="abc",
    )


def settings(**overrides: Any) -> DeployerSettings:
    return DeployerSettings(
        state_dir=Path("/srv/.lambdabus/deployer"), path="/usr/bin:/bin", **overrides
    )


def revision(**changes: Any) -> DesiredRevision:
    desired = desired_instances(record(), build())
    assert desired is not None
    return replace(desired, **changes)


def spec(rev: DesiredRevision | None = None) -> InstanceSpec:
    return InstanceSpec(
        id="hello-abc123-000001",
        scratch="/srv/.lambdabus/deployer/instances/hello-abc123-000001",
        revision=rev or revision(),
        runtime=RUNTIME,
        socket_dir="/run/lambdabus/deployer-x/0123456789ab",
    )


# -- desired state ---------------------------------------------------------------------------


def test_nothing_runs_before_a_successful_build() -> None:
    assert desired_instances(record(), None) is None
    assert desired_instances(record(), build("started")) is None
    assert desired_instances(record(), build("failed")) is None
    assert desired_instances(record(), build(uid="another-uid")) is None


def test_the_artifact_of_the_build_runs_with_the_config_of_the_record() -> None:
    rec = record(generation=3, env={"A": "1"}, replicas=2, memory=128, timeout=5)
    desired = desired_instances(rec, build(generation=2))
    assert desired is not None
    assert (desired.artifact, desired.build_generation, desired.generation) == (ARTIFACT, 2, 3)
    assert (desired.env, desired.replicas, desired.memory, desired.timeout) == (
        (("A", "1"),),
        2,
        128,
        5,
    )


def test_a_config_change_is_a_new_revision_but_a_replica_change_is_not() -> None:
    base = desired_instances(record(), build())
    env = desired_instances(record(generation=2, env={"A": "2"}), build())
    scaled = desired_instances(record(generation=2, replicas=5), build())
    memory = desired_instances(record(generation=2, memory=512), build())
    assert base is not None
    assert env is not None
    assert scaled is not None
    assert memory is not None
    assert env.key != base.key
    assert memory.key != base.key
    assert scaled.key == base.key
    assert env.artifact == base.artifact  # a config-only update redeploys the same artifact


def test_while_a_new_source_builds_what_runs_keeps_running_unchanged() -> None:
    running = desired_instances(record(), build())
    assert running is not None
    new_source = SourceRef(
        sha256="b" * 64, size=10, kind="inline", entrypoint="lambda_main.py", files=1
    )
    changed = record(generation=2, replicas=3).model_copy(update={"source": new_source})
    assert desired_instances(changed, build("started", 2), running) is running
    assert desired_instances(changed, build("failed", 2), running) is running
    # The builder has not looked at generation 2 yet: its state is still generation 1's.
    assert desired_instances(changed, build(), running) is running
    assert desired_instances(record(uid="other"), build("started"), running) is None


def test_with_nothing_running_an_older_build_runs_under_its_own_generation() -> None:
    new_source = SourceRef(
        sha256="b" * 64, size=10, kind="inline", entrypoint="lambda_main.py", files=1
    )
    changed = record(generation=2).model_copy(update={"source": new_source})
    desired = desired_instances(changed, build(generation=1))
    assert desired is not None
    assert (desired.artifact, desired.generation) == (ARTIFACT, 1)


# -- starting an instance --------------------------------------------------------------------


def test_a_python_instance_runs_the_runtime_sdk_of_its_env() -> None:
    assert runtime_command(manifest(), spec()) == [
        "/srv/.lambdabus/builder/envs/abc/bin/python",
        "-m",
        "lambdabus_runtime",
        "--code",
        "/srv/.lambdabus/builder/artifacts/default/hello/x-1/code",
        "--entrypoint",
        "lambda_main.py",
        "--port",
        "0",
        "--host",
        "127.0.0.1",
        "--function",
        "default/hello",
        "--timeout",
        "30",
        "--memory",
        "128",  # the default resources preset (M) limit
        "--runtime",
        "python3.11",
    ]
    assert uses_rlimit_as(manifest())


def test_a_node_instance_caps_its_heap_instead_of_its_address_space() -> None:
    argv = runtime_command(manifest("nodejs20"), spec(revision(memory=128)))
    assert argv[:3] == [
        "/usr/bin/node",
        "--max-old-space-size=128",
        "/opt/lambdabus/runtime/src/lambdabus_runtime/node/server.js",
    ]
    assert "--entrypoint" in argv
    assert not uses_rlimit_as(manifest("nodejs20"))
    env = runtime_env(manifest("nodejs20"), spec(), settings(), tmp="/tmp", env_file_path="/e")
    assert env["NODE_PATH"] == "/srv/.lambdabus/builder/envs/abc/node_modules"
    assert "PYTHONPATH" not in env


def test_a_kubeless_handler_is_passed_to_the_runtime() -> None:
    kubeless = manifest().model_copy(
        update={"entrypoint": "helloget.py", "style": "kyma", "function": "foo"}
    )
    argv = runtime_command(kubeless, spec())
    assert argv[argv.index("--entrypoint") + 1] == "helloget.py"
    assert argv[-2:] == ["--handler", "foo"]
    assert "--handler" not in runtime_command(manifest(), spec())  # `main`: the default


def test_without_the_runtime_sdk_nothing_can_start() -> None:
    no_sdk = replace(spec(), runtime=RuntimePaths())
    with pytest.raises(RuntimeUnavailable, match="LAMBDABUS_DEPLOYER_RUNTIME_PYTHONPATH"):
        runtime_command(manifest(), no_sdk)
    with pytest.raises(RuntimeUnavailable, match="node"):
        runtime_command(manifest("nodejs20"), no_sdk)


def test_the_runtime_starts_with_the_platforms_env_only() -> None:
    rev = revision(env=(("GREETING", "hi"), ("HOME", "/root"), ("PYTHONPATH", "/evil")))
    env = runtime_env(manifest(), spec(rev), settings(), tmp="/tmp", env_file_path="/run/e.json")
    assert env == {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "MALLOC_ARENA_MAX": "2",
        "HOME": "/tmp",
        "TMPDIR": "/tmp",
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONPATH": "/opt/lambdabus/runtime/src",
        "LAMBDABUS_ENV_FILE": "/run/e.json",
    }


def test_the_functions_env_and_secret_env_go_to_its_env_file_without_reserved_names() -> None:
    rev = revision(
        env=(("GREETING", "hi"), ("HOME", "/home/x"), ("PYTHONPATH", "/evil")),
        secret_env=(("DB_PASSWORD", "s3cret"), ("LD_AUDIT", "/x.so")),
    )
    assert function_env(rev) == {"GREETING": "hi", "DB_PASSWORD": "s3cret"}
    assert json.loads(env_file(rev)) == function_env(rev)


def test_secret_files_are_mounted_under_secrets_and_odd_names_are_skipped() -> None:
    rev = revision(
        secret_files=(("db", (("password", b"pw"), ("..", b"x"))), ("a/b", (("k", b"v"),)))
    )
    assert secret_files(rev) == (DataFile("/secrets/db/password", b"pw", mode=0o400),)


def test_without_bubblewrap_the_runtime_listens_on_its_socket_with_its_env_file() -> None:
    argv, env = render_unsandboxed(manifest(), spec(), settings())
    assert argv == runtime_command(manifest(), spec(), socket=spec().socket)
    assert _pairs(argv, "--socket", 1) == [(f"{spec().socket_dir}/sock",)]
    assert env["LAMBDABUS_ENV_FILE"] == f"{spec().socket_dir}/env.json"
    assert env["HOME"] == spec().scratch


def _pairs(argv: list[str], option: str, arity: int) -> list[tuple[str, ...]]:
    return [tuple(argv[i + 1 : i + 1 + arity]) for i, arg in enumerate(argv) if arg == option]


def test_the_sandbox_of_an_instance() -> None:
    m, instance = manifest(), spec()
    sandbox = render_sandbox(m, instance, settings(), interpreter_dirs=["/root/.pyenv/3.11"])
    assert sandbox.command[:3] == ("/lambdabus/deps/bin/python", "-m", "lambdabus_runtime")
    assert _pairs(list(sandbox.command), "--code", 1) == [("/lambdabus/code",)]
    assert _pairs(list(sandbox.command), "--socket", 1) == [("/run/lambdabus/http/sock",)]
    assert sandbox.binds == (
        Bind(m.code_dir, "/lambdabus/code"),
        Bind(m.env_dir, "/lambdabus/deps"),
        Bind(RUNTIME.pythonpath or "", "/lambdabus/runtime/python0"),
        Bind("/root/.pyenv/3.11", "/root/.pyenv/3.11"),
        Bind(instance.scratch, "/tmp", writable=True),
        Bind(instance.socket_dir, "/run/lambdabus/http", writable=True),
    )
    assert sandbox.chdir == "/tmp"
    assert dict(sandbox.env)["LAMBDABUS_ENV_FILE"] == "/run/lambdabus/env.json"
    assert dict(sandbox.env)["HOME"] == "/tmp"
    assert dict(sandbox.env)["PYTHONPATH"] == "/lambdabus/runtime/python0"
    assert dict(sandbox.env)["PYTHONPATH"] == "/lambdabus/runtime/python0"
    assert sandbox.files[0].dest == "/run/lambdabus/env.json"
    assert sandbox.network == "outbound"
    assert instance.endpoint == "unix:/run/lambdabus/deployer-x/0123456789ab/sock"


def test_the_network_of_a_sandbox_is_the_functions() -> None:
    sandbox = render_sandbox(manifest(), spec(revision(network="none")), settings())
    assert sandbox.network == "none"


def test_a_reserved_variable_never_reaches_the_launcher() -> None:
    """Even a revision that skipped the API's validation: LD_PRELOAD (or any of the function's
    env) is not in bubblewrap's argv, bubblewrap's env or slirp4netns's, only in the data file
    the runtime reads inside the sandbox (and reserved names not even there)."""
    rev = revision(
        env=(("LD_PRELOAD", "/code/evil.so"), ("API_KEY", "k-123")),
        secret_env=(("DB_PASSWORD", "s3cret"),),
        secret_files=(("db", (("password", b"s3cret"),)),),
    )
    sandbox = render_sandbox(manifest(), spec(rev), settings())
    args = bwrap_args(
        sandbox,
        layout=(("dir", "/usr"),),
        identity=Identity(1_300_000_001, 1_300_000_001),
        file_fds=list(range(10, 10 + len(sandbox.files))),
        info_fd=3,
        block_fd=4,
    )
    launcher = [*args, *slirp_args(userns_fd=5, netns_fd=6, ready_fd=7, exit_fd=8)]
    for word in ("LD_PRELOAD", "/code/evil.so", "API_KEY", "k-123", "s3cret"):
        assert not any(word in arg for arg in launcher), word
        assert not any(word in f"{k}={v}" for k, v in LAUNCHER_ENV.items())
    assert "LD_PRELOAD" not in json.loads(sandbox.files[0].content)
    assert json.loads(sandbox.files[0].content) == {"API_KEY": "k-123", "DB_PASSWORD": "s3cret"}
    assert not any(k.startswith("LD_") for k, _ in sandbox.env)


def test_a_sandboxed_node_instance_sees_the_runtime_server() -> None:
    sandbox = render_sandbox(manifest("nodejs20"), spec(), settings())
    node_dir = "/opt/lambdabus/runtime/src/lambdabus_runtime/node"
    assert Bind(node_dir, "/lambdabus/runtime/node") in sandbox.binds
    assert sandbox.command[:3] == (
        "/usr/bin/node",
        "--max-old-space-size=128",  # the default resources preset (M) limit
        "/lambdabus/runtime/node/server.js",
    )
    assert dict(sandbox.env)["NODE_PATH"] == "/lambdabus/deps/node_modules"


# -- restarts --------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_delay(n, 0.5, 30) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(10_000, 0.5, 30) == 30


def test_crashloop_counts_exits_within_the_window_or_in_a_row_before_ready() -> None:
    assert not is_crashloop([1, 2], 3, window=60, limit=3, unready_streak=2)
    assert is_crashloop([1, 2, 3], 3, window=60, limit=3, unready_streak=0)
    assert not is_crashloop([1, 2, 100], 100, window=60, limit=3, unready_streak=0)
    assert is_crashloop([1, 200, 400], 400, window=60, limit=3, unready_streak=3)


def test_a_crash_message_tells_how_it_ended_and_its_last_lines() -> None:
    tail = [f"line {i}" for i in range(30)] + ["x" * 2000]
    message = crash_message("hello-1", "exited with code 3 before it was ready", tail)
    assert message.startswith("instance hello-1 exited with code 3 before it was ready")
    assert "line 11" in message
    assert "line 10\n" not in message
    assert "x" * 512 + " …" in message
    assert crash_message("hello-1", "exited with code 1", []).endswith("it wrote no log lines")


# -- deployment state and events -------------------------------------------------------------


def ready_instance(n: int, generation: int = 1) -> InstanceState:
    return InstanceState(
        id=f"hello-{n}", generation=generation, phase="ready", endpoint=f"http://127.0.0.1:{n}"
    )


def observe(rev: DesiredRevision | None = None, **fields: Any) -> Observation:
    values: dict[str, Any] = {"revision": rev or revision(), "instances": (), "endpoints": ()}
    values.update(fields)
    return Observation(**values)


def test_a_first_deployment_goes_started_then_ready() -> None:
    starting = next_deployment_state(None, observe(rolling_out=True), NOW)
    assert starting.write
    assert starting.state.phase == "started"
    assert isinstance(starting.event, DeploymentStarted)
    assert event_key(starting.state) == f"{UID}:1:started"

    up = observe(instances=(ready_instance(1),), endpoints=("http://127.0.0.1:1",))
    ready = next_deployment_state(starting.state, up, NOW)
    assert ready.state.phase == "ready"
    assert ready.state.endpoints == ["http://127.0.0.1:1"]
    assert ready.state.ready_replicas == 1
    assert isinstance(ready.event, DeploymentReady)
    assert event_key(ready.state) == f"{UID}:1:ready:1"
    assert ready.state.message == "1/1 instances ready"

    again = next_deployment_state(ready.state, up, NOW.replace(hour=9))
    assert not again.write
    assert again.event is None
    assert again.state is ready.state


def test_an_instance_restart_changes_endpoints_without_an_event() -> None:
    rev = revision(replicas=2)
    both = observe(rev, endpoints=("http://a", "http://b"))
    ready = next_deployment_state(None, both, NOW).state
    one = next_deployment_state(ready, observe(rev, endpoints=("http://b",)), NOW)
    assert one.write
    assert one.event is None
    assert (one.state.phase, one.state.ready_replicas, one.state.endpoints) == (
        "ready",
        1,
        ["http://b"],
    )


def test_a_rollout_keeps_the_old_endpoints_until_the_switch() -> None:
    old = next_deployment_state(None, observe(endpoints=("http://old",)), NOW).state
    rev2 = revision(generation=2, env=(("A", "2"),))
    rolling = next_deployment_state(
        old, observe(rev2, endpoints=("http://old",), rolling_out=True, serving_generation=1), NOW
    )
    assert rolling.state.phase == "started"
    assert rolling.state.endpoints == ["http://old"]
    assert "generation 1 serves meanwhile" in rolling.state.message
    switched = next_deployment_state(rolling.state, observe(rev2, endpoints=("http://new",)), NOW)
    assert (switched.state.phase, switched.state.generation) == ("ready", 2)
    assert isinstance(switched.event, DeploymentReady)


def test_a_crash_loop_fails_the_deployment() -> None:
    failure = Failure(reason="CrashLoop", message="instance x exited with code 3")
    failed = next_deployment_state(None, observe(failure=failure), NOW)
    assert (failed.state.phase, failed.state.reason) == ("failed", "CrashLoop")
    assert failed.state.message == "instance x exited with code 3"
    assert isinstance(failed.event, DeploymentFailed)
    assert event_key(failed.state) == f"{UID}:1:failed"
    kept = next_deployment_state(
        None, observe(failure=failure, endpoints=("http://old",), serving_generation=1), NOW
    )
    assert kept.state.endpoints == ["http://old"]
    assert "generation 1 keeps serving" in kept.state.message


def test_scaling_is_announced_as_scaled() -> None:
    ready = next_deployment_state(None, observe(endpoints=("http://a",)), NOW).state
    rev3 = revision(generation=2, replicas=3)
    growing = next_deployment_state(
        ready, observe(rev3, endpoints=("http://a",), scaling=True), NOW
    )
    assert growing.state.phase == "ready"  # still serving while the new instances start
    assert growing.event is not None  # generation 2 of the same phase: announced once
    grown = next_deployment_state(
        growing.state,
        observe(rev3, endpoints=("http://a", "http://b", "http://c"), scaling=True),
        NOW,
    )
    assert grown.state.phase == "scaled"
    assert isinstance(grown.event, DeploymentScaled)
    assert event_key(grown.state) == f"{UID}:2:scaled:3"
    zero = next_deployment_state(grown.state, observe(revision(generation=3, replicas=0)), NOW)
    assert (zero.state.phase, zero.state.replicas, zero.state.endpoints) == ("scaled", 0, [])


def test_an_unsandboxed_deployment_says_so() -> None:
    decision = next_deployment_state(
        None,
        observe(endpoints=("http://a",), sandboxed=False, sandbox_note=NO_SANDBOX.reason),
        NOW,
    )
    assert not decision.state.sandboxed
    assert decision.state.message == (
        "1/1 instances ready (unsandboxed: bubblewrap (bwrap) is not installed)"
    )


def test_events_have_deterministic_ids() -> None:
    first = next_deployment_state(None, observe(endpoints=("http://a",)), NOW)
    retried = next_deployment_state(None, observe(endpoints=("http://b",)), NOW.replace(hour=8))
    assert first.event is not None
    assert retried.event is not None
    assert first.event.id == retried.event.id


def test_a_deleted_function_is_stopped_with_no_endpoints() -> None:
    ready: DeploymentState = next_deployment_state(
        None, observe(endpoints=("http://a",)), NOW
    ).state
    stopped = stopped_state(ready, NOW)
    assert (stopped.phase, stopped.endpoints, stopped.ready_replicas) == ("stopped", [], 0)
    assert event_key(stopped) == f"{UID}:stopped"


def test_with_nothing_to_run_no_endpoints_remain() -> None:
    ready = next_deployment_state(None, observe(endpoints=("http://a",)), NOW).state
    waiting = idle_state(ready, 2, NOW)
    assert (waiting.phase, waiting.reason, waiting.endpoints, waiting.ready_replicas) == (
        "started",
        "WaitingForBuild",
        [],
        0,
    )
    assert "generation 2" in waiting.message


def test_a_stopping_deployer_withdraws_endpoints_but_keeps_a_failure() -> None:
    ready = next_deployment_state(None, observe(endpoints=("http://a",)), NOW).state
    withdrawn = withdrawn_state(ready, NOW)
    assert (withdrawn.phase, withdrawn.endpoints, withdrawn.ready_replicas) == ("ready", [], 0)
    failed = next_deployment_state(
        None, observe(failure=Failure(reason="CrashLoop", message="it broke")), NOW
    ).state
    assert withdrawn_state(failed, NOW).message == "it broke"
