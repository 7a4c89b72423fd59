"""Dependencies that install without a network: a tiny pure-Python wheel written by hand into a
find-links directory (`wheel_index`), and a tiny npm package tarball (`make_npm_tarball`) for a
`package.json` dependency `"tinydep": "file:<path>"`.

Both packages are `tinydep` 1.0.0 with one function, `double(x) -> 2 * x`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

TINYDEP_PY = "def double(x):\n    return 2 * x\n"
TINYDEP_JS = "exports.double = (x) => 2 * x;\n"


@dataclass(frozen=True)
class WheelIndex:
    """A find-links directory holding `tinydep-1.0.0-py3-none-any.whl`."""

    path: Path
    package: str = "tinydep"
    version: str = "1.0.0"


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return f"sha256={digest.decode()}"


def make_wheel(directory: Path, name: str = "tinydep", version: str = "1.0.0") -> Path:
    """Write a pure-Python wheel of one module `<name>/__init__.py` (with `double`) into
    `directory`, with the METADATA, WHEEL and RECORD files installers check."""
    dist_info = f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {
        f"{name}/__init__.py": TINYDEP_PY.encode(),
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            "Summary: a tiny dependency for Lambdabus tests\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: lambdabus-testing\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0)), data)
    return wheel


def make_npm_tarball(directory: Path, name: str = "tinydep", version: str = "1.0.0") -> Path:
    """Write `<name>-<version>.tgz` as `npm pack` would: `package/package.json` and
    `package/index.js` (exporting `double`). npm installs it offline from a `file:` spec."""
    files = {
        "package/package.json": json.dumps(
            {"name": name, "version": version, "main": "index.js", "license": "MIT"}
        ).encode(),
        "package/index.js": TINYDEP_JS.encode(),
    }
    directory.mkdir(parents=True, exist_ok=True)
    tarball = directory / f"{name}-{version}.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return tarball


@pytest.fixture(scope="session")
def wheel_index(tmp_path_factory: pytest.TempPathFactory) -> WheelIndex:
    """A find-links directory with the `tinydep` wheel: builds run with
    `--no-index --find-links <path>` and never touch the network. World-readable, as a
    wheelhouse must be: sandboxed builds read it as an unprivileged uid."""
    path = tmp_path_factory.mktemp("wheels")
    make_wheel(path)
    path.chmod(0o755)
    for wheel in path.iterdir():
        wheel.chmod(0o644)
    return WheelIndex(path)


@pytest.fixture(scope="session")
def npm_tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tinydep` npm package as a local tarball."""
    return make_npm_tarball(tmp_path_factory.mktemp("npm"))
