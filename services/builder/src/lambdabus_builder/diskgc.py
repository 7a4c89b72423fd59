"""The local backend's disk, as the garbage collector sees it (blocking; run in a thread):
artifact directories and dependency environments listed as `gc.Stored`, the environments the
remaining artifacts use, and removal that is safe against a concurrent builder.

Removal renames first (`<artifact>.partial-gc…`, `envs/.tmp-<key>-gc…`: names `recover`
clears), so another builder process sees the thing whole or not at all, and two sweepers never
delete the same thing twice. An environment a build touched (`local.touch_env`) after the sweep
looked at it is renamed back instead of deleted.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

from pydantic import ValidationError

from lambdabus_builder.local import digest_path, remove_tree
from lambdabus_events.models import ArtifactManifest
from lambdabus_platform.gc import Stored

_PARTIAL = ".partial-"
_TMP_ENV = ".tmp-"
MANIFEST = "manifest.json"


def artifact_ref(directory: Path) -> str:
    """How build states and revision records name the artifact in `directory`."""
    return f"file://{directory / MANIFEST}"


def _size(root: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def artifact_dirs(root: Path) -> list[Path]:
    """`artifacts/<ns>/<name>/<uid>-<generation>` of finished builds (none in the making)."""
    return sorted(p for p in root.glob("artifacts/*/*/*") if _PARTIAL not in p.name and p.is_dir())


def stored_artifacts(root: Path) -> dict[str, tuple[Stored, Path]]:
    """Every finished artifact by its reference: its size, and when its manifest was written."""
    found: dict[str, tuple[Stored, Path]] = {}
    for directory in artifact_dirs(root):
        modified = _mtime(directory / MANIFEST) or _mtime(directory)
        if modified is None:  # gone meanwhile
            continue
        ref = artifact_ref(directory)
        found[ref] = (Stored(ref, _size(directory), modified), directory)
    return found


def stored_envs(root: Path) -> list[Stored]:
    """Every dependency environment by its key, and when it was made or last used."""
    envs = root / "envs"
    found = []
    for env in sorted(envs.iterdir()) if envs.is_dir() else ():
        if env.name.startswith(_TMP_ENV) or env.is_symlink() or not env.is_dir():
            continue
        modified = _mtime(env)
        if modified is not None:
            found.append(Stored(env.name, _size(env), modified))
    return found


def envs_in_use(directories: list[Path]) -> set[str]:
    """The environment keys the artifacts in `directories` run with. An artifact whose manifest
    cannot be read names none (it cannot be run either)."""
    keys = set()
    for directory in directories:
        try:
            manifest = ArtifactManifest.model_validate_json((directory / MANIFEST).read_bytes())
        except (OSError, ValueError, ValidationError):
            continue
        keys.add(manifest.deps_key)
        keys.add(Path(manifest.env_dir).name)
    return keys


def remove_artifact(directory: Path) -> bool:
    """Delete one artifact directory (and its function's directories left empty); False if
    another sweeper or builder took it away first."""
    doomed = directory.with_name(f"{directory.name}{_PARTIAL}gc{secrets.token_hex(4)}")
    try:
        directory.rename(doomed)
    except OSError:
        return False
    remove_tree(doomed)
    for empty in (directory.parent, directory.parent.parent):
        with contextlib.suppress(OSError):
            empty.rmdir()
    return True


def remove_env(root: Path, key: str, *, grace: float) -> bool:
    """Delete the environment `key` unless a build used it within `grace` seconds (checked
    again after the rename, so a build that touched it meanwhile keeps it)."""
    env = root / "envs" / key
    doomed = env.with_name(f"{_TMP_ENV}{key}-gc{secrets.token_hex(4)}")
    try:
        env.rename(doomed)
    except OSError:
        return False
    modified = _mtime(doomed)
    if modified is not None and time.time() - modified < grace:
        try:
            doomed.rename(env)
        except OSError:  # a build made it anew meanwhile: this copy is not needed
            remove_tree(doomed)
        return False
    remove_tree(doomed)
    with contextlib.suppress(FileNotFoundError):
        digest_path(env).unlink()
    return True
