"""Kubeless functions deployed unchanged: functions in Kubeless's form (examples/kubeless/) with the handlers, file formats and flags of `kubeless function deploy`, through
`lambdabus deploy` against `lambdabus up` with offline builds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Platform
from tests.e2e.helpers import (
    EXAMPLES,
    cli,
    http,
    offline_platform,
    status_of,
    wait_for,
    wait_running,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

KUBELESS = EXAMPLES / "kubeless"
# Kubeless's examples/Makefile writes its timeout function so, and deploys it as helloget.py.
HELLO_LOOP = 'def foo(event, context):\n    while 1: pass\n    return "hello world"\n'


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(tmp_path_factory, "kubeless")


def deploy(platform: Platform, source: Path, name: str, *flags: str) -> None:
    done = cli(platform, "deploy", str(source), "--name", name, *flags, "--no-wait")
    assert done.returncode == 0, done.stderr + done.stdout


def function_names(platform: Platform, query: str = "") -> list[str]:
    status, body = http("GET", f"{platform.urls['gateway']}/v1/namespaces/default/functions{query}")
    assert status == 200, body
    return sorted(item["name"] for item in body["items"])


def test_python_examples_from_single_files(platform: Platform) -> None:
    router = platform.urls["router"]
    python = KUBELESS / "python"
    deploy(platform, python / "helloget.py", "get-python", "--handler", "helloget.foo")
    deploy(
        platform,
        python / "hellowithdata.py",
        "post-python",
        "--handler",
        "hellowithdata.handler",
        "--label",
        "created-by=kubeless",
        "--label",
        "app.kubernetes.io/part-of=examples",
    )
    wait_running(platform, "get-python")
    wait_running(platform, "post-python")

    assert http("GET", f"{router}/default/get-python") == (200, "hello world")
    posted = {"hello": "world", "n": [1, 2]}
    assert http("POST", f"{router}/default/post-python", posted) == (200, posted)

    def event_logged() -> str | None:
        out = cli(platform, "logs", "post-python").stdout
        return next((line for line in out.splitlines() if "'event-time'" in line), None)

    line = wait_for(event_logged, 30, "the printed event in the function's logs")
    assert re.search(r"'event-time': '\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z'", line), line
    assert "'event-type': 'application/json'" in line, line
    assert "'event-id': '" in line, line
    assert "'event-namespace': '" in line, line
    assert "'data': {'hello': 'world', 'n': [1, 2]}" in line, line

    # stored as Kubeless does: under the handler's module name
    status, record = http(
        "GET", f"{platform.urls['gateway']}/v1/namespaces/default/functions/post-python"
    )
    assert status == 200, record
    assert record["source"]["entrypoint"] == "hellowithdata.py"
    assert record["spec"]["handler"] == "hellowithdata.handler"
    assert record["spec"]["labels"] == {
        "created-by": "kubeless",
        "app.kubernetes.io/part-of": "examples",
    }
    # labels filter the list, over HTTP and in the CLI
    assert function_names(platform, "?label=created-by=kubeless") == ["post-python"]
    assert function_names(platform, "?label=created-by=nobody") == []
    listed = cli(platform, "ls", "--label", "created-by=kubeless", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert [f["name"] for f in json.loads(listed.stdout)["items"]] == ["post-python"]


def test_python_from_tar_gz_bz2_xz_with_dependencies(platform: Platform, tmp_path: Path) -> None:
    if shutil.which("tar") is None:
        pytest.skip("tar is not installed")
    router = platform.urls["router"]
    work = tmp_path / "python"
    shutil.copytree(KUBELESS / "python", work)
    # the archive's own requirements would fail offline: --dependencies must replace them
    (work / "requirements.txt").write_text("nonexistent-pkg-xyz\n")
    dependencies = tmp_path / "requirements.txt"
    dependencies.write_text("humanize==4.12.3\n")
    names = {"gz": "z", "bz2": "j", "xz": "J"}
    files = ["hellowithdeps.py", "hellowithdepshelper.py", "requirements.txt"]
    for suffix, flag in names.items():
        archive = tmp_path / f"hellowithdeps.tar.{suffix}"
        subprocess.run(
            ["tar", f"c{flag}f", str(archive), "-C", str(work), *files],
            check=True,
        )
        deploy(
            platform,
            archive,
            f"deps-tar-{suffix}",
            "--runtime",
            "python3.11",
            "--handler",
            "hellowithdeps.foo",
            "--dependencies",
            str(dependencies),
        )
    for suffix in names:
        wait_running(platform, f"deps-tar-{suffix}", timeout=180)
        answer = http("POST", f"{router}/default/deps-tar-{suffix}", {"n": 1234567})
        assert answer == (200, "1.2 million"), suffix


def test_node_index_reexporting_from_a_zip(platform: Platform, tmp_path: Path) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    archive = tmp_path / "helloFunctions.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("helloget.js", "hellowithdata.js", "index.js"):
            zf.write(KUBELESS / "nodejs" / name, name)
    # no --runtime: JavaScript sources without a Python one are a Node function
    deploy(platform, archive, "get-nodejs", "--handler", "index.helloGet")
    wait_running(platform, "get-nodejs")
    assert http("GET", f"{platform.urls['router']}/default/get-nodejs") == (200, "hello world!")


def test_timeout_of_3_seconds_answers_504_within_4(platform: Platform, tmp_path: Path) -> None:
    loop = tmp_path / "hello-loop.py"
    loop.write_text(HELLO_LOOP)
    deploy(platform, loop, "timeout-python", "--handler", "helloget.foo", "--timeout", "3")
    wait_running(platform, "timeout-python")
    try:
        started = time.monotonic()
        status, body = http("GET", f"{platform.urls['router']}/default/timeout-python")
        took = time.monotonic() - started
        assert status == 504, body
        assert 2.9 <= took < 4.0, took
    finally:  # the loop spins on in its thread: stop the instance
        assert cli(platform, "rm", "timeout-python").returncode == 0


def build_failure(platform: Platform, name: str) -> str:
    def failed() -> dict[str, Any] | None:
        st = status_of(platform, name)
        return st if st.get("image_status") == "error" else None

    st = wait_for(failed, 90, f"the build of {name} to fail")
    return str(next(c for c in st["conditions"] if c["type"] == "BuildReady")["message"])


def test_a_handler_missing_after_the_build_names_what_the_module_exports(
    platform: Platform, tmp_path: Path
) -> None:
    deploy(
        platform, KUBELESS / "python" / "helloget.py", "wrong-handler", "--handler", "helloget.bar"
    )
    message = build_failure(platform, "wrong-handler")
    assert "the handler helloget.bar does not exist" in message, message
    assert "it exports: foo" in message, message

    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    archive = tmp_path / "helloFunctions.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in ("helloget.js", "hellowithdata.js", "index.js"):
            zf.write(KUBELESS / "nodejs" / name, name)
    deploy(platform, archive, "wrong-export", "--handler", "index.hello")
    message = build_failure(platform, "wrong-export")
    assert "the handler index.hello does not exist" in message, message
    assert "it exports: helloGet, helloWithData" in message, message


def test_bad_kubeless_input_is_refused_and_nothing_is_stored(
    platform: Platform, tmp_path: Path
) -> None:
    helloget = KUBELESS / "python" / "helloget.py"
    notes = tmp_path / "notes.txt"
    notes.write_text("def foo(event, context):\n    return 1\n")
    evil = tmp_path / "evil.tar.gz"
    subprocess.run(
        [
            "tar",
            "czf",
            str(evil),
            "-C",
            str(KUBELESS / "python"),
            "--transform",
            "s,^,../,",
            "helloget.py",
        ],
        check=True,
    )
    zipped = tmp_path / "helloget.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.write(helloget, "helloget.py")
    linked = tmp_path / "linked.tar"
    (tmp_path / "src").mkdir()
    shutil.copy(helloget, tmp_path / "src" / "helloget.py")
    (tmp_path / "src" / "passwd").symlink_to("/etc/passwd")
    subprocess.run(["tar", "cf", str(linked), "-C", str(tmp_path / "src"), "."], check=True)
    cases = {
        "no-dot": (helloget, ["--handler", "foo"], "<module>.<function>"),
        "no-module": (zipped, ["--handler", "hello.foo"], "missing_handler_module"),
        "dotdot": (evil, ["--handler", "helloget.foo"], "unsafe_path"),
        "symlink": (linked, ["--handler", "helloget.foo"], "special_entry"),
        "not-source": (notes, ["--handler", "notes.foo"], "not_a_source_file"),
    }
    before = function_names(platform)
    for name, (source, flags, says) in cases.items():
        done = cli(platform, "deploy", str(source), "--name", f"bad-{name}", *flags, "--no-wait")
        assert done.returncode != 0, name
        assert says in done.stderr, (name, done.stderr)
        assert "Traceback" not in done.stderr, name
    assert function_names(platform) == before
