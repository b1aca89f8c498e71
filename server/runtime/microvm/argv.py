"""QEMU's command line for one workspace VM, and the files of its directory. Pure: no I/O.

A VM lives in one directory (its handle names it) holding its disks, the host ends of its
sockets, QEMU's pid file and a small JSON record of its labels (``vm.json``)::

    root.qcow2      copy-on-write overlay over the shared root filesystem image
    workspace.img   /workspace: raw ext4, sized by disk_gb (a full disk is ENOSPC, no growth)
    agent.sock      the virtio-serial port the guest's agent serves (server/agent/session.py)
    qmp.sock        QEMU's monitor
    qemu.pid        the daemonized QEMU's pid
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from server.errors import ValidationFailed

# A Unix socket's path must fit sockaddr_un (108 bytes with its NUL).
MAX_SOCKET_PATH = 107
AGENT_PORT = "den.agent"  # the virtio-serial port's name (/dev/vportNpM in the guest)
# The disks reach QEMU as descriptors (jail.py: it cannot open them by path once it runs),
# each in an fd set of its own (``-add-fd``): the root filesystem's overlay and /workspace.
DISK_FDSETS = {"root": 1, "workspace": 2}


@dataclass(frozen=True)
class VmFiles:
    """The files of one VM's directory."""

    dir: Path

    @property
    def root(self) -> Path:
        return self.dir / "root.qcow2"

    @property
    def workspace(self) -> Path:
        return self.dir / "workspace.img"

    @property
    def agent(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.dir / "qemu.pid"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    @property
    def record(self) -> Path:
        return self.dir / "vm.json"


@dataclass(frozen=True)
class BootFiles:
    """What every VM boots: built once by scripts/setup-microvm.sh."""

    kernel: Path  # vmlinux, uncompressed (PVH entry)
    initramfs: Path
    rootfs: Path  # the shared, read-only base of every root.qcow2

    @classmethod
    def under(cls, directory: Path) -> BootFiles:
        return cls(kernel=directory / "vmlinux", initramfs=directory / "initramfs.cpio",
                   rootfs=directory / "rootfs.ext4")


# QEMU 7.2's seccomp filter. Measured with -daemonize here: spawn=deny kills the daemonizing
# fork (SIGSYS) and elevateprivileges=deny makes it exit 1, so those two stay allowed.
SANDBOX = "on,obsolete=deny,resourcecontrol=deny"
# TCG's cache of translated code (QEMU 7.2's default: up to 1 GiB, which would count against
# the VM's cgroup as it fills); a full cache is flushed and refilled.
TB_SIZE_MB = 128


def vcpus(cpus: float) -> int:
    """Whole virtual CPUs for a workspace's (possibly fractional) CPU share."""
    return max(1, math.ceil(cpus))


def kernel_cmdline(hostname: str, *, console: bool, probe: bool = False, tsc_khz: int = 0,
                   pids_limit: int = 0) -> str:
    """The guest kernel's command line. ``panic=-1`` with QEMU's ``-no-reboot``: the VM
    ends when its init (the agent) exits. ``probe`` makes the initramfs power off at once
    (the KVM check). ``tsc_khz`` (TCG): the microvm machine has no PIT or HPET the kernel
    can calibrate its TSC against, and without being told the frequency it waits for a
    timer forever; under TCG the guest's TSC is the host's. ``pids_limit``: the initramfs
    makes it the RLIMIT_NPROC of every process in the guest (scripts/setup-microvm.sh)."""
    args = ["panic=-1", "reboot=t", "quiet", "loglevel=3", f"den.hostname={hostname}"]
    if pids_limit > 0:
        args.append(f"den.pids={int(pids_limit)}")
    if tsc_khz > 0:
        args.append(f"tsc_early_khz={tsc_khz}")
    if console:
        args.append("console=ttyS0")
    if probe:
        args.append("den.probe=1")
    return " ".join(args)


def qemu_argv(qemu: str, boot: BootFiles, files: VmFiles, *, accel: str, cpus: float,
              memory_mb: int, hostname: str, tsc_khz: int = 0, console_log: bool = False,
              runas: str = "", pids_limit: int = 0) -> list[str]:
    """The command that boots the VM, daemonized once its sockets listen."""
    if accel not in ("kvm", "tcg"):
        raise ValueError(f"accel must be kvm or tcg, not {accel!r}")
    for sock in (files.agent, files.qmp):
        if len(str(sock).encode()) > MAX_SOCKET_PATH:
            raise ValidationFailed(f"the VM directory {files.dir} is too deep for a Unix socket "
                                   f"path; choose a shorter DEN_MICROVM_DIR")
    if any(c in hostname for c in " ,=\n\0") or not hostname:
        raise ValidationFailed(f"hostname {hostname!r} cannot be passed to a microVM")
    argv = [
        qemu, "-M", "microvm,x-option-roms=off,rtc=on,pcie=off",
        "-accel", f"tcg,tb-size={TB_SIZE_MB}" if accel == "tcg" else accel,
        "-cpu", "max" if accel == "tcg" else "host",
        "-smp", str(vcpus(cpus)), "-m", f"{memory_mb}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(boot.kernel), "-initrd", str(boot.initramfs),
        "-append", kernel_cmdline(hostname, console=console_log, tsc_khz=tsc_khz,
                                  pids_limit=pids_limit),
        "-drive", _drive("root", "qcow2"),
        "-device", "virtio-blk-device,drive=root",
        "-drive", _drive("workspace", "raw"),
        "-device", "virtio-blk-device,drive=workspace",
        "-device", "virtio-serial-device,max_ports=2",
        "-chardev", f"socket,id=agent,path={_opt(files.agent)},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent,name={AGENT_PORT}",
        "-qmp", f"unix:{_opt(files.qmp)},server=on,wait=off",
        "-serial", f"file:{_opt(files.console)}" if console_log else "none",
        # QEMU's seccomp filter (the host's exposure to a guest is QEMU): no obsolete system
        # calls, no scheduler or resource changes.
        "-sandbox", SANDBOX,
        "-daemonize", "-pidfile", str(files.pidfile),
    ]
    if runas:  # after setting up (disks, sockets, /dev/kvm opened as root): setuid/setgid
        argv += ["-runas", runas]
    return argv


def probe_argv(qemu: str, boot: BootFiles, *, accel: str = "kvm", tsc_khz: int = 0
               ) -> list[str]:
    """A VM that boots the kernel and initramfs and powers off at once, its console on
    stdout: whether an accelerator (KVM) can run a guest here (and the bare boot that
    benchmarks compare Den's with)."""
    return [
        qemu, "-M", "microvm,x-option-roms=off,rtc=on,pcie=off", "-accel", accel,
        "-cpu", "host" if accel == "kvm" else "max", "-smp", "1", "-m", "256M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(boot.kernel), "-initrd", str(boot.initramfs),
        "-append", kernel_cmdline("probe", console=True, probe=True, tsc_khz=tsc_khz),
        "-serial", "stdio",
    ]


def host_tsc_khz(cpuinfo: str) -> int:
    """The host's TSC frequency in kHz from /proc/cpuinfo's first ``cpu MHz`` (0: unknown)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                return int(float(value) * 1000)
            except ValueError:
                return 0
    return 0


def _drive(name: str, fmt: str) -> str:
    return (f"id={name},file=/dev/fdset/{DISK_FDSETS[name]},format={fmt},if=none,"
            "cache=writeback,discard=unmap")


def disk_fds_argv(fds: dict[str, tuple[int, int]]) -> list[str]:
    """``-add-fd`` for each disk's descriptors (read-write, read-only), by disk name: QEMU
    opens a disk read-write, and reopens it read-only when a memory save completes and
    read-write again when a saved memory is loaded; it takes each from the fd set."""
    argv = []
    for name, (rw, ro) in fds.items():
        argv += ["-add-fd", f"fd={int(rw)},set={DISK_FDSETS[name]},opaque={name}-rw",
                 "-add-fd", f"fd={int(ro)},set={DISK_FDSETS[name]},opaque={name}-ro"]
    return argv


def _opt(path: Path) -> str:
    """A path as a QEMU option value: commas doubled."""
    return str(path).replace(",", ",,")
