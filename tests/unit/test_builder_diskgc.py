"""The builder's disk as the garbage collector sees it (`lambdabus_builder.diskgc`), on real
directories: what is listed, what the artifacts use, and removal that leaves a just-used
environment in place."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lambdabus_builder import diskgc
from lambdabus_builder.local import digest_path, seal, touch_env
from lambdabus_events.models import ArtifactManifest


def artifact(root: Path, name: str, build: str, key: str) -> Path:
    directory = root / "artifacts" / "default" / name / build
    (directory / "code").mkdir(parents=True)
    (directory / "code" / "lambda_main.py").write_text("async def main(r):\n    return 1\n")
    manifest = ArtifactManifest(
        runtime="python3.11",
        entrypoint="lambda_main.py",
        style="kyma",
        code_dir=str(directory / "code"),
        env_dir=str(root / "envs" / key),
        source_sha256="a" * 64,
        deps_key=key,
    )
    (directory / "manifest.json").write_text(manifest.model_dump_json())
    seal(directory / "code")
    return directory


def env(root: Path, key: str, age: float = 0.0) -> Path:
    path = root / "envs" / key
    (path / "lib").mkdir(parents=True)
    (path / "lib" / "pkg.py").write_text("x = 1\n")
    digest_path(path).write_text("sha256:0\n")
    seal(path)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_listing_skips_what_is_in_the_making_and_reads_what_artifacts_use(tmp_path: Path) -> None:
    kept = artifact(tmp_path, "a", "u1-1", "k1")
    artifact(tmp_path, "a", "u1-2.partial-abcd", "k2")
    env(tmp_path, "k1")
    (tmp_path / "envs" / ".tmp-k3-1234").mkdir()
    listed = diskgc.stored_artifacts(tmp_path)
    assert list(listed) == [f"file://{kept}/manifest.json"]
    assert listed[f"file://{kept}/manifest.json"][0].size > 0
    assert [s.name for s in diskgc.stored_envs(tmp_path)] == ["k1"]
    assert diskgc.envs_in_use(diskgc.artifact_dirs(tmp_path)) == {"k1"}


def test_removing_an_artifact_removes_its_empty_function_dirs_once(tmp_path: Path) -> None:
    one = artifact(tmp_path, "a", "u1-1", "k1")
    assert diskgc.remove_artifact(one)
    assert not (tmp_path / "artifacts" / "default").exists()
    assert not diskgc.remove_artifact(one)  # another sweeper took it first


def test_an_environment_used_meanwhile_is_renamed_back_not_removed(tmp_path: Path) -> None:
    old = env(tmp_path, "old", age=120)
    used = env(tmp_path, "used", age=120)
    touch_env(used)  # a build looked for it after the sweep listed it
    assert diskgc.remove_env(tmp_path, "old", grace=60)
    assert not old.exists()
    assert not digest_path(old).exists()
    assert not diskgc.remove_env(tmp_path, "used", grace=60)
    assert (used / "lib" / "pkg.py").read_text() == "x = 1\n"
    assert digest_path(used).exists()
    assert sorted(p.name for p in (tmp_path / "envs").iterdir()) == ["used", "used.sha256"]
