"""A uid of its own for each microVM (server/runtime/microvm/vmusers.py): handed out in
turn, recorded with the VM, never one a VM directory or a process holds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from server.runtime.errors import EngineError
from server.runtime.microvm import disks, vmusers
from server.runtime.microvm.argv import VmFiles
from server.runtime.microvm.vmusers import UidRange

BASE = 2_000_000_000


def _vm(vms: Path, name: str) -> VmFiles:
    files = VmFiles(vms / name)
    files.dir.mkdir(parents=True, mode=0o700)
    files.record.write_text(json.dumps({"labels": {}, "workspace_id": name}))
    (files.dir / "workspace.img").write_bytes(b"")
    return files


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@needs_root
def test_each_vm_gets_its_own_uid_recorded_and_its_directory_stays_roots(
        tmp_path: Path) -> None:
    """QEMU gets its disks as descriptors (jail.py): its uid owns nothing in its directory,
    and a directory an earlier Den gave to the uid is taken back at launch (disks.own)."""
    uids = UidRange(BASE, 100)
    a, b = _vm(tmp_path, "den-vm-a"), _vm(tmp_path, "den-vm-b")
    assert vmusers.uid_of(a, uids) == BASE
    assert vmusers.uid_of(b, uids) == BASE + 1
    assert vmusers.uid_of(a, uids) == BASE  # kept for the directory's life
    assert json.loads(a.record.read_text())["uid"] == BASE
    for path in (b.dir, *b.dir.iterdir()):  # as an earlier Den left it
        os.chown(path, BASE + 1, BASE + 1)
    b.dir.chmod(0o711)
    for files in (a, b):
        disks.own(files)
        st = files.dir.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o700)
        assert {(p.stat().st_uid, p.stat().st_gid) for p in files.dir.iterdir()} == {(0, 0)}
    assert vmusers.runas(BASE) == ["-runas", f"{BASE}:{BASE}"]


@needs_root
def test_a_deleted_vms_uid_is_not_handed_out_again_until_the_range_goes_round(
        tmp_path: Path) -> None:
    uids = UidRange(BASE, 3)
    a = _vm(tmp_path, "den-vm-a")
    assert vmusers.uid_of(a, uids) == BASE
    shutil.rmtree(a.dir)
    assert vmusers.uid_of(_vm(tmp_path, "den-vm-c"), uids) == BASE + 1
    assert vmusers.uid_of(_vm(tmp_path, "den-vm-d"), uids) == BASE + 2
    assert vmusers.uid_of(_vm(tmp_path, "den-vm-e"), uids) == BASE  # round again: free
    with pytest.raises(EngineError, match="widen the range"):
        vmusers.uid_of(_vm(tmp_path, "den-vm-f"), uids)


@needs_root
def test_a_uid_a_process_runs_as_or_out_of_range_is_not_taken(tmp_path: Path) -> None:
    # A range holding 0: root's processes run as it, so the next one is handed out; checked
    # when the counter is lost and once the range has gone round.
    assert vmusers.uid_of(_vm(tmp_path, "den-vm-a"), UidRange(0, 2)) == 1
    shutil.rmtree(tmp_path / "den-vm-a")
    assert (tmp_path / vmusers.COUNTER).read_text() == "2"  # gone round: 0 is next
    assert vmusers.uid_of(_vm(tmp_path, "den-vm-z"), UidRange(0, 2)) == 1
    # A record naming a uid outside the range (a range changed since) gets a new one.
    b = _vm(tmp_path, "den-vm-b")
    b.record.write_text(json.dumps({"uid": 5}))
    assert vmusers.uid_of(b, UidRange(BASE, 10)) in UidRange(BASE, 10)


def test_a_directory_without_a_record_is_refused(tmp_path: Path) -> None:
    files = VmFiles(tmp_path / "den-vm-x")
    files.dir.mkdir()
    with pytest.raises(EngineError, match="no record"):
        vmusers.uid_of(files, UidRange(BASE, 10))
