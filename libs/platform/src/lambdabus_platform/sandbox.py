"""The sandbox for untrusted code (function instances, builds): bubblewrap around a command,
run as an unprivileged host uid, with an allowlisted read-only view of the host, no network
but its own loopback, or outbound network through slirp4netns.

Pure parts (`bwrap_args`, `slirp_args`, `identity_for`, `system_binds`) decide; `launch` does.

What a sandbox gets: /usr, /bin, /sbin, /lib*, /etc read-only (nothing else of the host: not
/root, /home, /work, the data dir, the repo checkout); the binds its caller names; a private
/proc (pid namespace) and a minimal /dev; new user, pid, ipc, uts, net and cgroup namespaces;
no capabilities; its own session. When we are root, bubblewrap itself runs as an unprivileged
uid (one per sandbox key, from a configured range) so the sandbox is nobody special on the
host either; directories the caller binds that this uid could not reach (Python under
/root/.pyenv) are exposed to it in a private mount namespace of the launcher only.
Network "outbound": slirp4netns (as the same uid) gives the sandbox a NAT to the outside,
without the host's loopback; host firewall rules (`egress_restore`) also refuse its traffic to
link-local addresses and to the host's own addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol

from lambdabus_platform.errors import PermanentError

NetworkMode = Literal["none", "outbound"]
SandboxMode = Literal["auto", "bubblewrap", "none"]

# The whole environment of bubblewrap and slirp4netns themselves (never a user's values).
LAUNCHER_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
# The host paths every sandbox sees, read-only (symlinks, such as /lib -> usr/lib, stay links).
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEFAULT_UID_BASE = 1_300_000_000
DEFAULT_UID_COUNT = 65536
TAP = "tap0"
FIREWALL_CHAIN = "LAMBDABUS-SANDBOX"
FIREWALL_LOCK = "/run/lambdabus-firewall.lock"

_CLONE_NEWNS = 0x00020000
_MS_BIND = 4096
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_MS_NOSUID = 2
_PR_SET_PDEATHSIG = 1
_NS_GET_USERNS = 0xB701
_libc = ctypes.CDLL(None, use_errno=True)


class SandboxUnavailable(PermanentError):
    code = "sandbox_unavailable"


class SandboxStartError(PermanentError):
    code = "sandbox_start_failed"


@dataclass(frozen=True)
class Identity:
    """Who the sandbox is on the host (and inside: the same numbers)."""

    uid: int
    gid: int


@dataclass(frozen=True)
class Sandbox:
    """What this machine offers, detected once (`detect_sandbox`)."""

    kind: Literal["bubblewrap", "none"]
    bwrap: str | None = None
    slirp4netns: str | None = None
    reason: str = ""
    # Switch to an unprivileged uid from this range (only when we are root).
    switch_uid: bool = False
    uid_base: int = DEFAULT_UID_BASE
    uid_count: int = DEFAULT_UID_COUNT
    # The host path layout of SYSTEM_PATHS: ("dir", path) | ("symlink", path, target).
    layout: tuple[tuple[str, ...], ...] = ()

    @property
    def enabled(self) -> bool:
        return self.kind == "bubblewrap" and self.bwrap is not None

    @property
    def outbound(self) -> bool:
        """Whether `network: outbound` can be given (slirp4netns is there)."""
        return self.enabled and self.slirp4netns is not None

    def identity(self, key: str) -> Identity:
        """The host uid/gid of the sandbox named `key` (e.g. a function's ns/name)."""
        if not self.switch_uid:
            return Identity(os.getuid(), os.getgid())
        return identity_for(key, self.uid_base, self.uid_count)


@dataclass(frozen=True)
class Bind:
    source: str
    dest: str
    writable: bool = False


@dataclass(frozen=True)
class DataFile:
    """A file made from bytes inside the sandbox (never on the host's disk)."""

    dest: str
    content: bytes = field(repr=False)  # env values and secrets: never in a repr or a log
    mode: int = 0o400


@dataclass(frozen=True)
class SandboxSpec:
    """One sandboxed command: what it runs, sees and may reach."""

    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    binds: tuple[Bind, ...] = ()
    files: tuple[DataFile, ...] = ()
    chdir: str = "/"
    network: NetworkMode = "none"
    hostname: str = "sandbox"


def identity_for(key: str, base: int, count: int) -> Identity:
    """A stable uid (= gid) for a key: tenants differ on the host too (up to hash collisions
    within `count`)."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    uid = base + digest % count
    return Identity(uid, uid)


def host_layout(paths: Iterable[str] = SYSTEM_PATHS) -> tuple[tuple[str, ...], ...]:
    """How this host lays out the system paths (done once, at detection)."""
    out: list[tuple[str, ...]] = []
    for path in paths:
        if os.path.islink(path):
            out.append(("symlink", path, os.readlink(path)))
        elif os.path.isdir(path):
            out.append(("dir", path))
    return tuple(out)


def system_binds(layout: Sequence[tuple[str, ...]]) -> list[str]:
    args: list[str] = []
    for entry in layout:
        if entry[0] == "symlink":
            args += ["--symlink", entry[2], entry[1]]
        else:
            args += ["--ro-bind", entry[1], entry[1]]
    return args


def bwrap_args(
    spec: SandboxSpec,
    *,
    layout: Sequence[tuple[str, ...]],
    identity: Identity,
    file_fds: Sequence[int],
    info_fd: int | None = None,
    block_fd: int | None = None,
    status_fd: int | None = None,
    die_with_parent: bool = True,
) -> list[str]:
    """bubblewrap's options (without the program): an allowlisted view of the host, then the
    spec's binds and files in order, then its environment (bubblewrap's own stays ours).
    Without `die_with_parent` the sandbox outlives its launcher (a detached instance)."""
    if len(file_fds) != len(spec.files):
        raise ValueError("one fd per data file")
    args = [
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--uid",
        str(identity.uid),
        "--gid",
        str(identity.gid),
        "--hostname",
        spec.hostname,
        *(["--die-with-parent"] if die_with_parent else []),
        "--new-session",
        "--cap-drop",
        "ALL",
        *system_binds(layout),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--dir",
        "/tmp",
    ]
    # Parents before children: a bind over /tmp must not hide one made inside it before.
    for bind in sorted(spec.binds, key=lambda b: len(Path(b.dest).parts)):
        args += ["--bind" if bind.writable else "--ro-bind", bind.source, bind.dest]
    for data, fd in zip(spec.files, file_fds, strict=True):
        args += ["--perms", f"{data.mode:04o}", "--ro-bind-data", str(fd), data.dest]
    args += ["--remount-ro", "/"]  # the sandbox's own root (a tmpfs) holds nothing to write
    args.append("--clearenv")
    for key, value in spec.env:
        args += ["--setenv", key, value]
    args += ["--chdir", spec.chdir]
    if info_fd is not None:
        args += ["--info-fd", str(info_fd)]
    if block_fd is not None:
        args += ["--block-fd", str(block_fd)]
    if status_fd is not None:
        args += ["--json-status-fd", str(status_fd)]
    return args


def slirp_args(*, userns_fd: int, netns_fd: int, ready_fd: int, exit_fd: int) -> list[str]:
    """slirp4netns's options for the sandbox whose network namespace (and the user namespace
    owning it) are open as these fds: NAT to the outside, no host loopback (127.0.0.0/8 and
    10.0.2.2 refused)."""
    return [
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        "--enable-seccomp",
        f"--ready-fd={ready_fd}",
        f"--exit-fd={exit_fd}",
        f"--userns-path=/proc/self/fd/{userns_fd}",
        "--netns-type=path",
        f"/proc/self/fd/{netns_fd}",
        TAP,
    ]


def egress_owner(uid_first: int, uid_last: int) -> list[str]:
    """The match of the sandboxes' traffic: made by their uids (slirp4netns runs as them)."""
    return ["-m", "owner", "--uid-owner", f"{uid_first}-{uid_last}"]


