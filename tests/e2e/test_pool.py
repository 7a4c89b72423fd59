"""The pool of pre-started runtimes on the whole platform (`lambdabus up`, the real sandbox):
an instance started from the pool serves its own function, sees only its own code, env and
/tmp, runs as a uid of its own, and is never given to another function (its process ends with
it; the pool starts new ones).

A pooled runtime is told from a fresh one by its command line: specialised, it rewrites it
with `--function NS/NAME` first (a fresh one starts with `--code`); an idle one shows `--pool`.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lambdabus_platform.sandbox import DEFAULT_UID_BASE, DEFAULT_UID_COUNT
from tests.e2e.conftest import Platform
from tests.e2e.helpers import cmdline, http, offline_platform, runtime_processes, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

NS = "default"
PROBE = """
import os


def main(request):
    with open(os.path.join("/tmp", os.environ["WHO"] + "-was-here"), "w") as f:
        f.write("x")
    return {
        "who": os.environ.get("WHO"),
        "env": sorted(k for k in os.environ if k.endswith("_ONLY")),
        "values": sorted(v for k, v in os.environ.items() if k.endswith("_ONLY")),
        "code": sorted(os.listdir("/lambdabus/code")),
        "tmp": sorted(os.listdir("/tmp")),
        "uid": os.getuid(),
    }
"""


def source(who: str) -> dict[str, str]:
    return {"lambda_main.py": PROBE, f"{who}_marker.txt": who}


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    yield from offline_platform(tmp_path_factory, "pool", LAMBDABUS_DEPLOYER_POOL_SIZE="2")


def deploy(platform: Platform, who: str) -> None:
    status, body = http(
        "POST",
        f"{platform.urls['gateway']}/v1/namespaces/{NS}/functions",
        {
            "name": f"pool-{who}",
            "source": {"files": source(who)},
            "env": {"WHO": who, f"{who.upper()}_ONLY": f"{who}-value"},
        },
    )
    assert status == 202, body


def running(platform: Platform, name: str) -> bool:
    _, st = http("GET", f"{platform.urls['gateway']}/v1/namespaces/{NS}/functions/{name}/status")
    if st.get("image_status") == "error" or st.get("status") == "terminated":
        raise AssertionError(f"{name} failed: {st}")
    return bool(st.get("status") == "running" and st.get("endpoints", 1))


def call(platform: Platform, name: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{platform.urls['router']}/{NS}/{name}", data=b"{}", method="POST"
    )
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        body: dict[str, Any] = json.loads(response.read())
        return body


def argv_of(pid: int) -> list[bytes]:
    return [a for a in cmdline(pid).split(b"\0") if a]


def idle_pool_processes() -> list[int]:
    """Pre-started runtimes not yet any function's, anywhere on the machine."""
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = path.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"lambdabus_runtime" in argv[:3] and b"--pool" in argv:
            found.append(int(path.parent.name))
    return found


def host_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


def pooled(pid: int, name: str) -> bool:
    argv = argv_of(pid)
    return argv[3:5] == [b"--function", f"{NS}/{name}".encode()]


