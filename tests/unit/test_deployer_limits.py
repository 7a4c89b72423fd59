"""Per-instance limits, the pure part: what a cgroup (v1, v2) gets written for a spec, which
rlimits an instance gets where no cgroup enforces a limit, and what the status reports."""

from __future__ import annotations

import resource
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from lambdabus_client.commands.functions import describe_limits
from lambdabus_deployer.cgroups import (
    CgroupLimits,
    V1Hierarchy,
    V2Hierarchy,
    cpu_quota_us,
    oom_kills,
    own_cgroups,
    v1_mounts,
    v1_writes,
    v2_mount,
    v2_writes,
)
from lambdabus_deployer.limits import Limits, limits_report, oom_message, rlimits, tmpfs_options
from lambdabus_deployer.plan import Observation, next_deployment_state, runtime_command
from lambdabus_events.models import (
    DeploymentState,
    FunctionConfig,
    FunctionRecord,
    InstanceLimits,
    SourceRef,
)
from lambdabus_platform.status import compute_status
from tests.unit.test_deployer_plan import manifest, revision, spec

MiB = 1024 * 1024
LIMITS = Limits(memory=128, cpu=250, pids=64, open_files=512, tmp_size=32)
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)

MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""

PROC_SELF_CGROUP = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
1:cpu,cpuacct:/user.slice
0::/
"""


# -- cgroup files ----------------------------------------------------------------------------


def test_cpu_quota_is_millicores_of_the_period() -> None:
    assert cpu_quota_us(1000) == 100_000  # one core
    assert cpu_quota_us(100) == 10_000  # a tenth
    assert cpu_quota_us(2500) == 250_000  # two and a half
    assert cpu_quota_us(5) == 1_000  # the kernel's minimum
    assert cpu_quota_us(500, period_us=50_000) == 25_000


def test_v1_writes_memory_then_memsw_so_no_swap_then_cpu_and_pids() -> None:
    limits = CgroupLimits(memory=128, cpu=250, pids=64)
    assert v1_writes(limits, memsw=True) == [
        ("memory", "memory.limit_in_bytes", str(128 * MiB)),
        ("memory", "memory.memsw.limit_in_bytes", str(128 * MiB)),
        ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "25000"),
        ("cpu", "cpu.shares", "1024"),
        ("pids", "pids.max", "64"),
    ]
    without_swap_accounting = v1_writes(limits, memsw=False)
    assert ("memory", "memory.swappiness", "0") in without_swap_accounting
    assert all(file != "memory.memsw.limit_in_bytes" for _, file, _ in without_swap_accounting)


def test_v1_writes_raise_memsw_before_memory_and_lower_memory_before_memsw() -> None:
    """The kernel refuses memory > memsw at any step: a pre-started slot's cgroup (128 MiB)
    given a function's 512 MiB raises memsw first; given 64 MiB, lowers memory first."""
    limits = CgroupLimits(memory=512, cpu=250, pids=64)
    raised = [file for _, file, _ in v1_writes(limits, memsw=True, current=128 * MiB)][:2]
    assert raised == ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
    lowered = CgroupLimits(memory=64, cpu=250, pids=64)
    lowered_files = [file for _, file, _ in v1_writes(lowered, memsw=True, current=128 * MiB)]
    assert lowered_files[:2] == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]


def test_v2_writes_one_directory_with_oom_group_and_cpu_max() -> None:
    limits = CgroupLimits(memory=256, cpu=1500, pids=128)
    assert v2_writes(limits, swap=True) == [
        ("", "memory.max", str(256 * MiB)),
        ("", "memory.swap.max", "0"),
        ("", "memory.oom.group", "1"),
        ("", "cpu.max", "150000 100000"),
        ("", "cpu.weight", "100"),
        ("", "pids.max", "128"),
    ]
    assert ("", "memory.swap.max", "0") not in v2_writes(limits, swap=False)


def test_hierarchies_and_our_own_cgroups_are_read_from_proc() -> None:
    assert v1_mounts(MOUNTS) == {
        "cpu": "/sys/fs/cgroup/cpu,cpuacct",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct",
        "memory": "/sys/fs/cgroup/memory",
        "pids": "/sys/fs/cgroup/pids",
    }
    assert v2_mount(MOUNTS) == "/sys/fs/cgroup/unified"
    assert v2_mount("cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n") is None
    v1, v2 = own_cgroups(PROC_SELF_CGROUP)
    assert v1["memory"] == "/process_api/abc"
    assert v1["cpu"] == v1["cpuacct"] == "/user.slice"
    assert v1["pids"] == "/"
    assert v2 == "/"


