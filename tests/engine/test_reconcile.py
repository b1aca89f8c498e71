"""kill -9 of a real ``den serve`` in the middle of create and delete; a restart reconciles."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RUN_PREFIX, engine_objects, free_port

pytestmark = pytest.mark.engine


class Server:
    """``den serve`` as a child process that a test can kill -9 and start again."""

    def __init__(self, data_dir: Path, repos_root: Path, prefix: str) -> None:
        self.port = free_port()
        self.prefix = prefix
        self.env = {**os.environ, "DEN_DATA_DIR": str(data_dir), "DEN_ENGINE_PREFIX": prefix,
                    "DEN_LOCAL_REPO_ROOTS": json.dumps([str(repos_root)]),
                    "DEN_DEFAULT_MEMORY_MB": "512", "DEN_STOP_TIMEOUT_S": "2"}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"server-{self.port}.log"
        self.token = subprocess.run(
            [sys.executable, "-m", "server.cli", "admin", "token", "--user", "alice"],
            env=self.env, capture_output=True, text=True, check=True,
        ).stdout.strip()
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=60,
                                 headers={"Authorization": f"Bearer {self.token}"})

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "server.cli", "serve", "--port", str(self.port)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError(f"server did not start: {self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

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
    srv.stop()


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
    r = server.http.post("/api/v1/workspaces", json={"name": "api", "repo": {"url": str(repo)}})
    assert r.status_code == 202, r.text
    wid = r.json()["id"]
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
        again = server.http.post("/api/v1/workspaces",
                                 json={"name": "api", "repo": {"url": str(repo)}})
        assert again.status_code == 202
        assert _wait(lambda: server.ws(again.json()["id"]).get("state") == "running")


def test_kill9_during_delete_then_restart_reconciles(
    server: Server, make_repo: Callable[..., Path]
) -> None:
    r = server.http.post("/api/v1/workspaces",
                         json={"name": "api", "repo": {"url": str(make_repo())}})
    wid = r.json()["id"]
    assert _wait(lambda: server.ws(wid).get("state") == "running")
    deleter = threading.Thread(
        target=lambda: _swallow(lambda: server.http.delete(f"/api/v1/workspaces/{wid}")))
    deleter.start()
    assert _wait(lambda: server.ws(wid).get("state") in ("deleting", None), timeout_s=30)
    server.kill9()
    deleter.join()

    server.start()
    assert server.ws(wid) == {"status": 404}
    assert server.objects(wid) == []


def test_kill9_leaves_no_transitional_state_after_stop(
    server: Server, make_repo: Callable[..., Path]
) -> None:
    r = server.http.post("/api/v1/workspaces",
                         json={"name": "api", "repo": {"url": str(make_repo())}})
    wid = r.json()["id"]
    assert _wait(lambda: server.ws(wid).get("state") == "running")
    stopper = threading.Thread(
        target=lambda: _swallow(lambda: server.http.post(f"/api/v1/workspaces/{wid}/stop")))
    stopper.start()
    assert _wait(lambda: server.ws(wid).get("state") in ("stopping", "stopped"))
    server.kill9()
    stopper.join()

    server.start()
    ws = server.ws(wid)
    assert ws["state"] == "stopped", ws
    r = server.http.post(f"/api/v1/workspaces/{wid}/exec", json={"cmd": "cat README.md"})
    assert r.json()["stdout"] == "# api\n"


def test_orphans_of_this_instance_are_removed_at_startup(
    server: Server, make_repo: Callable[..., Path]
) -> None:
    r = server.http.post("/api/v1/workspaces",
                         json={"name": "api", "repo": {"url": str(make_repo())}})
    wid = r.json()["id"]
    assert _wait(lambda: server.ws(wid).get("state") == "running")
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


def _swallow(fn: Callable[[], object]) -> None:
    with contextlib.suppress(httpx.TransportError):
        fn()
