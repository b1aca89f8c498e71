"""Workspaces as QEMU microVMs (DEN_BACKEND=microvm, docs/microvm.md), through the API of a
real server: what is microVM-only (its own kernel and the accelerator, QEMU unprivileged in a
cgroup of its own, the TCG size refusal, the guest's processes getting SIGTERM at stop, QEMU
killed, killed mid-pause, a hung guest, the workspace disk's size enforced, a full host
disk during a memory save, a truncated saved memory, a restarted Den finding its VMs). The lifecycle
contract both backends share is tests/engine/test_backends.py. Needs the boot files of
scripts/setup-microvm.sh (under CI their absence fails the module). One VM is shared by the
tests, in order (each boot takes seconds under TCG)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.runtime.microvm import cgroup, process
from server.runtime.microvm.argv import VmFiles
from server.runtime.microvm.cgroup import Cgroups
from tests.conftest import (
    IN_CI,
    RUN_PREFIX,
    ApiClient,
    bare_repo,
    git,
    microvm_subnet,
    remove_microvm_network,
    users,
)

pytestmark = pytest.mark.engine

BOOT_DIR = Path(os.environ.get("DEN_MICROVM_DIR") or "/var/lib/den/microvm")


def _setup_problem() -> str | None:
    missing = [n for n in ("vmlinux", "initramfs.cpio", "rootfs.ext4")
               if not (BOOT_DIR / n).is_file()]
    if missing:
        return (f"the microVM boot files are not built ({', '.join(missing)} missing in "
                f"{BOOT_DIR}): run scripts/setup-microvm.sh")
    return None


def _require_setup() -> None:
    """Skip on a developer machine without the boot files; fail under CI (make test builds
    them), as the engine tests do."""
    problem = _setup_problem()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"the microVM tests need their boot files under CI: {problem}")
        pytest.skip(problem)


@pytest.fixture(scope="module")
def vm_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiClient]:
    _require_setup()
    root = tmp_path_factory.mktemp("microvm")
    repos = root / "repos"
    src = root / "src"
    for d in (repos, src):
        d.mkdir()
    git("init", "-q", "-b", "main", cwd=src)
    (src / "README.md").write_text("# api\n")
    (src / "src").mkdir()
    (src / "src" / "main.py").write_text("print('hi')\n")
    git("add", "-A", cwd=src)
    git("commit", "-q", "-m", "initial", cwd=src)
    git("clone", "-q", "--bare", str(src), str(repos / "api.git"))
    settings = Settings(data_dir=root / "data", local_repo_roots=[repos], backend="microvm",
                        microvm_dir=BOOT_DIR, microvm_accel="auto",
                        engine_prefix=f"{RUN_PREFIX}-{secrets.token_hex(2)}",
                        default_memory_mb=512, default_cpus=1.0, default_disk_gb=1,
                        stop_timeout_s=5, reaper_interval_s=0, ssh_port=0,
                        outbound_allow=["127.0.0.0/8", "::1"], gpus="none",
                        microvm_subnet=microvm_subnet())
    app = create_app(settings)
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        api.repo = repos / "api.git"  # type: ignore[attr-defined]
        try:
            yield api
        finally:
            for ws in api.get("/api/v1/workspaces", user="root").json().get("workspaces", []):
                client.delete(f"/api/v1/workspaces/{ws['id']}", headers=api.h("root"))
            for d in (BOOT_DIR / "vms").glob(f"{settings.engine_prefix}-*"):
                process.end(VmFiles(d), timeout_s=0)
                subprocess.run(["rm", "-rf", str(d)], check=False)
                Cgroups().remove(d.name)
            remove_microvm_network(settings)


@pytest.fixture(scope="module")
def vm(vm_api: ApiClient) -> dict[str, Any]:
    """One running microVM workspace made from the repository."""
    ws = vm_api.create(vm_api.repo, wait=True, runtime="microvm")  # type: ignore[attr-defined]
    assert ws["state"] == "running", ws
    return ws


def vm_dir(api: ApiClient, ws_id: str) -> Path:
    """The workspace's VM directory (a restore moves it to a new name: <name>-<hex>)."""
    base = BOOT_DIR / "vms" / f"{api.app.state.settings.engine_prefix}-vm-{ws_id}"
    found = sorted(base.parent.glob(f"{base.name}*"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else base


def test_health_names_the_backend_and_its_accelerator(vm_api: ApiClient) -> None:
    engine = vm_api.get("/healthz").json()["engine"]
    assert engine["backend"] == "microvm"
    # This machine's /dev/kvm cannot boot a guest (RUNTIME.md): the check falls back to TCG.
    assert engine["accelerator"] in ("kvm", "tcg")
    if not os.access("/dev/kvm", os.W_OK):
        assert engine["accelerator"] == "tcg"


def test_tcg_refuses_more_vcpus_than_the_host_can_emulate(vm_api: ApiClient) -> None:
    if vm_api.get("/healthz").json()["engine"]["accelerator"] != "tcg":
        pytest.skip("KVM here: every size the operator allows is served")
    cores = len(os.sched_getaffinity(0))
    r = vm_api.post("/api/v1/workspaces", json={"name": "big", "resources": {"cpus": cores + 1},
                                                "repo": {"url": str(vm_api.repo)}})  # type: ignore[attr-defined]
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "resources_unfit" and "TCG" in r.text, r.text
    assert [w["name"] for w in vm_api.get("/api/v1/workspaces").json()["workspaces"]
            if w["name"] == "big"] == []  # nothing written


def _events(api: ApiClient, ws_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = api.get(f"/api/v1/workspaces/{ws_id}/events").json()["events"]
    return events


def _qmp(files: VmFiles, command: str) -> None:
    """One command to the VM's QEMU monitor (QMP)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(files.qmp))
        f = s.makefile("rwb")
        f.readline()  # the greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while b'"return"' not in (line := f.readline()):
                assert line and b'"error"' not in line, line


def test_the_workspace_runs_in_its_own_kernel(vm_api: ApiClient, vm: dict[str, Any]) -> None:
    """Debian's kernel, not the host's, with the accelerator in the event log; the whole VM is
    one QEMU process of the host with the workspace's disks in its directory. (The contract
    both backends share, create from Git to delete, is tests/engine/test_backends.py.)"""
    assert vm["runtime"] == "microvm"
    out = vm_api.exec(vm["id"], "pwd; ls; id -un; git log --format=%s -1; uname -r")
    assert out["exit_code"] == 0, out
    lines = out["stdout"].split("\n")
    assert lines[:5] == ["/workspace/api", "README.md", "src", "dev", "initial"], out
    host = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout.strip()
    guest = lines[5]
    assert guest != host and guest.endswith("-amd64"), (guest, host)  # Debian's kernel
    # The event log says how the VM runs (an engine event: it may come just after "running").
    accel = vm_api.get("/healthz").json()["engine"]["accelerator"].upper()
    deadline = time.monotonic() + 10
    while not [e for e in _events(vm_api, vm["id"]) if f"booted with {accel}" in e["message"]]:
        assert time.monotonic() < deadline, _events(vm_api, vm["id"])
        time.sleep(0.05)
    # The whole VM is one QEMU process of the host, with the workspace's disks in its dir.
    files = VmFiles(vm_dir(vm_api, vm["id"]))
    assert process.running(files) is not None
    assert files.root.exists() and files.workspace.exists()


def _cgroups_of(pid: int) -> dict[str, str]:
    """controller -> the cgroup path process ``pid`` is in (v1 lines; v2: key "")."""
    found = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            found[c] = path
    return found


def qemu_uid(files: VmFiles) -> int:
    """The uid the VM's QEMU runs as: its real, effective, saved and filesystem uids, and
    its gids, all the same number (the VM's own uid and group)."""
    pid = process.running(files)
    assert pid is not None
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uids = next(line.split()[1:] for line in status if line.startswith("Uid:"))
    gids = next(line.split()[1:] for line in status if line.startswith("Gid:"))
    assert len(set(uids)) == 1 and set(gids) == set(uids), status
    return int(uids[0])


def assert_vms_apart(a: VmFiles, b: VmFiles) -> None:
    """Two VMs' QEMUs run as different uids of Den's range; their directories are root's
    (0700: QEMU holds its disks as descriptors, jail.py). With ``b``'s credentials (a guest
    escaped into its QEMU) ``a``'s disk cannot be read nor ``a``'s QEMU signalled, while
    ``b``'s own QEMU can; not even ``b``'s own disk can be opened by path."""
    ua, ub = qemu_uid(a), qemu_uid(b)
    base = Settings().microvm_uid_base
    assert ua != ub and base <= ua and base <= ub, (ua, ub)
    for files, uid in ((a, ua), (b, ub)):
        st = files.dir.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o700), files.dir
        assert json.loads(files.record.read_text())["uid"] == uid

    def as_b(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", f"--reuid={ub}", f"--regid={ub}", "--clear-groups",
                               *argv], capture_output=True, text=True, timeout=30, check=False)

    denied = as_b("head", "-c", "1", str(a.workspace))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    assert as_b("head", "-c", "1", str(b.workspace)).returncode != 0
    assert as_b("kill", "-0", str(process.running(a))).returncode != 0
    assert as_b("kill", "-0", str(process.running(b))).returncode == 0


def test_qemu_runs_unprivileged_in_a_cgroup_of_its_own(vm_api: ApiClient,
                                                       vm: dict[str, Any]) -> None:
    """QEMU dropped root (-runas UID:GID, the VM's own uid, recorded in vm.json), runs in
    its jail (jail.py: chrooted into an empty directory, network and IPC namespaces of its
    own, its disks held as descriptors) and was born in the VM's cgroup, whose limits follow
    the workspace's cpus and memory (plus QEMU's overhead)."""
    files = VmFiles(vm_dir(vm_api, vm["id"]))
    pid = process.running(files)
    assert pid is not None
    uid = qemu_uid(files)
    assert uid >= vm_api.app.state.settings.microvm_uid_base, uid
    assert uid == json.loads(files.record.read_text())["uid"]
    jail_dir = files.dir.parent.parent / "jail"
    assert os.readlink(f"/proc/{pid}/root") == str(jail_dir)
    assert list(jail_dir.iterdir()) == [] and jail_dir.stat().st_mode & 0o777 == 0o555
    for ns in ("net", "ipc"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    links = ip_links_of(pid)
    assert links == ["lo"], links  # no way to the host's network from QEMU itself
    held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert {str(files.root), str(files.workspace)} <= held, held
    groups = _cgroups_of(pid)
    want = f"/{cgroup.PARENT}/{files.dir.name}"
    root = Path("/sys/fs/cgroup")
    if Cgroups(root).version() == 1:
        assert [groups[c] for c in ("cpu", "memory", "pids")] == [want] * 3, groups
        assert (root / "cpu" / want[1:] / "cpu.cfs_quota_us").read_text().strip() == "100000"
        limit = int((root / "memory" / want[1:] / "memory.limit_in_bytes").read_text())
        assert (root / "pids" / want[1:] / "pids.max").read_text().strip() == "256"
    else:
        assert groups[""] == want, groups
        assert (root / want[1:] / "cpu.max").read_text().split() == ["100000", "100000"]
        limit = int((root / want[1:] / "memory.max").read_text())
    assert limit == (512 + cgroup.QEMU_OVERHEAD_MB) * 1024 * 1024


def ip_links_of(pid: int) -> list[str]:
    """The network interfaces process ``pid`` sees (in its network namespace)."""
    out = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-o", "link"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()]


def test_workspace_disk_has_the_size_asked_for(vm_api: ApiClient, vm: dict[str, Any]) -> None:
    out = vm_api.exec(vm["id"], ["df", "--output=size", "-B1M", "/workspace"])
    size_mb = int(out["stdout"].split()[-1])
    assert 900 <= size_mb <= 1024, out  # disk_gb 1: ext4's own metadata takes the rest


def test_the_guests_processes_get_sigterm_at_stop(vm_api: ApiClient, vm: dict[str, Any]) -> None:
    """What they write then is kept, with the rest of /workspace, over stop and start."""
    ws_id = vm["id"]
    assert vm_api.exec(ws_id, "echo kept > /workspace/api/note")["exit_code"] == 0
    daemon = ("trap 'echo got-term > /workspace/term; exit 0' TERM; touch /tmp/armed; "
              "while :; do sleep 1; done")
    out = vm_api.exec(ws_id, ["sh", "-c", f"setsid sh -c \"{daemon}\" </dev/null >/dev/null "
                              "2>&1 & until [ -e /tmp/armed ]; do sleep 0.05; done"])
    assert out["exit_code"] == 0, out
    r = vm_api.post(f"/api/v1/workspaces/{ws_id}/stop")
    assert r.status_code in (200, 202), r.text
    assert vm_api.wait_state(ws_id, settled=("stopped", "error"))["state"] == "stopped"
    files = VmFiles(vm_dir(vm_api, ws_id))
    assert process.running(files) is None  # no QEMU left running
    r = vm_api.post(f"/api/v1/workspaces/{ws_id}/start")
    assert r.status_code in (200, 202), r.text
    assert vm_api.wait_state(ws_id, settled=("running", "error"))["state"] == "running"
    out = vm_api.exec(ws_id, "cat /workspace/api/note; git -C /workspace/api status --short")
    assert out["stdout"] == "kept\n?? note\n", out
    assert vm_api.exec(ws_id, "cat /workspace/term")["stdout"] == "got-term\n"


def test_a_killed_qemu_stops_the_workspace_with_an_event(vm_api: ApiClient,
                                                        vm: dict[str, Any]) -> None:
    """kill -9 of the VM's QEMU: the workspace is stopped at once (an engine event, not the
    next failing call) and the event log says why; a start boots it again."""
    ws_id = vm["id"]
    pid = process.running(VmFiles(vm_dir(vm_api, ws_id)))
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    ws = vm_api.wait_state(ws_id, settled=("stopped", "error"), timeout_s=30)
    assert ws["state"] == "stopped", ws
    events = _events(vm_api, ws_id)
    last = events[-1]
    assert last["actor"] == "engine" and "QEMU process ended" in last["message"], events[-3:]
    r = vm_api.post(f"/api/v1/workspaces/{ws_id}/start")
    assert r.status_code in (200, 202), r.text
    assert vm_api.wait_state(ws_id, settled=("running", "error"))["state"] == "running"
    assert vm_api.exec(ws_id, "cat /workspace/api/note")["stdout"] == "kept\n"


def test_a_guest_that_stops_answering_is_504_and_a_restart_brings_it_back(
        vm_api: ApiClient, vm: dict[str, Any]) -> None:
    """The guest's CPUs stopped (QEMU's monitor `stop`: a hung kernel as the host sees it,
    QEMU itself alive): an exec is a 504 naming the restart, not a hang; stop and start
    boot it again with /workspace kept."""
    ws_id = vm["id"]
    _qmp(VmFiles(vm_dir(vm_api, ws_id)), "stop")
    for _ in range(2):  # the live session's call, then a fresh hello's
        r = vm_api.post(f"/api/v1/workspaces/{ws_id}/exec", json={"cmd": "true"})
        assert r.status_code == 504, r.text
        assert "restart the workspace" in r.json()["error"]["message"], r.text
    r = vm_api.post(f"/api/v1/workspaces/{ws_id}/stop")
    assert r.status_code in (200, 202), r.text
    assert vm_api.wait_state(ws_id, settled=("stopped", "error"))["state"] == "stopped"
    r = vm_api.post(f"/api/v1/workspaces/{ws_id}/start")
    assert r.status_code in (200, 202), r.text
    assert vm_api.wait_state(ws_id, settled=("running", "error"))["state"] == "running"
    assert vm_api.exec(ws_id, "cat /workspace/api/note")["stdout"] == "kept\n"


def _event_lines(api: ApiClient, ws_id: str) -> list[str]:
    r = api.get(f"/api/v1/workspaces/{ws_id}/events")
    assert r.status_code == 200, r.text
    return [f"{e['kind']} {e['to_state'] or ''} {e['message']}" for e in r.json()["events"]]


def test_qemu_dying_mid_pause_leaves_the_workspace_to_start_cold(
        vm_api: ApiClient, vm: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Failure injection: QEMU is killed as soon as it is told to save its memory."""
    from server.runtime.microvm.qmp import Qmp

    ws_id = vm["id"]
    assert vm_api.exec(ws_id, "echo synced > /workspace/api/kept")["exit_code"] == 0
    real = Qmp.execute
    killed: list[int] = []

    def dying(self: Qmp, name: str, arguments: Any = None, *, fds: Any = None) -> Any:
        out = real(self, name, arguments, fds=fds)
        if name == "migrate":
            pid = process.running(VmFiles(vm_dir(vm_api, ws_id)))
            assert pid is not None
            os.kill(pid, 9)
            killed.append(pid)
        return out

    monkeypatch.setattr(Qmp, "execute", dying)
    r = vm_api.post(f"/api/v1/workspaces/{ws_id}/pause")
    monkeypatch.undo()
    assert killed and r.status_code >= 500, r.text
    assert "QEMU exited while saving" in r.text, r.text
    ws = vm_api.get(f"/api/v1/workspaces/{ws_id}").json()
    assert ws["state"] == "stopped", ws
    files = VmFiles(vm_dir(vm_api, ws_id))
    assert not (files.dir / "checkpoints" / "den-pause").exists()
    assert not (files.dir / "checkpoints" / ".den-pause.tmp").exists()
    # The next access starts it cold from its disk: files kept, processes (and /tmp) not.
    out = vm_api.exec(ws_id, "cat /workspace/api/kept; test -e /tmp/count || echo cold")
    assert out["stdout"] == "synced\ncold\n", out
    events = _event_lines(vm_api, ws_id)
    assert any("pause failed" in e and "starts cold from its disk" in e for e in events), events
    assert any("started on access" in e for e in events), events


def test_a_truncated_saved_memory_starts_cold_from_disk(vm_api: ApiClient,
                                                        vm: dict[str, Any]) -> None:
    """The saved memory cut short (a disk that lost its tail, a copy interrupted): the
    resume does not hang or lose the disk; the workspace starts cold and the event log says
    so."""
    ws_id = vm["id"]
    out = vm_api.exec(ws_id, "echo on-disk > /workspace/api/kept; echo in-memory > /tmp/mem")
    assert out["exit_code"] == 0, out
    r = vm_api.post(f"/api/v1/workspaces/{ws_id}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused", r.text
    state = vm_dir(vm_api, ws_id) / "checkpoints" / "den-pause" / "state"
    size = state.stat().st_size
    with state.open("r+b") as f:
        f.truncate(size // 2)
    r = vm_api.post(f"/api/v1/workspaces/{ws_id}/resume")
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    out = vm_api.exec(ws_id, "cat /workspace/api/kept; test -e /tmp/mem || echo cold")
    assert out["stdout"] == "on-disk\ncold\n", out
    last = _event_lines(vm_api, ws_id)[-1]
    assert "restore from memory failed" in last and "started cold from disk" in last, last
    assert process.running(VmFiles(vm_dir(vm_api, ws_id))) is not None


def test_the_workspace_disk_never_grows_past_its_size(vm_api: ApiClient,
                                                      vm: dict[str, Any]) -> None:
    """A guest writing past disk_gb gets ENOSPC; the host's image file stays within its
    size (apparent and allocated)."""
    ws_id = vm["id"]
    # Most of the free space reserved at once (no data written), then 64 MiB more than is
    # left written for real.
    fill = ("left=$(df --output=avail -B1 /workspace | tail -1); "
            "fallocate -l $((left - 32 * 1048576)) /workspace/fill && "
            "head -c 96M /dev/zero > /workspace/more; echo rc=$?; sync")
    out = vm_api.exec(ws_id, ["sh", "-c", fill])
    assert "rc=1" in out["stdout"] and "No space left on device" in out["stderr"], out
    image = vm_dir(vm_api, ws_id) / "workspace.img"
    st = image.stat()
    assert st.st_size == 1 << 30, st  # disk_gb 1
    assert st.st_blocks * 512 <= 1 << 30, st
    out = vm_api.exec(ws_id, "rm /workspace/fill /workspace/more && cat /workspace/api/kept")
    assert out["stdout"] == "on-disk\n", out  # the workspace goes on, its files whole


def test_a_full_host_disk_during_the_memory_save_leaves_the_workspace_running(
        tmp_path: Path) -> None:
    """The VM directories on a small filesystem that fills up while QEMU saves the guest's
    memory: the pause fails with the reason, the workspace runs on (its processes too), no
    partial checkpoint is left, and a pause once there is room works."""
    _require_setup()
    small = Path(tempfile.mkdtemp(prefix="dentest-vmfull-"))
    small.chmod(0o711)  # QEMU runs as den-vm: it must reach its VM's directory
    for name in ("vmlinux", "initramfs.cpio", "rootfs.ext4"):
        (small / name).symlink_to((BOOT_DIR / name).resolve())
    (small / "vms").mkdir(mode=0o711)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m,mode=0711", "tmpfs",
                    str(small / "vms")], check=True)
    repos = tmp_path / "repos"
    repos.mkdir()
    repo = bare_repo(repos, tmp_path / "src", files={"README.md": "# api\n"})
    settings = Settings(data_dir=tmp_path / "data", local_repo_roots=[repos],
                        backend="microvm", microvm_dir=small, microvm_accel="auto",
                        engine_prefix=f"{RUN_PREFIX}-{secrets.token_hex(2)}",
                        default_memory_mb=512, default_cpus=1.0, default_disk_gb=1,
                        stop_timeout_s=5, reaper_interval_s=0, ssh_port=0,
                        outbound_allow=["127.0.0.0/8", "::1"], gpus="none",
                        microvm_subnet=microvm_subnet())
    try:
        with TestClient(create_app(settings)) as client:
            api = ApiClient(client, users(client.app))
            ws = api.create(repo, runtime="microvm")
            assert ws["state"] == "running", ws
            wid = ws["id"]
            assert api.exec(wid, "echo mem > /tmp/mem")["exit_code"] == 0
            files = VmFiles(next((small / "vms").glob(f"*-vm-{wid}")))
            # Leave 16 MiB free: an idle 512 MB guest's memory is about 80 MB.
            free = os.statvfs(small / "vms")
            filler = small / "vms" / "filler"
            with filler.open("wb") as f:
                os.posix_fallocate(f.fileno(), 0, free.f_bavail * free.f_frsize - (16 << 20))
            r = api.post(f"/api/v1/workspaces/{wid}/pause")
            assert r.status_code >= 500, r.text
            message = r.json()["error"]["message"]
            assert "could not save the VM's memory" in message, message
            assert "No space left on device" in message, message
            assert api.get(f"/api/v1/workspaces/{wid}").json()["state"] == "running"
            assert not (files.dir / "checkpoints" / ".den-pause.tmp").exists()
            assert not (files.dir / "checkpoints" / "den-pause").exists()
            assert api.exec(wid, "cat /tmp/mem")["stdout"] == "mem\n"  # it ran on
            events = _event_lines(api, wid)
            assert any("pause failed" in e and "the workspace is running" in e
                       for e in events), events
            filler.unlink()
            r = api.post(f"/api/v1/workspaces/{wid}/pause")
            assert r.status_code == 200 and r.json()["state"] == "paused", r.text
            assert api.exec(wid, "cat /tmp/mem")["stdout"] == "mem\n"  # woken from memory
            assert api.delete(f"/api/v1/workspaces/{wid}").status_code in (200, 202, 204)
    finally:
        for d in (small / "vms").glob(f"{settings.engine_prefix}-*"):
            process.end(VmFiles(d), timeout_s=0)
            Cgroups().remove(d.name)
        subprocess.run(["umount", str(small / "vms")], check=False)
        remove_microvm_network(settings)
        subprocess.run(["rm", "-rf", str(small)], check=False)


def test_a_restarted_den_finds_the_running_vm_and_its_agent(tmp_path: Path) -> None:
    """QEMU runs daemonized: a new runtime (Den after a restart) finds the VM by its directory,
    lists it for reconcile, and reaches the same agent once the old session is gone."""
    _require_setup()
    from server.runtime.base import ContainerStatus, ExecRequest, WorkspaceSpec, labels_for
    from server.runtime.microvm.backend import MicroVmRuntime

    prefix = f"{RUN_PREFIX}-{secrets.token_hex(2)}"
    vms = BOOT_DIR / "vms"

    def runtime() -> MicroVmRuntime:
        return MicroVmRuntime(boot_dir=BOOT_DIR, vms_dir=vms, image="den/workspace:latest",
                              prefix=prefix)

    first = runtime()
    spec = WorkspaceSpec(workspace_id="r1", handle=first.new_handle("r1"),
                         image="den/workspace:latest", runtime="microvm", cpus=1,
                         memory_mb=512, pids_limit=1024, hostname="r1",
                         labels=labels_for(instance=prefix, workspace_id="r1", owner="t"),
                         disk_gb=1)

    async def scenario() -> None:
        await first.check()
        await first.create(spec)
        await first.start(spec)
        before = await first.exec(spec, ExecRequest(argv=["sh", "-c", "echo $$ > /tmp/mark"]))
        assert before.exit_code == 0, before
        old = await first.agent(spec)
        assert old is not None
        await old.close("Den went away")
        again = runtime()
        await again.check()
        assert await again.status(spec) is ContainerStatus.RUNNING
        [obj] = await again.list_objects(prefix)
        assert (obj.name, obj.workspace_id, obj.running) == (spec.handle["vm"], "r1", True)
        assert not again.stale(obj, spec.handle)
        out = await again.exec(spec, ExecRequest(argv=["cat", "/tmp/mark"]))
        assert out.exit_code == 0 and out.stdout.strip().isdigit(), out  # same boot: /tmp kept
        # Den killed during a pause (fault point pause.checkpoint, right after QEMU was told
        # to migrate): a new Den's reconcile settles it, QEMU's save completes and is
        # installed, and the workspace resumes from it with its memory.
        await (await again.agent(spec)).close("the pausing Den is another process")  # type: ignore[union-attr]
        files = again.files(spec)
        dying = subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; "
             "from server.runtime.microvm import checkpoint, argv; "
             "checkpoint.save(argv.VmFiles(Path(sys.argv[1])), 'den-pause', meta={"
             "'vm': Path(sys.argv[1]).name, 'hostname': 'r1', 'cpus': 1.0, "
             "'memory_mb': 512})", str(files.dir)],
            env={**os.environ, "DEN_FAULT": "pause.checkpoint"}, capture_output=True,
            timeout=120, check=False)
        assert dying.returncode == -9, dying.stderr  # SIGKILL at the fault point
        assert (files.dir / "checkpoints" / ".den-pause.tmp").is_dir()
        assert await again.settle_checkpoint(spec, checkpoint="den-pause", wait_s=60)
        assert await again.status(spec) is ContainerStatus.STOPPED  # QEMU quit after its save
        await again.resume(spec, checkpoint="den-pause")
        kept = await again.exec(spec, ExecRequest(argv=["cat", "/tmp/mark"]))
        assert kept.stdout == out.stdout, kept  # /tmp (memory) came back
        await again.remove_object(obj)
        assert await again.status(spec) is ContainerStatus.MISSING
        assert await again.list_objects(prefix) == []

    try:
        asyncio.run(scenario())
    finally:
        for d in vms.glob(f"{prefix}-*"):
            process.end(VmFiles(d), timeout_s=0)
            subprocess.run(["rm", "-rf", str(d)], check=False)
            Cgroups().remove(d.name)
