"""Memory of idle warm instances: N sandboxed runtimes of a trivial Python function, each
called once and then left idle, measured as PSS (proportional set size, from
`/proc/<pid>/smaps_rollup`: a page shared by k processes counts 1/k to each) over every process
of each sandbox: bubblewrap outside, bubblewrap as the sandbox's pid 1, the runtime, and
slirp4netns with `--network outbound`.

    uv run python bench/density.py [--counts 10,50,200] [--network none|outbound]
        [--modes fresh,pooled]

`fresh`: the runtime started for its function, as the deployer starts an instance without the
pool; `pooled`: started as the pool starts one (`--pool`, the runtime imported) and then
specialised over stdin, as a pre-started runtime becomes an instance. Sandboxes are started as
the deployer starts them (bubblewrap as an unprivileged uid each when root, no cgroup). Prints
the mean PSS per instance by process and in total, and how many would fit in 8 GiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lambdabus_platform.sandbox import (
    NetworkMode,
    Sandbox,
    SandboxProcess,
    descendants,
    detect_sandbox,
    launch,
)
from lambdabus_testing.sandboxed import first_answer, runtime_command, runtime_spec

SOURCE = "async def main(request):\n    return {'ok': True}\n"


@dataclass
class Running:
    handle: SandboxProcess
    socket_dir: Path


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
    return "runtime"


async def start_one(
    sandbox: Sandbox, work: Path, index: int, mode: str, network: NetworkMode
) -> Running:
    code = work / "code"
    socket_dir = work / f"sock-{index}"
    socket_dir.mkdir(mode=0o777)
    socket_dir.chmod(0o777)  # whichever uid the sandbox runs as may listen there
    name = f"density/fn{index}"
    argv = runtime_command(name)
    command = [*argv[:3], "--pool", " " * 512] if mode == "pooled" else argv
    spec = runtime_spec(code, socket_dir, command, network=network)
    stdin: int | None = asyncio.subprocess.DEVNULL
    control_r = control_w = -1
    if mode == "pooled":
        control_r, control_w = os.pipe()
        stdin = control_r
    handle = await launch(
        sandbox, spec, key=name, stdin=stdin, stdout=asyncio.subprocess.PIPE, stderr=None
    )
    if mode == "pooled":
        os.close(control_r)
        await asyncio.sleep(0.05)  # imported and waiting, as in the pool
        os.write(control_w, json.dumps({"argv": argv[3:], "env": {}}).encode() + b"\n")
        os.close(control_w)
    assert handle.process.stdout is not None
    line = await asyncio.wait_for(handle.process.stdout.readline(), 60)
    if b"listening" not in line:
        raise RuntimeError(f"the sandboxed runtime did not start: {line!r}")
    await first_answer(socket_dir / "sock")
    return Running(handle, socket_dir)


async def measure(count: int, mode: str, network: NetworkMode) -> dict[str, float]:
    sandbox = await detect_sandbox("bubblewrap")
    work = Path(tempfile.mkdtemp(prefix="lambdabus-density-"))
    work.chmod(0o755)
    (work / "code").mkdir(mode=0o755)
    (work / "code" / "lambda_main.py").write_text(SOURCE)
    running: list[Running] = []
    limit = asyncio.Semaphore(4)

    async def one(index: int) -> None:
        async with limit:
            running.append(await start_one(sandbox, work, index, mode, network))

    try:
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(count)))
        took = time.perf_counter() - started
        await asyncio.sleep(2)  # idle
        totals: dict[str, int] = {}
        for item in running:
            pids = [item.handle.pid, *descendants(item.handle.pid)]
            if item.handle.slirp is not None:
                pids.append(item.handle.slirp.pid)
            for pid in pids:
                kind = kind_of(pid, item)
                totals[kind] = totals.get(kind, 0) + pss_kib(pid)
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
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--counts", default="10,50,200")
    parser.add_argument("--network", choices=("none", "outbound"), default="none")
    parser.add_argument("--modes", default="fresh,pooled")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"fresh", "pooled"}:
        parser.error("modes: fresh, pooled")
    network: NetworkMode = "outbound" if args.network == "outbound" else "none"
    print(f"idle warm instances, PSS MiB per instance (network: {network}, {os.cpu_count()} cores)")
    kinds = ["runtime", "bwrap", "bwrap pid 1", "slirp4netns"]
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