def test_pooled_instances_serve_their_own_function_only_and_are_never_reused(
    platform: Platform,
) -> None:
    deploy(platform, "a")
    wait_for(lambda: running(platform, "pool-a"), 120, "pool-a running")
    # pool-a made its key's pool: two idle runtimes wait for the next function.
    wait_for(lambda: len(idle_pool_processes()) >= 2, 60, "two idle pre-started runtimes")

    deploy(platform, "b")
    wait_for(lambda: running(platform, "pool-b"), 120, "pool-b running")
    b_pids = wait_for(lambda: runtime_processes("pool-b"), 30, "pool-b's runtime")
    assert len(b_pids) == 1
    b_pid = b_pids[0]
    assert pooled(b_pid, "pool-b"), argv_of(b_pid)

    a = call(platform, "pool-a")
    b = call(platform, "pool-b")
    # Each serves its own function: its code, its env, its /tmp; nothing of the other.
    assert a["who"] == "a"
    assert b["who"] == "b"
    assert a["env"] == ["A_ONLY"]
    assert a["values"] == ["a-value"]
    assert b["env"] == ["B_ONLY"]
    assert b["values"] == ["b-value"]
    assert "a_marker.txt" in a["code"]
    assert "b_marker.txt" not in a["code"]
    assert "b_marker.txt" in b["code"]
    assert "a_marker.txt" not in b["code"]
    assert "b-was-here" not in a["tmp"]
    assert "a-was-here" not in b["tmp"]
    # A uid of its own, from the sandbox range, not the other function's.
    if os.geteuid() == 0:
        a_pid = runtime_processes("pool-a")[0]
        assert b["uid"] == host_uid(b_pid) != host_uid(a_pid) == a["uid"]
        assert DEFAULT_UID_BASE <= b["uid"] < DEFAULT_UID_BASE + DEFAULT_UID_COUNT

    # The pool refills: a slot taken is replaced, never given back.
    wait_for(lambda: len(idle_pool_processes()) >= 2, 60, "the pool refilled")
    assert b_pid not in idle_pool_processes()

    # pool-b goes: its process ends with it, and serves no other function afterwards.
    status, body = http("DELETE", f"{platform.urls['gateway']}/v1/namespaces/{NS}/functions/pool-b")
    assert status in (200, 202, 204), body
    wait_for(lambda: not cmdline(b_pid), 60, "pool-b's process gone")
    deploy(platform, "c")
    wait_for(lambda: running(platform, "pool-c"), 120, "pool-c running")
    c_pid = wait_for(lambda: runtime_processes("pool-c"), 30, "pool-c's runtime")[0]
    assert c_pid != b_pid
    assert pooled(c_pid, "pool-c"), argv_of(c_pid)
    c = call(platform, "pool-c")
    assert c["who"] == "c"
    assert c["env"] == ["C_ONLY"]
    assert "b_marker.txt" not in c["code"]
    assert "b-was-here" not in c["tmp"]


NODE_PROBE = (
    "exports.main = async function (event, context) {\n"
    "  const fs = require('fs');\n"
    "  return { who: process.env.WHO, code: fs.readdirSync('/lambdabus/code').sort(),\n"
    "           env: Object.keys(process.env).filter((k) => k.endsWith('_ONLY')).sort() };\n"
    "};\n"
)


def deploy_node(platform: Platform, who: str) -> None:
    status, body = http(
        "POST",
        f"{platform.urls['gateway']}/v1/namespaces/{NS}/functions",
        {
            "name": f"pool-{who}",
            "runtime": "nodejs20",
            "source": {"files": {"handler.js": NODE_PROBE, f"{who}_marker.txt": who}},
            "env": {"WHO": who, f"{who.upper()}_ONLY": f"{who}-value"},
        },
    )
    assert status == 202, body


def node_pool_processes() -> list[int]:
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = path.read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and argv[1].endswith(b"server.js") and argv[2] == b"--pool":
            found.append(int(path.parent.name))
    return found


def test_node_functions_are_made_of_pre_started_runtimes_too(platform: Platform) -> None:
    deploy_node(platform, "n1")
    wait_for(lambda: running(platform, "pool-n1"), 120, "pool-n1 running")
    wait_for(lambda: len(node_pool_processes()) >= 1, 60, "an idle pre-started node runtime")
    deploy_node(platform, "n2")
    wait_for(lambda: running(platform, "pool-n2"), 120, "pool-n2 running")
    pid = wait_for(lambda: runtime_processes("pool-n2"), 30, "pool-n2's runtime")[0]
    assert argv_of(pid)[2:4] == [b"--function", f"{NS}/pool-n2".encode()], argv_of(pid)
    n2 = call(platform, "pool-n2")
    assert n2["who"] == "n2"
    assert n2["env"] == ["N2_ONLY"]
    assert "n2_marker.txt" in n2["code"]
    assert "n1_marker.txt" not in n2["code"]
