"""Upload archive rules: decide whether a user's zip is safe and runnable, build a zip from inline
source, and extract a zip under a directory. Pure: reads only the given bytes, writes only under
the given directory."""

from __future__ import annotations

import copy
import io
import os
import re
import stat
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lambdabus_events.models import ENTRYPOINTS, RUNTIMES, Runtime
from lambdabus_platform.errors import ArchiveError, PayloadTooLarge

__all__ = [
    "ArchiveInfo",
    "ArchiveLimits",
    "build_inline_archive",
    "extract_archive",
    "inspect_archive",
]

_CHUNK = 64 * 1024
_UNIX = 3
_ENCRYPTED = 0x1
_DOCS = ("docs/lambda.html", "docs/lambda.yml")
_INLINE_DATE = (1980, 1, 1, 0, 0, 0)
MAX_NAME_BYTES = 255  # one path component, as most file systems allow (NAME_MAX)
MAX_PATH_BYTES = 1024  # a whole entry name, well below PATH_MAX once under a build dir
_DRIVE = re.compile(r"^[A-Za-z]:")
# bzip2 and lzma are left out on purpose: zipfile decompresses them without an output bound,
# so one small read could expand to gigabytes in memory before any byte is counted.
_COMPRESSION = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}


@dataclass(frozen=True)
class ArchiveLimits:
    max_entries: int = 10_000
    max_uncompressed: int = 250 * 1024 * 1024  # bytes, counted while actually decompressing


@dataclass(frozen=True)
class ArchiveInfo:
    entrypoint: str  # e.g. "lambda_main.py"
    files: int  # number of regular files
    uncompressed_size: int  # real bytes decompressed
    # the root files asked for with `keep`: at most their limit + 1 bytes, so a caller sees
    # that one passed its limit without holding all of it
    kept: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class _Entry:
    info: zipfile.ZipInfo
    name: str  # without the trailing "/" of a directory
    is_dir: bool
    executable: bool


def inspect_archive(
    data: bytes | BinaryIO,
    runtime: Runtime,
    limits: ArchiveLimits = ArchiveLimits(),
    keep: Mapping[str, int] | None = None,
    entrypoints: tuple[str, ...] | None = None,
) -> ArchiveInfo:
    """Check an uploaded zip against every rule, decompressing it fully without keeping it.

    Raises `ArchiveError` (400) naming the broken rule in `code`, or `PayloadTooLarge` (413,
    `archive_too_large`) once the really decompressed bytes pass `limits.max_uncompressed`.
    A bad CRC, an invalid compressed stream or a declared size that differs from the real one
    is `corrupt_entry`. A file object must be seekable. `keep` names root files (e.g. the
    dependency files) whose content to return in `kept`, each up to its limit plus one byte.
    `entrypoints`: the files a handler's module may be (`helloget.py`), instead of the runtime's
    default entry points; none present is `missing_handler_module`.
    """
    keep = keep or {}
    kept: dict[str, bytes] = {}
    with _open(data) as zf:
        entries = _scan(zf, limits)
        entrypoint = (
            _entrypoint(entries, runtime)
            if entrypoints is None
            else _handler_module(entries, runtime, entrypoints)
        )
        total = 0
        for entry in entries:
            if entry.is_dir:
                continue
            if entry.name not in keep:
                total += _decompress(zf, entry, total, limits, None)
                continue
            buffer = bytearray()
            total += _decompress(zf, entry, total, limits, _capped(buffer, keep[entry.name] + 1))
            kept[entry.name] = bytes(buffer)
    return ArchiveInfo(
        entrypoint=entrypoint,
        files=sum(not e.is_dir for e in entries),
        uncompressed_size=total,
        kept=kept,
    )


def _capped(buffer: bytearray, cap: int) -> Callable[[bytes], None]:
    def sink(chunk: bytes) -> None:
        if len(buffer) < cap:
            buffer.extend(chunk[: cap - len(buffer)])

    return sink