def egress_restore(uid_first: int, uid_last: int, *, ipv6: bool = False, jump: bool) -> str:
    """`iptables-restore --noflush` input (or ip6tables') that refuses the sandboxes' outbound
    traffic to link-local addresses (cloud metadata) and to any address of this host (its
    loopback and its own interfaces'), and, with `jump`, sends OUTPUT's traffic of their uids
    to it. One transaction: the chain's rules are replaced in a single commit, so a deployer or
    builder starting while sandboxes run never leaves them a moment with an empty chain (as a
    flush, then appends, did)."""
    refuse = (
        [["-d", "fe80::/10"], ["-d", "::1/128"], ["-m", "addrtype", "--dst-type", "LOCAL"]]
        if ipv6
        else [
            ["-d", "169.254.0.0/16"],
            ["-d", "127.0.0.0/8"],
            ["-m", "addrtype", "--dst-type", "LOCAL"],
            ["-m", "addrtype", "--dst-type", "BROADCAST"],
        ]
    )
    lines = ["*filter", f":{FIREWALL_CHAIN} - [0:0]"]  # created, or emptied in this commit
    lines += [" ".join(["-A", FIREWALL_CHAIN, *match, "-j", "REJECT"]) for match in refuse]
    if jump:
        lines.append(
            " ".join(["-I", "OUTPUT", "1", *egress_owner(uid_first, uid_last)])
            + f" -j {FIREWALL_CHAIN}"
        )
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# -- reaching bind sources as the sandbox's uid -----------------------------------------------


