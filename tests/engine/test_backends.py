"""The lifecycle contract a user relies on, run once per backend: `docker` (gVisor) and
`microvm` (QEMU, docs/microvm.md), through the HTTP API of a real server.

One workspace per backend is shared by the tests, in order (a microVM boots in seconds under
TCG): create from Git, exec, files, a streaming exec, stop and start, pause and resume with a
running process, a memory snapshot forked and restored, delete leaving no engine object, and
a fork of the snapshot after its workspace is gone. What a backend does not support is
asserted as the clear refusal it gets (docs/microvm.md, "What each backend refuses"), never
skipped. The docker run needs the engine (the ``engine`` fixture), the microvm run the boot
files of scripts/setup-microvm.sh: each is skipped on a developer machine without them and
fails under CI, as the other engine tests do.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.runtime.microvm import process
from server.runtime.microvm.argv import VmFiles
from tests.conftest import (
    RUN_PREFIX,
    ApiClient,
    bare_repo,
    engine_objects,
    microvm_subnet,
    remove_microvm_network,
    users,
)
from tests.engine.test_microvm import BOOT_DIR, _require_setup, vm_dir

pytestmark = pytest.mark.engine

BACKENDS = ("docker", "microvm")


@pytest.fixture(scope="module", params=BACKENDS)
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[ApiClient]:
    """A server on one backend, with the repository ``api.git`` it may clone."""
    backend: str = request.param
    if backend == "docker":
        request.getfixturevalue("engine")
    else:
        _require_setup()
    root = tmp_path_factory.mktemp(f"backend-{backend}")
    repos = root / "repos"
    repos.mkdir()
    repo = bare_repo(repos, root / "src", files={"README.md": "# api\n",
                                                 "src/main.py": "print('hi')\n"})
    prefix = f"{RUN_PREFIX}-{secrets.token_hex(2)}"
    extra: dict[str, Any] = ({"microvm_dir": BOOT_DIR, "microvm_accel": "auto",
                              "default_disk_gb": 1, "microvm_subnet": microvm_subnet()}
                             if backend == "microvm" else {})
    settings = Settings(data_dir=root / "data", local_repo_roots=[repos], backend=backend,
                        engine_prefix=prefix, default_memory_mb=512, default_cpus=1.0,
                        stop_timeout_s=5, reaper_interval_s=0, ssh_port=0,
                        outbound_allow=["127.0.0.0/8", "::1"], gpus="none", **extra)
    app = create_app(settings)
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        api.repo = repo  # type: ignore[attr-defined]
        api.backend = backend  # type: ignore[attr-defined]
        try:
            yield api
        finally:
            for ws in api.get("/api/v1/workspaces", user="root").json()["workspaces"]:
                client.delete(f"/api/v1/workspaces/{ws['id']}", headers=api.h("root"),
                              params={"snapshots": "true"})
            if backend == "microvm":
                for d in (BOOT_DIR / "vms").glob(f"{prefix}-*"):
                    process.end(VmFiles(d), timeout_s=0)
                    subprocess.run(["rm", "-rf", str(d)], check=False)
                remove_microvm_network(settings)
            # The docker run's leftovers go with the engine fixture's sweep of RUN_PREFIX.


def _backend(api: ApiClient) -> str:
    return str(api.backend)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def ws(api: ApiClient) -> dict[str, Any]:
    """One running workspace made from the repository, on the module's backend."""
    ws = api.create(api.repo, wait=True)  # type: ignore[attr-defined]
    assert ws["state"] == "running", ws
    return ws


def _engine_objects(api: ApiClient, ws_id: str) -> list[str]:
    """What the engine holds of a workspace: its containers and volumes (docker), its VM
    directories and QEMU processes (microvm)."""
    prefix = api.app.state.settings.engine_prefix
    if _backend(api) == "docker":
        return [f"{kind} {name}" for kind, name in engine_objects(prefix) if ws_id in name]
    found = []
    for d in (BOOT_DIR / "vms").glob(f"{prefix}-vm-{ws_id}*"):
        found.append(f"directory {d}")
        if process.running(VmFiles(d)) is not None:
            found.append(f"qemu of {d}")
    return found


def _events(api: ApiClient, ws_id: str) -> list[str]:
    r = api.get(f"/api/v1/workspaces/{ws_id}/events")
    assert r.status_code == 200, r.text
    return [f"{e['kind']} {e['to_state'] or ''} {e['message']}" for e in r.json()["events"]]


def _error(r: Any) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


# --- create, exec, files, streams ------------------------------------------------------------


