"""`PYTHONPATH=<the runtime> python -sSB -m lambdabus_runtime.zygote CONTROL_FD PADDING`: one process with the runtime imported, from
which the deployer's pre-started Python runtimes are forked, so that their interpreter heap
(the imported standard library and runtime: ~8 MiB of each runtime started afresh) is shared
copy-on-write instead of private to each.

The sandbox is still bubblewrap's. The deployer starts a slot's sandbox as for any runtime,
with a placeholder as its command (`lambdabus_deployer.zygote.STUB`: a shell that exits with
the status it reads), and
sends the zygote, over the socket on CONTROL_FD (SOCK_SEQPACKET, one request a message), the
placeholder's host pid, the slot's cgroup files, the sandbox's env, and five fds (the
runtime's stdin, stdout and stderr, the write end of the placeholder's stdin, and a pidfd of
the placeholder: what the zygote opens of `/proc/<pid>` is the sandbox's only if that process
still lives once it is opened, and runs as the sandbox's uid). Then:

- the zygote forks a *keeper*, which stays in the host's namespaces, except that its
  children are born in the sandbox's pid namespace; the keeper forks the *runtime*, waits for
  it, and writes its exit status to the placeholder, which exits with it (so bubblewrap's
  status file says the runtime's code, as for a runtime that is bubblewrap's own command);
- the runtime, still host root: joins the slot's cgroups, takes the placeholder's rlimits,
  drops its supplementary groups, enters the sandbox's net, uts, ipc, cgroup and mount
  namespaces (its root and working directory become the sandbox's), then the user namespace
  bubblewrap made for the command, becomes the sandbox's uid and gid, drops every capability
  (permitted, effective, inheritable, ambient, bounding set: entering a user namespace gives
  them all there, and a uid change from an unmapped uid clears none), sets no_new_privs and
  (in a session of its own) the parent-death signal, closes every other fd, takes the sandbox's env and paths, adds the
  sandbox's site-packages (its `.pth` files run now, in the sandbox, as its uid: never in the
  zygote) and waits on stdin for its function, as `python -m lambdabus_runtime --pool` does.

The zygote itself imports only the standard library and this package (no site, no env), holds
no function's data (a function's env and code reach the runtime after the fork, over its
stdin), and answers only the deployer that started it. It ignores SIGCHLD (its keepers are
reaped by the kernel) and dies with the deployer.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import ctypes.util
import json
import os
import resource
import signal
import socket
import sys
from typing import Any

# Everything the runtime may import later is imported now: after the fork, the package's
# host path is not in the sandbox (`__path__` is rewritten to where it is inside).
import lambdabus_runtime.__main__ as runtime_main
import lambdabus_runtime.capture
import lambdabus_runtime.cli
import lambdabus_runtime.entrypoint
import lambdabus_runtime.relay
import lambdabus_runtime.request
import lambdabus_runtime.response
import lambdabus_runtime.server
import lambdabus_runtime.wire
import lambdabus_runtime.workers  # noqa: F401 - imported to be shared

MAX_REQUEST = 256 * 1024

_CLONE_NEWNS = 0x00020000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# (namespace file, flag), in the order they are entered; user last: entering it gives the
# capabilities of that namespace only, and the others are owned by its parent.
_NAMESPACES = (
    ("net", _CLONE_NEWNET),
    ("uts", _CLONE_NEWUTS),
    ("ipc", _CLONE_NEWIPC),
    ("cgroup", _CLONE_NEWCGROUP),
    ("mnt", _CLONE_NEWNS),
)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _open(path: str, directory: bool = False) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0))


def _setns(fd: int, flag: int, what: str) -> None:
    _check(_libc.setns(fd, flag), f"setns {what}")


def _drop_capabilities() -> None:
    """Every capability, in every set, for good."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    _check(_libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


# /proc/<pid>/limits' names of the rlimits a runtime takes from its sandbox's command (read
# there: prlimit(2) on another uid's process needs CAP_SYS_RESOURCE, which root may lack).
_RLIMITS = {
    "Max cpu time": resource.RLIMIT_CPU,
    "Max file size": resource.RLIMIT_FSIZE,
    "Max data size": resource.RLIMIT_DATA,
    "Max stack size": resource.RLIMIT_STACK,
    "Max core file size": resource.RLIMIT_CORE,
    "Max processes": resource.RLIMIT_NPROC,
    "Max open files": resource.RLIMIT_NOFILE,
    "Max locked memory": resource.RLIMIT_MEMLOCK,
    "Max address space": resource.RLIMIT_AS,
    "Max msgqueue size": resource.RLIMIT_MSGQUEUE,
}


