"""Memory of idle warm instances: N sandboxed runtimes of a trivial Python function, each
called once and then left idle, measured as PSS (proportional set size, from
`/proc/<pid>/smaps_rollup`: a page shared by k processes counts 1/k to each) over every process
of each sandbox: bubblewrap outside, bubblewrap as the sandbox's pid 1, the runtime, and
slirp4netns with `--network outbound`.

    uv run python bench/density.py [--counts 10,50,200] [--network none|outbound]
        [--modes fresh,pooled,forked]

`fresh`: the runtime started for its function, as the deployer starts an instance without the
pool; `pooled`: started as the pool starts one (`--pool`, the runtime imported) and then
specialised over stdin, as a pre-started runtime becomes an instance; `forked`: as `pooled`, but
the runtime forked from a zygote into the sandbox (`LAMBDABUS_DEPLOYER_POOL_FORK`), its
processes then being the two bubblewrap ones, the placeholder command (`sh`), the keeper that
waits for the runtime outside, the runtime, and a share of the zygote (its PSS / N). Sandboxes
are started as
the deployer starts them (bubblewrap as an unprivileged uid each when root, no cgroup), each
with a virtualenv as its function's environment, as the builder makes them. Prints
the mean PSS per instance by process and in total, and how many would fit in 8 GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lambdabus_deployer.zygote import STUB, Zygote
from lambdabus_platform.sandbox import (
    Bind,
    NetworkMode,
    Sandbox,
    SandboxProcess,
    detect_sandbox,
    launch,
    members,
)
from lambdabus_testing.sandboxed import RUNTIME_SRC, first_answer, runtime_command, runtime_spec

SOURCE = "async def main(request):\n    return {'ok': True}\n"
# The function's environment, as the builder makes one for a function without dependencies:
# a virtualenv of this Python, without the installation's site-packages.
DEPS = "/lambdabus/deps"
DEPS_PYTHON = f"{DEPS}/bin/python"


@dataclass
class Running:
    handle: SandboxProcess
    socket_dir: Path
    keeper: int | None = None
    sh: int | None = None  # the placeholder command of a forked runtime's sandbox


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def kind_of(pid: int, running: Running) -> str:
    if pid == running.handle.pid:
        return "bwrap"
    if pid == running.handle.child_pid:
        return "bwrap pid 1"
    if running.handle.slirp is not None and pid == running.handle.slirp.pid:
        return "slirp4netns"
    if pid == running.keeper:
        return "keeper"
    if pid == running.sh:
        return "sh"
    return "runtime"


async def start_one(
    sandbox: Sandbox,
    work: Path,
    index: int,
    mode: str,
    network: NetworkMode,
    zygote: Zygote | None = None,
) -> Running:
    code = work / "code"
    socket_dir = work / f"sock-{index}"
    socket_dir.mkdir(mode=0o777)
    socket_dir.chmod(0o777)  # whichever uid the sandbox runs as may listen there
    name = f"density/fn{index}"
    argv = [DEPS_PYTHON, *runtime_command(name)[1:]]
    command = [*argv[:3], "--pool", " " * 512] if mode != "fresh" else argv
    spec = runtime_spec(code, socket_dir, command, network=network)
    spec = dataclasses.replace(spec, binds=(*spec.binds, Bind(str(work / "env"), DEPS)))
    stdin: int | None = asyncio.subprocess.DEVNULL
    control_r = control_w = -1
    if mode != "fresh":
        control_r, control_w = os.pipe()
        stdin = control_r
    keeper = sh = None
    if mode == "forked":
        assert zygote is not None
        relay_r, relay_w = os.pipe()
        out_r, out_w = os.pipe()
        forked = dataclasses.replace(spec, command=STUB)
        handle = await launch(sandbox, forked, key=name, stdin=relay_r, stdout=None, stderr=None)
        assert handle.child_pid is not None
        request = {
            "cgroup_procs": [],
            "uid": handle.identity.uid,
            "gid": handle.identity.gid,
            "chdir": spec.chdir,
            "env": dict(spec.env),
            "executable": spec.command[0],
            "pythonpath": ["/lambdabus/runtime"],
            "host_pythonpath": [str(RUNTIME_SRC)],
        }
        keeper, sh = await zygote.fork_into(
            handle.child_pid, request, [control_r, out_w, 2, relay_w]
        )
        for fd in (relay_r, relay_w, out_w):
            os.close(fd)
        loop = asyncio.get_running_loop()
        stdout = asyncio.StreamReader()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stdout), os.fdopen(out_r, "rb", 0)
        )
    else:
        handle = await launch(
            sandbox, spec, key=name, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=None
        )
        assert handle.process.stdout is not None
        stdout = handle.process.stdout
    if mode != "fresh":
        os.close(control_r)
        await asyncio.sleep(0.05)  # imported and waiting, as in the pool
        os.write(control_w, json.dumps({"argv": argv[3:], "env": {}}).encode() + b"\n")
        os.close(control_w)
    line = await asyncio.wait_for(stdout.readline(), 60)
    if b"listening" not in line:
        raise RuntimeError(f"the sandboxed runtime did not start: {line!r}")
    await first_answer(socket_dir / "sock")
    return Running(handle, socket_dir, keeper, sh)


async def measure(count: int, mode: str, network: NetworkMode) -> dict[str, float]:
    sandbox = await detect_sandbox("bubblewrap")
    work = Path(tempfile.mkdtemp(prefix="lambdabus-density-"))
    work.chmod(0o755)
    (work / "code").mkdir(mode=0o755)
    (work / "code" / "lambda_main.py").write_text(SOURCE)
    subprocess.run(  # noqa: ASYNC221 - once, before anything is measured
        [os.path.realpath(sys.executable), "-m", "venv", "--without-pip", str(work / "env")],
        check=True,
    )
    running: list[Running] = []
    limit = asyncio.Semaphore(4)
    zygote = None
    if mode == "forked":
        python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        zygote = Zygote(python, [str(RUNTIME_SRC)], " " * 512)

    async def one(index: int) -> None:
        async with limit:
            running.append(await start_one(sandbox, work, index, mode, network, zygote))

    try:
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        took = time.perf_counter() - started
        await asyncio.sleep(2)  # idle
        totals: dict[str, int] = {}
        for item in running:
            assert item.handle.child_pid is not None
            pids = [item.handle.pid, item.handle.child_pid, *members(item.handle.child_pid)]
            for extra in (item.keeper, item.handle.slirp.pid if item.handle.slirp else None):
                if extra is not None:
                    pids.append(extra)
            for pid in dict.fromkeys(pids):
                kind = kind_of(pid, item)
                totals[kind] = totals.get(kind, 0) + pss_kib(pid)
        if zygote is not None:
            totals["zygote"] = pss_kib(zygote.pid or 0)
        result = {kind: kib / count / 1024 for kind, kib in totals.items()}
        result["total"] = sum(totals.values()) / count / 1024
        result["start_seconds"] = took
        return result
    finally:
        for item in running:
            item.handle.kill()
        for item in running:
            await item.handle.process.wait()
            await item.handle.close()
        if zygote is not None:
            await zygote.aclose()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--counts", default="10,50,200")
    parser.add_argument("--network", choices=("none", "outbound"), default="none")
    parser.add_argument("--modes", default="fresh,pooled,forked")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"fresh", "pooled", "forked"}:
        parser.error("modes: fresh, pooled, forked")
    network: NetworkMode = "outbound" if args.network == "outbound" else "none"
    print(f"idle warm instances, PSS MiB per instance (network: {network}, {os.cpu_count()} cores)")
    kinds = ["runtime", "bwrap", "bwrap pid 1", "slirp4netns", "sh", "keeper", "zygote"]
    print(
        f"{'mode':<7} {'N':>4} " + " ".join(f"{k:>12}" for k in kinds) + f" {'total':>8}"
        f" {'in 8 GiB':>9}"
    )
    for mode in modes:
        for count in counts:
            r = asyncio.run(measure(count, mode, network))
            cells = " ".join(f"{r.get(k, 0.0):12.2f}" for k in kinds)
            fit = int(8 * 1024 / r["total"]) if r["total"] else 0
            print(f"{mode:<7} {count:>4} {cells} {r['total']:8.2f} {fit:>9}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
