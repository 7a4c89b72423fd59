"""Zip archives for tests, benign and hostile, built in memory."""

from __future__ import annotations

import io
import zipfile


def make_zip(files: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return buf.getvalue()


def make_entries(entries: list[zipfile.ZipInfo | tuple[str, str | bytes]]) -> bytes:
    """A zip from raw entries: ZipInfo objects keep their flags and attributes as given."""
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicates we mean to write
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for entry in entries:
                if isinstance(entry, zipfile.ZipInfo):
                    zf.writestr(entry, b"content")
                else:
                    zf.writestr(entry[0], entry[1])
    return buf.getvalue()


def info(name: str, *, mode: int | None = None) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name)
    zi.create_system = 3
    zi.compress_type = zipfile.ZIP_DEFLATED
    if mode is not None:
        zi.external_attr = mode << 16
    return zi


def rename_bytes(archive: bytes, old: bytes, new: bytes) -> bytes:
    """Rewrite a name inside the local header and the central directory (same length)."""
    assert len(old) == len(new)
    assert archive.count(old) >= 2
    return archive.replace(old, new)


def zip_bomb(uncompressed: int) -> bytes:
    """One entry of `uncompressed` zero bytes beside a valid entry point; compresses ~1000:1."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("lambda_main.py", "async def main(request):\n    return {}\n")
        with zf.open("bomb.bin", "w", force_zip64=True) as out:
            block = bytes(1024 * 1024)
            for _ in range(uncompressed // len(block)):
                out.write(block)
    return buf.getvalue()


def set_flag_bits(archive: bytes, name: str, flags: int) -> bytes:
    """OR `flags` into an entry's general-purpose bits in its local header and central record
    (zipfile resets them when writing)."""
    import struct

    data = bytearray(archive)
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        local = zf.getinfo(name).header_offset
    (old,) = struct.unpack_from("<H", data, local + 6)
    struct.pack_into("<H", data, local + 6, old | flags)
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46 : pos + 46 + name_len]) == name.encode():
            (old,) = struct.unpack_from("<H", data, pos + 8)
            struct.pack_into("<H", data, pos + 8, old | flags)
        pos = data.find(b"PK\x01\x02", pos + 4)
    return bytes(data)
