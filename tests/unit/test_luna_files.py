"""LUNA's files: the docs read back out of a stored zip, and the reserved names the builder
replaces in an unpacked archive."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from lambdabus_builder.luna import install_luna_files, replaced_line
from lambdabus_platform.archive import read_files
from lambdabus_platform.errors import ArchiveError, PayloadTooLarge

DOCS = ("docs/lambda.html", "docs/lambda.yml")


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_read_files_returns_only_the_named_entries() -> None:
    data = _zip({"lambda_main.py": b"x", DOCS[0]: b"<p>hi</p>", DOCS[1]: b"a: 1\n"})
    assert read_files(data, DOCS) == {DOCS[0]: b"<p>hi</p>", DOCS[1]: b"a: 1\n"}
    assert read_files(_zip({"lambda_main.py": b"x"}), DOCS) == {}


def test_read_files_refuses_a_file_over_its_limit_and_a_non_zip() -> None:
    data = _zip({DOCS[0]: b"x" * 2000, DOCS[1]: b"a: 1\n"})
    with pytest.raises(PayloadTooLarge) as caught:
        read_files(data, DOCS, max_bytes=1000)
    assert caught.value.code == "file_too_large"
    with pytest.raises(ArchiveError):
        read_files(b"not a zip", DOCS)


def test_reserved_files_are_replaced_by_ours(tmp_path: Path) -> None:
    (tmp_path / "run.py").write_text("raise SystemExit('theirs')\n")
    (tmp_path / "luna_lambda_tools" / "sub").mkdir(parents=True)
    (tmp_path / "luna_lambda_tools" / "__init__.py").write_text("raise ImportError\n")
    assert install_luna_files(tmp_path) == ["run.py", "luna_lambda_tools/"]
    assert "theirs" not in (tmp_path / "run.py").read_text()
    assert [p.name for p in (tmp_path / "luna_lambda_tools").iterdir()] == ["__init__.py"]
    namespace: dict[str, object] = {}
    exec((tmp_path / "luna_lambda_tools" / "__init__.py").read_text(), namespace)
    assert namespace["StandaloneLambdaRequest"] is namespace["HandlersLambdaRequest"]
    assert "run.py and luna_lambda_tools/ replaced" in replaced_line(
        ["run.py", "luna_lambda_tools/"]
    )


def test_without_reserved_files_ours_are_added_and_nothing_is_said(tmp_path: Path) -> None:
    assert install_luna_files(tmp_path) == []
    assert (tmp_path / "run.py").is_file()
    assert (tmp_path / "luna_lambda_tools" / "__init__.py").is_file()
