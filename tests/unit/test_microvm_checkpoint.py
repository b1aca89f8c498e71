"""The microVM backend's pause, snapshot and fork parts that need no VM: QMP's messages and a
monitor client against a scripted monitor on a real Unix socket, the command lines that load
a checkpoint and copy disks, a checkpoint's files (written, exported, installed, deleted),
and the names of snapshots and restores."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.runtime.errors import ObjectMissing
from server.runtime.microvm import checkpoint, qmp
from server.runtime.microvm.argv import VmFiles
from server.runtime.microvm.backend import MicroVmRuntime
from server.runtime.microvm.features import fork_identity_argv, launched_with
from server.runtime.microvm.snapshots import copy_argv, copy_disks


def test_commands_are_one_json_line() -> None:
    assert qmp.command("stop") == b'{"execute": "stop"}\n'
    assert json.loads(qmp.command("migrate", uri="fd:x")) == {
        "execute": "migrate", "arguments": {"uri": "fd:x"}}


@pytest.mark.parametrize(("line", "kind", "value"), [
    (b'{"return": {}}', "return", {}),
    (b'{"return": {"status": "completed"}}', "return", {"status": "completed"}),
    (b'{"error": {"class": "GenericError", "desc": "no"}}', "error", "no"),
    (b'{"event": "STOP", "timestamp": {}}', "event", "STOP"),
    (b'{"QMP": {"version": {}}}', "greeting", {"version": {}}),
])
def test_answers_are_told_apart(line: bytes, kind: str, value: object) -> None:
    assert qmp.answer(line) == (kind, value)


@pytest.mark.parametrize("line", [b"not json", b"[1]", b'{"other": 1}'])
def test_what_is_not_qmp_is_an_error(line: bytes) -> None:
    with pytest.raises(qmp.QmpError):
        qmp.answer(line)


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, object]]]]:
    """A scripted QMP monitor: greets, answers each command (events in between), and keeps
    what it received (and the descriptors passed with ``getfd``)."""
    path = tmp_path / "qmp.sock"
    got: list[dict[str, object]] = []
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\n')
            buf = b""
            while True:
                msg, fds, _, _ = socket.recv_fds(conn, 65536, 4)
                if not msg:
                    return
                buf += msg
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    cmd = json.loads(line)
                    cmd["fds"] = len(fds)
                    for fd in fds:
                        os.close(fd)
                    got.append(cmd)
                    if cmd["execute"] == "bad":
                        conn.sendall(b'{"error": {"class": "GenericError", "desc": "nope"}}\n')
                    elif cmd["execute"] == "query-migrate":
                        done = sum(c["execute"] == "query-migrate" for c in got) >= 3
                        conn.sendall(b'{"event": "MIGRATION", "data": {}}\n')
                        conn.sendall(json.dumps({"return": {
                            "status": "completed" if done else "active"}}).encode() + b"\n")
                    else:
                        conn.sendall(b'{"return": {}}\n')

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, got
    srv.close()
    t.join(5)


def test_client_negotiates_skips_events_and_passes_descriptors(
        monitor: tuple[Path, list[dict[str, object]]], tmp_path: Path) -> None:
    path, got = monitor
    with qmp.Qmp(path) as q:
        assert q.execute("stop") == {}
        fd = os.open(tmp_path / "state", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            q.execute("getfd", {"fdname": "m"}, fds=[fd])
        finally:
            os.close(fd)
        final = q.wait_for("query-migrate", lambda s: s["status"] == "completed",
                           timeout_s=10)
        assert final == {"status": "completed"}
        with pytest.raises(qmp.QmpError, match="QEMU refused bad: nope"):
            q.execute("bad")
    assert [c["execute"] for c in got] == ["qmp_capabilities", "stop", "getfd",
                                          "query-migrate", "query-migrate", "query-migrate",
                                          "bad"]
    assert got[2] == {"execute": "getfd", "arguments": {"fdname": "m"}, "fds": 1}


def test_a_monitor_that_is_not_there_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(qmp.QmpError, match="does not answer"):
        qmp.Qmp(tmp_path / "none.sock")


def test_a_checkpoint_loads_into_the_vms_own_command_line() -> None:
    argv = ["qemu", "-smp", "2", "-m", "512M", "-daemonize"]
    assert checkpoint.incoming_argv(argv) == [*argv, "-incoming", "defer"]
    assert launched_with(argv) == (2.0, 512)


def test_a_fork_takes_its_own_host_name_and_stirs_its_random_pool() -> None:
    argv = fork_identity_argv("b; rm -rf /")
    assert argv[:2] == ["sh", "-c"] and "/dev/urandom" in argv[2]
    assert argv[-1] == "b; rm -rf /"  # an argument of the script, never part of it
    # With its network: the address's commands run after, in the same round trip.
    both = fork_identity_argv("b", ["sh", "-c", "ip addr", "den-net"])
    assert both[3:] == ["den-fork", "b", "sh", "-c", "ip addr", "den-net"]
    assert both[2].endswith('&& shift && exec "$@"')


def test_disks_are_copied_sparse_with_shared_blocks_where_possible() -> None:
    assert copy_argv(Path("/a/x"), Path("/b/-y")) == [
        "cp", "--reflink=auto", "--sparse=always", "--", "/a/x", "/b/-y"]


def _checkpoint(files: VmFiles, name: str, data: bytes = b"RAM") -> Path:
    d = checkpoint.directory(files, name)
    d.mkdir(parents=True)
    (d / checkpoint.STATE).write_bytes(data)
    (d / checkpoint.META).write_text(json.dumps({"vm": files.dir.name, "cpus": 1.0,
                                                 "memory_mb": 512}))
    return d


def test_checkpoints_export_install_and_delete(tmp_path: Path) -> None:
    vm, fork = VmFiles(tmp_path / "vm-a"), VmFiles(tmp_path / "vm-b")
    _checkpoint(vm, "den-pause")
    assert checkpoint.read_meta(checkpoint.directory(vm, "den-pause"))["vm"] == "vm-a"
    dest = tmp_path / "snapshots" / "sn1"
    size = checkpoint.export(vm, "den-pause", dest)
    assert size == len(b"RAM") + (dest / checkpoint.META).stat().st_size
    checkpoint.delete(vm, "den-pause")  # the snapshot's copy stays
    assert not checkpoint.directory(vm, "den-pause").exists()
    assert (dest / checkpoint.STATE).read_bytes() == b"RAM"
    checkpoint.install(fork, "den-pause", dest)
    installed = checkpoint.directory(fork, "den-pause")
    assert (installed / checkpoint.STATE).read_bytes() == b"RAM"
    assert checkpoint.read_meta(installed)["vm"] == "vm-a"  # resume knows it is a fork
    checkpoint.delete(fork, "den-pause")
    assert (dest / checkpoint.STATE).exists()


def test_a_missing_or_partial_checkpoint_is_missing(tmp_path: Path) -> None:
    vm = VmFiles(tmp_path / "vm")
    with pytest.raises(ObjectMissing):
        checkpoint.read_meta(checkpoint.directory(vm, "den-pause"))
    d = _checkpoint(vm, "den-pause")
    (d / checkpoint.STATE).unlink()
    with pytest.raises(ObjectMissing):
        checkpoint.export(vm, "den-pause", tmp_path / "out")


def test_a_vm_with_no_qemu_settles_to_its_complete_checkpoint_only(tmp_path: Path) -> None:
    vm = VmFiles(tmp_path / "vm")
    tmp = checkpoint.partial(vm, "den-pause")
    tmp.mkdir(parents=True)
    (tmp / checkpoint.STATE).write_bytes(b"half")
    assert checkpoint.settle(vm, "den-pause", wait_s=0) is False
    assert not tmp.exists()  # a partial save is removed
    _checkpoint(vm, "den-pause")
    assert checkpoint.settle(vm, "den-pause", wait_s=0) is True


def test_disk_copies_are_complete_or_absent(tmp_path: Path) -> None:
    src, dst = VmFiles(tmp_path / "a"), VmFiles(tmp_path / "snap")
    src.dir.mkdir()
    src.root.write_bytes(b"root")
    with src.workspace.open("wb") as f:
        f.truncate(1 << 30)  # sparse: the copy stays sparse
    size = copy_disks(src, dst, record={"labels": {"den.snapshot": "s"}})
    assert dst.root.read_bytes() == b"root" and dst.workspace.stat().st_size == 1 << 30
    assert size < 1 << 20
    assert json.loads(dst.record.read_text()) == {"labels": {"den.snapshot": "s"}}
    src.workspace.unlink()
    with pytest.raises(ObjectMissing):
        copy_disks(src, VmFiles(tmp_path / "other"), record={})
    assert not (tmp_path / "other").exists() and not (tmp_path / ".other.tmp").exists()


def test_a_forks_disk_copy_whose_create_is_cancelled_makes_nothing_more(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A delete cancels the fork's create while a disk is being copied (in a thread it
    cannot stop: server/runtime/inflight.py); the copy stops before the next disk and leaves
    no VM directory, and the delete, waiting for the thread, sees it end."""
    import asyncio
    import contextlib

    from server.runtime import inflight
    from server.runtime.base import WorkspaceSpec
    from server.runtime.microvm import disks

    rt = MicroVmRuntime(boot_dir=tmp_path, vms_dir=tmp_path / "vms", image="img")
    snap = rt.new_snapshot("sn1", {"den.instance": "i"})
    src = VmFiles(tmp_path / "vms" / str(snap.handle["snapshot"]))
    src.dir.mkdir(parents=True)
    src.root.write_bytes(b"root")
    src.workspace.write_bytes(b"data")
    spec = WorkspaceSpec(workspace_id="ws1", handle=rt.new_handle("ws1"), image="img",
                         runtime="microvm", cpus=1, memory_mb=512, pids_limit=100,
                         hostname="fork", labels={"den.workspace": "ws1"})
    copying, gate = threading.Event(), threading.Event()
    copies: list[str] = []
    real = disks.run_tool

    def slow_tool(argv: list[str], **kw: object) -> None:
        copies.append(argv[-1])
        copying.set()
        gate.wait(30)
        real(argv, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(disks, "run_tool", slow_tool)

    async def delete_mid_copy() -> bool:
        calls = inflight.Calls()
        fork = asyncio.create_task(rt.load_snapshot(spec, snap),
                                   context=inflight.tracking(calls))
        assert await asyncio.to_thread(copying.wait, 30)
        fork.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fork
        assert calls.pending == 1  # the copy runs on in its thread
        gate.set()
        return await calls.settled(30)

    assert asyncio.run(delete_mid_copy())
    assert len(copies) == 1  # the second disk was not copied
    assert sorted(p.name for p in (tmp_path / "vms").iterdir()) == [src.dir.name]


def test_snapshot_and_restore_names(tmp_path: Path) -> None:
    rt = MicroVmRuntime(boot_dir=tmp_path, vms_dir=tmp_path / "vms", image="img")
    snap = rt.new_snapshot("sn1", {"den.instance": "i"})
    assert (snap.image, dict(snap.handle)) == ("img", {"snapshot": "den-snap-sn1"})
    assert snap.labels["den.snapshot"] == "sn1"
