"""The builder's pure core: what a dependency environment is keyed by, what to do for a function
given its record and build state, how a build state moves and which event tells of it. No I/O.

A build is of one function's *source*: its uid and source sha256. A new generation that changed
only the config needs no build; its build state is re-stamped with the new generation, so the
function's image status (which compares generations) stays true.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from lambdabus_builder.claims import Claimable, HeldElsewhere, Target, claim_status
from lambdabus_events.catalog import (
    BuildFailed,
    BuildFailedData,
    BuildQueued,
    BuildQueuedData,
    BuildStarted,
    BuildStartedData,
    BuildSucceeded,
    BuildSucceededData,
    LifecycleEvent,
    lifecycle_event,
)
from lambdabus_events.models import BuildState, FunctionRecord, Runtime, build_recipe

Phase = Literal["queued", "started", "succeeded", "failed"]
Style = Literal["luna", "kyma", "node", "custom"]

DEPENDENCY_FILES: dict[Runtime, str] = {
    "python3.11": "requirements.txt",
    "nodejs20": "package.json",
    "custom": "",  # nothing is installed for a custom program (only the runtime's relay runs)
}
NODE_LOCKFILE = "package-lock.json"
_STYLES: dict[str, Style] = {"lambda_main.py": "luna", "handler.py": "kyma", "handler.js": "node"}
_NEXT: dict[Phase | None, frozenset[Phase]] = {
    None: frozenset({"queued"}),
    "queued": frozenset({"started", "failed"}),
    "started": frozenset({"succeeded", "failed"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
}
_EVENTS: dict[Phase, type[LifecycleEvent]] = {
    "queued": BuildQueued,
    "started": BuildStarted,
    "succeeded": BuildSucceeded,
    "failed": BuildFailed,
}


def deps_key(runtime: Runtime, dependency_file: bytes) -> str:
    """The cache key of a dependency environment: sha256 of (runtime, dependency file)."""
    return hashlib.sha256(runtime.encode() + b"\0" + dependency_file).hexdigest()


def dependency_bytes(
    runtime: Runtime, manifest: bytes | None, lockfile: bytes | None = None
) -> bytes:
    """What `deps_key` hashes: the dependency file (b"" if none); for Node, the lockfile too
    when there is one, since npm installs what it pins."""
    data = manifest or b""
    if runtime == "nodejs20" and lockfile is not None:
        data += b"\0" + lockfile
    return data


def lists_requirements(requirements: bytes) -> bool:
    """Whether a requirements.txt names anything to install (not only blanks and comments)."""
    for raw in requirements.decode(errors="replace").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            return True
    return False


def style_of(entrypoint: str) -> Style:
    """How the runtime calls the entry point: LUNA's `lambda_main.py`, Kyma's `handler.py`, or
    Node's `handler.js`."""
    try:
        return _STYLES[entrypoint]
    except KeyError:
        raise ValueError(f"not an entry point: {entrypoint!r}") from None


def handler_of(runtime: Runtime, entrypoint: str, handler: str | None) -> tuple[Style, str]:
    """The style and the function name of a build: Kubeless's `handler` (`helloget.foo`: a
    Kyma/Kubeless-style `foo(event, context)` in helloget.py, or Node's export `foo`), or the
    conventions of the default entry points (`main`). LUNA's lambda_main.py keeps its style."""
    if handler is None:
        return style_of(entrypoint), "main"
    function = handler.rpartition(".")[2]
    if runtime == "nodejs20":
        return "node", function
    return ("luna" if entrypoint == "lambda_main.py" else "kyma"), function


def entrypoint_hint(style: Style) -> str:
    """What an entry point of `style` must define, for error messages."""
    return {
        "luna": "e.g. `async def main(request): ...`",
        "kyma": "e.g. `def main(event, context): ...`",
        "node": "e.g. `exports.main = async (event, context) => ...`",
        "custom": "a program that listens on $PORT and answers GET /healthz",
    }[style]