def test_oom_kills_are_counted_in_v1_oom_control_and_v2_memory_events() -> None:
    assert oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n") == 3
    assert oom_kills("low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 1\n") == 1
    assert oom_kills("oom_kill_disable 0\nunder_oom 0\n") == 0  # an old kernel: no counter


# -- rlimits ---------------------------------------------------------------------------------


def test_with_a_cgroup_and_a_tmpfs_only_open_files_is_an_rlimit() -> None:
    assert rlimits(LIMITS, cgroup=True, tmpfs=True, python=True) == ((resource.RLIMIT_NOFILE, 512),)


def test_without_a_cgroup_python_gets_its_address_space_limited_per_process() -> None:
    found = dict(rlimits(LIMITS, cgroup=False, tmpfs=True, python=True))
    assert found == {resource.RLIMIT_NOFILE: 512, resource.RLIMIT_AS: 128 * MiB}
    node = dict(rlimits(LIMITS, cgroup=False, tmpfs=True, python=False))
    assert resource.RLIMIT_AS not in node  # V8 reserves far more: its heap flag instead


def test_processes_are_an_rlimit_only_with_a_uid_of_its_own() -> None:
    shared_uid = dict(rlimits(LIMITS, cgroup=False, tmpfs=True, python=True))
    assert resource.RLIMIT_NPROC not in shared_uid  # it would count every instance's processes
    own_uid = dict(rlimits(LIMITS, cgroup=False, tmpfs=True, python=True, per_instance_uid=True))
    assert own_uid[resource.RLIMIT_NPROC] == 64


def test_without_a_tmpfs_each_file_is_limited_to_tmp_size() -> None:
    found = dict(rlimits(LIMITS, cgroup=True, tmpfs=False, python=True))
    assert found[resource.RLIMIT_FSIZE] == 32 * MiB


def test_without_privilege_no_rlimit_goes_past_our_hard_limit() -> None:
    def hard(res: int) -> int:
        return 256 if res == resource.RLIMIT_NOFILE else resource.RLIM_INFINITY

    found = dict(
        rlimits(LIMITS, cgroup=False, tmpfs=False, python=True, privileged=False, hard=hard)
    )
    assert found[resource.RLIMIT_NOFILE] == 256
    assert found[resource.RLIMIT_AS] == 128 * MiB
    root = dict(rlimits(LIMITS, cgroup=True, tmpfs=True, python=True, privileged=True, hard=hard))
    assert root[resource.RLIMIT_NOFILE] == 512


def test_tmpfs_options_keep_the_scratch_dirs_owner() -> None:
    assert tmpfs_options(64, 1000, 1000) == ("size=64m,nr_inodes=16384,mode=0700,uid=1000,gid=1000")
    assert "nr_inodes=1024," in tmpfs_options(1, 0, 0)


# -- what is reported ------------------------------------------------------------------------


def test_a_cgroup_reports_every_limit() -> None:
    assert limits_report(LIMITS, cgroup=True, tmpfs=True, log_rate=2000) == InstanceLimits(
        enforced_by="cgroup",
        memory=128,
        cpu=250,
        pids=64,
        open_files=512,
        tmp_size=32,
        tmp_enforced_by="tmpfs",
        log_lines_per_second=2000,
    )


def test_rlimits_report_what_they_cannot_enforce_as_null() -> None:
    report = limits_report(LIMITS, cgroup=False, tmpfs=False, log_rate=2000)
    assert report.model_dump() == {
        "enforced_by": "rlimit",
        "memory": 128,
        "cpu": None,
        "pids": None,
        "open_files": 512,
        "tmp_size": 32,
        "tmp_enforced_by": "rlimit",
        "log_lines_per_second": 2000,
    }
    assert (
        limits_report(LIMITS, cgroup=False, tmpfs=False, log_rate=2000, per_instance_uid=True).pids
        == 64
    )


def test_limits_come_from_the_desired_revision() -> None:
    rev = revision(memory=512, cpu=100, pids=16, open_files=64, tmp_size=8)
    assert Limits.of(rev) == Limits(memory=512, cpu=100, pids=16, open_files=64, tmp_size=8)


def test_node_keeps_no_heap_flag_when_a_cgroup_limits_its_memory() -> None:
    rev = revision(memory=128)
    capped = runtime_command(manifest("nodejs20"), spec(rev))
    assert "--max-old-space-size=128" in capped
    in_cgroup = runtime_command(manifest("nodejs20"), replace(spec(rev), per_process_memory=False))
    assert not any(arg.startswith("--max-old-space-size") for arg in in_cgroup)


