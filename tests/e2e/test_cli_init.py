"""`lambdabus init` → `deploy` → `invoke` for each runtime and style, against a whole platform
(`lambdabus up`, offline builds): what `init` writes deploys as it is and answers."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Platform
from tests.e2e.helpers import cli, offline_platform

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(tmp_path_factory, "e2e-init")


@pytest.mark.parametrize(
    ("name", "runtime", "style", "entry"),
    [
        ("py-luna", "python3.11", "luna", "lambda_main.py"),
        ("py-kyma", "python3.11", "kyma", "handler.py"),
        ("js-node", "nodejs20", None, "handler.js"),
    ],
)
def test_init_deploy_invoke(
    platform: Platform, tmp_path: Path, name: str, runtime: str, style: str | None, entry: str
) -> None:
    if runtime == "nodejs20" and shutil.which("node") is None:
        pytest.skip("node is not installed")
    target = tmp_path / name
    style_args = ["--style", style] if style else []
    made = cli(platform, "init", name, "--runtime", runtime, *style_args, "--dir", str(target))
    assert made.returncode == 0, made.stderr
    assert (target / entry).is_file()
    assert (target / "README.md").read_text().count(f"lambdabus deploy . --name {name}") == 1

    # no --runtime: deploy detects it and says so
    deployed = cli(platform, "deploy", str(target), "--name", name)
    assert deployed.returncode == 0, deployed.stderr + deployed.stdout
    assert deployed.stdout.startswith(f"runtime {runtime} (")
    lines = deployed.stdout.splitlines()
    assert len(lines) == len(set(lines)), "a progress line repeated"
    assert not any("Activate with" in line for line in lines)
    assert lines[-1].startswith("ready: ")

    invoked = cli(platform, "invoke", name, "--data", '{"x": 1}')
    assert invoked.returncode == 0, invoked.stderr
    answer = json.loads(invoked.stdout)
    assert answer["message"] == f"Hello from {name}!"

    described = cli(platform, "-o", "json", "describe", name)
    assert described.returncode == 0, described.stderr
    assert json.loads(described.stdout)["status"]["status"] == "running"
