"""The sandbox's pure decisions: bubblewrap's and slirp4netns's argv, the uid of a sandbox,
which bind sources need exposing to it, and the firewall rules."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from lambdabus_platform.sandbox import (
    LAUNCHER_ENV,
    Bind,
    DataFile,
    Identity,
    SandboxSpec,
    blocked_roots,
    bwrap_args,
    egress_restore,
    identity_for,
    read_pipe,
    slirp_args,
    system_binds,
)

LAYOUT = (("dir", "/usr"), ("symlink", "/bin", "usr/bin"), ("dir", "/etc"))
WHO = Identity(1_300_000_123, 1_300_000_123)


def pairs(args: list[str], option: str) -> list[tuple[str, str]]:
    return [(args[i + 1], args[i + 2]) for i, a in enumerate(args) if a == option]


def spec(**kw: object) -> SandboxSpec:
    base: dict[str, object] = {
        "command": ("/opt/py/bin/python", "-m", "x"),
        "env": (("PATH", "/usr/bin"), ("HOME", "/tmp")),
        "binds": (Bind("/opt/py", "/opt/py"), Bind("/data/i/tmp", "/tmp", writable=True)),
        "files": (DataFile("/run/lambdabus/env.json", b"{}"),),
        "chdir": "/tmp",
    }
    base.update(kw)
    return SandboxSpec(**base)  # type: ignore[arg-type]


def test_the_host_is_allowlisted_not_bound_whole() -> None:
    args = bwrap_args(spec(), layout=LAYOUT, identity=WHO, file_fds=[7])
    ro = pairs(args, "--ro-bind")
    assert ("/", "/") not in ro
    assert ("/usr", "/usr") in ro
    assert ("/etc", "/etc") in ro
    assert ("/opt/py", "/opt/py") in ro
    assert pairs(args, "--symlink") == [("usr/bin", "/bin")]
    assert pairs(args, "--bind") == [("/data/i/tmp", "/tmp")]
    assert not any(a.startswith("/root") or a.startswith("/work") for a in args)
    assert "--tmpfs" not in args  # the scratch dir is bound, never a RAM tmpfs


def test_every_namespace_is_new_and_no_capability_is_kept() -> None:
    args = bwrap_args(spec(), layout=LAYOUT, identity=WHO, file_fds=[7])
    for option in ("--unshare-all", "--unshare-user", "--die-with-parent", "--new-session"):
        assert option in args
    assert args[args.index("--cap-drop") + 1] == "ALL"
    assert args[args.index("--uid") + 1] == str(WHO.uid)
    assert tuple(args[args.index("--proc") : args.index("--proc") + 2]) == ("--proc", "/proc")
    assert args[args.index("--dev") + 1] == "/dev"
    assert "--share-net" not in args


def test_a_detached_sandbox_outlives_its_launcher_and_reports_its_exit_code() -> None:
    args = bwrap_args(
        spec(), layout=LAYOUT, identity=WHO, file_fds=[7], status_fd=5, die_with_parent=False
    )
    assert "--die-with-parent" not in args
    assert "--new-session" in args
    assert args[args.index("--json-status-fd") + 1] == "5"


def test_the_commands_env_is_set_inside_and_data_files_come_from_fds() -> None:
    args = bwrap_args(spec(), layout=LAYOUT, identity=WHO, file_fds=[7], info_fd=8, block_fd=9)
    assert "--clearenv" in args
    assert pairs(args, "--setenv") == [("PATH", "/usr/bin"), ("HOME", "/tmp")]
    assert pairs(args, "--ro-bind-data") == [("7", "/run/lambdabus/env.json")]
    assert args[args.index("--ro-bind-data") - 1] == "0400"
    assert args[args.index("--info-fd") + 1] == "8"
    assert args[args.index("--block-fd") + 1] == "9"
    assert args[args.index("--chdir") + 1] == "/tmp"


def test_file_contents_never_appear_in_the_argv() -> None:
    secret = DataFile("/secrets/db/password", b"hunter2")
    args = bwrap_args(spec(files=(secret,)), layout=LAYOUT, identity=WHO, file_fds=[5])
    assert not any("hunter2" in a for a in args)


def test_system_binds_follow_the_host_layout() -> None:
    assert system_binds(LAYOUT) == [
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/bin", "/bin",
        "--ro-bind", "/etc", "/etc",
    ]  # fmt: skip


def test_a_sandbox_uid_is_stable_unprivileged_and_differs_between_tenants() -> None:
    a = identity_for("attacker/fn", 1_300_000_000, 65536)
    assert a == identity_for("attacker/fn", 1_300_000_000, 65536)
    assert a != identity_for("victim/fn", 1_300_000_000, 65536)
    assert 1_300_000_000 <= a.uid < 1_300_000_000 + 65536
    assert a.uid == a.gid


def test_slirp_gets_no_host_loopback_and_the_namespaces_as_fds() -> None:
    args = slirp_args(userns_fd=3, netns_fd=4, ready_fd=5, exit_fd=6)
    assert "--disable-host-loopback" in args
    assert "--configure" in args
    assert "--userns-path=/proc/self/fd/3" in args
    assert args[-2:] == ["/proc/self/fd/4", "tap0"]
    assert "--ready-fd=5" in args
    assert "--exit-fd=6" in args


def test_the_launchers_env_is_fixed() -> None:
    assert set(LAUNCHER_ENV) == {"PATH", "LANG"}


def test_egress_rules_refuse_link_local_and_host_addresses_for_the_uid_range() -> None:
    text = egress_restore(100, 199, jump=True).splitlines()
    assert text[:2] == ["*filter", ":LAMBDABUS-SANDBOX - [0:0]"]  # replaced in one commit
    assert text[-1] == "COMMIT"
    assert "-A LAMBDABUS-SANDBOX -d 169.254.0.0/16 -j REJECT" in text
    assert "-A LAMBDABUS-SANDBOX -d 127.0.0.0/8 -j REJECT" in text
    assert "-A LAMBDABUS-SANDBOX -m addrtype --dst-type LOCAL -j REJECT" in text
    assert "-I OUTPUT 1 -m owner --uid-owner 100-199 -j LAMBDABUS-SANDBOX" in text
    assert not any(
        line.startswith("-I OUTPUT") for line in egress_restore(1, 2, jump=False).splitlines()
    )
    assert "-A LAMBDABUS-SANDBOX -d ::1/128 -j REJECT" in egress_restore(
        1, 2, ipv6=True, jump=False
    )


def test_sources_behind_a_closed_dir_are_exposed_from_its_topmost_blocked_ancestor() -> None:
    base = Path(tempfile.mkdtemp(prefix="lambdabus-sandbox-test-"))
    try:
        base.chmod(0o755)  # /tmp is open to all; pytest's tmp_path is not
        closed = base / "closed"
        (closed / "inner" / "py").mkdir(parents=True)
        (base / "open" / "code").mkdir(parents=True)
        closed.chmod(0o700)
        (closed / "inner").chmod(0o700)
        other = Identity(os.getuid() + 12345, os.getgid() + 12345)
        sources = [str(closed / "inner" / "py"), str(base / "open" / "code")]
        assert blocked_roots(sources, other) == {str(closed): [str(closed / "inner" / "py")]}
        assert blocked_roots(sources, Identity(os.getuid(), os.getgid())) == {}
    finally:
        shutil.rmtree(base)


async def test_a_pipe_read_that_times_out_leaves_no_reader_behind() -> None:
    """A timed-out read (bubblewrap that never reports) stops reading at once: no executor
    thread goes on reading the fd, whose number the next open() may be given."""
    read_end, write_end = os.pipe()
    try:
        with os.fdopen(read_end, "rb", buffering=0) as pipe, pytest.raises(TimeoutError):
            await asyncio.wait_for(read_pipe(pipe), 0.05)
        assert not [t for t in threading.enumerate() if t.name.startswith("asyncio_")]
        reused_r, reused_w = os.pipe()  # likely the same number again: nobody reads it
        os.write(reused_w, b"mine")
        await asyncio.sleep(0.05)
        assert os.read(reused_r, 16) == b"mine"
        os.close(reused_r)
        os.close(reused_w)
    finally:
        os.close(write_end)


async def test_a_pipe_is_read_to_its_end_or_to_a_size() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b'{"child-pid": 7}')
    os.close(write_end)
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        assert await read_pipe(pipe) == b'{"child-pid": 7}'
    read_end, write_end = os.pipe()
    os.write(write_end, b"12")
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        assert await read_pipe(pipe, 1) == b"1"
    os.close(write_end)
