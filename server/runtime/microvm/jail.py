"""What confines a VM's QEMU beyond its uid, cgroup and seccomp filter: a network and an IPC
namespace of its own, and an empty root directory.

QEMU opens what it needs while it starts, as root (the kernel and initramfs, the root
filesystem's shared base, its sockets, ``/dev/kvm``); its disks and its TAP it gets from Den
as descriptors (:func:`disks`, net.open_tap). Then it ``-chroot``s into :func:`root`'s empty
directory and drops to its uid (``-runas``). From then on the only files it reaches are the
descriptors it holds: QEMU reopens a disk read-only when a memory save completes and
read-write when a saved memory is loaded, and takes both from the disk's fd set; a memory
save or load comes as a descriptor too (``getfd``, checkpoint.py), and snapshots copy the
disks on the host. So nothing in the VM's directory needs to be QEMU's: it is all root's.

In a network namespace of its own (no interface but a down ``lo``) a QEMU taken over by
its guest reaches no host service over TCP, UDP or an abstract Unix socket; in an IPC
namespace of its own, no SysV or POSIX IPC object of the host.

No mount namespace: the chroot is empty, read-only and root's, and the unprivileged QEMU has
no capability to leave it; a private copy of the host's mounts would keep every mount made
while it runs (container layers, volumes) alive in it.

Side effect of the chroot: QEMU cannot remove its pid file and sockets when it ends (they
are outside its root). Den does not trust a pid file alone (process.running) and removes
the sockets before each launch.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from server.runtime.errors import EngineError, EngineUnavailable
from server.runtime.microvm.argv import VmFiles, disk_fds_argv

# util-linux's unshare runs QEMU (exec, no fork) in new namespaces; Den runs it as root.
UNSHARE = ("unshare", "--net", "--ipc", "--")


def confine(argv: list[str], root: Path) -> list[str]:
    """QEMU's command line ``argv`` run in namespaces of its own, chrooted into ``root``."""
    return [*UNSHARE, *argv, "-chroot", str(root)]


def root(directory: Path) -> Path:
    """Make ``directory`` the jail's root (idempotent): empty, root's, mode 0555 (QEMU, as
    its own uid, can neither write in it nor leave it). Blocking."""
    directory.mkdir(mode=0o555, parents=True, exist_ok=True)
    st = directory.lstat()
    if not os.path.isdir(directory) or directory.is_symlink():
        raise EngineUnavailable(f"the microVM jail {directory} is not a directory")
    if st.st_uid != 0 or st.st_gid != 0:
        os.chown(directory, 0, 0, follow_symlinks=False)
    if st.st_mode & 0o7777 != 0o555:
        directory.chmod(0o555)
    if any(directory.iterdir()):
        raise EngineUnavailable(f"the microVM jail {directory} must be empty (QEMU's root "
                                "directory): remove what is in it")
    return directory


def disks(files: VmFiles) -> tuple[list[str], tuple[int, ...]]:
    """The VM's disks opened for its QEMU (read-write and read-only each, close-on-exec:
    only the QEMU they are passed to inherits them): its ``-add-fd`` arguments and the
    descriptors, which the caller closes once QEMU runs. Never through a link, and only
    regular files. Blocking."""
    fds: list[int] = []
    opened: dict[str, tuple[int, int]] = {}
    try:
        for name, path in (("root", files.root), ("workspace", files.workspace)):
            rw, ro = _open_disk(path, os.O_RDWR), _open_disk(path, os.O_RDONLY)
            fds += (rw, ro)
            opened[name] = (rw, ro)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return disk_fds_argv(opened), tuple(fds)


def _open_disk(path: Path, mode: int) -> int:
    try:  # O_NONBLOCK: a FIFO put in a disk's place does not hang the open
        fd = os.open(path, mode | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise EngineError(f"cannot open the VM's disk {path.name}: {exc}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise EngineError(f"the VM's disk {path.name} is not a regular file")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd
