"""The pool of pre-started runtimes, its pure parts: which revisions may start from it (and
from which pool), what a pre-started sandbox sees before it has a function, and the one line
that specialises it; and the runtime's `--pool` mode as a real subprocess."""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lambdabus_deployer.plan import (
    POOL_FLAG,
    PoolKey,
    pool_key,
    pool_message,
    render_pooled,
    render_sandbox,
)
from lambdabus_deployer.pool import PoolSizer, fill_code
from lambdabus_platform.sandbox import Bind
from tests.unit.test_deployer_plan import RUNTIME, manifest, revision, settings, spec

RUNTIME_SRC = Path(__file__).resolve().parents[2] / "libs" / "runtime" / "src"


def test_python_revisions_without_secret_files_share_a_pool_by_env_network_and_tmp() -> None:
    m = manifest()
    a = pool_key(m, revision(), outbound=True, interpreter_dirs=["/opt/py", "/opt/py"])
    b = pool_key(m, revision(env=(("X", "1"),), memory=256, timeout=5.0), outbound=True)
    assert a is not None
    assert b is not None
    assert a.interpreter_dirs == ("/opt/py",)
    # What the sandbox is built with decides; what the specialisation sends does not.
    assert (a.runtime, a.env_dir, a.network, a.tmp_size) == (b.runtime, b.env_dir, "outbound", 64)
    assert pool_key(m, revision(network="none"), outbound=True) != b
    assert pool_key(m, revision(tmp_size=128), outbound=True) != b
    # Without slirp4netns every sandbox is network-less: one pool.
    assert pool_key(m, revision(), outbound=False) == pool_key(
        m, revision(network="none"), outbound=False
    )


def test_node_pools_only_where_a_cgroup_limits_its_memory_and_keys_its_open_files() -> None:
    key = pool_key(manifest("nodejs20"), revision(open_files=2048), outbound=True, node=True)
    assert key is not None
    assert key.open_files == 2048  # node cannot lower its own rlimits: the slot starts with them
    pooled = render_pooled(
        key,
        code_dir="/srv/pool-1.code",
        scratch="/srv/pool-1",
        socket_dir="/run/x/aa",
        runtime=RUNTIME,
        path="/usr/bin",
    )
    fresh = render_sandbox(manifest("nodejs20"), spec(), settings())
    assert pooled.command[1:3] == ("/lambdabus/runtime/node/server.js", POOL_FLAG)
    assert [b.dest for b in pooled.binds] == [b.dest for b in fresh.binds]
    assert dict(pooled.env)["NODE_PATH"] == "/lambdabus/deps/node_modules"
    message = json.loads(pool_message(manifest("nodejs20"), spec(), []))
    assert message["argv"] == list(fresh.command[fresh.command.index(pooled.command[1]) + 1 :])


def test_node_custom_and_secret_file_revisions_start_afresh() -> None:
    assert pool_key(manifest("nodejs20"), revision(), outbound=True) is None
    assert pool_key(manifest("custom"), revision(), outbound=True) is None
    with_secret = revision(secret_files=(("db", (("password", b"s3cret"),)),))
    assert pool_key(manifest(), with_secret, outbound=True) is None


def test_a_pre_started_sandbox_has_its_own_empty_code_dir_and_no_function_data() -> None:
    m, instance = manifest(), spec()
    key = pool_key(m, revision(), outbound=True, interpreter_dirs=["/root/.pyenv/3.11"])
    assert key is not None
    pooled = render_pooled(
        key,
        code_dir="/srv/deployer/instances/pool-1.code",
        scratch="/srv/deployer/instances/pool-1",
        socket_dir="/run/lambdabus/deployer-x/aa",
        runtime=RUNTIME,
        path="/usr/bin:/bin",
    )
    fresh = render_sandbox(m, instance, settings(), interpreter_dirs=["/root/.pyenv/3.11"])
    assert pooled.command[:4] == (
        "/lambdabus/deps/bin/python",
        "-m",
        "lambdabus_runtime",
        POOL_FLAG,
    )
    assert pooled.command[4].strip() == ""  # room for the function's flags in `ps`
    # The same view as an instance's, except the code: the slot's own dir, not the artifact.
    assert pooled.binds[0] == Bind("/srv/deployer/instances/pool-1.code", "/lambdabus/code")
    assert [b.dest for b in pooled.binds] == [b.dest for b in fresh.binds]
    assert pooled.binds[1:3] == fresh.binds[1:3]
    assert all(b.source != m.code_dir for b in pooled.binds)
    # No env file, no secrets, no function name: nothing of any function before it has one.
    assert pooled.files == ()
    env = dict(pooled.env)
    assert "LAMBDABUS_ENV_FILE" not in env
    assert {k: v for k, v in dict(fresh.env).items() if k != "LAMBDABUS_ENV_FILE"} == env
    assert pooled.hostname == "lambdabus"
    assert pooled.network == "outbound"


def test_the_specialising_line_holds_the_flags_env_and_rlimits() -> None:
    m = manifest()
    instance = spec(revision(env=(("GREETING", "hi"),)))
    line = pool_message(m, instance, [(resource.RLIMIT_NOFILE, 1024)])
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    message = json.loads(line)
    fresh = render_sandbox(m, instance, settings())
    assert message["argv"] == list(fresh.command[3:])
    assert message["env"] == {"GREETING": "hi"}
    assert message["rlimits"] == [[resource.RLIMIT_NOFILE, 1024]]


def test_code_is_linked_into_the_slots_dir(tmp_path: Path) -> None:
    source = tmp_path / "artifact"
    (source / "pkg").mkdir(parents=True)
    (source / "lambda_main.py").write_text("x = 1\n")
    (source / "pkg" / "mod.py").write_text("y = 2\n")
    (source / "link").symlink_to("lambda_main.py")
    slot = tmp_path / "pool-1.code"
    slot.mkdir()
    fill_code(source, slot)
    assert (slot / "pkg" / "mod.py").read_text() == "y = 2\n"
    assert (slot / "link").is_symlink()
    assert os.stat(slot / "lambda_main.py").st_ino == os.stat(source / "lambda_main.py").st_ino


def _pooled_runtime() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "lambdabus_runtime", "--pool", " " * 256],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(RUNTIME_SRC)},
    )


