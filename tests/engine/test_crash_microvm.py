"""Crash consistency on the microVM backend: test_crash.py's cases that apply to QEMU
microVMs (docs/microvm.md). ``den serve`` (DEN_BACKEND=microvm) is killed (SIGKILL) at the
fault points of create, fork, restore, snapshot, pause, resume and delete, and a VM's QEMU is killed
while Den is down; then Den starts again. After each restart: no workspace is left in a
transitional state, the files are kept (or the workspace is explicitly ``error``), no VM
directory (nor a half-made copy of one) or QEMU process of the run is orphaned, and the event
log says what happened. One server, one small workspace, one disk snapshot.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import Settings
from server.runtime.microvm import process
from server.runtime.microvm.argv import VmFiles
from tests.conftest import RUN_PREFIX, bare_repo, microvm_subnet, remove_microvm_network
from tests.engine.test_crash import TRANSITIONAL, Crashing, _assert_data, _only_new, _repo, _wait
from tests.engine.test_microvm import BOOT_DIR, _require_setup

pytestmark = pytest.mark.engine

World = tuple[Crashing, str, str, list[str]]


def _vm_dirs(prefix: str) -> list[Path]:
    """The run's entries in the VMs' directory, half-made copies (``.<name>.tmp``) too."""
    vms = BOOT_DIR / "vms"
    return sorted([*vms.glob(f"{prefix}-*"), *vms.glob(f".{prefix}-*")])


def _qemus(prefix: str) -> dict[int, str]:
    """QEMU processes of the run: pid -> the VM directory their command line names."""
    found = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu" in argv[0]:
            for arg in argv:
                text = arg.decode(errors="replace")
                if f"/vms/{prefix}-" in text:
                    found[int(cmdline.parent.name)] = text.split("/vms/")[1].split("/")[0]
                    break
    return found


def check_consistent(srv: Crashing) -> None:
    """No row in a transitional state; every VM and snapshot directory of the run belongs to
    a row, no half-made copy is left, a workspace has one VM, and no QEMU runs a VM whose
    directory is gone."""
    rows = srv.rows()
    assert not [(w["name"], w["state"]) for w in rows if w["state"] in TRANSITIONAL], rows
    known, snaps = {w["id"] for w in rows}, set(srv.snapshots())
    owners: list[str] = []
    for d in _vm_dirs(srv.prefix):
        assert not d.name.startswith("."), f"a half-made copy was left: {d}"
        kind, _, rest = d.name[len(srv.prefix) + 1:].partition("-")
        ident = rest.split("-")[0]
        assert ident in (known if kind == "vm" else snaps), f"orphan {d}"
        if kind == "vm":
            owners.append(ident)
    assert len(owners) == len(set(owners)), owners  # one VM directory per workspace
    for pid, name in _qemus(srv.prefix).items():
        assert (BOOT_DIR / "vms" / name).is_dir(), f"QEMU {pid} runs the removed VM {name}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The server, a running microVM workspace whose /workspace/keep says "v2", a disk
    snapshot of it when it said "v1", and the list of workspace ids the tests made."""
    _require_setup()
    root = tmp_path_factory.mktemp("crash-microvm")
    repos = root / "repos"
    repos.mkdir()
    bare_repo(repos, root / "src")
    subnet = microvm_subnet()  # a bridge of this server's own, removed at the end
    srv = Crashing(root / "data", repos, f"{RUN_PREFIX}-vmcrash{os.getpid() % 1000}",
                   user="alice", default_memory_mb=512, default_cpus=1, stop_timeout_s=2,
                   ssh_port=0, backend="microvm", microvm_dir=BOOT_DIR, microvm_accel="auto",
                   default_disk_gb=1, microvm_subnet=subnet, http_timeout_s=240)
    srv.start()
    try:
        r = srv.http.post("/api/v1/workspaces", json={"name": "base",
                                                      "repo": {"url": str(repos / "api.git")}})
        assert r.status_code == 202, r.text
        wid = r.json()["id"]
        assert _wait(lambda: srv.ws(wid).get("state") == "running", 240), srv.ws(wid)
        srv.exec(wid, "echo v1 > /workspace/keep && mkdir -p /workspace/api/d")
        r = srv.http.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "v1"})
        assert r.status_code == 201, r.text
        srv.exec(wid, "echo v2 > /workspace/keep")
        yield srv, wid, r.json()["id"], [wid]
    finally:
        for w in srv.rows() if srv.proc and srv.proc.poll() is None else []:
            srv.http.delete(f"/api/v1/workspaces/{w['id']}", params={"snapshots": "true"})
        srv.close()
        for d in _vm_dirs(srv.prefix):
            process.end(VmFiles(d), timeout_s=0)
            subprocess.run(["rm", "-rf", str(d)], check=False)
        remove_microvm_network(Settings(engine_prefix=srv.prefix, microvm_subnet=subnet))


def _no_vm(srv: Crashing, wid: str) -> None:
    assert not [d for d in _vm_dirs(srv.prefix) if f"-vm-{wid}" in d.name]


def _create_cut_short(world: World, point: str, body: dict[str, object]) -> None:
    """A create killed at ``point``: the new workspace is in error saying Den restarted,
    nothing of its VM is left, and it can be deleted."""
    srv, _, _, ids = world
    srv.crash_at(point, lambda: srv.http.post("/api/v1/workspaces", json=body))
    wid = _only_new(srv, str(body["name"]))
    ids.append(wid)
    ws = srv.ws(wid)
    assert ws["state"] == "error" and "restarted while" in ws["state_reason"], ws
    check_consistent(srv)
    _no_vm(srv, wid)
    assert srv.http.delete(f"/api/v1/workspaces/{wid}").status_code == 204


