"""Garbage collection (issue 11) on a running platform, with 2 revisions kept, a grace period of
1 s and a sweep every 0.5 s: two functions share a dependency environment, a third has its
own. `shared-a` gets three versions, the first tagged by the route, so its second revision is
collected; `solo` is deleted. The sweeps free the collected revision's artifact and source
blob, the deleted function's artifact and blob, and the environment no function uses any
more; they keep everything still referenced: the shared environment, the latest artifacts, the
tagged and the latest revisions' artifacts and blobs (which still answer).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lambdabus_events.models import (
    ArtifactManifest,
    BuildState,
    FunctionRecord,
    FunctionRevisions,
    RevisionDeployment,
)
from lambdabus_platform.blobstore import NatsBlobStore
from lambdabus_platform.bus import Bus
from lambdabus_platform.settings import NatsSettings
from lambdabus_platform.subjects import (
    BUILD_INPUTS_BUCKET,
    BUILDS_BUCKET,
    FUNCTIONS_BUCKET,
    REVISION_DEPLOYMENTS_BUCKET,
    REVISIONS_BUCKET,
)
from tests.e2e.conftest import Platform
from tests.e2e.helpers import cli, http, offline_platform, wait_for, wait_running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SOURCE = (
    "import humanize\n\n\nasync def main(request):\n"
    "    return {{'fn': '{name}', 'version': {version}, 'size': humanize.naturalsize(1000)}}\n"
)
SHARED, PINNED = "humanize\n", "humanize==4.12.3\n"  # two dependency files: two environments


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(
        tmp_path_factory,
        "gc",
        LAMBDABUS_GC_GRACE_SECONDS="1",
        LAMBDABUS_GC_INTERVAL_SECONDS="0.5",
        LAMBDABUS_GATEWAY_REVISIONS_KEPT="2",
    )


@dataclass(frozen=True)
class Seen:
    """What the records say of one function: its source blob, its latest artifact's directory
    and environment, and the artifact of each revision the deployer recorded."""

    source: str
    artifact: Path
    env: Path
    revisions: dict[str, Path]
    kept: list[str]


def _dir(artifact: str) -> Path:
    return Path(artifact.removeprefix("file://")).parent


async def _read(platform: Platform, name: str) -> Seen:
    settings = NatsSettings(
        url=platform.urls["nats"], nkey_seed_file=platform.nats_seed(), connect_wait_seconds=5
    )
    async with Bus.connect(settings, name="e2e-gc") as bus:
        key = f"default.{name}"
        record = await bus.kv(FUNCTIONS_BUCKET).get(key)
        build = await bus.kv(BUILDS_BUCKET).get(key)
        doc = await bus.kv(REVISIONS_BUCKET).get(key)
        assert record is not None
        assert build is not None
        assert doc is not None
        state = BuildState.model_validate_json(build.value)
        assert state.artifact
        manifest = ArtifactManifest.model_validate_json(
            Path(state.artifact.removeprefix("file://")).read_bytes()
        )
        revisions = {}
        for entry in await bus.kv(REVISION_DEPLOYMENTS_BUCKET).values(f"{key}.*"):
            rd = RevisionDeployment.model_validate_json(entry.value)
            if rd.artifact:
                revisions[rd.revision] = _dir(rd.artifact)
        return Seen(
            source=FunctionRecord.model_validate_json(record.value).source.sha256,
            artifact=_dir(state.artifact),
            env=Path(manifest.env_dir),
            revisions=revisions,
            kept=[r.name for r in FunctionRevisions.model_validate_json(doc.value).revisions],
        )


def seen(platform: Platform, name: str) -> Seen:
    return asyncio.run(_read(platform, name))


def stored(platform: Platform, *blobs: str) -> dict[str, bool]:
    async def check() -> dict[str, bool]:
        settings = NatsSettings(
            url=platform.urls["nats"], nkey_seed_file=platform.nats_seed(), connect_wait_seconds=5
        )
        async with Bus.connect(settings, name="e2e-gc") as bus:
            store = NatsBlobStore(bus)
            return {b: await store.exists(b) for b in blobs}

    return asyncio.run(check())


def indexed(platform: Platform) -> set[Path]:
    """The artifact directories the `build-inputs` index offers for reuse."""

    async def read() -> set[Path]:
        settings = NatsSettings(
            url=platform.urls["nats"], nkey_seed_file=platform.nats_seed(), connect_wait_seconds=5
        )
        async with Bus.connect(settings, name="e2e-gc") as bus:
            entries = await bus.kv(BUILD_INPUTS_BUCKET).values(">")
            return {_dir(json.loads(e.value)["artifact"]) for e in entries}

    return asyncio.run(read())


def deploy(platform: Platform, root: Path, name: str, version: int, requirements: str) -> None:
    fn = root / name
    fn.mkdir(exist_ok=True)
    (fn / "lambda_main.py").write_text(SOURCE.format(name=name, version=version))
    (fn / "requirements.txt").write_text(requirements)
    deployed = cli(platform, "deploy", str(fn), "--name", name)
    assert deployed.returncode == 0, deployed.stderr


def answers(platform: Platform, path: str, version: int) -> bool:
    status, body = http("GET", f"{platform.urls['router']}/default/{path}", timeout=10)
    return status == 200 and isinstance(body, dict) and body.get("version") == version


def gc_counts(platform: Platform) -> dict[tuple[str, str], float]:
    """`lambdabus_gc_*_total` of the gateway and the builder, by (metric, kind)."""
    found: dict[tuple[str, str], float] = {}
    for service in ("gateway", "builder"):
        status, text = http("GET", f"{platform.urls[service]}/metrics", timeout=5)
        assert status == 200
        for metric, kind, value in re.findall(
            r'^lambdabus_gc_(\w+)_total\{kind="(\w+)"\} (\S+)$', str(text), re.M
        ):
            found[(metric, kind)] = float(value)
    return found


def test_collecting_revisions_and_deleting_functions_frees_only_the_unreferenced(
    platform: Platform, tmp_path: Path
) -> None:
    gateway = f"{platform.urls['gateway']}/v1/namespaces/default/functions"
    deploy(platform, tmp_path, "shared-a", 1, SHARED)
    deploy(platform, tmp_path, "shared-b", 1, SHARED)
    deploy(platform, tmp_path, "solo", 1, PINNED)
    for name in ("shared-a", "shared-b", "solo"):
        wait_running(platform, name, timeout=180)
    a1, b, solo = seen(platform, "shared-a"), seen(platform, "shared-b"), seen(platform, "solo")
    assert a1.env == b.env != solo.env
    assert solo.env.is_dir()

    # The route tags the first revision: it is never collected.
    route = [
        {"latest": True, "percent": 100},
        {"revision": "shared-a-00001", "percent": 0, "tag": "old"},
    ]
    status, body = http("PUT", f"{gateway}/shared-a/traffic", {"traffic": route})
    assert status == 200, body
    deploy(platform, tmp_path, "shared-a", 2, SHARED)
    wait_for(lambda: answers(platform, "shared-a", 2), 120, "shared-a v2 answering")
    a2 = wait_for(
        lambda: (s := seen(platform, "shared-a")).revisions.get("shared-a-00002") and s,
        30,
        "the deployer's record of shared-a-00002",
    )
    deploy(platform, tmp_path, "shared-a", 3, SHARED)
    wait_for(lambda: answers(platform, "shared-a", 3), 120, "shared-a v3 answering")
    a3 = seen(platform, "shared-a")
    assert a3.kept == ["shared-a-00001", "shared-a-00003"]  # 2 kept: the tagged one, the latest
    collected_artifact = a2.revisions["shared-a-00002"]
    assert collected_artifact not in (a1.artifact, a3.artifact)

    removed = cli(platform, "rm", "solo")
    assert removed.returncode == 0, removed.stderr

    def left() -> list[str]:
        blobs = stored(platform, a2.source, solo.source)
        paths = (collected_artifact, solo.artifact, solo.env)
        return [b for b, there in blobs.items() if there] + [str(p) for p in paths if p.exists()]

    try:
        wait_for(lambda: not left(), 90, "the unreferenced things freed")
    except AssertionError as exc:
        raise AssertionError(f"still there: {left()}") from exc
    # Two more sweeps of each kind after that: still nothing referenced is touched.
    before = gc_counts(platform)
    wait_for(
        lambda: all(
            gc_counts(platform)[("sweeps", kind)] >= before[("sweeps", kind)] + 2
            for kind in ("blob", "artifact", "environment")
        ),
        60,
        "two more sweeps",
    )
    assert stored(platform, a1.source, a3.source, b.source) == dict.fromkeys(
        (a1.source, a3.source, b.source), True
    )
    for kept in (a1.artifact, a3.artifact, b.artifact, a1.env):
        assert kept.is_dir(), kept
    assert a3.revisions["shared-a-00001"] == a1.artifact
    offered = indexed(platform)  # the reuse index offers what is kept, not what was freed
    assert {a1.artifact, a3.artifact, b.artifact} <= offered
    assert not offered & {collected_artifact, solo.artifact}
    assert answers(platform, "shared-a", 3)
    assert answers(platform, "shared-a@old", 1)
    assert answers(platform, "shared-b", 1)
    counts = gc_counts(platform)
    assert counts[("freed", "blob")] >= 2
    assert counts[("freed", "artifact")] >= 1
    assert counts[("freed", "environment")] >= 1
    assert counts[("freed_bytes", "environment")] > 0