def extract_archive(
    data: bytes | BinaryIO, dest: Path, limits: ArchiveLimits = ArchiveLimits()
) -> ArchiveInfo | None:
    """Extract a zip under `dest` with the same safety rules as `inspect_archive`.

    There is no entry point check (the runtime is not known here; the gateway ran
    `inspect_archive` on upload): the result names the first entry point of any runtime found
    at the root, and is None when there is none — the files are extracted all the same.
    Files get mode 0o644, or 0o755 when the zip marks them executable. Existing files are
    never overwritten. Every metadata rule is checked before anything is written; if an entry
    fails while decompressing, whatever this call created is removed before the error is raised.
    """
    with _open(data) as zf:
        entries = _scan(zf, limits)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        created: list[Path] = []
        total = 0
        try:
            for entry in entries:
                target = _target(root, entry)
                if entry.is_dir:
                    _make_dirs(root, target, created)
                    continue
                _make_dirs(root, target.parent, created)
                total += _write(zf, entry, target, total, limits, created)
        except BaseException:
            _remove(created)
            raise
    roots = {e.name for e in entries if not e.is_dir and "/" not in e.name}
    found = [name for rt in RUNTIMES for name in ENTRYPOINTS[rt] if name in roots]
    if not found:
        return None
    return ArchiveInfo(
        entrypoint=found[0],
        files=sum(not e.is_dir for e in entries),
        uncompressed_size=total,
    )


def build_inline_archive(files: Mapping[str, str]) -> bytes:
    """Zip inline source `{path: text}` deterministically: the same files always give the same
    bytes (sorted names, 1980-01-01 timestamps, mode 0o644, deflate level 9), as the store is
    content-addressed. Paths follow the archive path rules; the entry point is not checked here."""
    if not files:
        raise ArchiveError(
            "the inline source has no files: add at least the entry point, e.g. "
            '{"lambda_main.py": "..."}',
            code="empty_source",
        )
    for path in files:
        problem = _path_problem(path, directory=False)
        if problem is not None:
            raise _unsafe(path, problem)
        _check_length(path)
    _check_conflicts(set(files), set(files))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(files):
            info = zipfile.ZipInfo(path, date_time=_INLINE_DATE)
            info.create_system = _UNIX
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, files[path].encode("utf-8"), compresslevel=9)
    return buffer.getvalue()


@contextmanager
def _open(data: bytes | BinaryIO) -> Iterator[zipfile.ZipFile]:
    source: BinaryIO = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:
        # ValueError covers entry names flagged UTF-8 that are not valid UTF-8.
        raise ArchiveError(
            f"the upload is not a readable zip archive ({exc}); upload a .zip file "
            "(for example made with `zip -r function.zip .` inside the function's folder)",
            code="not_a_zip",
        ) from exc
    with zf:
        yield zf


def _scan(zf: zipfile.ZipFile, limits: ArchiveLimits) -> list[_Entry]:
    """Every rule that needs only the central directory, checked before decompressing."""
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise ArchiveError(
            f"the archive has {len(infos)} entries, more than the limit of "
            f"{limits.max_entries}: remove files (e.g. tests, caches, .git) from it",
            code="too_many_entries",
            details={"entries": len(infos), "limit": limits.max_entries},
        )
    entries: list[_Entry] = []
    seen: set[str] = set()
    for info in infos:
        entry = _entry(info)
        if entry.name in seen:
            raise ArchiveError(
                f"the archive has two entries named {entry.name!r}: keep only one",
                code="duplicate_entry",
                details={"entry": entry.name},
            )
        seen.add(entry.name)
        entries.append(entry)
    _check_conflicts({e.name for e in entries if not e.is_dir}, {e.name for e in entries})
    _check_docs(entries)
    return entries


def _entry(info: zipfile.ZipInfo) -> _Entry:
    # zipfile cuts `filename` at a NUL byte; `orig_filename` is the name as stored.
    for name in (info.orig_filename, info.filename):
        problem = _path_problem(name, directory=True)
        if problem is not None:
            raise _unsafe(name, problem)
        _check_length(name)
    name = info.filename
    if info.flag_bits & _ENCRYPTED:
        raise ArchiveError(
            f"archive entry {name!r} is encrypted: upload an archive without a password",
            code="encrypted_entry",
            details={"entry": name},
        )
    is_dir = name.endswith("/")
    mode = info.external_attr >> 16 if info.create_system == _UNIX else 0
    kind = stat.S_IFMT(mode)
    if kind not in (0, stat.S_IFDIR if is_dir else stat.S_IFREG):
        raise ArchiveError(
            f"archive entry {name!r} is a {_kind_name(kind)}, not a regular file or a directory:"
            " put the real file in its place (`zip -r` without `-y` stores files, not links)",
            code="special_entry",
            details={"entry": name},
        )
    if not is_dir and info.compress_type not in _COMPRESSION:
        raise ArchiveError(
            f"archive entry {name!r} uses an unsupported compression method "
            f"({info.compress_type}): re-create the archive with deflate (the zip default)",
            code="unsupported_compression",
            details={"entry": name},
        )
    return _Entry(
        info=info,
        name=name.rstrip("/"),
        is_dir=is_dir,
        executable=bool(mode & 0o111) and not is_dir,
    )


