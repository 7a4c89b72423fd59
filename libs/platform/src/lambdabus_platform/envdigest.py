"""The digest of a dependency environment: sha256 over its whole tree (every path, type, mode,
file content and symlink target, in sorted order), so that any change to what a function runs
shows. The builder records it in the artifact manifest; the deployer checks it before it runs
an instance (`EnvironmentVerifier`, once per environment and digest per process)."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lambdabus_platform.errors import LambdabusError

__all__ = ["EnvironmentTampered", "EnvironmentVerifier", "tree_digest"]

if TYPE_CHECKING:
    from hashlib import _Hash as Hash
else:
    Hash = Any

_CHUNK = 1024 * 1024
_PREFIX = "sha256:"


class EnvironmentTampered(LambdabusError):
    """A dependency environment is not what its build recorded: never run it."""

    code = "artifact_unavailable"

    def __init__(self, env_dir: str, expected: str, actual: str) -> None:
        super().__init__(
            f"the dependency environment {env_dir} changed after its build (digest {actual}, "
            f"recorded {expected}): it is not run; rebuild the function to get a fresh one",
            details={"reason": "EnvironmentTampered", "env_dir": env_dir},
        )
        self.reason = "EnvironmentTampered"


def tree_digest(root: Path | str) -> str:
    """`sha256:<hex>` of the tree at `root` (not followed if a symlink itself: its target then
    is the digest's only content). Raises OSError if the tree cannot be read."""
    outer = hashlib.sha256()
    base = os.fsencode(root)
    info = os.lstat(base)
    if stat.S_ISLNK(info.st_mode):
        _record(outer, b".", b"l", info, os.readlink(base))
    else:
        _record(outer, b".", b"d" if stat.S_ISDIR(info.st_mode) else b"o", info, b"")
        if stat.S_ISDIR(info.st_mode):
            _walk(outer, base, b"")
    return _PREFIX + outer.hexdigest()


def _walk(outer: Hash, base: bytes, rel: bytes) -> None:
    directory = os.path.join(base, rel) if rel else base
    with os.scandir(directory) as it:
        names = sorted(entry.name for entry in it)
    for name in names:
        child = os.path.join(rel, name) if rel else name
        info = os.lstat(os.path.join(base, child))
        _entry(outer, base, child, info)
        if stat.S_ISDIR(info.st_mode):
            _walk(outer, base, child)


def _entry(outer: Hash, base: bytes, rel: bytes, info: os.stat_result) -> None:
    mode = info.st_mode
    path = os.path.join(base, rel)
    if stat.S_ISREG(mode):
        _record(outer, rel, b"f", info, _file_digest(path))
    elif stat.S_ISLNK(mode):
        _record(outer, rel, b"l", info, os.readlink(path))
    elif stat.S_ISDIR(mode):
        _record(outer, rel, b"d", info, b"")
    else:
        _record(outer, rel, b"o", info, str(stat.S_IFMT(mode)).encode())


def _record(outer: Hash, rel: bytes, kind: bytes, info: os.stat_result, payload: bytes) -> None:
    for part in (rel, kind, b"%o" % stat.S_IMODE(info.st_mode), payload):
        outer.update(len(part).to_bytes(8, "big"))
        outer.update(part)


def _file_digest(path: bytes) -> bytes:
    inner = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as file:
        while chunk := file.read(_CHUNK):
            inner.update(chunk)
    return inner.digest()


class EnvironmentVerifier:
    """Checks environments against their recorded digests, hashing each (dir, digest) pair once
    per process: a verified environment is read-only and owned by the platform, so no build or
    function can change it afterwards."""

    def __init__(self) -> None:
        self._verified: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def verify(self, env_dir: str, expected: str) -> None:
        """Raise `EnvironmentTampered` unless the tree at `env_dir` has digest `expected`."""
        key = (env_dir, expected)
        with self._lock:
            if key in self._verified:
                return
        try:
            actual = tree_digest(env_dir)
        except OSError as exc:
            raise EnvironmentTampered(env_dir, expected, f"unreadable: {exc}") from exc
        if actual != expected:
            raise EnvironmentTampered(env_dir, expected, actual)
        with self._lock:
            self._verified.add(key)