def test_crash_while_cloning_a_new_workspace(world: World) -> None:
    srv = world[0]
    _create_cut_short(world, "create.clone", {"name": "c1", "repo": {"url": _repo(srv)}})


def test_crash_while_a_fork_copies_its_disks(world: World) -> None:
    sid = world[2]
    _create_cut_short(world, "fork.copy", {"name": "f1", "from_snapshot": sid})


def test_crash_while_a_restore_copies_keeps_the_workspace_as_it_was(world: World) -> None:
    srv, wid, sid, _ = world
    srv.crash_at("restore.copy", lambda: srv.http.post(f"/api/v1/snapshots/{sid}/restore"))
    ws = srv.ws(wid)
    assert ws["state"] == "stopped", ws
    assert "exactly as it was" in srv.events(wid)[-1]
    check_consistent(srv)
    _assert_data(srv, wid, "v2")  # the pre-restore data, whole


def test_crash_after_a_restore_copied_finishes_it(world: World) -> None:
    srv, wid, sid, _ = world
    srv.crash_at("restore.swap", lambda: srv.http.post(f"/api/v1/snapshots/{sid}/restore"))
    ws = srv.ws(wid)
    assert ws["state"] == "stopped", ws
    assert "it is finished now" in srv.events(wid)[-1]
    check_consistent(srv)
    _assert_data(srv, wid, "v1")  # the snapshot's data
    srv.exec(wid, "echo v2 > /workspace/keep")


def test_crash_while_a_snapshot_is_copied_leaves_no_half_snapshot(world: World) -> None:
    srv, wid, sid, _ = world
    srv.crash_at("snapshot.copy", lambda: srv.http.post(
        f"/api/v1/workspaces/{wid}/snapshots", json={"name": "half"}))
    assert srv.snapshots() == [sid]
    assert srv.ws(wid)["state"] == "running"
    # The VM's CPUs were stopped for the copy: reconcile let it run again (its agent answers).
    assert "CPUs were left stopped" in srv.events(wid)[-1]
    check_consistent(srv)
    _assert_data(srv, wid, "v2")


def test_crash_while_the_memory_is_saved_uses_the_saved_memory(world: World) -> None:
    """QEMU outlives Den: reconcile waits for its migration and installs it."""
    srv, wid, _, _ = world
    srv.exec(wid, "echo alive > /tmp/t")  # /tmp is memory only in a microVM
    srv.crash_at("pause.checkpoint", lambda: srv.http.post(f"/api/v1/workspaces/{wid}/pause"))
    ws = srv.ws(wid)
    assert ws["state"] == "paused", ws
    assert "checkpoint was complete" in srv.events(wid)[-1]
    check_consistent(srv)
    out = srv.exec(wid, "cat /tmp/t /workspace/keep")
    assert out["stdout"] == "alive\nv2\n", out  # resumed from memory
    assert "restored from memory" in srv.events(wid)[-1]


def test_crash_while_resuming_finds_the_guest_running(world: World) -> None:
    """Den dies once QEMU has loaded the saved memory, before its agent's session: the
    workspace is running with its processes, and what is left of its checkpoint is no
    problem for the next pause."""
    srv, wid, _, _ = world
    r = srv.http.post(f"/api/v1/workspaces/{wid}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused", r.text
    srv.crash_at("resume.session", lambda: srv.http.post(f"/api/v1/workspaces/{wid}/resume"))
    ws = srv.ws(wid)
    assert ws["state"] == "running", ws
    assert "interrupted by a restart" in srv.events(wid)[-1]
    check_consistent(srv)
    out = srv.exec(wid, "cat /tmp/t /workspace/keep")
    assert out["stdout"] == "alive\nv2\n", out  # the memory was restored
    r = srv.http.post(f"/api/v1/workspaces/{wid}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused", r.text
    assert srv.exec(wid, "cat /tmp/t")["stdout"] == "alive\n"


def test_qemu_killed_while_den_is_down_is_found_stopped(world: World) -> None:
    srv, wid, _, _ = world
    srv.exec(wid, "true")
    [(pid, _)] = [(p, n) for p, n in _qemus(srv.prefix).items() if f"-vm-{wid}" in n]
    srv.kill9()
    os.kill(pid, signal.SIGKILL)
    assert _wait(lambda: not Path(f"/proc/{pid}").exists(), 30)
    srv.start(timeout_s=240)
    ws = srv.ws(wid)
    assert ws["state"] == "stopped", ws  # the row said running; the engine says otherwise
    check_consistent(srv)
    _assert_data(srv, wid, "v2")  # the next access starts it cold from its disk


def test_crash_while_deleting_finishes_the_delete(world: World) -> None:
    srv, _, _, ids = world
    r = srv.http.post("/api/v1/workspaces", json={"name": "d1", "repo": {"url": _repo(srv)}})
    wid = r.json()["id"]
    ids.append(wid)
    assert _wait(lambda: srv.ws(wid).get("state") == "running", 240), srv.ws(wid)
    srv.crash_at("delete.volume", lambda: srv.http.delete(f"/api/v1/workspaces/{wid}"))
    assert srv.ws(wid) == {"status": 404}
    check_consistent(srv)
    _no_vm(srv, wid)