def _path_problem(name: str, *, directory: bool) -> str | None:
    if not name:
        return "it is empty"
    if "\x00" in name:
        return "it contains a NUL byte"
    if "\\" in name:
        return "it contains a backslash (use '/' between folders)"
    if name.startswith("/"):
        return "it is an absolute path"
    if _DRIVE.match(name):
        return "it starts with a drive letter"
    parts = name.split("/")
    if directory and len(parts) > 1 and parts[-1] == "":
        parts.pop()  # the trailing "/" of a directory entry
    if ".." in parts:
        return "it has a '..' component"
    if "." in parts or "" in parts:
        return "it has an empty or '.' component"
    return None


def _check_length(name: str) -> None:
    """Raise `path_too_long` for a component over 255 bytes or a name over 1,024 bytes: such a
    name cannot be written on the builder's file system (or not below a build dir)."""
    problem = _length_problem(name)
    if problem is not None:
        shown = name if len(name) <= 120 else name[:100] + "..."
        raise ArchiveError(
            f"archive entry {shown!r} has a name too long: {problem}; shorten the path",
            code="path_too_long",
            details={"entry": shown, "max_component": MAX_NAME_BYTES, "max_path": MAX_PATH_BYTES},
        )


def _length_problem(name: str) -> str | None:
    parts = name.rstrip("/").split("/")
    size = len(name.encode("utf-8", "surrogateescape"))
    if size > MAX_PATH_BYTES:
        return f"it is {size} bytes long, more than the limit of {MAX_PATH_BYTES} bytes"
    for part in parts:
        length = len(part.encode("utf-8", "surrogateescape"))
        if length > MAX_NAME_BYTES:
            return (
                f"its component {part[:40]!r}... is {length} bytes long, more than the limit "
                f"of {MAX_NAME_BYTES} bytes"
            )
    return None


def _unsafe(name: str, problem: str) -> ArchiveError:
    shown = name if len(name) <= 120 else name[:100] + "..."
    return ArchiveError(
        f"archive entry {shown!r} is not a safe relative path: {problem}; "
        "use plain paths relative to the archive root, like 'lib/util.py'",
        code="unsafe_path",
        details={"entry": shown},
    )


def _kind_name(kind: int) -> str:
    names = {
        stat.S_IFLNK: "symbolic link",
        stat.S_IFREG: "regular file whose name ends with '/'",
        stat.S_IFDIR: "directory whose name does not end with '/'",
        stat.S_IFCHR: "character device",
        stat.S_IFBLK: "block device",
        stat.S_IFIFO: "named pipe",
        stat.S_IFSOCK: "socket",
    }
    return names.get(kind, f"special entry (type {kind:#o})")


def _check_conflicts(files: set[str], names: set[str]) -> None:
    """A name cannot be both a file and a folder: 'a' and 'a/' or 'a' and 'a/b'."""
    for name in sorted(names):
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in files:
                raise ArchiveError(
                    f"archive entry {parent!r} is a file, but {name!r} uses it as a folder: "
                    "rename one of them",
                    code="duplicate_entry",
                    details={"entry": name},
                )


def _check_docs(entries: list[_Entry]) -> None:
    present = {e.name for e in entries if not e.is_dir and e.name in _DOCS}
    if len(present) == 1:
        (have,) = present
        (missing,) = set(_DOCS) - present
        raise ArchiveError(
            f"the archive has {have!r} but not {missing!r}: add both documentation files or "
            "neither",
            code="incomplete_docs",
            details={"entry": have, "missing": missing},
        )


def _entrypoint(entries: list[_Entry], runtime: Runtime) -> str:
    accepted = ENTRYPOINTS[runtime]
    if not accepted:  # runtime custom: the program is the spec's command, checked at build
        return ""
    files = {e.name for e in entries if not e.is_dir}
    for name in accepted:
        if name in files:
            return name
    message = (
        f"the archive has no entry point for {runtime} at its root: add one of "
        f"{', '.join(accepted)} at the top level of the zip"
    )
    nested = sorted(n for n in files if n.rsplit("/", 1)[-1] in accepted)
    if nested:
        message += (
            f" (found {nested[0]!r} inside a folder: zip the folder's contents, not the folder)"
        )
    raise ArchiveError(
        message,
        code="missing_entrypoint",
        details={"runtime": runtime, "accepted": list(accepted)},
    )


