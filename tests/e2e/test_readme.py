"""README.md runs as written: every ```sh block, in order, in one bash (`set -euo pipefail`),
against a platform this test starts (`lambdabus up --ephemeral-ports`, offline builds).

The run happens as a reader's would, in a directory laid out like the checkout after `make run`
(`./lambdabus`, `.venv`, `examples/`, `.lambdabus/` = the platform's data dir), with no `uv` on
PATH. The README reads the platform's addresses from `LAMBDABUS_URL` and `ROUTER` and defaults
them to the ports of `make run`; this test sets them to the ephemeral ones. A block fenced as
```sh title="not run: ..."``` is skipped; only `make run` / `make test` may be (they start the
platform and the suite themselves)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Platform
from tests.e2e.helpers import ROOT, offline_platform

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

README = ROOT / "README.md"
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)
NOT_RUN = re.compile(r'^sh title="not run: [^"]+"$')
ALLOWED_UNRUN = {"make run", "make test"}


def blocks(text: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(line, body) of each runnable ```sh block, and the bodies of the skipped ones."""
    run: list[tuple[int, str]] = []
    skipped: list[str] = []
    for match in FENCE.finditer(text):
        info = match["info"].strip()
        line = text.count("\n", 0, match.start()) + 1
        if info == "sh":
            run.append((line, match["body"]))
        elif NOT_RUN.match(info):
            skipped.append(match["body"])
        elif info.startswith("sh") or info in ("bash", "shell", "console"):
            raise AssertionError(f"README.md line {line}: unknown shell fence {info!r}")
    return run, skipped


def test_only_make_run_and_make_test_are_not_run() -> None:
    run, skipped = blocks(README.read_text())
    assert run, "README.md has no runnable ```sh block"
    for body in skipped:
        commands = {line.split("#", 1)[0].strip() for line in body.splitlines()} - {""}
        assert commands <= ALLOWED_UNRUN, f"a skipped block runs more than make: {commands}"


def test_no_command_needs_uv_or_the_shared_directory() -> None:
    text = README.read_text()
    assert "uv run" not in text
    assert "../shared" not in text


def _path_without_uv() -> str:
    dirs = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(d for d in dirs if d and not (Path(d) / "uv").exists())


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(tmp_path_factory, "readme")


def test_every_block_runs_in_order(platform: Platform, tmp_path: Path) -> None:
    run, _ = blocks(README.read_text())
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "lambdabus").symlink_to(ROOT / "lambdabus")
    (checkout / ".venv").symlink_to(ROOT / ".venv")
    (checkout / ".lambdabus").symlink_to(platform.data_dir)
    shutil.copytree(ROOT / "examples", checkout / "examples")
    script = ["set -euo pipefail"]
    for line, body in run:
        script.append(f"echo '### README.md line {line}' >&2")
        script.append(body)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LAMBDABUS_", "VIRTUAL_ENV"))}
    env.update(
        PATH=_path_without_uv(),
        LAMBDABUS_URL=platform.urls["gateway"],
        ROUTER=platform.urls["router"],
    )
    assert shutil.which("uv", path=env["PATH"]) is None
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    shown = f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, shown
    # the README's blocks have run to the end (the last marker is there) and did what they say
    assert f"### README.md line {run[-1][0]}" in result.stderr, shown
    assert '"words":"5"' in result.stdout, shown  # curl to the router
    assert "1.2 million" in result.stdout, shown  # invoke through the gateway
    assert "Hello, Ada!" in result.stdout, shown  # after the rollout
    assert "Status:      succeeded" in result.stdout, shown  # the async invocation
    assert "io.lambdabus.function.created default/hello" in result.stdout, shown  # audit.py
    print(result.stdout)
    print(result.stderr)


def test_the_wrapper_says_to_run_make_run_first(tmp_path: Path) -> None:
    """`./lambdabus` before `make run` has installed .venv: one line saying what to do, exit 2."""
    shutil.copy(ROOT / "lambdabus", tmp_path / "lambdabus")
    result = subprocess.run(
        [str(tmp_path / "lambdabus"), "ls"], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "run `make run` first" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_the_wrapper_runs_the_checkouts_cli() -> None:
    result = subprocess.run(
        [str(ROOT / "lambdabus"), "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lambdabus")