def test_create_from_git_puts_the_repo_in_workspace(api: ApiClient, ws: dict[str, Any]) -> None:
    assert ws["runtime"] == ("microvm" if _backend(api) == "microvm" else "gvisor"), ws
    out = api.exec(ws["id"], "pwd; ls; id -un; git log --format=%s -1; git status --short")
    assert out["exit_code"] == 0, out
    assert out["stdout"].split("\n") == ["/workspace/api", "README.md", "src", "dev",
                                         "initial", ""], out


def test_exec_exit_codes_streams_cwd_env_and_timeout(api: ApiClient,
                                                     ws: dict[str, Any]) -> None:
    wid = ws["id"]
    out = api.exec(wid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert out | {"duration_ms": 0} == {"exit_code": 3, "stdout": "out\n", "stderr": "err\n",
                                        "timed_out": False, "duration_ms": 0,
                                        "truncated": False}, out
    assert api.exec(wid, ["no-such-command"])["exit_code"] == 127
    assert api.exec(wid, "echo $GREETING", env={"GREETING": "hello"})["stdout"] == "hello\n"
    assert api.exec(wid, "pwd", cwd="..")["stdout"] == "/workspace\n"
    assert api.exec(wid, "pwd", cwd="/tmp")["stdout"] == "/tmp\n"
    assert api.exec(wid, ["cat"], stdin="piped")["stdout"] == "piped"
    slow = api.exec(wid, "sleep 31 & sleep 32; echo never", timeout_s=1)
    assert slow["timed_out"] is True and "never" not in slow["stdout"], slow
    left = api.exec(wid, "pgrep -c -f 'sleep 3[12]' || true")
    assert left["stdout"].strip() == "0", left  # nothing of the timed-out command is left


def test_files_write_read_list_stat_remove(api: ApiClient, ws: dict[str, Any]) -> None:
    url = f"/api/v1/workspaces/{ws['id']}/files"
    blob = bytes(range(256)) * 300
    r = api.put(url, params={"path": "api/data/blob.bin"}, content=blob)
    assert r.status_code == 200, r.text
    assert r.json() == {"path": "/workspace/api/data/blob.bin", "size": len(blob)}
    got = api.get(url, params={"path": "/workspace/api/data/blob.bin"})
    assert got.status_code == 200 and got.content == blob
    assert api.exec(ws["id"], "stat -c %U data/blob.bin")["stdout"] == "dev\n"
    listing = api.get(f"{url}/list", params={"path": "api"}).json()
    names = {e["name"]: e["type"] for e in listing["entries"]}
    assert listing["path"] == "/workspace/api"
    assert (names["data"], names["README.md"], names[".git"]) == ("dir", "file", "dir"), names
    stat = api.get(f"{url}/stat", params={"path": "api/data/blob.bin"})
    assert stat.status_code == 200, stat.text
    assert (stat.json()["type"], stat.json()["size"]) == ("file", len(blob)), stat.json()
    assert _error(api.get(url, params={"path": "/etc/passwd"})) == (403, "path_outside")
    assert _error(api.delete(url, params={"path": "api/data"})) == (409, "not_empty")
    assert api.delete(url, params={"path": "api/data/blob.bin"}).status_code == 204
    assert _error(api.get(url, params={"path": "api/data/blob.bin"})) == (404, "not_found")
    assert api.delete(url, params={"path": "api/data", "recursive": "true"}).status_code == 204
    assert api.exec(ws["id"], "test -e data || echo gone")["stdout"] == "gone\n"


def test_exec_stream_over_the_websocket(api: ApiClient, ws: dict[str, Any]) -> None:
    url = f"/api/v1/workspaces/{ws['id']}/exec/stream"
    with api.client.websocket_connect(url, headers=api.h()) as sock:
        sock.send_json({"cmd": ["sh", "-c", "read line; echo got:$line; echo oops >&2; exit 4"]})
        sock.send_json({"type": "stdin", "data": "hello\n"})
        sock.send_json({"type": "close_stdin"})
        messages: list[dict[str, Any]] = []
        while not messages or messages[-1]["type"] not in ("exit", "error"):
            messages.append(sock.receive_json())
    out = "".join(m["data"] for m in messages if m["type"] == "stdout")
    err = "".join(m["data"] for m in messages if m["type"] == "stderr")
    assert (out, err, messages[-1]) == ("got:hello\n", "oops\n",
                                        {"type": "exit", "exit_code": 4}), messages


# --- stop and start, pause and resume ---------------------------------------------------------


def test_stop_then_start_keeps_workspace_files(api: ApiClient, ws: dict[str, Any]) -> None:
    wid = ws["id"]
    assert api.exec(wid, "echo kept > /workspace/api/note")["exit_code"] == 0
    r = api.post(f"/api/v1/workspaces/{wid}/stop")
    assert r.status_code in (200, 202), r.text
    assert api.wait_state(wid, settled=("stopped", "error"))["state"] == "stopped"
    if _backend(api) == "microvm":
        assert process.running(VmFiles(vm_dir(api, wid))) is None  # no QEMU left running
    r = api.post(f"/api/v1/workspaces/{wid}/start")
    assert r.status_code in (200, 202), r.text
    assert api.wait_state(wid, settled=("running", "error"))["state"] == "running"
    out = api.exec(wid, "cat /workspace/api/note; git -C /workspace/api status --short")
    assert out["stdout"] == "kept\n?? note\n", out


COUNTER = ("setsid sh -c 'i=0; while true; do i=$((i+1)); echo $$ $i > /tmp/.c; "
           "mv /tmp/.c /tmp/count; sleep 0.2; done' </dev/null >/dev/null 2>&1 &")


def _counter(api: ApiClient, ws_id: str) -> tuple[int, int]:
    """(pid, count) of the workspace's counter, from /tmp (memory only on a microVM)."""
    out = api.exec(ws_id, "cat /tmp/count")
    pid, count = out["stdout"].split()
    return int(pid), int(count)


def _counts_on(api: ApiClient, ws_id: str, pid: int, above: int) -> None:
    """The same counter process goes on counting (a condition, waited for)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = _counter(api, ws_id)
        assert now[0] == pid, now
        if now[1] > above:
            return
        time.sleep(0.2)
    raise AssertionError(f"the counter stayed at {above}")


def test_pause_then_resume_keeps_a_running_process(api: ApiClient, ws: dict[str, Any]) -> None:
    wid = ws["id"]
    assert api.exec(wid, COUNTER)["exit_code"] == 0
    deadline = time.monotonic() + 30
    while api.exec(wid, "test -s /tmp/count")["exit_code"] and time.monotonic() < deadline:
        time.sleep(0.1)
    pid, count = _counter(api, wid)
    r = api.post(f"/api/v1/workspaces/{wid}/pause")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "paused"
    saved = None
    if _backend(api) == "microvm":
        files = VmFiles(vm_dir(api, wid))
        assert process.running(files) is None  # no QEMU: no CPU, no RAM held
        saved = files.dir / "checkpoints" / "den-pause" / "state"
        assert saved.stat().st_size > 1 << 20
    r = api.post(f"/api/v1/workspaces/{wid}/resume")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "running"
    _counts_on(api, wid, pid, count)  # the process (and /tmp) came back
    if saved is not None:
        assert not saved.exists()  # QEMU read all of it; nothing kept while running
        assert any("restored from memory" in e for e in _events(api, wid))


# --- snapshots, forks, restores ---------------------------------------------------------------


def test_memory_snapshot_forks_with_its_processes_and_files_and_restores(
        api: ApiClient, ws: dict[str, Any]) -> None:
    wid = ws["id"]
    assert api.exec(wid, "echo before > /workspace/api/snap")["exit_code"] == 0
    pid, _ = _counter(api, wid)
    r = api.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "m", "memory": True})
    assert r.status_code in (200, 201), r.text
    snap = r.json()
    api.snapshot_id = snap["id"]  # type: ignore[attr-defined]
    assert api.get(f"/api/v1/workspaces/{wid}").json()["state"] == "running"
    r = api.post("/api/v1/workspaces", json={"name": "twin", "from_snapshot": snap["id"]})
    assert r.status_code in (201, 202), r.text
    fork = api.wait_state(r.json()["id"])
    assert fork["state"] == "running", fork
    out = api.exec(fork["id"], "hostname; cat /workspace/api/snap")
    assert out["stdout"] == "twin\nbefore\n", out  # its own name, the snapshot's files
    _counts_on(api, fork["id"], pid, 0)  # the snapshot's process, running in the fork
    assert api.exec(wid, "hostname")["stdout"] == "api\n"
    r = api.delete(f"/api/v1/workspaces/{fork['id']}")
    assert r.status_code in (200, 202, 204), r.text
    # Restore: the workspace's files replaced by the snapshot's, its process back too.
    assert api.exec(wid, "echo after > /workspace/api/snap")["exit_code"] == 0
    old = _engine_objects(api, wid)
    r = api.post(f"/api/v1/snapshots/{snap['id']}/restore")
    assert r.status_code in (200, 202), r.text
    assert api.wait_state(wid)["state"] == "running"
    assert api.exec(wid, "cat /workspace/api/snap")["stdout"] == "before\n"
    assert _counter(api, wid)[0] == pid
    if _backend(api) == "microvm":
        assert not [o for o in old if o.startswith("directory ")
                    and Path(o.split(" ", 1)[1]).exists()]  # the replaced disks are gone


# --- what a backend does not support: refused clearly -----------------------------------------


def test_what_the_backend_does_not_support_is_refused_clearly(
        api: ApiClient, ws: dict[str, Any]) -> None:
    """docs/microvm.md, "What each backend refuses": each row, as a user meets it."""
    repo = {"url": str(api.repo)}  # type: ignore[attr-defined]
    create = "/api/v1/workspaces"
    if _backend(api) == "docker":
        r = api.post(create, json={"name": "v", "runtime": "microvm", "repo": repo})
        assert _error(r) == (422, "invalid") and "DEN_BACKEND=microvm" in r.text, r.text
        return
    for runtime in ("gvisor", "runc"):
        r = api.post(create, json={"name": "g", "runtime": runtime, "repo": repo})
        assert _error(r) == (422, "invalid") and "DEN_BACKEND=microvm" in r.text, r.text
    r = api.post(create, json={"name": "i", "image": "python:3.12", "repo": repo})
    assert _error(r) == (422, "invalid") and "python:3.12" in r.text, r.text
    r = api.post(f"/api/v1/workspaces/{ws['id']}/processes", json={"cmd": "sleep 1"})
    assert _error(r) == (501, "no_agent"), r.text
    assert "microvm" in r.json()["error"]["message"], r.text
    # Nothing was made by the refusals.
    names = [w["name"] for w in api.get(create, user="root").json()["workspaces"]]
    assert names == ["api"], names
    # A devcontainer.json is found in the clone, after the 202: the workspace fails with
    # the way out in its message, and nothing of it is left in the engine.
    devc = bare_repo(api.repo.parent, api.repo.parent.parent / "src-devc", name="devc",  # type: ignore[attr-defined]
                     files={".devcontainer/devcontainer.json": '{"image": "python:3.12"}'})
    r = api.post(create, json={"name": "devc", "repo": {"url": str(devc)}})
    assert r.status_code == 202, r.text
    failed = api.wait_state(r.json()["id"], settled=("error", "running", "stopped"))
    assert failed["state"] == "error", failed
    assert any("--no-devcontainer" in e for e in _events(api, failed["id"])), failed
    assert _engine_objects(api, failed["id"]) == []
    assert api.delete(f"{create}/{failed['id']}").status_code in (200, 202, 204)


# --- delete, and a snapshot that outlives its workspace ---------------------------------------


def test_delete_leaves_no_engine_object(api: ApiClient, ws: dict[str, Any]) -> None:
    assert _engine_objects(api, ws["id"])  # it has some now
    pids = [process.running(VmFiles(vm_dir(api, ws["id"])))] if _backend(
        api) == "microvm" else []
    r = api.delete(f"/api/v1/workspaces/{ws['id']}")
    assert r.status_code in (200, 202, 204), r.text
    deadline = time.monotonic() + 60
    while _engine_objects(api, ws["id"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _engine_objects(api, ws["id"]) == []
    for pid in pids:  # not even a QEMU process that lost its directory
        assert pid is not None
        assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(
            f"/proc/{pid}/cmdline").read_bytes()


def test_a_snapshot_outlives_its_workspace(api: ApiClient) -> None:
    """After the workspace's delete, a fork of its memory snapshot still starts, with the
    snapshot's files; deleting the snapshot leaves nothing of it."""
    snap = getattr(api, "snapshot_id", None)
    assert snap is not None, "the snapshot test did not run"
    r = api.post("/api/v1/workspaces", json={"name": "orphan", "from_snapshot": snap})
    assert r.status_code in (201, 202), r.text
    fork = api.wait_state(r.json()["id"])
    assert fork["state"] == "running", fork
    out = api.exec(fork["id"], "hostname; cat /workspace/api/snap")
    assert out["stdout"] == "orphan\nbefore\n", out
    r = api.delete(f"/api/v1/snapshots/{snap}")
    assert r.status_code in (200, 204), r.text
    if _backend(api) == "microvm":
        assert not list((BOOT_DIR / "vms").glob(f"*-snap-{snap}"))
