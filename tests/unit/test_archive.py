"""Upload archive rules: every hostile archive is built here with zipfile, sometimes with its
central directory falsified (ZipInfo fields changed after writing are what `close()` records)."""

from __future__ import annotations

import io
import stat
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from lambdabus_events.models import Runtime
from lambdabus_platform.archive import (
    ArchiveInfo,
    ArchiveLimits,
    build_inline_archive,
    extract_archive,
    inspect_archive,
)
from lambdabus_platform.errors import ArchiveError, PayloadTooLarge

Entry = tuple[str | zipfile.ZipInfo, bytes | str]
MAIN = b"def handler(event, context):\n    return event\n"
TWO_MB = 2 * 1024 * 1024
DEFAULT = ArchiveLimits()
SMALL = ArchiveLimits(max_uncompressed=1_000_000)


def make_zip(
    *entries: Entry,
    patch: Callable[[list[zipfile.ZipInfo]], None] | None = None,
) -> bytes:
    """A zip of `entries`; `patch` edits the ZipInfos before the central directory is written."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, content in entries:
            zf.writestr(name, content)
        if patch is not None:
            patch(zf.infolist())
    return buffer.getvalue()


def python_zip(
    *extra: Entry, patch: Callable[[list[zipfile.ZipInfo]], None] | None = None
) -> bytes:
    return make_zip(("lambda_main.py", MAIN), *extra, patch=patch)


def unix_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


def rejected(
    data: bytes,
    code: str,
    *,
    runtime: Runtime = "python3.11",
    limits: ArchiveLimits = DEFAULT,
) -> ArchiveError:
    with pytest.raises(ArchiveError) as caught:
        inspect_archive(data, runtime, limits)
    assert caught.value.code == code
    assert caught.value.status == 400
    return caught.value


def too_large(data: bytes, limits: ArchiveLimits = SMALL) -> PayloadTooLarge:
    with pytest.raises(PayloadTooLarge) as caught:
        inspect_archive(data, "python3.11", limits)
    assert caught.value.code == "archive_too_large"
    assert caught.value.status == 413
    return caught.value


# --- valid archives ---------------------------------------------------------------------------


def test_valid_python_archive() -> None:
    data = python_zip(("lib/", b""), ("lib/util.py", b"X = 1\n"), ("requirements.txt", b""))
    assert inspect_archive(data, "python3.11") == ArchiveInfo(
        entrypoint="lambda_main.py", files=3, uncompressed_size=len(MAIN) + 6
    )


def test_handler_py_is_a_python_entrypoint() -> None:
    data = make_zip(("handler.py", MAIN))
    assert inspect_archive(data, "python3.11").entrypoint == "handler.py"


def test_lambda_main_wins_over_handler_py() -> None:
    data = make_zip(("handler.py", MAIN), ("lambda_main.py", MAIN))
    assert inspect_archive(data, "python3.11").entrypoint == "lambda_main.py"


def test_valid_nodejs_archive_from_a_file_object() -> None:
    data = make_zip(("handler.js", b"exports.handler = async (e) => e;\n"))
    info = inspect_archive(io.BytesIO(data), "nodejs20")
    assert (info.entrypoint, info.files) == ("handler.js", 1)


def test_docs_pair_is_accepted() -> None:
    data = python_zip(("docs/lambda.html", b"<p>hi</p>"), ("docs/lambda.yml", b"a: 1\n"))
    assert inspect_archive(data, "python3.11").files == 3


def test_unix_regular_files_and_directories_are_accepted() -> None:
    data = python_zip(
        (unix_info("bin/", stat.S_IFDIR | 0o755), b""),
        (unix_info("bin/run", stat.S_IFREG | 0o755), b"#!/bin/sh\n"),
        (unix_info("plain.txt", 0o600), b"no file type bits: a regular file\n"),
    )
    assert inspect_archive(data, "python3.11").files == 3


# --- not_a_zip, encrypted_entry, unsupported_compression, corrupt_entry ------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"this is not a zip", python_zip()[:-10], python_zip()[:30]],
    ids=["empty", "garbage", "truncated-end", "truncated-start"],
)
def test_not_a_zip(data: bytes) -> None:
    error = rejected(data, "not_a_zip")
    assert "zip" in error.message


def test_encrypted_entry() -> None:
    def encrypt(infos: list[zipfile.ZipInfo]) -> None:
        infos[1].flag_bits |= 0x1

    error = rejected(python_zip(("secret.py", b"x"), patch=encrypt), "encrypted_entry")
    assert "'secret.py'" in error.message


def test_bzip2_entry_is_refused() -> None:
    info = zipfile.ZipInfo("big.bin")
    info.compress_type = zipfile.ZIP_BZIP2
    error = rejected(python_zip((info, b"x")), "unsupported_compression")
    assert "'big.bin'" in error.message


def test_bad_crc_is_corrupt() -> None:
    def bad_crc(infos: list[zipfile.ZipInfo]) -> None:
        infos[1].CRC ^= 0xFFFF

    error = rejected(python_zip(("util.py", b"X = 1\n"), patch=bad_crc), "corrupt_entry")
    assert "'util.py'" in error.message


def test_entry_larger_than_declared_is_corrupt() -> None:
    def shrink(infos: list[zipfile.ZipInfo]) -> None:
        infos[1].file_size = 10

    error = rejected(python_zip(("data.bin", bytes(5000)), patch=shrink), "corrupt_entry")
    assert "'data.bin'" in error.message
    assert "declares 10 bytes but holds 5000" in error.message


def test_huge_declared_size_is_not_trusted_either() -> None:
    def inflate(infos: list[zipfile.ZipInfo]) -> None:
        infos[1].file_size = 10**12

    error = rejected(python_zip(("data.bin", b"abc"), patch=inflate), "corrupt_entry")
    assert "holds 3" in error.message


# --- unsafe_path, special_entry, duplicate_entry -----------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../evil.py",
        "lib/../../evil.py",
        "..",
        "../",
        "/etc/cron.d/evil",
        "C:/evil.py",
        "c:evil.py",
        "..\\evil.py",
        "lib\\util.py",
        "",
        "./lambda_main.py",
        "lib//util.py",
    ],
)
def test_unsafe_path(name: str) -> None:
    # A ZipInfo, as writestr() refuses an empty name given as a string.
    error = rejected(python_zip((zipfile.ZipInfo(name), b"x")), "unsafe_path")
    assert repr(name) in error.message
    assert error.details["entry"] == name


def test_nul_byte_in_name_is_unsafe_even_though_zipfile_cuts_it() -> None:
    info = zipfile.ZipInfo("evil.py")
    info.filename = "evil.py\x00.txt"  # written as stored; zipfile reads back filename "evil.py"
    error = rejected(python_zip((info, b"x")), "unsafe_path")
    assert repr("evil.py\x00.txt") in error.message


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        (stat.S_IFLNK | 0o777, "symbolic link"),
        (stat.S_IFIFO | 0o644, "named pipe"),
        (stat.S_IFCHR | 0o644, "character device"),
        (stat.S_IFDIR | 0o755, "directory whose name does not end"),
    ],
)
def test_special_entry(mode: int, kind: str) -> None:
    error = rejected(python_zip((unix_info("link.py", mode), b"/etc/passwd")), "special_entry")
    assert "'link.py'" in error.message
    assert kind in error.message


def test_duplicate_entry() -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = python_zip(("util.py", b"good"), ("util.py", b"evil"))
    error = rejected(data, "duplicate_entry")
    assert "'util.py'" in error.message


def test_file_and_directory_with_the_same_name_are_duplicates() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        data = python_zip(("lib", b"file"), ("lib/", b""))
    error = rejected(data, "duplicate_entry")
    assert "'lib'" in error.message


def test_file_used_as_a_folder_is_a_duplicate() -> None:
    error = rejected(python_zip(("lib", b"file"), ("lib/util.py", b"x")), "duplicate_entry")
    assert "'lib'" in error.message
    assert "'lib/util.py'" in error.message


# --- too_many_entries, archive_too_large --------------------------------------------------------


def test_too_many_entries_is_checked_before_decompressing() -> None:
    def corrupt_all(infos: list[zipfile.ZipInfo]) -> None:
        for info in infos:
            info.CRC ^= 1

    data = python_zip(*[(f"f{i}.py", b"x") for i in range(3)], patch=corrupt_all)
    error = rejected(data, "too_many_entries", limits=ArchiveLimits(max_entries=3))
    assert "4 entries" in error.message
    assert "3" in error.message


def test_max_entries_is_inclusive() -> None:
    data = python_zip(("lib/", b""), ("lib/a.py", b""))
    assert inspect_archive(data, "python3.11", ArchiveLimits(max_entries=3)).files == 2


def test_zip_bomb_is_stopped_by_the_real_byte_count() -> None:
    error = too_large(python_zip(("zeros.bin", bytes(TWO_MB))))
    assert "'zeros.bin'" in error.message


def test_zip_bomb_with_falsified_small_size_is_stopped_by_the_real_byte_count() -> None:
    def lie(infos: list[zipfile.ZipInfo]) -> None:
        infos[1].file_size = 100  # a checker summing declared sizes would see 100 bytes

    data = python_zip(("zeros.bin", bytes(TWO_MB)), patch=lie)
    [declared] = [i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if i.file_size == 100]
    assert declared.filename == "zeros.bin"
    error = too_large(data)
    assert "'zeros.bin'" in error.message


def test_limit_counts_the_total_over_entries() -> None:
    data = python_zip(("a.bin", bytes(600_000)), ("b.bin", bytes(600_000)))
    error = too_large(data)
    assert "'b.bin'" in error.message


# --- missing_entrypoint, incomplete_docs --------------------------------------------------------


def test_missing_entrypoint_lists_the_accepted_names() -> None:
    error = rejected(make_zip(("handler.js", b"")), "missing_entrypoint")
    assert "lambda_main.py" in error.message
    assert "handler.py" in error.message


def test_missing_nodejs_entrypoint() -> None:
    error = rejected(python_zip(), "missing_entrypoint", runtime="nodejs20")
    assert "handler.js" in error.message


def test_entrypoint_inside_a_folder_is_named() -> None:
    error = rejected(make_zip(("myfunc/lambda_main.py", MAIN)), "missing_entrypoint")
    assert "'myfunc/lambda_main.py'" in error.message


def test_directory_named_like_the_entrypoint_is_not_one() -> None:
    rejected(make_zip(("lambda_main.py/", b"")), "missing_entrypoint")


@pytest.mark.parametrize(
    ("present", "missing"),
    [("docs/lambda.html", "docs/lambda.yml"), ("docs/lambda.yml", "docs/lambda.html")],
)
def test_incomplete_docs(present: str, missing: str) -> None:
    error = rejected(python_zip((present, b"x")), "incomplete_docs")
    assert repr(present) in error.message
    assert repr(missing) in error.message


# --- build_inline_archive -----------------------------------------------------------------------


def test_inline_archive_is_deterministic() -> None:
    files = {"lambda_main.py": MAIN.decode(), "lib/util.py": "NAME = 'café'\n"}
    first = build_inline_archive(files)
    second = build_inline_archive(dict(reversed(files.items())))
    assert first == second
    info = inspect_archive(first, "python3.11")
    assert info == ArchiveInfo("lambda_main.py", 2, len(MAIN) + len("NAME = 'café'\n".encode()))
    with zipfile.ZipFile(io.BytesIO(first)) as zf:
        assert [i.filename for i in zf.infolist()] == ["lambda_main.py", "lib/util.py"]
        for entry in zf.infolist():
            assert entry.date_time == (1980, 1, 1, 0, 0, 0)
            assert entry.external_attr >> 16 == stat.S_IFREG | 0o644
            assert entry.compress_type == zipfile.ZIP_DEFLATED
        assert zf.read("lib/util.py").decode() == "NAME = 'café'\n"


def test_inline_archive_changes_with_its_content() -> None:
    assert build_inline_archive({"handler.py": "a"}) != build_inline_archive({"handler.py": "b"})


@pytest.mark.parametrize("path", ["../evil.py", "/abs.py", "a\\b.py", "dir/", "x\x00.py"])
def test_inline_archive_refuses_unsafe_paths(path: str) -> None:
    with pytest.raises(ArchiveError) as caught:
        build_inline_archive({"lambda_main.py": "", path: "x"})
    assert caught.value.code == "unsafe_path"
    assert repr(path) in caught.value.message


def test_inline_archive_refuses_empty_source() -> None:
    with pytest.raises(ArchiveError) as caught:
        build_inline_archive({})
    assert caught.value.code == "empty_source"
    assert caught.value.status == 400


def test_inline_archive_refuses_a_file_used_as_a_folder() -> None:
    with pytest.raises(ArchiveError) as caught:
        build_inline_archive({"lib": "", "lib/util.py": ""})
    assert caught.value.code == "duplicate_entry"


# --- extract_archive ----------------------------------------------------------------------------


def test_extract_writes_files_with_their_modes(tmp_path: Path) -> None:
    data = python_zip(
        ("empty/", b""),
        ("lib/util.py", b"X = 1\n"),
        (unix_info("bin/run", stat.S_IFREG | 0o750), b"#!/bin/sh\n"),
    )
    dest = tmp_path / "out"
    info = extract_archive(data, dest)
    assert info == ArchiveInfo("lambda_main.py", 3, len(MAIN) + 6 + 10)
    assert (dest / "lambda_main.py").read_bytes() == MAIN
    assert (dest / "lib" / "util.py").read_bytes() == b"X = 1\n"
    assert (dest / "empty").is_dir()
    assert stat.S_IMODE((dest / "lib" / "util.py").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "bin" / "run").stat().st_mode) == 0o755


def test_extract_without_entrypoint_returns_none(tmp_path: Path) -> None:
    assert extract_archive(make_zip(("README.md", b"hi")), tmp_path) is None
    assert (tmp_path / "README.md").read_bytes() == b"hi"


def test_extract_finds_a_nodejs_entrypoint(tmp_path: Path) -> None:
    info = extract_archive(make_zip(("handler.js", b"")), tmp_path)
    assert info is not None
    assert info.entrypoint == "handler.js"


def test_extract_refuses_traversal_and_writes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(ArchiveError) as caught:
        extract_archive(python_zip(("../evil.py", b"x")), dest)
    assert caught.value.code == "unsafe_path"
    assert not (tmp_path / "evil.py").exists()
    assert not dest.exists() or not any(dest.iterdir())


def test_extract_does_not_follow_a_symlink_out_of_dest(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "lib").symlink_to(outside)
    with pytest.raises(ArchiveError) as caught:
        extract_archive(python_zip(("lib/evil.py", b"x")), dest)
    assert caught.value.code == "unsafe_path"
    assert "'lib/evil.py'" in caught.value.message
    assert not any(outside.iterdir())


def test_extract_removes_what_it_wrote_when_an_entry_fails(tmp_path: Path) -> None:
    data = python_zip(("lib/a.py", b"x"), ("lib/zeros.bin", bytes(TWO_MB)))
    with pytest.raises(PayloadTooLarge):
        extract_archive(data, tmp_path, SMALL)
    assert list(tmp_path.iterdir()) == []


def test_extract_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "lambda_main.py").write_bytes(b"mine")
    with pytest.raises(FileExistsError):
        extract_archive(python_zip(), tmp_path)
    assert (tmp_path / "lambda_main.py").read_bytes() == b"mine"


def test_extract_applies_the_same_rules(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError) as caught:
        extract_archive(python_zip((unix_info("link", stat.S_IFLNK | 0o777), b"/")), tmp_path)
    assert caught.value.code == "special_entry"
    with pytest.raises(ArchiveError) as caught:
        extract_archive(python_zip(("docs/lambda.html", b"")), tmp_path)
    assert caught.value.code == "incomplete_docs"
    assert list(tmp_path.iterdir()) == []


# -- name lengths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("a" * 256 + ".py", "259 bytes"),
        ("lib/" + "b" * 256, "256 bytes"),
        ("é" * 128 + ".py", "259 bytes"),  # 2 bytes a character: bytes count, not characters
        ("/".join(["d" * 200] * 6) + "/x.py", "1210 bytes"),
        ("x/" * 2048 + "y.py", "4100 bytes"),
    ],
)
def test_a_name_too_long_is_refused(name: str, says: str) -> None:
    error = rejected(python_zip((name, b"x")), "path_too_long")
    assert says in error.message
    assert error.details["max_component"] == 255
    assert error.details["max_path"] == 1024
    assert len(error.message) < 400  # the name is cut in the message


def test_names_at_the_limits_are_accepted(tmp_path: Path) -> None:
    component = "c" * 255
    path = ("c" * 250 + "/") * 4 + "x" * 17 + ".py"
    assert len(path.encode()) == 1024
    data = python_zip((component, b"1"), (path, b"2"))
    inspect_archive(data, "python3.11")
    extract_archive(data, tmp_path / "out")
    assert (tmp_path / "out" / component).read_bytes() == b"1"


def test_inline_archive_refuses_a_name_too_long() -> None:
    with pytest.raises(ArchiveError) as caught:
        build_inline_archive({"lambda_main.py": "", "z" * 300: ""})
    assert caught.value.code == "path_too_long"


def test_extract_refuses_a_name_too_long_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError) as caught:
        extract_archive(python_zip(("q" * 300, b"x")), tmp_path / "out")
    assert caught.value.code == "path_too_long"
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# -- kept files ------------------------------------------------------------------------------


def test_inspect_keeps_the_root_files_asked_for_up_to_their_limit() -> None:
    data = python_zip(
        ("requirements.txt", b"humanize\n"),
        ("package.json", b"x" * 100),
        ("lib/requirements.txt", b"not at the root"),
    )
    info = inspect_archive(
        data, "python3.11", keep={"requirements.txt": 1000, "package.json": 10, "absent": 5}
    )
    assert info.kept == {"requirements.txt": b"humanize\n", "package.json": b"x" * 11}
    assert inspect_archive(data, "python3.11").kept == {}
