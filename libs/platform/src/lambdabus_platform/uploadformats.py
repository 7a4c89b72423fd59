"""The formats a function's source may be uploaded in, as Kubeless accepts them: a zip, a tar
(plain, gzip, bzip2 or xz, told from the content, never from the file name) or a single source
file. Every upload is turned into one zip here, so the rest of the platform (the checks in
`archive`, the store, the builder) sees zips only. Pure: reads only the given bytes.

A tar is held to the zip's rules (safe relative paths, no duplicates, entry count and
decompressed size limits) and to its own: no hard or symbolic links, devices, FIFOs or sparse
files, and no PAX header that renames entries for all that follow (a global `path`) or carries a
link target.
"""

from __future__ import annotations

import bz2
import io
import lzma
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from typing import IO, Literal

from lambdabus_events.models import ENTRYPOINTS, SOURCE_SUFFIXES, Runtime, split_handler
from lambdabus_platform.archive import (
    ArchiveLimits,
    _check_conflicts,
    _check_length,
    _path_problem,
    _unsafe,
)
from lambdabus_platform.errors import ArchiveError, PayloadTooLarge

__all__ = [
    "DEPENDENCY_FILE",
    "Format",
    "detect_format",
    "handler_modules",
    "to_zip",
    "with_dependencies",
]

Format = Literal["zip", "tar", "gzip", "bzip2", "xz", "file"]

DEPENDENCY_FILE: dict[Runtime, str] = {"python3.11": "requirements.txt", "nodejs20": "package.json"}
# Files made stale by a replaced dependency file: a lock pins what the old manifest named.
_STALE_WITH: dict[str, tuple[str, ...]] = {"package.json": ("package-lock.json",)}

_TAR_NAMES = (".tar", ".tgz", ".tar.gz", ".tbz2", ".tar.bz2", ".txz", ".tar.xz")
_TAR_BLOCK = 512
_DEFAULT_LIMITS = ArchiveLimits()
_CHUNK = 64 * 1024


