"""The builder's pure core: cache keys, decisions, state transitions, events and messages."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lambdabus_builder.claims import Target
from lambdabus_builder.plan import (
    Action,
    Build,
    Forget,
    Restamp,
    Skip,
    artifact_dir,
    build_event,
    decide,
    dependency_bytes,
    deps_key,
    env_dir,
    is_stale,
    lists_requirements,
    next_build_state,
    node_syntax_error,
    style_of,
    syntax_error_message,
    tail_message,
)
from lambdabus_events.catalog import BuildFailed, BuildQueued, BuildSucceeded, parse_lifecycle
from lambdabus_events.models import (
    BuildState,
    FunctionConfig,
    FunctionRecord,
    SourceRef,
    build_recipe,
)

T0 = datetime(2025, 1, 1, tzinfo=UTC)
SHA_A = "a" * 64
SHA_B = "b" * 64


def record(*, uid: str = "u1", generation: int = 1, sha: str = SHA_A) -> FunctionRecord:
    return FunctionRecord(
        namespace="default",
        name="hello",
        uid=uid,
        generation=generation,
        spec=FunctionConfig(),
        source=SourceRef(sha256=sha, size=10, kind="inline", entrypoint="lambda_main.py", files=1),
        created_at=T0,
        updated_at=T0,
    )


def state(phase: str = "succeeded", **fields: object) -> BuildState:
    base: dict[str, object] = {
        "namespace": "default",
        "name": "hello",
        "uid": "u1",
        "generation": 1,
        "phase": phase,
        "source_sha256": SHA_A,
        "runtime": "python3.11",
        "updated_at": T0,
    }
    if phase == "succeeded":
        base["artifact"] = "file:///x/manifest.json"
    return BuildState.model_validate(base | fields)


# -- keys and names ---------------------------------------------------------------------------


def test_deps_key_is_sha256_of_runtime_nul_file() -> None:
    expected = hashlib.sha256(b"python3.11\0tinydep\n").hexdigest()
    assert deps_key("python3.11", b"tinydep\n") == expected
    assert deps_key("python3.11", b"") != deps_key("nodejs20", b"")
    assert deps_key("python3.11", b"a") != deps_key("python3.11", b"b")


def test_dependency_bytes_counts_the_node_lockfile_only() -> None:
    assert dependency_bytes("python3.11", None) == b""
    assert dependency_bytes("python3.11", b"x", b"lock") == b"x"
    assert dependency_bytes("nodejs20", b"{}") == b"{}"
    assert dependency_bytes("nodejs20", b"{}", b"lock") == b"{}\0lock"


def test_lists_requirements() -> None:
    assert not lists_requirements(b"")
    assert not lists_requirements(b"# nothing\n\n   \n")
    assert lists_requirements(b"# deps\ntinydep==1.0\n")


@pytest.mark.parametrize(
    ("entrypoint", "style"),
    [("lambda_main.py", "luna"), ("handler.py", "kyma"), ("handler.js", "node")],
)
def test_style_of(entrypoint: str, style: str) -> None:
    assert style_of(entrypoint) == style


def test_style_of_unknown() -> None:
    with pytest.raises(ValueError, match=r"main\.py"):
        style_of("main.py")


def test_paths() -> None:
    root = Path("/state")
    assert artifact_dir(root, "ns", "fn", "u1", 3) == Path("/state/artifacts/ns/fn/u1-3")
    assert env_dir(root, "k") == Path("/state/envs/k")


# -- decisions --------------------------------------------------------------------------------

ME = "host-1-aaaaaa"


def decide_at_t0(
    record: FunctionRecord | None, state: BuildState | None, building: Target | None
) -> Action:
    return decide(record, state, building, me=ME, now=T0)


def test_a_new_function_is_built() -> None:
    action = decide_at_t0(record(), None, None)
    assert isinstance(action, Build)
    assert action.replaces_uid is None


def test_a_source_being_built_is_left_alone() -> None:
    assert isinstance(
        decide_at_t0(record(), state("started"), Target("u1", SHA_A, "python3.11")), Skip
    )
    assert isinstance(decide_at_t0(record(), None, Target("u1", SHA_A, "python3.11")), Skip)


def test_a_built_source_is_not_built_again() -> None:
    assert isinstance(decide_at_t0(record(), state("succeeded"), None), Skip)
    assert isinstance(decide_at_t0(record(), state("failed", reason="SyntaxError"), None), Skip)


def test_a_new_source_is_built_even_while_the_old_one_builds() -> None:
    action = decide_at_t0(
        record(generation=2, sha=SHA_B), state("started"), Target("u1", SHA_A, "python3.11")
    )
    assert isinstance(action, Build)
    assert action.record.generation == 2


def test_an_interrupted_build_is_built_again() -> None:
    for phase in ("queued", "started"):
        assert isinstance(decide_at_t0(record(), state(phase), None), Build)


def test_a_config_only_generation_restamps_the_build() -> None:
    action = decide_at_t0(record(generation=3), state("succeeded"), None)
    assert isinstance(action, Restamp)
    assert action.state.generation == 3
    assert action.state.artifact == "file:///x/manifest.json"
    assert action.state.updated_at == T0


def test_a_new_generation_of_a_source_whose_build_failed_is_built_again() -> None:
    """A redeploy after a build that failed for a passing reason (the network) tries again;
    the same generation is not retried on its own."""
    failed = state("failed", reason="DependencyInstallFailed", message="network unreachable")
    assert isinstance(decide_at_t0(record(generation=2), failed, None), Build)
    assert not isinstance(decide_at_t0(record(generation=1), failed, None), Build)


def test_a_recreated_function_is_built_and_replaces_the_old_uid() -> None:
    action = decide_at_t0(record(uid="u2"), state("succeeded"), None)
    assert isinstance(action, Build)
    assert action.replaces_uid == "u1"


def test_a_deleted_function_is_forgotten() -> None:
    assert decide_at_t0(None, state("succeeded"), None) == Forget("default", "hello", "u1")
    assert decide_at_t0(None, state("started"), Target("u1", SHA_A, "python3.11")) == Forget(
        "default", "hello", "u1"
    )
    assert isinstance(decide_at_t0(None, None, None), Skip)


def test_staleness() -> None:
    target = Target("u1", SHA_A, "python3.11")
    assert not is_stale(target, record())
    assert not is_stale(target, record(generation=5))  # config-only changes
    assert is_stale(target, record(generation=2, sha=SHA_B))
    assert is_stale(target, record(uid="u2"))
    assert is_stale(target, None)


# -- transitions ------------------------------------------------------------------------------


def test_the_lifecycle_of_a_build() -> None:
    queued = next_build_state(None, record(), "queued", T0)
    assert (queued.phase, queued.generation, queued.source_sha256) == ("queued", 1, SHA_A)
    started = next_build_state(queued, record(), "started", T0)
    done = next_build_state(
        started,
        record(generation=2),  # a config-only change meanwhile: stamped with the current one
        "succeeded",
        T0,
        artifact="file:///m.json",
        dependencies_cached=True,
        duration_seconds=0.2,
    )
    assert (done.phase, done.generation, done.artifact) == ("succeeded", 2, "file:///m.json")
    assert done.dependencies_cached
    failed = next_build_state(queued, record(), "failed", T0, reason="InvalidSource", message="m")
    assert (failed.reason, failed.message) == ("InvalidSource", "m")


@pytest.mark.parametrize(
    ("current", "phase"),
    [(None, "started"), ("queued", "succeeded"), ("succeeded", "started"), ("failed", "queued")],
)
def test_transitions_that_do_not_exist(current: str | None, phase: str) -> None:
    previous = state(current, reason="x") if current else None
    with pytest.raises(ValueError, match="cannot go"):
        next_build_state(previous, record(), phase, T0, artifact="a", reason="r")  # type: ignore[arg-type]


def test_a_transition_needs_the_same_build_and_its_details() -> None:
    started = state("started")
    with pytest.raises(ValueError, match="another build"):
        next_build_state(started, record(sha=SHA_B), "failed", T0, reason="x")
    with pytest.raises(ValueError, match="artifact"):
        next_build_state(started, record(), "succeeded", T0)
    with pytest.raises(ValueError, match="reason"):
        next_build_state(started, record(), "failed", T0)


def test_build_events_are_catalog_events_with_deterministic_ids() -> None:
    queued = build_event(state("queued"), "python3.11")
    assert isinstance(queued, BuildQueued)
    assert queued.source == "/lambdabus/builder"
    assert queued.subject == "default/hello"
    assert queued.id == build_event(state("queued"), "python3.11").id
    assert queued.id != build_event(state("queued", generation=2), "python3.11").id
    succeeded = build_event(state("succeeded", duration_seconds=0.5), "python3.11")
    assert isinstance(succeeded, BuildSucceeded)
    assert succeeded.data.artifact == "file:///x/manifest.json"
    failed = build_event(state("failed", reason="SyntaxError", message="m"), "nodejs20")
    assert isinstance(failed, BuildFailed)
    assert (failed.data.reason, failed.data.runtime) == ("SyntaxError", "nodejs20")
    assert parse_lifecycle(failed.model_dump_json()) == failed


# -- messages ---------------------------------------------------------------------------------


def test_syntax_error_message_names_file_line_and_code() -> None:
    assert (
        syntax_error_message("lambda_main.py", 3, "invalid syntax", "x = = 1\n")
        == "lambda_main.py:3: invalid syntax: x = = 1"
    )
    assert syntax_error_message("a.py", None, "null bytes", None) == "a.py: null bytes"


def test_tail_message_starts_at_the_first_error() -> None:
    uv_out = [
        "Using Python 3.11.7 environment at: /x",
        "error: No solution found when resolving dependencies",
        "  cause: Because nonexistent-pkg-xyz was not found",
    ]
    assert tail_message(uv_out) == (
        "error: No solution found when resolving dependencies | "
        "cause: Because nonexistent-pkg-xyz was not found"
    )
    assert tail_message(["a", "", "b", "c"], limit=2) == "b | c"
    assert tail_message(["x" * 50], max_chars=10) == "x" * 9 + "…"


def test_node_syntax_error() -> None:
    stderr = [
        "/state/artifacts/ns/fn/u-1.partial-1/code/handler.js:3",
        "};;; )",
        "     ^",
        "",
        "SyntaxError: Unexpected token ')'",
        "    at wrapSafe (node:internal/modules/cjs/loader:1464:18)",
        "",
        "Node.js v20.20.2",
    ]
    assert (
        node_syntax_error(stderr, "/state/artifacts/ns/fn/u-1.partial-1/code")
        == "handler.js:3: SyntaxError: Unexpected token ')': };;; )"
    )
    assert node_syntax_error([], "/x") == "handler.js: does not compile"


def test_another_runtime_for_the_same_source_is_a_new_build() -> None:
    node = record().model_copy(update={"spec": FunctionConfig(runtime="nodejs20")})
    action = decide_at_t0(node, state("succeeded"), None)
    assert isinstance(action, Build)
    assert action.why == "new runtime"


def test_other_user_docker_commands_need_a_new_build() -> None:
    commands = ["RUN echo hi"]
    changed = record(generation=2).model_copy(
        update={"spec": FunctionConfig(user_docker_commands=commands)}
    )
    action = decide_at_t0(changed, state("succeeded"), None)
    assert isinstance(action, Build)
    assert action.why == "new user_docker_commands"
    queued = next_build_state(None, changed, "queued", T0)
    assert queued.recipe == build_recipe(commands) != ""
    # built with these commands: a later config change is re-stamped, not built
    done = state("succeeded", generation=2, recipe=build_recipe(commands))
    later = changed.model_copy(update={"generation": 3})
    assert isinstance(decide_at_t0(later, done, None), Restamp)
