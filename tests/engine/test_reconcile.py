"""kill -9 of a real ``den serve`` in the middle of create and delete; a restart reconciles."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RUN_PREFIX, engine_objects
from tests.server_process import DenServer

pytestmark = pytest.mark.engine


class Server(DenServer):
    """``den serve`` as a child process that a test can kill -9 and start again."""

    def __init__(self, data_dir: Path, repos_root: Path, prefix: str) -> None:
        super().__init__(data_dir, repos_root, prefix, user="alice",
                         default_memory_mb=512, stop_timeout_s=2)

    def create(self, repo: Path) -> str:
        """POST a workspace ``api`` for ``repo``; its id."""
        r = self.http.post("/api/v1/workspaces", json={"name": "api", "repo": {"url": str(repo)}})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def create_running(self, repo: Path) -> str:
        """Create a workspace and wait until it is running; its id."""
        wid = self.create(repo)
        assert _wait(lambda: self.ws(wid).get("state") == "running")
        return wid

    def ws(self, wid: str) -> dict[str, Any]:
        r = self.http.get(f"/api/v1/workspaces/{wid}")
        return r.json() if r.status_code == 200 else {"status": r.status_code}

    def objects(self, wid: str) -> list[tuple[str, str]]:
        return engine_objects(f"{self.prefix}-{wid}")


@pytest.fixture
def server(engine: None, tmp_path: Path, repos_root: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data", repos_root, f"{RUN_PREFIX}-srv{os.getpid() % 1000}")
    srv.start()
    yield srv
    srv.close()


def _wait(cond: Callable[[], bool], timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("moment", ["right-after-202", "container-exists"])
def test_kill9_during_create_then_restart_reconciles(
    server: Server, make_repo: Callable[..., Path], moment: str
) -> None:
    repo = make_repo()
    wid = server.create(repo)
    if moment == "container-exists":
        assert _wait(lambda: ("container", f"{server.prefix}-{wid}") in server.objects(wid))
    server.kill9()

    server.start()
    ws = server.ws(wid)
    if ws.get("state") == "running":  # the create finished before the kill landed
        assert sorted(k for k, _ in server.objects(wid)) == ["container", "volume"]
    else:
        assert ws["state"] == "error" and "restarted" in ws["state_reason"], ws
        assert server.objects(wid) == []
        # The user can delete it and create it again under the same name.
        assert server.http.delete(f"/api/v1/workspaces/{wid}").status_code == 204
        server.create_running(repo)


def test_kill9_during_delete_then_restart_reconciles(
    server: Server, make_repo: Callable[..., Path]
) -> None:
    wid = server.create_running(make_repo())
    _kill9_during(server, wid, lambda: server.http.delete(f"/api/v1/workspaces/{wid}"),
                  ("deleting", None), timeout_s=30)

    server.start()
    assert server.ws(wid) == {"status": 404}
    assert server.objects(wid) == []


def test_kill9_leaves_no_transitional_state_after_stop(
    server: Server, make_repo: Callable[..., Path]
) -> None:
    wid = server.create_running(make_repo())
    _kill9_during(server, wid, lambda: server.http.post(f"/api/v1/workspaces/{wid}/stop"),
                  ("stopping", "stopped"))

    server.start()
    ws = server.ws(wid)
    assert ws["state"] == "stopped", ws
    r = server.http.post(f"/api/v1/workspaces/{wid}/exec", json={"cmd": "cat README.md"})
    assert r.json()["stdout"] == "# api\n"


def test_orphans_of_this_instance_are_removed_at_startup(
    server: Server, make_repo: Callable[..., Path]
) -> None:
    wid = server.create_running(make_repo())
    server.kill9()
    # Forget the row behind the server's back: its engine objects are now orphans.
    import sqlite3

    db = sqlite3.connect(server.env["DEN_DATA_DIR"] + "/den.db")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("DELETE FROM workspaces WHERE id = ?", (wid,))
    db.commit()
    db.close()
    server.start()
    assert server.objects(wid) == []


def _kill9_during(server: Server, wid: str, request: Callable[[], object],
                  states: tuple[str | None, ...], timeout_s: float = 60) -> None:
    """Send ``request`` from a thread and kill -9 the server once the workspace's state is one
    of ``states`` (None: gone); the request's own outcome does not matter."""

    def send() -> None:
        with contextlib.suppress(httpx.TransportError):
            request()

    sender = threading.Thread(target=send)
    sender.start()
    assert _wait(lambda: server.ws(wid).get("state") in states, timeout_s=timeout_s)
    server.kill9()
    sender.join()


def test_snapshots_survive_a_restart_and_a_paused_workspace_resumes_after_kill9(
    server: Server, make_repo: Callable[..., Path]
) -> None:
    wid = server.create_running(make_repo())
    server.http.post(f"/api/v1/workspaces/{wid}/exec", json={"cmd": "echo snap > /workspace/f"})
    r = server.http.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "s"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    server.http.post(f"/api/v1/workspaces/{wid}/exec",
                     json={"cmd": "tmux new-session -d -s t 'echo alive > /tmp/t; sleep 999'"})
    assert server.http.post(f"/api/v1/workspaces/{wid}/pause").json()["state"] == "paused"
    server.kill9()

    server.start()
    assert server.ws(wid)["state"] == "paused"
    assert engine_objects(f"{server.prefix}-{sid}") == [("volume", f"{server.prefix}-{sid}-snap")]
    r = server.http.post(f"/api/v1/workspaces/{wid}/exec", json={"cmd": "cat /tmp/t /workspace/f"})
    assert r.json()["stdout"] == "alive\nsnap\n", r.text  # resumed from memory
    fork = server.http.post("/api/v1/workspaces", json={"name": "fork", "from_snapshot": sid})
    assert fork.status_code == 202
    assert _wait(lambda: server.ws(fork.json()["id"]).get("state") == "running")


def test_a_snapshot_interrupted_before_its_row_leaves_nothing_after_a_restart(
    server: Server, make_repo: Callable[..., Path]
) -> None:
    """Den writes a snapshot's row after its engine objects and saved memory; a crash in
    between leaves them without a row, and the next start removes them."""
    wid = server.create_running(make_repo())
    r = server.http.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "s", "memory": True})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    memory = Path(server.env["DEN_DATA_DIR"]) / "snapshots" / sid
    assert memory.is_dir()
    assert sorted(engine_objects(f"{server.prefix}-{sid}")) == [
        ("volume", f"{server.prefix}-{sid}-snap")]
    image = f"{server.prefix}-snapshot:{sid}"
    assert subprocess.run(["docker", "image", "inspect", image], capture_output=True
                          ).returncode == 0
    server.kill9()
    import sqlite3

    db = sqlite3.connect(server.env["DEN_DATA_DIR"] + "/den.db")
    db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
    db.commit()
    db.close()
    server.start()
    assert engine_objects(f"{server.prefix}-{sid}") == []
    assert subprocess.run(["docker", "image", "inspect", image], capture_output=True
                          ).returncode != 0
    assert not memory.exists()
    assert server.ws(wid)["state"] == "running"