def test_an_oom_kill_says_so_and_names_the_limit() -> None:
    assert oom_message(64).startswith("OOMKilled: it used more than its 64 MiB of memory")


def test_the_limits_reach_the_deployment_state_and_the_status() -> None:
    report = limits_report(LIMITS, cgroup=True, tmpfs=True, log_rate=2000)
    rev = revision()
    obs = Observation(revision=rev, instances=(), endpoints=("http://127.0.0.1:1",), limits=report)
    state = next_deployment_state(None, obs, NOW).state
    assert state.limits == report
    record = FunctionRecord(
        namespace=rev.namespace,
        name=rev.name,
        uid=rev.uid,
        generation=rev.generation,
        spec=FunctionConfig(),
        source=SourceRef(
            sha256="a" * 64, size=10, kind="inline", entrypoint="lambda_main.py", files=1
        ),
        created_at=NOW,
        updated_at=NOW,
    )
    assert compute_status(record, None, state).limits == report
    other_uid: DeploymentState = state.model_copy(update={"uid": "another"})
    assert compute_status(record, None, other_uid).limits is None
    assert "limits" in state.model_dump(mode="json")


def test_the_cli_says_the_limits_in_one_line() -> None:
    cgroup = limits_report(LIMITS, cgroup=True, tmpfs=True, log_rate=2000).model_dump()
    assert describe_limits(cgroup) == (
        "by cgroup: memory 128 MiB, cpu 250m, pids 64, open files 512, /tmp 32 MiB (tmpfs), "
        "logs 2000 lines/s"
    )
    rlimit = limits_report(LIMITS, cgroup=False, tmpfs=False, log_rate=2000).model_dump()
    assert describe_limits(rlimit) == (
        "by rlimit: memory 128 MiB, cpu not enforced, pids not enforced, open files 512, "
        "/tmp 32 MiB (rlimit), logs 2000 lines/s"
    )


# -- the hierarchies' files, on a plain directory standing in for cgroupfs ----------------------


def test_a_v2_instance_cgroup_gets_its_files_written(tmp_path: Path) -> None:
    cgroup = V2Hierarchy(tmp_path, swap=True).create("fn-abc-1", CgroupLimits(128, 250, 64))
    files = {p.name: p.read_text() for p in (tmp_path / "fn-abc-1").iterdir()}
    assert files == {
        "memory.max": str(128 * MiB),
        "memory.swap.max": "0",
        "memory.oom.group": "1",
        "cpu.max": "25000 100000",
        "cpu.weight": "100",
        "pids.max": "64",
    }
    assert cgroup.procs_files == (str(tmp_path / "fn-abc-1" / "cgroup.procs"),)
    (tmp_path / "fn-abc-1" / "memory.events").write_text("oom 1\noom_kill 2\n")
    (tmp_path / "fn-abc-1" / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1\n")
    (tmp_path / "fn-abc-1" / "pids.events").write_text("max 7\n")
    assert (cgroup.oom_kills(), cgroup.cpu_seconds(), cgroup.fork_rejections()) == (2, 1.5, 7)
    assert V2Hierarchy(tmp_path, swap=True).find("fn-abc-1") == cgroup
    assert V2Hierarchy(tmp_path, swap=True).find("other") is None


def test_a_v1_instance_cgroup_is_one_directory_per_hierarchy(tmp_path: Path) -> None:
    roots = {c: tmp_path / c / "lambdabus" for c in ("memory", "cpu", "pids", "cpuacct")}
    roots["cpuacct"] = roots["cpu"]  # co-mounted cpu,cpuacct: one directory
    for root in roots.values():
        root.mkdir(parents=True, exist_ok=True)
    cgroup = V1Hierarchy(roots, memsw=True).create("fn-abc-1", CgroupLimits(128, 250, 64))
    assert (roots["memory"] / "fn-abc-1" / "memory.memsw.limit_in_bytes").read_text() == str(
        128 * MiB
    )
    assert (roots["cpu"] / "fn-abc-1" / "cpu.cfs_quota_us").read_text() == "25000"
    assert (roots["pids"] / "fn-abc-1" / "pids.max").read_text() == "64"
    assert sorted(cgroup.procs_files) == sorted(
        str(roots[c] / "fn-abc-1" / "cgroup.procs") for c in ("memory", "cpu", "pids")
    )
    (roots["memory"] / "fn-abc-1" / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n"
    )
    (roots["cpu"] / "fn-abc-1" / "cpuacct.usage").write_text("250000000\n")
    assert (cgroup.oom_kills(), cgroup.cpu_seconds()) == (1, 0.25)