def test_a_pooled_runtime_serves_the_function_it_is_told_with_its_env_and_limits(
    tmp_path: Path,
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "lambda_main.py").write_text(
        "import os, resource\n"
        "async def main(request):\n"
        "    return {'who': os.environ.get('WHO'),\n"
        "            'nofile': resource.getrlimit(resource.RLIMIT_NOFILE)[1]}\n"
    )
    sock = tmp_path / "sock"
    process = _pooled_runtime()
    try:
        assert process.stdin is not None
        assert process.stdout is not None
        time.sleep(0.2)
        assert process.poll() is None  # waiting for its function
        argv = [
            "--code", str(code), "--entrypoint", "lambda_main.py",
            "--socket", str(sock), "--function", "default/who",
        ]  # fmt: skip
        message = {"argv": argv, "env": {"WHO": "me"}, "rlimits": [[resource.RLIMIT_NOFILE, 512]]}
        process.stdin.write(json.dumps(message).encode() + b"\n")
        process.stdin.close()
        assert b'"listening"' in process.stdout.readline()
        # Its command line names its function now (`--function` first), as in `ps`.
        shown = [a for a in Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0") if a]
        assert shown[3:5] == [b"--function", b"default/who"]
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        assert any(
            line.startswith("Max open files") and " 512 " in line for line in limits.splitlines()
        )
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(sock))
            client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            data = b""
            while b"}" not in data:
                data += client.recv(4096)
        assert json.loads(data.split(b"\r\n\r\n", 1)[1]) == {"who": "me", "nofile": 512}
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(10)
    for pipe in (process.stdin, process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def test_a_pooled_runtime_whose_deployer_is_gone_exits_having_served_nothing() -> None:
    process = _pooled_runtime()
    _, err = process.communicate(b"", timeout=30)  # EOF on the control channel
    assert process.returncode == 0
    assert err == b""


def test_a_pooled_runtime_refuses_a_message_it_cannot_read() -> None:
    process = _pooled_runtime()
    _, err = process.communicate(b'{"argv": "not a list", "env": {}}\n', timeout=30)
    assert process.returncode == 2
    assert b"argv is not strings" in err


def test_a_key_whose_cold_starts_find_no_idle_runtime_keeps_more_then_gives_them_back() -> None:
    sizer = PoolSizer(base=2, most=5, shrink_after=300.0)
    python = PoolKey(runtime="python3.11", env_dir="/envs/a", network="none", tmp_size=16)
    other = PoolKey(runtime="python3.11", env_dir="/envs/b", network="none", tmp_size=16)
    assert sizer.target(python, 0.0) == 2
    assert sizer.next_shrink(0.0) is None
    for _ in range(2):  # a burst of 4 wakes found 2 idle: 2 misses
        sizer.missed(python, 10.0)
    assert sizer.target(python, 10.0) == 4
    assert sizer.target(other, 10.0) == 2  # per key
    for _ in range(5):
        sizer.missed(python, 20.0)
    assert sizer.target(python, 20.0) == 5  # never above `most`
    assert sizer.next_shrink(20.0) == 300.0
    assert sizer.target(python, 319.0) == 5
    assert sizer.target(python, 320.0) == 4  # one back per 300 s without a miss
    assert sizer.next_shrink(320.0) == 300.0
    assert sizer.target(python, 20.0 + 3 * 300) == 2
    assert sizer.target(python, 20.0 + 9 * 300) == 2  # never below `base`
    assert sizer.next_shrink(20.0 + 9 * 300) is None
    sizer.missed(python, 5000.0)
    assert sizer.target(python, 5000.0) == 3
    sizer.forget({other})  # no function uses it any more
    assert sizer.target(python, 5000.0) == 2


def test_no_pool_grows_no_pool() -> None:
    sizer = PoolSizer(base=0, most=6, shrink_after=300.0)
    python = PoolKey(runtime="python3.11", env_dir="/envs/a", network="none", tmp_size=16)
    sizer.missed(python, 1.0)
    assert sizer.target(python, 1.0) == 0


def test_a_pooled_node_runtime_warms_up_leaving_nothing_then_serves_its_function(
    tmp_path: Path,
) -> None:
    """A Node slot sends itself one request before it waits for its function (node compiles
    its HTTP paths then, not in the cold start): on an abstract socket, so nothing is left in
    its /tmp; then it serves the function it is told. (NODE_DEBUG=http has node say what its
    HTTP server and client did, on stderr.)"""
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node here")
    if platform.machine() not in _READ_SYSCALL:
        pytest.skip(f"which syscall number is read() on {platform.machine()}: not known here")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    code = tmp_path / "code"
    code.mkdir()
    (code / "handler.js").write_text(
        "module.exports = { main: async (event) => ({ got: event.data, who: process.env.WHO }) };\n"
    )
    sock = tmp_path / "sock"
    server = RUNTIME_SRC / "lambdabus_runtime" / "node" / "server.js"
    process = subprocess.Popen(
        [node, str(server), "--pool", " " * 256],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", ""), "TMPDIR": str(scratch), "NODE_DEBUG": "http"},
    )
    try:
        assert process.stdin is not None
        assert process.stdout is not None
        deadline = time.monotonic() + 10
        while not _reading_stdin(process.pid):  # warmed up: blocked on its control channel
            assert process.poll() is None, process.stderr.read() if process.stderr else b""
            assert time.monotonic() < deadline, "the node slot did not come to wait"
            time.sleep(0.02)
        assert process.stderr is not None
        os.set_blocking(process.stderr.fileno(), False)
        said = process.stderr.read() or b""
        assert b"SERVER new http connection" in said  # the warm-up's request, served
        assert b"AGENT incoming response" in said  # and its answer, read
        assert list(scratch.iterdir()) == []
        assert f"@lambdabus-warm-up-{process.pid}" not in Path("/proc/net/unix").read_text()
        argv = [
            "--code", str(code), "--entrypoint", "handler.js", "--handler", "main",
            "--socket", str(sock), "--function", "default/who",
        ]  # fmt: skip
        process.stdin.write(json.dumps({"argv": argv, "env": {"WHO": "me"}}).encode() + b"\n")
        process.stdin.close()
        assert b'"listening"' in process.stdout.readline()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(sock))
            client.sendall(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 7\r\n\r\n[1,2,3]"
            )
            data = b""
            while b"}" not in data:
                data += client.recv(4096)
        assert json.loads(data.split(b"\r\n\r\n", 1)[1]) == {"got": [1, 2, 3], "who": "me"}
    finally:
        _stop(process)


_READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}


def _reading_stdin(pid: int) -> bool:
    """Is the process's main thread blocked in read(0, ...) (first argument 0)?"""
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return fields[:2] == [_READ_SYSCALL[platform.machine()], "0x0"]