def rlimits_of(text: str) -> list[tuple[int, tuple[int, int]]]:
    """The rlimits `/proc/<pid>/limits` says, soft and hard."""

    def value(word: str) -> int:
        return resource.RLIM_INFINITY if word == "unlimited" else int(word)

    found = []
    for line in text.splitlines()[1:]:
        name = line[:26].strip()
        if name in _RLIMITS:
            soft, hard = line[26:].split()[:2]
            found.append((_RLIMITS[name], (value(soft), value(hard))))
    return found


class Target:
    """What the zygote opens of the sandbox before it answers the deployer, for the runtime:
    born in the sandbox's pid namespace, the placeholder's host pid means nothing to it, and
    once the deployer has its answer the slot's cgroup may be renamed (specialised)."""

    def __init__(self, pid: int, pidfd: int, uid: int, cgroup_procs: list[str]) -> None:
        self.cgroups = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in cgroup_procs]
        with open(f"/proc/{pid}/limits") as f:
            self.limits = rlimits_of(f.read())
        with open(f"/proc/{pid}/status") as f:
            uids = next(line.split()[1:] for line in f if line.startswith("Uid:"))
        self.namespaces = [
            (name, flag, _open(f"/proc/{pid}/ns/{name}")) for name, flag in _NAMESPACES
        ]
        self.user = _open(f"/proc/{pid}/ns/user")
        self.pid_ns = _open(f"/proc/{pid}/ns/pid")
        self.root = _open(f"/proc/{pid}/root", directory=True)
        # All of it opened while `pid` was the sandbox's command, run as the sandbox's uid:
        # the process the deployer's pidfd names is alive (so its pid was not reused).
        try:
            signal.pidfd_send_signal(pidfd, 0)
        except OSError as exc:
            self.close()
            raise ValueError(f"the sandbox's command ({pid}) is gone") from exc
        if uids != [str(uid)] * 4:
            self.close()
            raise ValueError(f"{pid} does not run as the sandbox's uid {uid}: {uids}")

    def fds(self) -> list[int]:
        return [
            *self.cgroups,
            *(fd for _, _, fd in self.namespaces),
            self.user,
            self.pid_ns,
            self.root,
        ]

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)


def _enter(request: dict[str, Any], target: Target) -> None:
    """In the runtime, as host root: become a process of the sandbox (see the module's doc)."""
    for procs in target.cgroups:
        os.write(procs, b"0")  # this process (its pid here is the sandbox's)
    for res, limit in target.limits:
        resource.setrlimit(res, limit)
    os.setgroups([])
    for name, flag, fd in target.namespaces:
        _setns(fd, flag, name)
    # The sandbox's root, as the placeholder sees it (bubblewrap may have chrooted into it).
    os.fchdir(target.root)
    os.chroot(".")
    _setns(target.user, _CLONE_NEWUSER, "user")
    gid, uid = int(request["gid"]), int(request["uid"])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _drop_capabilities()
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")
    os.chdir(request["chdir"])


def _become_runtime(request: dict[str, Any]) -> None:
    """In the sandbox now: the sandbox's env, paths and site-packages, as a runtime started
    there would have them."""
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in request["env"].items()})
    inside = [str(p) for p in request["pythonpath"]]
    host = list(request["host_pythonpath"])
    sys.path[:] = [os.getcwd(), *inside, *(p for p in sys.path if p not in host)]
    import lambdabus_runtime

    package = [os.path.join(p, "lambdabus_runtime") for p in inside]
    lambdabus_runtime.__path__[:] = [p for p in package if os.path.isdir(p)]
    sys.path_importer_cache.clear()
    sys.executable = sys._base_executable = str(request["executable"])  # type: ignore[attr-defined]
    sys.dont_write_bytecode = True
    _add_site_packages(str(request["executable"]))
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def _add_site_packages(executable: str) -> None:
    """What `site` does at a start of `executable` that matters to a function: the venv its
    pyvenv.cfg names (sys.prefix), that venv's site-packages with their `.pth` files (run
    now: in the sandbox, as its uid), the base installation's where the venv includes them,
    and `sitecustomize`. Not `site.main()`: it rewrites every imported module's `__file__`,
    and so copies the pages the zygote shares."""
    import site

    bin_dir = os.path.dirname(executable)
    prefix = os.path.dirname(bin_dir)
    config = next(
        (
            c
            for c in (os.path.join(bin_dir, "pyvenv.cfg"), os.path.join(prefix, "pyvenv.cfg"))
            if os.path.isfile(c)
        ),
        None,
    )
    prefixes = [sys.base_prefix]
    if config is not None:
        sys.prefix = sys.exec_prefix = prefix
        with open(config) as f:
            settings = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition("=") for line in f)
            }
        system = settings.get("include-system-site-packages", "false").lower() == "true"
        prefixes = [prefix, sys.base_prefix] if system else [prefix]
    known: set[str] = set()
    for directory in site.getsitepackages(prefixes):
        if os.path.isdir(directory):
            site.addsitedir(directory, known)
    site.execsitecustomize()


