"""The microVM's cgroup: limits from the workspace's size (pure), the files of v1 and v2,
the launching shell that joins the groups before it becomes QEMU, and the I/O shell on a
hierarchy laid out in a temporary directory."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from server.runtime.errors import EngineUnavailable
from server.runtime.microvm import cgroup
from server.runtime.microvm.argv import BootFiles, VmFiles, qemu_argv


def test_limits_follow_cpus_and_memory() -> None:
    lim = cgroup.limits(cpus=1.5, memory_mb=512)
    assert lim == cgroup.Limits(cpu_quota_us=150_000, cpu_period_us=100_000,
                                memory_bytes=(512 + cgroup.QEMU_OVERHEAD_MB) << 20,
                                pids=cgroup.QEMU_PIDS)
    assert cgroup.limits(cpus=0.001, memory_mb=128).cpu_quota_us == 1000  # the kernel's least


def test_files_of_both_versions() -> None:
    lim = cgroup.limits(cpus=2, memory_mb=1024)
    mem = str((1024 + cgroup.QEMU_OVERHEAD_MB) << 20)
    assert cgroup.files_v2(lim) == {"cpu.max": "200000 100000", "memory.max": mem,
                                    "memory.swap.max": "0", "pids.max": "256"}
    v1 = cgroup.files_v1(lim)
    assert v1 == {"cpu": {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "200000"},
                  "memory": {"memory.limit_in_bytes": mem}, "pids": {"pids.max": "256"}}
    assert list(v1["cpu"]) == ["cpu.cfs_period_us", "cpu.cfs_quota_us"]  # period first


def test_wrap_joins_every_group_then_execs_the_command(tmp_path: Path) -> None:
    procs = [tmp_path / "a", tmp_path / "b"]
    argv = cgroup.wrap(["sh", "-c", 'echo "$0|$1"', "x y", "--"], procs)
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert out == "x y|--\n"  # the command's own arguments untouched, a "--" among them
    assert [p.read_text() for p in procs] == ["0\n", "0\n"]  # "0": the writer itself
    failing = cgroup.wrap(["true"], [tmp_path / "missing" / "cgroup.procs"])
    assert subprocess.run(failing, capture_output=True, check=False).returncode == 125


def test_wrapped_qemu_argv_keeps_its_pidfile_and_runs_as_the_vm_user() -> None:
    files = VmFiles(Path("/srv/den/vms/den-vm-a"))
    argv = qemu_argv("qemu", BootFiles.under(Path("/srv/den")), files, accel="tcg", cpus=1,
                     memory_mb=512, hostname="a", runas="den-vm")
    assert argv[-2:] == ["-runas", "den-vm"]
    assert argv[argv.index("-accel") + 1] == "tcg,tb-size=128"
    wrapped = cgroup.wrap(argv, [Path("/sys/fs/cgroup/den-microvm/den-vm-a/cgroup.procs")])
    assert wrapped[wrapped.index("--") + 1:] == argv
    assert wrapped[wrapped.index("-pidfile") + 1] == str(files.pidfile)


def _v1(root: Path) -> None:
    for c in cgroup.V1_CONTROLLERS:
        (root / c).mkdir(parents=True)
        (root / c / "cgroup.procs").write_text("")


def test_make_and_remove_on_a_v1_layout(tmp_path: Path) -> None:
    _v1(tmp_path)
    groups = cgroup.Cgroups(tmp_path)
    assert groups.version() == 1
    procs = groups.make("den-vm-a", cgroup.limits(cpus=1, memory_mb=512))
    assert procs == [tmp_path / c / "den-microvm" / "den-vm-a" / "cgroup.procs"
                     for c in ("cpu", "memory", "pids")]
    assert (tmp_path / "cpu/den-microvm/den-vm-a/cpu.cfs_quota_us").read_text() == "100000"
    groups.remove("den-vm-a")  # a plain directory with files stays (cgroupfs: rmdir works)
    for p in procs:  # as on cgroupfs, where a group's files go with it
        for f in p.parent.iterdir():
            f.unlink()
    groups.remove("den-vm-a")
    assert not any(p.parent.exists() for p in procs)
    groups.remove("den-vm-a")  # idempotent


def test_v2_needs_the_controllers_and_neither_layout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert cgroup.Cgroups(tmp_path).version() == 2
    (tmp_path / "cgroup.controllers").write_text("cpuset io\n")  # Docker 20.10 on v1: empty
    with pytest.raises(EngineUnavailable, match="cpu, memory and pids"):
        cgroup.Cgroups(tmp_path).version()
