"""Kubeless's upload formats: tars (hostile ones refused), single source files, the
`dependencies` part, handlers and labels."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zipfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from lambdabus_builder.compilecheck import check_handler
from lambdabus_builder.plan import handler_of
from lambdabus_events.models import FunctionConfig, split_handler
from lambdabus_gateway.functions import labels_match, parse_label_selectors
from lambdabus_platform.archive import ArchiveLimits, inspect_archive
from lambdabus_platform.errors import ArchiveError, InvalidRequest, PayloadTooLarge
from lambdabus_platform.uploadformats import (
    detect_format,
    handler_modules,
    to_zip,
    with_dependencies,
)

LIMITS = ArchiveLimits()
HELLO = b"def foo(event, context):\n    return 'hello world'\n"


def tar_bytes(
    *members: tuple[tarfile.TarInfo, bytes | None], fmt: int = tarfile.PAX_FORMAT
) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def regular(name: str, data: bytes = HELLO, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def special(name: str, kind: bytes, **attrs: object) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, None


def convert(data: bytes, limits: ArchiveLimits = LIMITS) -> zipfile.ZipFile:
    archive, _ = to_zip(
        data, runtime="python3.11", handler="helloget.foo", filename="x.tgz", limits=limits
    )
    return zipfile.ZipFile(io.BytesIO(archive))


def refused(data: bytes, code: str, limits: ArchiveLimits = LIMITS) -> ArchiveError:
    with pytest.raises(ArchiveError) as caught:
        convert(data, limits)
    assert caught.value.code == code, caught.value.message
    assert caught.value.status == 400
    return caught.value


# -- formats told from the content -------------------------------------------------------------


@pytest.mark.parametrize(
    ("compress", "kind"),
    [
        (lambda b: b, "tar"),
        (gzip.compress, "gzip"),
        (bz2.compress, "bzip2"),
        (lzma.compress, "xz"),
    ],
)
def test_tars_are_told_from_their_content_not_their_name(compress: object, kind: str) -> None:
    raw = tar_bytes(
        regular("./helloget.py"),
        regular("lib/util.py", b"X = 1\n"),
        regular("run.sh", b"#!/bin/sh\n", mode=0o755),
    )
    data = compress(raw)  # type: ignore[operator]
    assert detect_format(data) == kind
    archive, fmt = to_zip(data, runtime="python3.11", handler=None, filename="whatever.zip")
    assert fmt == kind
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        assert sorted(zf.namelist()) == ["helloget.py", "lib/util.py", "run.sh"]
        assert zf.read("helloget.py") == HELLO
        assert (zf.getinfo("run.sh").external_attr >> 16) & 0o111
        assert not (zf.getinfo("helloget.py").external_attr >> 16) & 0o111
    info = inspect_archive(archive, "python3.11", entrypoints=("helloget.py",))
    assert info.entrypoint == "helloget.py"


def test_a_zip_is_passed_through_unchanged() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("index.js", "module.exports = {}\n")
    assert to_zip(buffer.getvalue(), runtime="nodejs20", handler=None, filename="a.tar") == (
        buffer.getvalue(),
        "zip",
    )


# -- hostile tars -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("../escape.py", "'..'"),
        ("a/../../escape.py", "'..'"),
        ("/etc/cron.d/evil", "absolute"),
        ("a\\b.py", "backslash"),
        ("C:/x.py", "drive"),
    ],
)
def test_unsafe_paths_are_refused(name: str, says: str) -> None:
    error = refused(gzip.compress(tar_bytes(regular(name))), "unsafe_path")
    assert says in error.message


@pytest.mark.parametrize(
    ("entry", "kind"),
    [
        (special("hard.py", tarfile.LNKTYPE, linkname="helloget.py"), "hard link"),
        (special("soft.py", tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
        (special("tty", tarfile.CHRTYPE, devmajor=5, devminor=0), "character device"),
        (special("disk", tarfile.BLKTYPE, devmajor=8, devminor=0), "block device"),
        (special("pipe", tarfile.FIFOTYPE), "FIFO"),
    ],
)
def test_links_devices_and_fifos_are_refused(
    entry: tuple[tarfile.TarInfo, None], kind: str
) -> None:
    error = refused(tar_bytes(regular("helloget.py"), entry), "special_entry")
    assert kind in error.message


def test_a_pax_path_that_escapes_is_refused_whatever_the_ustar_name_says() -> None:
    info, data = regular("helloget.py")
    info.pax_headers = {"path": "../../home/user/.bashrc"}
    error = refused(tar_bytes((info, data)), "unsafe_path")
    assert ".bashrc" in error.message


def test_a_global_pax_header_renaming_every_entry_is_refused() -> None:
    buffer = io.BytesIO()
    with tarfile.open(
        fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "x.py"}
    ) as tar:
        info, data = regular("helloget.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    error = refused(buffer.getvalue(), "unsafe_path")
    assert "global PAX header" in error.message


def test_a_regular_file_with_a_pax_link_target_is_refused() -> None:
    info, data = regular("helloget.py")
    info.pax_headers = {"linkpath": "/etc/shadow"}
    refused(tar_bytes((info, data)), "special_entry")


def test_a_gnu_sparse_file_is_refused() -> None:
    info, data = regular("helloget.py")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
    with pytest.raises(ArchiveError):
        convert(tar_bytes((info, data)))


def test_duplicates_and_file_folder_clashes_are_refused() -> None:
    refused(tar_bytes(regular("helloget.py"), regular("./helloget.py")), "duplicate_entry")
    refused(tar_bytes(regular("lib"), regular("lib/x.py")), "duplicate_entry")


def test_the_entry_count_limit_holds() -> None:
    data = tar_bytes(*(regular(f"f{i}.py", b"") for i in range(6)))
    refused(data, "too_many_entries", ArchiveLimits(max_entries=5))


def test_a_decompression_bomb_stops_at_the_size_limit() -> None:
    bomb = gzip.compress(tar_bytes(regular("helloget.py", b"\0" * (4 * 1024 * 1024))))
    assert len(bomb) < 20_000
    with pytest.raises(PayloadTooLarge) as caught:
        convert(bomb, ArchiveLimits(max_uncompressed=1024 * 1024))
    assert caught.value.code == "archive_too_large"


def test_a_huge_pax_header_cannot_make_it_read_past_the_limit() -> None:
    info, data = regular("helloget.py")
    info.pax_headers = {"comment": "x" * (3 * 1024 * 1024)}
    bomb = gzip.compress(tar_bytes((info, data)))
    with pytest.raises(PayloadTooLarge):
        convert(bomb, ArchiveLimits(max_uncompressed=1024 * 1024, max_entries=10))


def test_a_truncated_or_corrupt_tar_is_a_400() -> None:
    good = gzip.compress(tar_bytes(regular("helloget.py", b"x" * 100_000)))
    with pytest.raises(ArchiveError):
        convert(good[: len(good) // 2])
    with pytest.raises(ArchiveError):
        convert(b"\x1f\x8b" + b"not gzip at all" * 10)


# -- single files -------------------------------------------------------------------------------


def test_a_single_file_is_stored_under_the_handlers_module_name() -> None:
    archive, kind = to_zip(
        HELLO, runtime="python3.11", handler="helloget.foo", filename="hello-loop.py"
    )
    assert kind == "file"
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        assert zf.namelist() == ["helloget.py"]
        assert zf.read("helloget.py") == HELLO
    node, _ = to_zip(
        b"module.exports = {}\n",
        runtime="nodejs20",
        handler="index.helloGet",
        filename="C:\\work\\test.js",
    )
    assert zipfile.ZipFile(io.BytesIO(node)).namelist() == ["index.js"]
    nested, _ = to_zip(HELLO, runtime="python3.11", handler="pkg.mod.fn", filename="f.py")
    assert zipfile.ZipFile(io.BytesIO(nested)).namelist() == ["pkg/mod.py"]
    # without a handler: its own name
    own, _ = to_zip(HELLO, runtime="python3.11", handler=None, filename="handler.py")
    assert zipfile.ZipFile(io.BytesIO(own)).namelist() == ["handler.py"]


@pytest.mark.parametrize(
    ("runtime", "filename"),
    [
        ("python3.11", "notes.txt"),
        ("python3.11", "hello.js"),
        ("nodejs20", "hello.py"),
        ("python3.11", ".py"),
        ("python3.11", None),
        ("python3.11", ""),
    ],
)
def test_a_file_that_is_no_source_of_the_runtime_is_refused(
    runtime: str, filename: str | None
) -> None:
    with pytest.raises(ArchiveError) as caught:
        to_zip(HELLO, runtime=runtime, handler="x.foo", filename=filename)  # type: ignore[arg-type]
    assert caught.value.code == "not_a_source_file"


# -- handler modules, dependencies --------------------------------------------------------------


def test_the_handlers_module_must_be_in_the_archive() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("helloget.py", HELLO)
        zf.writestr("lib/util.py", "")
    info = inspect_archive(buffer.getvalue(), "python3.11", entrypoints=("helloget.py",))
    assert info.entrypoint == "helloget.py"
    with pytest.raises(ArchiveError) as caught:
        inspect_archive(buffer.getvalue(), "python3.11", entrypoints=("hello.py",))
    assert caught.value.code == "missing_handler_module"
    assert "helloget.py" in caught.value.message  # what is there


def test_handler_modules() -> None:
    assert handler_modules("python3.11", "helloget.foo") == ("helloget.py",)
    assert handler_modules("python3.11", "pkg.mod.fn") == ("pkg/mod.py",)
    assert handler_modules("nodejs20", "index.helloGet") == ("index.js", "index.cjs", "index.mjs")
    assert handler_modules("python3.11", None) == ("lambda_main.py", "handler.py")
    assert split_handler("a.b.c") == ("a/b", "c")


def test_dependencies_replace_the_archives_own() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("index.js", "module.exports = {}\n")
        zf.writestr("package.json", '{"dependencies": {"left-pad": "1"}}')
        zf.writestr("package-lock.json", "{}")
        zf.writestr("lib/", "")
    replaced = with_dependencies(buffer.getvalue(), "nodejs20", b'{"dependencies": {}}')
    with zipfile.ZipFile(io.BytesIO(replaced)) as zf:
        assert sorted(zf.namelist()) == ["index.js", "lib/", "package.json"]
        assert zf.read("package.json") == b'{"dependencies": {}}'
    python = with_dependencies(replaced, "python3.11", b"humanize\n")
    assert zipfile.ZipFile(io.BytesIO(python)).read("requirements.txt") == b"humanize\n"


# -- the spec -----------------------------------------------------------------------------------


@pytest.mark.parametrize("handler", ["helloget.foo", "index.helloGet", "pkg.mod.fn", "a.$x"])
def test_valid_handlers(handler: str) -> None:
    assert FunctionConfig(handler=handler).handler == handler


@pytest.mark.parametrize(
    "handler", ["foo", "helloget.", ".foo", "a..b", "hello-get.foo", "a/b.foo", "1x.foo", ""]
)
def test_a_handler_must_be_module_dot_function(handler: str) -> None:
    with pytest.raises(ValidationError, match=r"<module>\.<function>"):
        FunctionConfig(handler=handler)


def test_labels_are_rfc_1123_keys() -> None:
    labels = {"app": "web", "app.kubernetes.io/name": "hello", "tier": "", "a_b.c-d": "X_1"}
    assert FunctionConfig(labels=labels).labels == labels
    for key in ("-app", "UPPER.example/x", "a/b/c", "x" * 64, "", "bad key"):
        with pytest.raises(ValidationError):
            FunctionConfig(labels={key: "v"})
    for value in ("-v", "v" * 64, "a b"):
        with pytest.raises(ValidationError):
            FunctionConfig(labels={"k": value})


def test_label_selectors() -> None:
    selectors = parse_label_selectors(["tier=web", "team"])
    assert selectors == [("tier", "web"), ("team", None)]
    assert labels_match({"tier": "web", "team": "a"}, selectors)
    assert not labels_match({"tier": "web"}, selectors)
    assert not labels_match({"tier": "db", "team": "a"}, selectors)
    assert labels_match({}, [])
    assert parse_label_selectors(["k="]) == [("k", "")]
    with pytest.raises(InvalidRequest):
        parse_label_selectors(["=v"])


# -- the build ----------------------------------------------------------------------------------


def test_handler_of_a_build() -> None:
    assert handler_of("python3.11", "handler.py", None) == ("kyma", "main")
    assert handler_of("python3.11", "lambda_main.py", None) == ("luna", "main")
    assert handler_of("python3.11", "helloget.py", "helloget.foo") == ("kyma", "foo")
    assert handler_of("nodejs20", "index.js", "index.helloGet") == ("node", "helloGet")


def test_compile_check_names_what_a_module_exports(tmp_path: Path) -> None:
    (tmp_path / "helloget.py").write_text(
        "import os\nfrom json import dumps as _d\nX, Y = 1, 2\n\ndef foo(event, context):\n"
        "    def inner(): pass\n    return 'hello world'\n\nclass Handler: pass\n"
        "try:\n    import ujson\nexcept ImportError:\n    ujson = None\n"
    )
    assert check_handler(str(tmp_path), "helloget.py", "foo") is None
    assert check_handler(str(tmp_path), "helloget.py", "Handler") is None
    error = check_handler(str(tmp_path), "helloget.py", "bar")
    assert error is not None
    assert error["error"] == "NoHandler"
    assert error["message"] == (
        "the handler helloget.bar does not exist: module helloget (helloget.py) defines no "
        "'bar'; it exports: Handler, X, Y, foo, os, ujson"
    )
    assert check_handler(str(tmp_path), "helloget.py", "inner") is not None
    (tmp_path / "star.py").write_text("from os.path import *\n")
    assert check_handler(str(tmp_path), "star.py", "join") is None


def test_a_file_named_as_an_archive_but_not_one_says_so() -> None:
    data, kind = to_zip(b"not a zip", runtime="python3.11", handler=None, filename="fn.zip")
    assert (data, kind) == (b"not a zip", "zip")
    with pytest.raises(ArchiveError) as caught:
        inspect_archive(data, "python3.11")
    assert caught.value.code == "not_a_zip"
    with pytest.raises(ArchiveError) as caught:
        to_zip(b"not a tar", runtime="python3.11", handler=None, filename="fn.tar.gz")
    assert caught.value.code == "not_an_archive"