def detect_format(data: bytes) -> Format:
    """What `data` is, by its first bytes: a zip, a (compressed) tar, or else a single file."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if data[:3] == b"BZh":
        return "bzip2"
    if data[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if len(data) >= 262 and data[257:262] == b"ustar":
        return "tar"
    return "file"


def handler_modules(runtime: Runtime, handler: str | None) -> tuple[str, ...]:
    """The files a handler's module may be, first match wins: `helloget.foo` → `helloget.py`;
    `index.helloGet` → `index.js`, `index.cjs`, `index.mjs`; no handler → the runtime's
    default entry points."""
    if handler is None:
        return ENTRYPOINTS[runtime]
    module, _ = split_handler(handler)
    return tuple(module + suffix for suffix in SOURCE_SUFFIXES[runtime])


def to_zip(
    data: bytes,
    *,
    runtime: Runtime,
    handler: str | None,
    filename: str | None,
    limits: ArchiveLimits = _DEFAULT_LIMITS,
) -> tuple[bytes, Format]:
    """The upload as a zip, and the format it came in. A zip is returned as it is (checked
    later by `inspect_archive`); a tar is checked entry by entry while it is converted; a single
    file is stored under the handler's module name (`helloget.foo` → `helloget.py`), or under
    its own name without a handler."""
    kind = detect_format(data)
    if kind == "zip":
        return data, kind
    name = (filename or "").lower()
    if kind == "file" and name.endswith(".zip"):
        return data, "zip"  # meant as a zip: `inspect_archive` says why it cannot be read
    if kind == "file" and name.endswith(_TAR_NAMES):
        raise ArchiveError(
            f"{filename!r} is not a tar archive (plain, gzip, bzip2 or xz) that can be read: "
            "re-create it, e.g. with `tar czf function.tar.gz -C <folder> .`",
            code="not_an_archive",
        )
    if kind == "file":
        return _single_file(data, runtime, handler, filename), kind
    return _tar_to_zip(data, kind, limits), kind


def with_dependencies(
    archive: bytes, runtime: Runtime, dependencies: bytes, limits: ArchiveLimits = _DEFAULT_LIMITS
) -> bytes:
    """The zip with its dependency file (requirements.txt, package.json) replaced by
    `dependencies`, as Kubeless's `--dependencies` does; a package-lock.json goes with a
    replaced package.json. Call on a zip already checked by `inspect_archive`."""
    name = DEPENDENCY_FILE[runtime]
    drop = {name, *_STALE_WITH.get(name, ())}
    out = io.BytesIO()
    total = 0
    with zipfile.ZipFile(io.BytesIO(archive)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            if info.filename in drop:
                continue
            if info.is_dir():
                target.writestr(info, b"")
                continue
            content = source.read(info)
            total += len(content)
            if total > limits.max_uncompressed:
                raise _too_large(info.filename, limits)
            target.writestr(info, content, compress_type=zipfile.ZIP_DEFLATED)
        target.writestr(_file_info(name, executable=False), dependencies)
    return out.getvalue()


# -- single files -------------------------------------------------------------------------------


def _single_file(data: bytes, runtime: Runtime, handler: str | None, filename: str | None) -> bytes:
    suffixes = SOURCE_SUFFIXES[runtime]
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    if not base:
        raise ArchiveError(
            "the upload is neither a zip nor a tar, and has no file name: send a single source "
            f"file with its name (a {' or '.join(suffixes)} file for {runtime}), or an archive",
            code="not_a_source_file",
            details={"runtime": runtime, "suffixes": list(suffixes)},
        )
    suffix = next((s for s in suffixes if base.endswith(s) and len(base) > len(s)), None)
    if suffix is None:
        raise ArchiveError(
            f"{base!r} is neither a zip nor a tar archive, nor a source file of {runtime} "
            f"(a file ending in {' or '.join(suffixes)}): upload the function's source file or "
            "an archive of its folder",
            code="not_a_source_file",
            details={"file": base[:120], "runtime": runtime, "suffixes": list(suffixes)},
        )
    if handler is not None:
        module, _ = split_handler(handler)
        name = module + suffix
    else:
        name = base
    problem = _path_problem(name, directory=False)
    if problem is not None:
        raise _unsafe(name, problem)
    _check_length(name)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        zf.writestr(_file_info(name, executable=False), data)
    return out.getvalue()


def _file_info(name: str, *, executable: bool) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = (stat.S_IFREG | (0o755 if executable else 0o644)) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _dir_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name + "/", date_time=(1980, 1, 1, 0, 0, 0))
    info.create_system = 3
    info.external_attr = (stat.S_IFDIR | 0o755) << 16
    return info


# -- tar ----------------------------------------------------------------------------------------


class _Bounded(io.RawIOBase):
    """Reads a decompressing stream, counting the bytes; past `limit` it raises the 413."""

    def __init__(self, stream: IO[bytes], limit: int, limits: ArchiveLimits) -> None:
        self._stream = stream
        self._limit = limit
        self._limits = limits
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._stream.read(len(buffer))
        self.read_bytes += len(data)
        if self.read_bytes > self._limit:
            raise _too_large(None, self._limits)
        buffer[: len(data)] = data
        return len(data)


def _decompressor(data: bytes, kind: Format) -> IO[bytes]:
    raw = io.BytesIO(data)
    if kind == "gzip":
        import gzip

        return gzip.open(raw, mode="rb")  # type: ignore[return-value]
    if kind == "bzip2":
        return bz2.BZ2File(raw, mode="rb")
    if kind == "xz":
        return lzma.LZMAFile(raw, mode="rb")
    return raw


_SPECIAL = {
    tarfile.LNKTYPE: "hard link",
    tarfile.SYMTYPE: "symbolic link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "named pipe (FIFO)",
    tarfile.CONTTYPE: "contiguous file",
    tarfile.GNUTYPE_SPARSE: "sparse file",
}


@dataclass
class _TarState:
    entries: int = 0
    total: int = 0


def _tar_to_zip(data: bytes, kind: Format, limits: ArchiveLimits) -> bytes:
    # The tar stream may hold, besides the files' bytes, a header and padding per entry and
    # some PAX records: bound it to that, so no header can make us read gigabytes.
    overhead = (limits.max_entries + 4) * 4 * _TAR_BLOCK + 64 * 1024
    bounded = _Bounded(_decompressor(data, kind), limits.max_uncompressed + overhead, limits)
    stream = io.BufferedReader(bounded, buffer_size=_CHUNK)
    out = io.BytesIO()
    state = _TarState()
    seen: set[str] = set()
    files: set[str] = set()
    try:
        with (
            tarfile.open(fileobj=stream, mode="r|") as tar,
            zipfile.ZipFile(out, "w") as zf,
        ):
            for member in tar:
                _check_globals(tar)
                name = _member_name(member)
                if name is None:  # "." or "./": the archive's own root
                    continue
                state.entries += 1
                if state.entries > limits.max_entries:
                    raise ArchiveError(
                        f"the archive has more than {limits.max_entries} entries: remove files "
                        "(e.g. tests, caches, .git) from it",
                        code="too_many_entries",
                        details={"limit": limits.max_entries},
                    )
                if name in seen:
                    raise ArchiveError(
                        f"the archive has two entries named {name!r}: keep only one",
                        code="duplicate_entry",
                        details={"entry": name},
                    )
                seen.add(name)
                if member.isdir():
                    zf.writestr(_dir_info(name), b"")
                    continue
                files.add(name)
                content = _read_member(tar, member, name, state, limits)
                zf.writestr(_file_info(name, executable=bool(member.mode & 0o111)), content)
            _check_globals(tar)
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error, ValueError) as exc:
        raise ArchiveError(
            f"the upload looks like a {kind} archive but cannot be read ({exc}): re-create it, "
            "e.g. with `tar czf function.tar.gz -C <folder> .`",
            code="corrupt_entry" if state.entries else "not_an_archive",
        ) from exc
    _check_conflicts(files, seen)
    return out.getvalue()


def _check_globals(tar: tarfile.TarFile) -> None:
    # A global PAX header applies to every entry after it: a `path` there renames them all.
    risky = {"path", "linkpath"} & set(tar.pax_headers)
    if risky:
        raise ArchiveError(
            f"the archive has a global PAX header setting {sorted(risky)[0]!r} for every entry: "
            "re-create it without (plain `tar` never writes one)",
            code="unsafe_path",
            details={"pax": sorted(risky)},
        )


def _member_name(member: tarfile.TarInfo) -> str | None:
    raw = member.name
    if any(key.startswith("GNU.sparse") for key in member.pax_headers):
        raise _special(raw, "sparse file")
    if "linkpath" in member.pax_headers or member.type in _SPECIAL:
        raise _special(raw, _SPECIAL.get(member.type, "link"))
    if not (member.isfile() or member.isdir()):
        raise _special(raw, f"special entry (type {member.type!r})")
    name = raw
    while name.startswith("./"):
        name = name[2:]
    name = name.rstrip("/") if member.isdir() else name
    if name in ("", "."):
        if member.isdir():
            return None
        raise _unsafe(raw, "it is empty")
    problem = _path_problem(name, directory=False)
    if problem is not None:
        raise _unsafe(raw, problem)
    _check_length(name)
    return name


def _special(name: str, kind: str) -> ArchiveError:
    return ArchiveError(
        f"archive entry {name[:120]!r} is a {kind}, not a regular file or a directory: put the "
        "real file in its place (e.g. `tar --dereference` or `tar -h`)",
        code="special_entry",
        details={"entry": name[:120], "kind": kind},
    )


def _read_member(
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    name: str,
    state: _TarState,
    limits: ArchiveLimits,
) -> bytes:
    if state.total + member.size > limits.max_uncompressed:
        raise _too_large(name, limits)
    handle = tar.extractfile(member)
    if handle is None:  # pragma: no cover - regular files always have one
        raise _special(name, "entry without content")
    content = bytearray()
    while chunk := handle.read(_CHUNK):
        content += chunk
    if len(content) != member.size:
        raise ArchiveError(
            f"archive entry {name!r} declares {member.size} bytes but holds {len(content)}: "
            "re-create the archive",
            code="corrupt_entry",
            details={"entry": name},
        )
    state.total += len(content)
    return bytes(content)


def _too_large(entry: str | None, limits: ArchiveLimits) -> PayloadTooLarge:
    where = f" (passed at entry {entry!r})" if entry else ""
    return PayloadTooLarge(
        f"the archive decompresses to more than {limits.max_uncompressed} bytes{where}: "
        "remove or shrink files",
        code="archive_too_large",
        details={"limit": limits.max_uncompressed, **({"entry": entry} if entry else {})},
    )