def _handler_module(entries: list[_Entry], runtime: Runtime, accepted: tuple[str, ...]) -> str:
    files = {e.name for e in entries if not e.is_dir}
    for name in accepted:
        if name in files:
            return name
    sources = sorted(n for n in files if n.endswith((".py", ".js", ".cjs", ".mjs")))[:20]
    found = f"; its source files: {', '.join(sources)}" if sources else "; it has no source file"
    raise ArchiveError(
        f"the handler's module is not in the archive: expected {' or '.join(accepted)} "
        f"for {runtime}{found}. Name the module as the file without its suffix, e.g. "
        "--handler helloget.foo for helloget.py",
        code="missing_handler_module",
        details={"runtime": runtime, "expected": list(accepted), "sources": sources},
    )


def _decompress(
    zf: zipfile.ZipFile,
    entry: _Entry,
    used: int,
    limits: ArchiveLimits,
    sink: Callable[[bytes], object] | None,
) -> int:
    """Stream one entry, counting the bytes it really holds; return that count.

    The declared size is never trusted: zipfile stops reading at `file_size`, so it is raised
    on a copy and the real size is compared with the declared one at the end. The CRC is still
    checked by zipfile against the whole real content."""
    info = copy.copy(entry.info)
    info.file_size = sys.maxsize
    real = 0
    try:
        with zf.open(info) as stream:
            while chunk := stream.read(_CHUNK):
                real += len(chunk)
                if used + real > limits.max_uncompressed:
                    raise PayloadTooLarge(
                        f"the archive decompresses to more than {limits.max_uncompressed} bytes "
                        f"(passed at entry {entry.name!r}): remove or shrink files",
                        code="archive_too_large",
                        details={"entry": entry.name, "limit": limits.max_uncompressed},
                    )
                if sink is not None:
                    sink(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
        raise ArchiveError(
            f"archive entry {entry.name!r} is corrupt ({exc}): re-create the archive",
            code="corrupt_entry",
            details={"entry": entry.name},
        ) from exc
    if real != entry.info.file_size:
        raise ArchiveError(
            f"archive entry {entry.name!r} declares {entry.info.file_size} bytes but holds "
            f"{real}: re-create the archive",
            code="corrupt_entry",
            details={"entry": entry.name},
        )
    return real


def _target(root: Path, entry: _Entry) -> Path:
    target = root.joinpath(*entry.name.split("/")).resolve()
    if target == root or not target.is_relative_to(root):
        raise _unsafe(entry.name, "it resolves outside the destination")
    return target


def _make_dirs(root: Path, path: Path, created: list[Path]) -> None:
    missing: list[Path] = []
    while path != root and not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        directory.mkdir()
        created.append(directory)


def _write(
    zf: zipfile.ZipFile,
    entry: _Entry,
    target: Path,
    used: int,
    limits: ArchiveLimits,
    created: list[Path],
) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o600)
    created.append(target)
    with os.fdopen(fd, "wb") as out:
        size = _decompress(zf, entry, used, limits, out.write)
        os.chmod(out.fileno(), 0o755 if entry.executable else 0o644)
    return size


def _remove(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink()
        except OSError:
            pass


# -- LUNA docs: reading named files back out of a stored zip -----------------------------------


def read_files(
    data: bytes | BinaryIO,
    names: Iterable[str],
    limits: ArchiveLimits = ArchiveLimits(),
    max_bytes: int = 5 * 1024 * 1024,
) -> dict[str, bytes]:
    """The content of the files `names` (paths inside the zip) that the archive holds, under
    the same rules as `inspect_archive` (only these entries are decompressed). A file larger
    than `max_bytes` raises `PayloadTooLarge` (`file_too_large`)."""
    wanted = set(names)
    found: dict[str, bytes] = {}
    with _open(data) as zf:
        entries = _scan(zf, limits)
        total = 0
        for entry in entries:
            if entry.is_dir or entry.name not in wanted:
                continue
            if entry.info.file_size > max_bytes:
                raise PayloadTooLarge(
                    f"{entry.name} is {entry.info.file_size} bytes; at most {max_bytes} are served",
                    code="file_too_large",
                    details={"entry": entry.name, "limit": max_bytes},
                )
            buffer = bytearray()
            total += _decompress(zf, entry, total, limits, buffer.extend)
            found[entry.name] = bytes(buffer)
    return found
