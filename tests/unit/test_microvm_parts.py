"""The microVM backend's pure parts: QEMU's command line, the kernel's, the host's TSC
frequency; the backend's registration and the runtime names a server accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from server import backends
from server.config import Settings
from server.errors import ValidationFailed
from server.runtime.base import (
    AgentChannel,
    Checkpoints,
    DiskSnapshots,
    Execs,
    Inventory,
    Lifecycle,
    features,
)
from server.runtime.microvm.argv import (
    BootFiles,
    VmFiles,
    disk_fds_argv,
    host_tsc_khz,
    kernel_cmdline,
    probe_argv,
    qemu_argv,
    vcpus,
)
from server.runtime.microvm.backend import MicroVmRuntime
from server.workspaces.validation import runtime_name

BOOT = BootFiles.under(Path("/srv/den/microvm"))
FILES = VmFiles(Path("/srv/den/microvm/vms/den-vm-abc"))


def _opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_boots_the_kernel_with_both_disks_and_the_agent_port() -> None:
    argv = qemu_argv("qemu", BOOT, FILES, accel="tcg", cpus=1.5, memory_mb=768,
                     hostname="api", tsc_khz=2596134, pids_limit=300)
    assert argv[0] == "qemu"
    assert _opt(argv, "-M")[0].startswith("microvm,")
    assert _opt(argv, "-accel") == ["tcg,tb-size=128"] and _opt(argv, "-cpu") == ["max"]
    assert _opt(argv, "-smp") == ["2"] and _opt(argv, "-m") == ["768M"]
    assert _opt(argv, "-kernel") == ["/srv/den/microvm/vmlinux"]
    assert _opt(argv, "-initrd") == ["/srv/den/microvm/initramfs.cpio"]
    drives = _opt(argv, "-drive")
    assert [d.split(",")[0] for d in drives] == ["id=root", "id=workspace"]
    # The disks come as descriptors (jail.py): each drive names its fd set, not a path.
    assert "file=/dev/fdset/1,format=qcow2" in drives[0]
    assert "file=/dev/fdset/2,format=raw" in drives[1]
    assert disk_fds_argv({"root": (7, 8), "workspace": (9, 10)}) == [
        "-add-fd", "fd=7,set=1,opaque=root-rw", "-add-fd", "fd=8,set=1,opaque=root-ro",
        "-add-fd", "fd=9,set=2,opaque=workspace-rw", "-add-fd", "fd=10,set=2,opaque=workspace-ro"]
    assert _opt(argv, "-chardev") == [
        "socket,id=agent,path=/srv/den/microvm/vms/den-vm-abc/agent.sock,server=on,wait=off"]
    assert "virtserialport,chardev=agent,name=den.agent" in _opt(argv, "-device")
    assert _opt(argv, "-serial") == ["none"]  # no console log unless asked for
    assert "-no-reboot" in argv and "-nodefaults" in argv and "-daemonize" in argv
    assert argv[argv.index("-sandbox") + 1] == "on,obsolete=deny,resourcecontrol=deny"
    assert _opt(argv, "-pidfile") == ["/srv/den/microvm/vms/den-vm-abc/qemu.pid"]
    cmdline = _opt(argv, "-append")[0].split()
    assert {"panic=-1", "den.hostname=api", "tsc_early_khz=2596134", "den.pids=300"
            } <= set(cmdline)
    assert not any(a.startswith("console=") for a in cmdline)
    # No network device, no host directory shared into the guest.
    assert not any(a in ("-netdev", "-nic", "-virtfs", "-fsdev") for a in argv)


def test_argv_with_kvm_and_a_console_log() -> None:
    argv = qemu_argv("qemu", BOOT, FILES, accel="kvm", cpus=0.25, memory_mb=512,
                     hostname="h", console_log=True)
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-cpu") == ["host"]
    assert _opt(argv, "-smp") == ["1"]
    assert _opt(argv, "-serial") == ["file:/srv/den/microvm/vms/den-vm-abc/console.log"]
    assert "console=ttyS0" in _opt(argv, "-append")[0]
    assert "tsc_early_khz" not in _opt(argv, "-append")[0]


def test_option_values_double_their_commas() -> None:
    files = VmFiles(Path("/srv/a,b/vms/den-vm-x"))
    argv = qemu_argv("qemu", BOOT, files, accel="tcg", cpus=1, memory_mb=512, hostname="h")
    assert "path=/srv/a,,b/vms/den-vm-x/agent.sock," in _opt(argv, "-chardev")[0]


@pytest.mark.parametrize("hostname", ["", "a b", "a,b", "a=b"])
def test_hostnames_that_would_break_the_command_lines_are_refused(hostname: str) -> None:
    with pytest.raises(ValidationFailed):
        qemu_argv("qemu", BOOT, FILES, accel="tcg", cpus=1, memory_mb=512, hostname=hostname)


def test_socket_paths_too_long_for_unix_sockets_are_refused() -> None:
    deep = VmFiles(Path("/" + "d" * 100))
    with pytest.raises(ValidationFailed, match="DEN_MICROVM_DIR"):
        qemu_argv("qemu", BOOT, deep, accel="tcg", cpus=1, memory_mb=512, hostname="h")


def test_unknown_accelerator_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        qemu_argv("qemu", BOOT, FILES, accel="hvf", cpus=1, memory_mb=512, hostname="h")


def test_probe_boots_with_kvm_and_powers_off() -> None:
    argv = probe_argv("qemu", BOOT)
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-serial") == ["stdio"]
    assert _opt(probe_argv("qemu", BOOT, accel="tcg"), "-cpu") == ["max"]
    assert "den.probe=1" in _opt(argv, "-append")[0]
    assert "-daemonize" not in argv


def test_vcpus_round_up_to_whole_cpus() -> None:
    assert [vcpus(c) for c in (0.1, 1, 1.01, 4)] == [1, 1, 2, 4]


def test_kernel_cmdline() -> None:
    assert kernel_cmdline("w", console=False).split()[-1] == "den.hostname=w"
    assert "den.probe=1" in kernel_cmdline("w", console=True, probe=True)
    # The workspace's process limit, for the initramfs to make RLIMIT_NPROC.
    assert kernel_cmdline("w", console=False, pids_limit=200).split()[-1] == "den.pids=200"
    assert "den.pids" not in kernel_cmdline("w", console=False)


def test_host_tsc_khz_from_cpuinfo() -> None:
    assert host_tsc_khz("processor\t: 0\ncpu MHz\t\t: 2596.134\ncpu MHz : 1.0\n") == 2596134
    assert host_tsc_khz("processor : 0\n") == 0
    assert host_tsc_khz("cpu MHz : fast\n") == 0


def test_backend_is_registered_and_has_the_required_protocols(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, backend="microvm")
    rt = backends.load(settings).runtime
    assert isinstance(rt, MicroVmRuntime)
    assert isinstance(rt, Lifecycle) and isinstance(rt, Execs) and isinstance(rt, Inventory)
    assert isinstance(rt, AgentChannel)
    assert isinstance(rt, Checkpoints) and isinstance(rt, DiskSnapshots)
    # Pause with memory, snapshots, forks and restores (features.py); connections and
    # background processes are the agent's (processes.py); its VMs' NICs are on a bridge of
    # Den's (net.py); a QEMU that ends is an event.
    assert features(rt) == ["checkpoints", "disk_snapshots", "agent", "processes",
                            "port_connect", "managed_network", "engine_events"]
    assert rt.boot.kernel == tmp_path / "microvm" / "vmlinux"
    assert rt.vms_dir == tmp_path / "microvm" / "vms"
    assert rt.new_handle("abc") == {"vm": "den-vm-abc"}


def test_runtime_names_follow_the_backend(tmp_path: Path) -> None:
    docker = Settings(data_dir=tmp_path)
    with pytest.raises(ValidationFailed, match="DEN_BACKEND=microvm"):
        runtime_name(docker, "microvm")
    assert runtime_name(docker, None) == "gvisor"
    vm = Settings(data_dir=tmp_path, backend="microvm")
    assert runtime_name(vm, None) == "microvm"
    assert runtime_name(vm, "microvm") == "microvm"
    for other in ("gvisor", "runc"):
        with pytest.raises(ValidationFailed, match="runs microVMs"):
            runtime_name(vm, other)
    with pytest.raises(ValidationFailed, match="unknown runtime"):
        runtime_name(vm, "kata")


def test_an_unfinished_copy_is_known_by_its_name() -> None:
    """A copy Den died making has no vm.json: reconcile finds it by the name alone."""
    from server.runtime.microvm.snapshots import unfinished

    assert unfinished(".den-vm-ws1.tmp", "den") == ("vm", "ws1")
    assert unfinished(".den-vm-ws1-a1b2c3.tmp", "den") == ("vm", "ws1")  # a restore's copy
    assert unfinished(".den-snap-sn9.tmp", "den") == ("snap", "sn9")
    for other in ("den-vm-ws1", ".den-vm-ws1", ".other-vm-ws1.tmp", ".den-pause.tmp",
                  ".den-vm-.tmp", ".den-x-ws1.tmp"):
        assert unfinished(other, "den") is None, other
