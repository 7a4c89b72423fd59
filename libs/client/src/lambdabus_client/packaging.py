"""Turning what a user points `lambdabus deploy` at into a function archive.

A directory is zipped deterministically (sorted entries, fixed timestamps and modes), so the same
tree always gives the same bytes and therefore the same sha256 on the gateway; an existing `.zip`
is sent as it is.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SKIPPED_DIRECTORIES = frozenset({"__pycache__", ".git", "node_modules", ".venv"})
SKIPPED_SUFFIXES = (".pyc",)
# The earliest timestamp a zip entry can hold; used for every entry so the bytes never depend
# on when the files were touched.
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)

Warn = Callable[[str], None]


class PackagingError(Exception):
    """The path cannot be turned into a function archive; the message says why."""


@dataclass(frozen=True, slots=True)
class _Entry:
    arcname: str
    path: Path
    executable: bool


def load_archive(path: Path, *, warn: Warn | None = None) -> bytes:
    """The archive to upload for `path`: a directory is zipped; a file (a zip, a tar, plain or
    compressed, or a single source file as Kubeless's `--from-file`) is sent as it is: the
    gateway tells them apart by their content."""
    if path.is_dir():
        return zip_directory(path, warn=warn)
    if not path.exists():
        raise PackagingError(f"{path} does not exist")
    if not path.is_file():
        raise PackagingError(
            f"{path} is neither a directory nor a file (pass a directory, an archive or a "
            "source file)"
        )
    return path.read_bytes()


def source_names(data: bytes, filename: str) -> set[str]:
    """The top-level file names of what `load_archive` gave: a zip's or a tar's entries, or
    the file's own name. Best effort (for guessing the runtime): unreadable → no names."""
    import tarfile

    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as opened:
                names = opened.namelist()
        except (zipfile.BadZipFile, ValueError):
            return set()
    else:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                names = [member.name.removeprefix("./") for member in tar]
        except (tarfile.TarError, OSError, EOFError):
            return {filename}
    return {name for name in names if name and "/" not in name.rstrip("/")}


def zip_directory(path: Path, *, warn: Warn | None = None) -> bytes:
    """Zip the files under `path` into deterministic bytes.

    `__pycache__`, `.git`, `node_modules`, `.venv` and `*.pyc` are left out. A symlink to a file
    inside the directory is stored as that file's content; every other symlink (to a directory,
    to somewhere outside, or dangling) is skipped and reported through `warn` (default: a log
    warning), so packaging never reads outside the tree it was given.
    """
    report = warn if warn is not None else logger.warning
    root = path.resolve()
    if not root.is_dir():
        raise PackagingError(f"{path} is not a directory")
    entries = sorted(_walk(root, root, report), key=lambda entry: entry.arcname)
    if not entries:
        raise PackagingError(f"{path} holds no files to package")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
        for entry in entries:
            info = zipfile.ZipInfo(entry.arcname, date_time=FIXED_DATE_TIME)
            info.create_system = 3  # unix, so external_attr carries the mode on every platform
            mode = 0o755 if entry.executable else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entry.path.read_bytes())
    return buffer.getvalue()


def _walk(root: Path, directory: Path, warn: Warn) -> Iterator[_Entry]:
    with os.scandir(directory) as scan:
        children = sorted(scan, key=lambda child: child.name)
    for child in children:
        child_path = Path(child.path)
        arcname = child_path.relative_to(root).as_posix()
        if child.name in SKIPPED_DIRECTORIES or child.name.endswith(SKIPPED_SUFFIXES):
            continue
        if child.is_symlink():
            entry = _symlinked_file(root, child_path, arcname, warn)
            if entry is not None:
                yield entry
        elif child.is_dir(follow_symlinks=False):
            yield from _walk(root, child_path, warn)
        elif child.is_file(follow_symlinks=False):
            executable = bool(child.stat(follow_symlinks=False).st_mode & 0o111)
            yield _Entry(arcname, child_path, executable)
        else:
            warn(f"skipping {arcname}: not a regular file")


def _symlinked_file(root: Path, link: Path, arcname: str, warn: Warn) -> _Entry | None:
    try:
        target = link.resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
        warn(f"skipping symlink {arcname}: it cannot be resolved")
        return None
    if not target.is_relative_to(root):
        warn(f"skipping symlink {arcname}: it points outside {root}")
        return None
    if not target.exists():
        warn(f"skipping symlink {arcname}: its target does not exist")
        return None
    if not target.is_file():
        warn(f"skipping symlink {arcname}: it does not point to a regular file")
        return None
    return _Entry(arcname, target, bool(target.stat().st_mode & 0o111))
