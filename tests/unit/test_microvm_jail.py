"""The microVM jail's builder and its root directory (server/runtime/microvm/jail.py). What
it does to a running QEMU is tested on the real engine (tests/engine/test_microvm.py)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from server.runtime.errors import EngineError, EngineUnavailable
from server.runtime.microvm import jail
from server.runtime.microvm.argv import VmFiles


def test_qemu_runs_in_namespaces_of_its_own_chrooted_into_the_jail() -> None:
    argv = jail.confine(["qemu", "-daemonize", "-pidfile", "/v/x/qemu.pid"], Path("/j"))
    assert argv == ["unshare", "--net", "--ipc", "--", "qemu", "-daemonize", "-pidfile",
                    "/v/x/qemu.pid", "-chroot", "/j"]


def test_the_root_is_made_empty_read_only_and_roots(tmp_path: Path) -> None:
    root = jail.root(tmp_path / "jail")
    st = root.stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o555, 0, 0)
    root.chmod(0o777)  # put back as it should be at the next start
    assert jail.root(root).stat().st_mode & 0o7777 == 0o555


def test_a_root_with_something_in_it_is_refused(tmp_path: Path) -> None:
    root = jail.root(tmp_path / "jail")
    root.chmod(0o755)
    (root / "bin").mkdir()
    with pytest.raises(EngineUnavailable, match="must be empty"):
        jail.root(root)


def test_a_root_that_is_a_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "jail")
    with pytest.raises(EngineUnavailable, match="not a directory"):
        jail.root(tmp_path / "jail")


def _disks(tmp_path: Path) -> VmFiles:
    files = VmFiles(tmp_path / "den-vm-a")
    files.dir.mkdir()
    files.root.write_bytes(b"QFI\xfb")
    files.workspace.write_bytes(b"ext4")
    return files


def test_the_disks_are_handed_over_read_write_and_read_only(tmp_path: Path) -> None:
    files = _disks(tmp_path)
    argv, fds = jail.disks(files)
    try:
        assert len(fds) == 4
        modes = [fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_NONBLOCK) for fd in fds]
        assert modes == [os.O_RDWR, os.O_RDONLY] * 2
        assert all(not os.get_inheritable(fd) for fd in fds)  # only QEMU gets them
        assert [os.readlink(f"/proc/self/fd/{fd}") for fd in fds] == [
            str(files.root)] * 2 + [str(files.workspace)] * 2
        assert argv == ["-add-fd", f"fd={fds[0]},set=1,opaque=root-rw",
                        "-add-fd", f"fd={fds[1]},set=1,opaque=root-ro",
                        "-add-fd", f"fd={fds[2]},set=2,opaque=workspace-rw",
                        "-add-fd", f"fd={fds[3]},set=2,opaque=workspace-ro"]
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("swap", ["link", "fifo", "missing"])
def test_a_disk_that_is_not_a_regular_file_of_its_own_is_refused(tmp_path: Path,
                                                                 swap: str) -> None:
    """A link put in a disk's place (to a host file, another VM's disk) is not followed; a
    FIFO does not hang the launch; nothing stays open after the refusal."""
    files = _disks(tmp_path)
    files.workspace.unlink()
    if swap == "link":
        (tmp_path / "secret").write_text("host file")
        files.workspace.symlink_to(tmp_path / "secret")
    elif swap == "fifo":
        os.mkfifo(files.workspace)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(EngineError, match=r"workspace\.img"):
        jail.disks(files)
    assert set(os.listdir("/proc/self/fd")) == before