def _traversable(st: os.stat_result, identity: Identity) -> bool:
    if st.st_uid == identity.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == identity.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def blocked_roots(sources: Iterable[str], identity: Identity) -> dict[str, list[str]]:
    """For sources the uid cannot reach (an ancestor it may not traverse, like /root 0700):
    the topmost such ancestor → the sources under it. Those are exposed in the launcher's
    private mount namespace (`_expose`)."""
    out: dict[str, list[str]] = {}
    for source in sources:
        path = Path(source)
        for ancestor in reversed(path.parents):
            if str(ancestor) == "/":
                continue
            try:
                st = os.stat(ancestor)
            except OSError:
                break
            if not _traversable(st, identity):
                out.setdefault(str(ancestor), []).append(source)
                break
    for root in list(out):  # keep the topmost only
        if any(other != root and root.startswith(other + "/") for other in out):
            out[next(o for o in out if root.startswith(o + "/"))].extend(out.pop(root))
    return out


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _private_mounts() -> None:
    _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount("none", "/", None, _MS_REC | _MS_PRIVATE, None)


def _expose(blocked: Mapping[str, Sequence[str]]) -> None:
    """In a private mount namespace (root, before dropping privileges): cover each blocked
    ancestor with a traversable tmpfs holding only the binds' sources at their paths."""
    for root, sources in blocked.items():
        fds = [os.open(s, os.O_PATH) for s in sources]
        _mount("tmpfs", root, "tmpfs", _MS_NOSUID, "mode=0755")
        for source, fd in zip(sources, fds, strict=True):
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(source, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(source), exist_ok=True)
                os.close(os.open(source, os.O_CREAT | os.O_WRONLY, 0o600))
            _mount(f"/proc/self/fd/{fd}", source, None, _MS_BIND | _MS_REC, None)
            os.close(fd)


def _private_tun(identity: Identity) -> None:
    """slirp4netns opens /dev/net/tun as the sandbox's uid: give it a private node it owns
    when the host's is root-only (no udev here), without changing the host's."""
    try:
        st = os.stat("/dev/net/tun")
    except OSError:
        return
    if st.st_mode & 0o006 == 0o006:
        return
    _mount("tmpfs", "/dev/net", "tmpfs", _MS_NOSUID, "mode=0755")
    os.mknod("/dev/net/tun", 0o600 | stat.S_IFCHR, st.st_rdev)
    os.chown("/dev/net/tun", identity.uid, identity.gid)


def _drop(identity: Identity) -> None:
    os.setgroups([])
    os.setgid(identity.gid)
    os.setuid(identity.uid)
    if os.getuid() != identity.uid or os.geteuid() != identity.uid:
        raise OSError(errno.EPERM, "could not drop privileges")


def _child_setup(
    *,
    hook: Callable[[], None] | None,
    identity: Identity | None,
    blocked: Mapping[str, Sequence[str]],
    tun: bool = False,
    die_with_parent: bool = True,
) -> Callable[[], None]:
    def setup() -> None:  # runs in the child between fork and exec
        if hook is not None:
            hook()  # as root still: join a cgroup, set rlimits
        if identity is None:
            return
        if blocked or tun:
            _private_mounts()
            _expose(blocked)
            if tun:
                _private_tun(identity)
        _drop(identity)
        if die_with_parent:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return setup


# -- launching ----------------------------------------------------------------------------


class ChildProcess(Protocol):
    """What the platform uses of a child process: asyncio's, or a `Spawned` one."""

    stdin: asyncio.StreamWriter | None
    stdout: asyncio.StreamReader | None
    stderr: asyncio.StreamReader | None

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, signal: int) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


def _popen(argv: Sequence[str], options: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, **options)


class Spawned:
    """A child started by `subprocess.Popen` in a worker thread, and reaped by a thread of its
    own (as asyncio's ThreadedChildWatcher does: also once nobody awaits it, e.g. an
    instance a stopping deployer leaves running).

    asyncio starts a subprocess on the event loop's thread, and with a `preexec_fn` (cgroups,
    the uid switch) CPython must fork the whole parent and wait for
    the child's set-up to reach exec: for a deployer that blocked its loop 25-35 ms per
    sandbox (measured while the pool refilled: the wake of the next cold start waited that
    long). In a thread, only the fork itself holds the interpreter. Its output goes to files
    or fds the caller gives (no asyncio pipes)."""

    stdin: asyncio.StreamWriter | None = None
    stdout: asyncio.StreamReader | None = None
    stderr: asyncio.StreamReader | None = None

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._popen = popen
        self._ended: asyncio.Future[int] = loop.create_future()
        try:
            threading.Thread(
                target=self._reap, args=(loop,), name=f"reaper {popen.pid}", daemon=True
            ).start()
        except BaseException:  # no thread to be had: no child nobody would reap
            popen.kill()
            popen.wait()
            raise

    def _reap(self, loop: asyncio.AbstractEventLoop) -> None:
        code = self._popen.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits it
            loop.call_soon_threadsafe(self._set, code)

    def _set(self, code: int) -> None:
        if not self._ended.done():
            self._ended.set_result(code)

    @classmethod
    async def start(cls, argv: Sequence[str], **options: Any) -> Spawned:
        loop = asyncio.get_running_loop()
        starting = loop.run_in_executor(None, functools.partial(_popen, argv, options))
        cancelled: asyncio.CancelledError | None = None
        while True:
            try:
                popen = await asyncio.shield(starting)
                break
            except asyncio.CancelledError as exc:
                # Not before the child exec'd: the caller closes the fds it passes (a memfd
                # of secrets, pipes) when this returns, and their numbers would be reused.
                cancelled = exc
        spawned = cls(popen, loop)
        if cancelled is not None:
            spawned.kill()  # a cancelled start leaves no child running
            raise cancelled
        return spawned

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode  # set when its reaper reaped it

    async def wait(self) -> int:
        return await asyncio.shield(self._ended)

    def send_signal(self, signal: int) -> None:
        if self._popen.returncode is None:  # never once reaped: its pid may be reused
            os.kill(self._popen.pid, signal)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclass
class SandboxProcess:
    """A running sandbox: bubblewrap (`process`), its pid-namespace init on the host
    (`child_pid`), and slirp4netns when it has outbound network."""

    process: ChildProcess
    identity: Identity
    child_pid: int | None = None
    slirp: ChildProcess | None = None
    network: NetworkMode = "none"
    _exit_w: int | None = field(default=None, repr=False)
    _slirp_err: _Head | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def piped(self) -> asyncio.subprocess.Process:
        """The asyncio process of a sandbox launched with pipes (not `detached` to files)."""
        assert isinstance(self.process, asyncio.subprocess.Process)
        return self.process

    def payload_pids(self) -> list[int]:
        """The host pids of the sandbox's processes (the command, its descendants, a runtime
        forked into it)."""
        return members(self.child_pid) if self.child_pid is not None else []

    def signal(self, sig: int) -> None:
        """Signal the command (and its descendants), not bubblewrap: it would not pass the
        signal on, and its death SIGKILLs the sandbox before a graceful exit."""
        for pid in self.payload_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL the sandbox: its pid 1 (the whole pid namespace goes with it), then
        bubblewrap. The pid 1 is bubblewrap's child, so its pid is not reused while
        bubblewrap runs. Not told yet (a start cut short before bubblewrap reported it), it is
        found as bubblewrap's child: a detached sandbox's pid 1 has no parent-death signal and
        would outlive bubblewrap, waiting for ever."""
        if self.process.returncode is None:
            first = [self.child_pid] if self.child_pid is not None else []
            if not first:
                first = _children_map().get(self.process.pid, [])
            for pid in first:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def close(self) -> None:
        """Stop slirp4netns (after the sandbox ended, or with it)."""
        if self._exit_w is not None:
            os.close(self._exit_w)
            self._exit_w = None
        if self.slirp is not None and self.slirp.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.slirp.wait()), 2)
            if self.slirp.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    self.slirp.kill()
                await self.slirp.wait()
        if self._slirp_err is not None:
            self._slirp_err.close()
            self._slirp_err = None


def descendants(root: int) -> list[int]:
    """The host pids of `root`'s descendants (not `root` itself)."""
    children = _children_map()
    out: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def members(pid1: int) -> list[int]:
    """The host pids of the processes in the pid namespace whose init is `pid1` (a sandbox's
    pid 1), other than it: its descendants, and a runtime forked into the sandbox from outside
    (`lambdabus_runtime.zygote`), which is none."""
    try:
        namespace = os.readlink(f"/proc/{pid1}/ns/pid")
    except OSError:
        return []
    out: list[int] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid1:
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                    out.append(int(entry))
            except OSError:
                continue
    return out


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        ppid = int(data[data.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _memfd(data: DataFile) -> int:
    fd = os.memfd_create("lambdabus-data", 0)
    view = memoryview(data.content)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


async def read_pipe(pipe: BinaryIO, size: int = -1) -> bytes:
    """Read `pipe` to its end (or at most `size` bytes) on the event loop; the caller closes
    it (`with os.fdopen(fd, "rb", buffering=0) as pipe`). Never in a thread: a thread cancelled by
    a timeout would go on reading, holding an executor worker the loop's close waits for,
    and would read whatever file the fd's number is given to next."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe
    )
    try:
        return await reader.read(size)
    finally:
        transport.close()


async def launch(
    sandbox: Sandbox,
    spec: SandboxSpec,
    *,
    key: str,
    preexec: Callable[[], None] | None = None,
    stdin: int | None = asyncio.subprocess.DEVNULL,
    stdout: int | None = asyncio.subprocess.PIPE,
    stderr: int | None = asyncio.subprocess.PIPE,
    start_timeout: float = 10.0,
    detached: bool = False,
    status_fd: int | None = None,
) -> SandboxProcess:
    """Start `spec` in a sandbox as the identity of `key`. `preexec` runs in the child before
    privileges are dropped. With outbound network the command starts once slirp4netns has
    configured it. Raises SandboxStartError when the sandbox cannot be set up.

    `detached`: the sandbox (and its slirp4netns) outlive this process: no --die-with-parent,
    no parent-death signal, and slirp4netns ends when the sandbox does (the sandbox, not we,
    holds the write end of its exit pipe). `status_fd`: bubblewrap writes its JSON status
    there, the command's exit code included, for whoever watches it after us."""
    if not sandbox.enabled or sandbox.bwrap is None:
        raise SandboxUnavailable(sandbox.reason or "bubblewrap is not available")
    identity = sandbox.identity(key)
    network = spec.network if sandbox.outbound else "none"
    switch = identity if sandbox.switch_uid else None
    sources = [b.source for b in spec.binds]
    blocked = blocked_roots(sources, identity) if switch else {}
    file_fds = [_memfd(f) for f in spec.files]
    info_r, info_w = os.pipe()
    block_r = block_w = None
    if network == "outbound":
        block_r, block_w = os.pipe()
    exit_r = exit_w = None
    if detached and network == "outbound":
        exit_r, exit_w = os.pipe()
    extra = [fd for fd in (block_r, exit_w, status_fd) if fd is not None]
    pass_fds = [*file_fds, info_w, *extra]
    argv = [
        sandbox.bwrap,
        *bwrap_args(
            spec,
            layout=sandbox.layout,
            identity=identity,
            file_fds=file_fds,
            info_fd=info_w,
            block_fd=block_r,
            status_fd=status_fd,
            die_with_parent=not detached,
        ),
        "--",
        *spec.command,
    ]
    options: dict[str, Any] = {
        "stdin": stdin,
        "stdout": stdout,
        "stderr": stderr,
        "env": dict(LAUNCHER_ENV),
        "cwd": "/",
        "start_new_session": True,
        "pass_fds": pass_fds,
        "preexec_fn": _child_setup(
            hook=preexec, identity=switch, blocked=blocked, die_with_parent=not detached
        ),
    }
    process: ChildProcess
    try:
        if detached and _plain_fds(stdin, stdout, stderr):
            # An instance or a pre-started runtime: started off the event loop (`Spawned`).
            process = await Spawned.start(argv, **options)
        else:
            process = await asyncio.create_subprocess_exec(*argv, **options)
    except BaseException:
        for fd in (info_r, exit_r, exit_w, block_w):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in (*file_fds, info_w, *([block_r] if block_r is not None else [])):
            os.close(fd)
    if exit_w is not None:
        os.close(exit_w)  # the sandbox holds it now
    handle = SandboxProcess(process=process, identity=identity, network=network)
    try:
        with os.fdopen(info_r, "rb", buffering=0) as pipe:
            info = await asyncio.wait_for(read_pipe(pipe), start_timeout)
        if info:
            handle.child_pid = int(json.loads(info)["child-pid"])
        if network == "outbound":
            assert block_w is not None
            if handle.child_pid is None:
                raise SandboxStartError("bubblewrap ended before its sandbox was set up")
            slirp_exit, exit_r = exit_r, None  # _start_slirp closes it
            await _start_slirp(sandbox, handle, identity, start_timeout, exit_r=slirp_exit)
            try:
                os.write(block_w, b"1")
            except BrokenPipeError:
                code = await asyncio.wait_for(process.wait(), start_timeout)
                raise SandboxStartError(
                    f"the sandbox ended (bubblewrap exit status {code}) before its command started"
                ) from None
    except BaseException:
        handle.kill()
        await process.wait()
        await handle.close()
        raise
    finally:
        if block_w is not None:
            os.close(block_w)
        if exit_r is not None:
            os.close(exit_r)
    return handle


def _plain_fds(*streams: int | None) -> bool:
    """No asyncio pipe asked for: each is None, DEVNULL or an fd of the caller's."""
    return all(stream is None or stream == subprocess.DEVNULL or stream >= 0 for stream in streams)


async def _start_slirp(
    sandbox: Sandbox,
    handle: SandboxProcess,
    identity: Identity,
    timeout: float,
    *,
    exit_r: int | None = None,
) -> None:
    """slirp4netns for the sandbox; it ends when its exit pipe's write end closes: ours, or
    (detached, `exit_r` given) the sandbox's."""
    assert sandbox.slirp4netns is not None
    assert handle.child_pid is not None
    # The user namespace that owns the sandbox's network namespace: bubblewrap nests another
    # one for the command (to switch uid, --disable-userns), in which slirp4netns could not
    # configure the network.
    netns_fd = os.open(f"/proc/{handle.child_pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        userns_fd = fcntl.ioctl(netns_fd, _NS_GET_USERNS)
    except OSError:
        os.close(netns_fd)
        raise
    ready_r, ready_w = os.pipe()
    detached = exit_r is not None
    exit_w: int | None = None
    if exit_r is None:
        exit_r, exit_w = os.pipe()
    switch = identity if sandbox.switch_uid else None
    err_r, err_w = os.pipe()
    argv = [
        sandbox.slirp4netns,
        *slirp_args(userns_fd=userns_fd, netns_fd=netns_fd, ready_fd=ready_w, exit_fd=exit_r),
    ]
    options: dict[str, Any] = {
        "stdin": subprocess.DEVNULL,
        "stdout": subprocess.DEVNULL,
        "stderr": err_w,
        "env": dict(LAUNCHER_ENV),
        "cwd": "/",
        "start_new_session": True,
        "pass_fds": (ready_w, exit_r, userns_fd, netns_fd),
        "preexec_fn": _child_setup(
            hook=None,
            identity=switch,
            blocked={},
            tun=switch is not None,
            die_with_parent=not detached,
        ),
    }
    slirp: ChildProcess
    try:
        if detached:  # off the loop (`Spawned`); not otherwise: its parent-death signal
            slirp = await Spawned.start(argv, **options)  # would follow the forking thread
        else:
            slirp = await asyncio.create_subprocess_exec(*argv, **options)
    except BaseException:
        for fd in (ready_r, ready_w, exit_r, exit_w, err_r):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        os.close(netns_fd)
        os.close(userns_fd)
        os.close(err_w)
    os.close(ready_w)
    os.close(exit_r)
    handle.slirp, handle._exit_w = slirp, exit_w
    handle._slirp_err = await _Head.follow(err_r)  # what it says, drained while it runs
    with os.fdopen(ready_r, "rb", buffering=0) as pipe:
        ready = await asyncio.wait_for(read_pipe(pipe, 1), timeout)
    if ready != b"1":
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(handle._slirp_err.ended, 1)
        detail = bytes(handle._slirp_err.head)
        raise SandboxStartError(
            "slirp4netns could not give the sandbox its network: "
            + (detail.decode(errors="replace").strip() or "it ended")
        )


class _Head(asyncio.Protocol):
    """Reads a child's output pipe until it ends, keeping its first 4 KiB (drained, so the
    child never blocks writing it)."""

    KEEP = 4096

    def __init__(self, ended: asyncio.Future[None]) -> None:
        self.head = bytearray()
        self.ended = ended
        self.transport: asyncio.BaseTransport | None = None

    @classmethod
    async def follow(cls, fd: int) -> _Head:
        loop = asyncio.get_running_loop()
        pipe = os.fdopen(fd, "rb", buffering=0)
        try:
            transport, protocol = await loop.connect_read_pipe(
                lambda: cls(loop.create_future()), pipe
            )
        except BaseException:
            pipe.close()
            raise
        protocol.transport = transport
        return protocol

    def data_received(self, data: bytes) -> None:
        room = self.KEEP - len(self.head)
        if room > 0:
            self.head += data[:room]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


# -- detection ----------------------------------------------------------------------------


async def detect_sandbox(
    mode: SandboxMode,
    *,
    uid_base: int = DEFAULT_UID_BASE,
    uid_count: int = DEFAULT_UID_COUNT,
    setting: str = "LAMBDABUS_DEPLOYER_SANDBOX",
) -> Sandbox:
    """Find bubblewrap (and slirp4netns) and check that a sandbox can be made here (it cannot
    in many containers). `bubblewrap` mode turns any failure into an error; `auto` falls back
    to no sandbox, saying why."""
    if mode == "none":
        return Sandbox("none", reason=f"sandbox disabled by settings ({setting}=none)")
    bwrap = shutil.which("bwrap")
    candidate = Sandbox(
        "bubblewrap",
        bwrap=bwrap,
        slirp4netns=shutil.which("slirp4netns"),
        switch_uid=os.geteuid() == 0,
        uid_base=uid_base,
        uid_count=uid_count,
        layout=host_layout(),
    )
    problem = "bubblewrap (bwrap) is not installed" if bwrap is None else await _probe(candidate)
    if problem:
        if mode == "bubblewrap":
            raise SandboxUnavailable(f"{problem}; install bubblewrap or set {setting}=auto")
        return Sandbox("none", reason=problem)
    if candidate.slirp4netns is None:
        return dataclasses.replace(
            candidate, reason="slirp4netns is not installed: functions get no outbound network"
        )
    return candidate


async def _probe(sandbox: Sandbox) -> str:
    true = shutil.which("true") or "/bin/true"
    try:
        handle = await launch(
            sandbox,
            SandboxSpec(command=(true,)),
            key="lambdabus-probe",
            stdout=asyncio.subprocess.DEVNULL,
        )
    except (OSError, PermanentError, ValueError) as exc:
        return f"bubblewrap cannot run: {exc}"
    except Exception as exc:  # a failing preexec surfaces as SubprocessError
        return f"bubblewrap cannot run: {exc}"
    try:
        assert handle.process.stderr is not None
        err = await asyncio.wait_for(handle.process.stderr.read(), 10)
        await asyncio.wait_for(handle.process.wait(), 10)
    except TimeoutError:
        handle.kill()
        await handle.process.wait()
        return "bubblewrap did not finish a trial run in 10 s"
    finally:
        await handle.close()
    if handle.process.returncode != 0:
        detail = err.decode(errors="replace").strip() or f"exit code {handle.process.returncode}"
        return f"bubblewrap cannot create a sandbox here ({detail})"
    return ""


async def _run(argv: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(LAUNCHER_ENV),
    )
    out, err = await process.communicate(stdin)
    return process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def install_egress_rules(sandbox: Sandbox) -> str:
    """Install the egress rules (`egress_restore`) for the sandbox uid range (root only,
    iptables needed); returns what was done, or why not (to log). Safe to run by several
    deployers and builders at once: the chain is replaced atomically, the jump is inserted only
    when missing, and copies of it that concurrent starts left are removed down to one."""
    if not sandbox.switch_uid:
        return "not root: no firewall rules for sandbox traffic"
    # One install at a time on this host (every deployer and builder is root here): the check
    # of the jump, the insert and the removal of copies must not interleave with another's.
    lock = os.open(FIREWALL_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        return await _install_egress_rules(sandbox)
    finally:
        os.close(lock)  # and the lock with it


async def _install_egress_rules(sandbox: Sandbox) -> str:
    last = sandbox.uid_base + sandbox.uid_count - 1
    owner = egress_owner(sandbox.uid_base, last)
    jump = ["OUTPUT", *owner, "-j", FIREWALL_CHAIN]
    results = []
    for program in ("iptables", "ip6tables"):
        exe, restore = shutil.which(program), shutil.which(f"{program}-restore")
        if exe is None or restore is None:
            results.append(f"{program} is not installed")
            continue
        has_jump = (await _run([exe, "-w", "-C", *jump]))[0] == 0
        text = egress_restore(
            sandbox.uid_base, last, ipv6=program == "ip6tables", jump=not has_jump
        )
        code, _, err = await _run([restore, "-w", "--noflush"], text.encode())
        if code:
            results.append(f"{program}: failed ({err.strip() or f'exit code {code}'})")
            continue
        listed = (await _run([exe, "-w", "-S", "OUTPUT"]))[1].splitlines()
        copies = listed.count(" ".join(["-A", *jump]))
        for _ in range(copies - 1):  # one always stays: never a moment without it
            await _run([exe, "-w", "-D", *jump])
        results.append(f"{program}: installed")
    return "; ".join(results)