def inputs_key(
    runtime: str,
    entrypoint: str,
    source_sha256: str,
    handler: str | None = None,
    command: Sequence[str] = (),
    recipe: str = "",
) -> str:
    """What a build's result depends on, hashed: the runtime, the entry point, the source
    archive (which holds the dependency files, so its digest covers theirs), the handler (the
    build checks that it exists and records it) and a custom runtime's program."""
    parts = [runtime, entrypoint, source_sha256, handler or "", json.dumps(list(command))]
    if recipe:  # user_docker_commands (kubernetes backend); keys without them stay as they were
        parts.append(recipe)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def artifact_dir(root: Path, namespace: str, name: str, uid: str, generation: int) -> Path:
    """`<root>/artifacts/<ns>/<name>/<uid>-<generation>`: the code and manifest of one build."""
    return root / "artifacts" / namespace / name / f"{uid}-{generation}"


def env_dir(root: Path, key: str) -> Path:
    """`<root>/envs/<deps_key>`: a dependency environment, shared by every build with the key."""
    return root / "envs" / key


# -- deciding -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Build:
    record: FunctionRecord
    why: str
    replaces_uid: str | None = None  # a deleted function of the same name left this state
    takeover_from: str | None = None  # the replica whose claim on this build ran out


@dataclass(frozen=True)
class Restamp:
    state: BuildState  # the state to write: the same build, valid for a newer generation


@dataclass(frozen=True)
class Forget:
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class Skip:
    why: str
    recheck_at: datetime | None = None  # another replica's claim: look again when it runs out


Action = Build | Restamp | Forget | Skip


def decide(
    record: FunctionRecord | None,
    state: BuildState | None,
    building: Target | None,
    *,
    me: str,
    now: datetime,
) -> Action:
    """What replica `me` does for one function, from its record (None: deleted), its build
    state and the build this process runs for it now (None: none). Events, KV watches and the
    periodic reconciliation all come here, so a duplicate or lost event changes nothing.

    An unfinished build of the current source that another replica has a live claim on is
    theirs (`Skip`, to look again when the claim runs out); once its lease has run out, it is
    taken over. A new source, runtime or function is built whatever the old build's claim: its
    holder sees its claim replaced at its next renewal and stops."""
    if record is None:
        if state is None:
            return Skip("no function and no build state")
        return Forget(state.namespace, state.name, state.uid)
    target = Target.of(record)
    if building == target:
        return Skip("this source is being built")
    if state is None:
        return Build(record, "no build yet")
    if state.uid != record.uid:
        return Build(record, "a new function of this name", replaces_uid=state.uid)
    if state.source_sha256 != record.source.sha256:
        return Build(record, "new source")
    if state.runtime and state.runtime != record.spec.runtime:
        return Build(record, "new runtime")
    if state.recipe != build_recipe(record.spec.user_docker_commands):
        return Build(record, "new user_docker_commands")
    if state.phase in ("queued", "started"):
        match claim_status(state, me, now):
            case HeldElsewhere(holder, expires_at):
                return Skip(f"replica {holder} builds this source", recheck_at=expires_at)
            case Claimable(takeover_from=None):
                return Build(record, f"the {state.phase} build of this source was interrupted")
            case Claimable(takeover_from=holder):
                return Build(
                    record,
                    f"the claim of replica {holder} on the {state.phase} build ran out",
                    takeover_from=holder,
                )
    if state.phase == "failed" and state.generation < record.generation:
        return Build(record, "a new generation of a source whose build failed: try again")
    if state.generation < record.generation:
        return Restamp(state.model_copy(update={"generation": record.generation}))
    return Skip(f"this source is already built ({state.phase})")


def is_stale(target: Target, record: FunctionRecord | None) -> bool:
    """A finished build is stale when its function was deleted or got another source meanwhile."""
    return record is None or Target.of(record) != target


# -- state transitions ----------------------------------------------------------------------


