"""Environment digests: every kind of change to a tree changes its digest; the deployer's
manifest check refuses a tampered environment and hashes a good one once."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lambdabus_deployer.local import interpreter_dirs, load_manifest
from lambdabus_deployer.plan import DesiredRevision, RuntimePaths
from lambdabus_events.models import ArtifactManifest
from lambdabus_platform.envdigest import EnvironmentTampered, EnvironmentVerifier, tree_digest
from lambdabus_platform.errors import LambdabusError


def make_tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "lib" / "pkg").mkdir(parents=True)
    (root / "lib" / "pkg" / "__init__.py").write_text("X = 1\n")
    (root / "bin" / "python").symlink_to("/usr/bin/python3")
    (root / "empty").mkdir()
    return root


def test_the_same_tree_anywhere_has_the_same_digest(tmp_path: Path) -> None:
    one = tree_digest(make_tree(tmp_path / "a"))
    assert one.startswith("sha256:")
    assert len(one) == len("sha256:") + 64
    assert tree_digest(make_tree(tmp_path / "b")) == one
    assert tree_digest(tmp_path / "a") == one  # stable


def relink(path: Path, target: str) -> None:
    path.unlink()
    path.symlink_to(target)


CHANGES: dict[str, Callable[[Path], object]] = {
    "content": lambda r: (r / "lib/pkg/__init__.py").write_text("X = 2\n"),
    "same size content": lambda r: (r / "lib/pkg/__init__.py").write_text("Y = 1\n"),
    "mode": lambda r: (r / "bin/tool").chmod(0o777),
    "directory mode": lambda r: (r / "lib").chmod(0o777),
    "symlink target": lambda r: relink(r / "bin/python", "/tmp/evil"),
    "new file": lambda r: (r / "lib/pkg/evil.pth").write_text("import os\n"),
    "new empty dir": lambda r: (r / "lib/x").mkdir(),
    "removed file": lambda r: (r / "bin/tool").unlink(),
    "renamed": lambda r: (r / "empty").rename(r / "empty2"),
    "file replaced by a symlink": lambda r: relink(r / "bin/tool", "/bin/sh"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_every_change_changes_the_digest(tmp_path: Path, change: str) -> None:
    root = make_tree(tmp_path / "env")
    before = tree_digest(root)
    CHANGES[change](root)
    assert tree_digest(root) != before


def test_the_verifier_refuses_a_mismatch_and_caches_a_match(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "env")
    digest = tree_digest(root)
    verifier = EnvironmentVerifier()
    verifier.verify(str(root), digest)
    with pytest.raises(EnvironmentTampered) as caught:
        verifier.verify(str(root), "sha256:" + "0" * 64)
    assert caught.value.code == "artifact_unavailable"
    assert caught.value.details["reason"] == "EnvironmentTampered"
    # a verified (dir, digest) is not hashed again in this process
    shutil.rmtree(root / "lib")
    verifier.verify(str(root), digest)
    with pytest.raises(EnvironmentTampered):
        EnvironmentVerifier().verify(str(root), digest)
    with pytest.raises(EnvironmentTampered, match="unreadable"):
        EnvironmentVerifier().verify(str(tmp_path / "missing"), digest)


def revision_for(tmp_path: Path, env: Path, digest: str) -> DesiredRevision:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    manifest = ArtifactManifest(
        runtime="python3.11",
        entrypoint="lambda_main.py",
        style="luna",
        code_dir=str(code),
        env_dir=str(env),
        source_sha256="0" * 64,
        deps_key="k",
        env_digest=digest,
    )
    path = tmp_path / f"manifest-{len(os.listdir(tmp_path))}.json"
    path.write_text(manifest.model_dump_json())
    return DesiredRevision(
        namespace="default",
        name="fn",
        uid="u",
        generation=1,
        build_generation=1,
        artifact=f"file://{path}",
        runtime="python3.11",
        env=(),
        replicas=1,
        memory=128,
        timeout=5.0,
    )


def test_the_deployer_loads_no_manifest_whose_environment_changed(tmp_path: Path) -> None:
    env = make_tree(tmp_path / "env")
    digest = tree_digest(env)
    assert load_manifest(revision_for(tmp_path, env, digest)).env_digest == digest
    victim = make_tree(tmp_path / "victim")
    recorded = tree_digest(victim)
    (victim / "lib" / "pkg" / "__init__.py").write_text("import evil\n")  # after its build
    with pytest.raises(EnvironmentTampered) as tampered:
        load_manifest(revision_for(tmp_path, victim, recorded))
    assert str(victim) in tampered.value.message
    with pytest.raises(LambdabusError, match="records no digest") as caught:
        load_manifest(revision_for(tmp_path, env, ""))
    assert caught.value.code == "artifact_unavailable"


def test_the_deployer_runs_no_environment_that_is_a_symlink(tmp_path: Path) -> None:
    """A build that swapped its env dir for a link to a host dir gets nothing run on it, even
    with the link's digest recorded."""
    target = make_tree(tmp_path / "host-dir")
    link = tmp_path / "env"
    link.symlink_to(target)
    with pytest.raises(LambdabusError, match="is a symlink") as caught:
        load_manifest(revision_for(tmp_path, link, tree_digest(link)))
    assert caught.value.code == "artifact_unavailable"


def test_only_the_deployers_own_interpreter_installation_is_bound(tmp_path: Path) -> None:
    """`bin/python` of an environment is the build's: a link to elsewhere binds nothing."""
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    manifest = ArtifactManifest(
        runtime="python3.11",
        entrypoint="lambda_main.py",
        style="luna",
        code_dir=str(tmp_path),
        env_dir=str(env),
        source_sha256="0" * 64,
        deps_key="k",
        env_digest="x",
    )
    elsewhere = tmp_path / "home" / "someone" / "bin"
    elsewhere.mkdir(parents=True)
    (elsewhere / "python").write_text("")
    (env / "bin" / "python").symlink_to(elsewhere / "python")
    assert interpreter_dirs(manifest, RuntimePaths()) == []
    (env / "bin" / "python").unlink()
    ours = Path(sys.executable).resolve()
    (env / "bin" / "python").symlink_to(ours)
    prefix = ours.parent.parent
    # this deployer's own installation is bound, unless it is /usr (visible anyway)
    expected = [] if prefix in (Path("/usr"), Path("/")) else [str(prefix)]
    assert interpreter_dirs(manifest, RuntimePaths()) == expected