def _runtime(request: dict[str, Any], fds: list[int], target: Target) -> None:
    """The forked runtime's whole life; never returns."""
    code = 70  # EX_SOFTWARE: it could not become the sandbox's runtime
    try:
        os.setsid()  # a session of its own, as bubblewrap's --new-session gives its command
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for number, fd in zip((0, 1, 2), fds[:3], strict=True):
            os.dup2(fd, number)
        _enter(request, target)
        # (after the uid change, which clears it) dies with its keeper, which waits for it
        _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        os.closerange(3, 2**31 - 1)
        _become_runtime(request)
        # As a runtime the pool started shows itself (the zygote's command line is ours).
        with contextlib.suppress(BaseException):
            runtime_main.set_title(
                [os.fsencode(sys.executable), b"-m", b"lambdabus_runtime", b"--pool", b" " * 512]
            )
        code = runtime_main.main(["--pool"])
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            import traceback

            where = traceback.extract_tb(exc.__traceback__)[-1]
            os.write(
                2,
                f"lambdabus-runtime: cannot start in the sandbox: {exc!r} "
                f"(at {where.name}, line {where.lineno})\n".encode(),
            )
    finally:
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def _keeper(request: dict[str, Any], fds: list[int], target: Target) -> None:
    """Fork the runtime into the sandbox's pid namespace, wait for it, tell the placeholder
    its exit status; never returns."""
    status = 70
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _setns(target.pid_ns, _CLONE_NEWPID, "pid")
        child = os.fork()
        if child == 0:
            _runtime(request, fds, target)
        for fd in fds[:3]:
            os.close(fd)
        _, waited = os.waitpid(child, 0)
        status = os.waitstatus_to_exitcode(waited)
        if status < 0:
            status = 128 - status
    except BaseException as exc:
        with contextlib.suppress(BaseException):
            os.write(fds[2], f"lambdabus-runtime: cannot fork into the sandbox: {exc!r}\n".encode())
    finally:
        with contextlib.suppress(BaseException):
            os.write(fds[3], f"{status}\n".encode())
        os._exit(0)


def _receive(control: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    fds = array.array("i")
    message, ancillary, _, _ = control.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(16 * fds.itemsize))
    if not message:
        return None
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return json.loads(message), list(fds)


def serve(control: socket.socket) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # keepers are reaped by the kernel
    while True:
        received = _receive(control)
        if received is None:
            return 0  # the deployer is gone
        request, fds = received
        target: Target | None = None
        try:
            if len(fds) != 5:
                raise ValueError(f"5 fds expected, {len(fds)} received")
            target = Target(
                int(request["pid"]), fds[4], int(request["uid"]), list(request["cgroup_procs"])
            )
            keeper = os.fork()
            if keeper == 0:
                control.close()
                _keeper(request, fds, target)
            control.send(json.dumps({"keeper": keeper}).encode())
        except Exception as exc:
            control.send(json.dumps({"error": repr(exc)}).encode())
        finally:
            for fd in fds:
                os.close(fd)
            if target is not None:
                target.close()


def main(control_fd: int) -> int:
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    if os.getppid() == 1:
        return 0  # the deployer is already gone
    control = socket.socket(fileno=control_fd)
    del sys.path[0]  # the working directory `-m` puts first (its own is set in the sandbox)
    import gc
    import site  # noqa: F401 - imported, not run (-S): `site.main()` runs in the sandbox

    gc.collect()
    gc.freeze()  # the imported objects stay out of the collector's way: fewer pages touched
    control.send(b'{"ready": true}')
    return serve(control)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