def next_build_state(
    current: BuildState | None,
    record: FunctionRecord,
    phase: Phase,
    now: datetime,
    *,
    reason: str = "",
    message: str = "",
    artifact: str | None = None,
    dependencies_cached: bool = False,
    duration_seconds: float | None = None,
) -> BuildState:
    """The build state after a transition, stamped with the record's (current) generation.

    Raises ValueError for a transition the lifecycle does not have (queued → started →
    succeeded | failed, or queued → failed), or a record of another build.
    """
    allowed = _NEXT[current.phase if current is not None else None]
    if phase not in allowed:
        was = current.phase if current is not None else "nothing"
        raise ValueError(f"a build cannot go from {was} to {phase}")
    recipe = build_recipe(record.spec.user_docker_commands)
    if current is not None and (
        current.uid,
        current.source_sha256,
        current.runtime,
        current.recipe,
    ) != (record.uid, record.source.sha256, record.spec.runtime, recipe):
        raise ValueError("the record is of another build than the current state")
    if phase == "succeeded" and not artifact:
        raise ValueError("a succeeded build names its artifact")
    if phase == "failed" and not reason:
        raise ValueError("a failed build names its reason")
    return BuildState(
        namespace=record.namespace,
        name=record.name,
        uid=record.uid,
        generation=record.generation,
        phase=phase,
        source_sha256=record.source.sha256,
        runtime=record.spec.runtime,
        recipe=recipe,
        reason=reason,
        message=message,
        artifact=artifact,
        dependencies_cached=dependencies_cached,
        duration_seconds=duration_seconds,
        updated_at=now,
    )


def build_event(state: BuildState, runtime: Runtime, now: datetime | None = None) -> LifecycleEvent:
    """The lifecycle event telling of `state`, keyed `<uid>:<generation>:<phase>`."""
    common: dict[str, Any] = {
        "namespace": state.namespace,
        "name": state.name,
        "uid": state.uid,
        "generation": state.generation,
        "source_sha256": state.source_sha256,
        "runtime": runtime,
    }
    data: BuildQueuedData | BuildStartedData | BuildSucceededData | BuildFailedData
    match state.phase:
        case "queued":
            data = BuildQueuedData(**common)
        case "started":
            data = BuildStartedData(**common)
        case "succeeded":
            data = BuildSucceededData(
                **common,
                artifact=state.artifact or "",
                duration_seconds=state.duration_seconds or 0.0,
                dependencies_cached=state.dependencies_cached,
            )
        case "failed":
            data = BuildFailedData(**common, reason=state.reason, message=state.message)
    return lifecycle_event(
        _EVENTS[state.phase],
        data,
        service="builder",
        subject=f"{state.namespace}/{state.name}",
        key=f"{state.uid}:{state.generation}:{state.phase}",
        time=now or state.updated_at,
    )


# -- messages ---------------------------------------------------------------------------------


def syntax_error_message(file: str, line: int | None, message: str, text: str | None) -> str:
    """`lambda_main.py:3: invalid syntax: x = = 1`: where, what, and the line itself."""
    where = f"{file}:{line}" if line else file
    code = (text or "").strip()
    return f"{where}: {message}" + (f": {code}" if code else "")


_ERROR_STARTS = ("error", "npm error", "npm err!", "\u00d7")  # uv colours off or on


def tail_message(lines: Sequence[str], *, limit: int = 8, max_chars: int = 1500) -> str:
    """A tool's error output as one message: from its first error line on (uv's `error: ...`,
    npm's `npm error ...`), else its last lines; at most `limit` lines."""
    kept = [line.strip() for line in lines if line.strip()]
    first_error = next(
        (i for i, line in enumerate(kept) if line.lower().startswith(_ERROR_STARTS)), None
    )
    kept = kept[first_error : first_error + limit] if first_error is not None else kept[-limit:]
    text = " | ".join(kept)
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


_NODE_WHERE = re.compile(r"^(?P<file>.+):(?P<line>\d+)$")
_NODE_ERROR = re.compile(r"^[A-Za-z]*Error: ")


def node_syntax_error(stderr: Sequence[str], code_dir: str) -> str:
    """The message of a failed `node --check`: `handler.js:3: SyntaxError: Unexpected token ')':
    <the line>`. Node prints `<path>:<line>`, the line, a caret, a blank, then the error."""
    file, line, text, error = "", None, None, ""
    for i, raw in enumerate(stderr):
        where = _NODE_WHERE.match(raw)
        if where and not file:
            file, line = where["file"], int(where["line"])
            if i + 1 < len(stderr):
                text = stderr[i + 1]
        elif _NODE_ERROR.match(raw) and not error:
            error = raw.strip()
    prefix = code_dir.rstrip("/") + "/"
    file = file.removeprefix(prefix) if file else "handler.js"
    return syntax_error_message(file, line, error or "does not compile", text)
