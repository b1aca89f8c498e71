"""Crash consistency: ``den serve`` killed (SIGKILL) at each engine step of create, fork,
restore, pause, snapshot and delete, through the fault points of server/faults.py, then
started again. After each restart: no workspace is left in a transitional state, no data is
lost (a file written before is still there, or the workspace is explicitly ``error``), no
engine object of the run is orphaned, and the event log says what happened.

Lean by default (one server, one small workspace, one snapshot; each point once). With
``DEN_CRASH_SOAK=<rounds>`` (``make soak``) it also runs that many rounds of random points
and of kills from outside at a random moment of a random operation.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server import faults
from server.runtime.docker import processes_naming
from tests.conftest import RUN_PREFIX, bare_repo, engine_objects
from tests.server_process import DenServer

pytestmark = pytest.mark.engine

TRANSITIONAL = {"creating", "starting", "stopping", "pausing", "resuming", "deleting"}
SOAK_ROUNDS = int(os.environ.get("DEN_CRASH_SOAK", "0") or 0)


class Crashing(DenServer):
    """A den serve that a test arms with a fault point, watches die, and starts again."""

    def ws(self, wid: str) -> dict[str, Any]:
        r = self.http.get(f"/api/v1/workspaces/{wid}")
        return r.json() if r.status_code == 200 else {"status": r.status_code}

    def exec(self, wid: str, cmd: str) -> dict[str, Any]:
        r = self.http.post(f"/api/v1/workspaces/{wid}/exec", json={"cmd": cmd})
        assert r.status_code == 200, r.text
        return dict(r.json())

    def events(self, wid: str) -> list[str]:
        r = self.http.get(f"/api/v1/workspaces/{wid}/events")
        assert r.status_code == 200, r.text
        return [str(e.get("message") or "") for e in r.json()["events"]]

    def rows(self) -> list[dict[str, Any]]:
        return list(self.http.get("/api/v1/workspaces").json()["workspaces"])

    def snapshots(self) -> list[str]:
        return [s["id"] for s in self.http.get("/api/v1/snapshots").json()["snapshots"]]

    def crash_at(self, point: str, action: Callable[[], object]) -> None:
        """Restart armed with ``point``, run ``action`` (from a thread: its request dies with
        the server), wait for the server to kill itself there, start it again unarmed."""
        self.stop()
        self.env[faults.ENV] = point
        try:
            self.start()
            self._send_and_die(action, lambda: None, timeout_s=120)
        finally:
            self.env.pop(faults.ENV, None)
        assert self.proc is not None and self.proc.returncode == -9, (
            f"den serve did not die at {point}:\n{self.log_tail()}")
        self.start(timeout_s=240)  # reconcile may wait for a checkpoint being written

    def kill_during(self, action: Callable[[], object], delay_s: float) -> None:
        """kill -9 from outside ``delay_s`` after ``action`` starts; start again."""
        def later() -> None:
            time.sleep(delay_s)
            self.kill9()

        self._send_and_die(action, later, timeout_s=120)
        self.start(timeout_s=240)

    def _send_and_die(self, action: Callable[[], object], kill: Callable[[], object], *,
                      timeout_s: float) -> None:
        def send() -> None:
            with contextlib.suppress(httpx.TransportError):
                action()

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        kill()
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout_s)
        if self.proc.poll() is None:  # the point was never reached: fail, not hang
            self.kill9()
        sender.join(timeout=30)

    def check_consistent(self, ids: list[str]) -> None:
        """No row in a transitional state; no engine object of the run that no row owns."""
        rows = self.rows()
        assert not [(w["name"], w["state"]) for w in rows if w["state"] in TRANSITIONAL]
        known = {w["id"] for w in rows}
        snaps = set(self.snapshots())
        for kind, name in engine_objects(self.prefix):
            owner = name[len(self.prefix) + 1:].split("-")[0]
            assert owner in known | snaps, f"orphan {kind} {name}"
        for wid in known:  # a workspace has exactly its container and one volume
            volumes = [n for k, n in engine_objects(f"{self.prefix}-{wid}") if k == "volume"]
            assert len(volumes) <= 1, volumes
        helpers = subprocess.run(
            ["docker", "ps", "-a", "--filter", "label=den.role=copy", "--format",
             '{{.Label "den.workspace"}}'], capture_output=True, text=True, timeout=30)
        assert not set(helpers.stdout.split()) & set(ids), "a copy helper was left behind"
        images = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
                                capture_output=True, text=True, timeout=30).stdout.split()
        for image in images:
            if image.startswith(f"{self.prefix}-snapshot:"):
                assert image.rpartition(":")[2] in snaps, f"orphan image {image}"


@pytest.fixture(scope="module")
def world(engine: None, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Crashing, str, str, list[str]]]:
    """The server, a running workspace whose /workspace/keep says "v2", a disk snapshot of
    it when it said "v1", and the list of workspace ids the tests made."""
    root = tmp_path_factory.mktemp("crash")
    repos = root / "repos"
    repos.mkdir()
    bare_repo(repos, root / "src")
    srv = Crashing(root / "data", repos, f"{RUN_PREFIX}-crash{os.getpid() % 1000}",
                   user="alice", default_memory_mb=512, stop_timeout_s=2, ssh_port=0)
    srv.start()
    try:
        r = srv.http.post("/api/v1/workspaces", json={"name": "base",
                                                      "repo": {"url": str(repos / "api.git")}})
        assert r.status_code == 202, r.text
        wid = r.json()["id"]
        assert _wait(lambda: srv.ws(wid).get("state") == "running"), srv.ws(wid)
        srv.exec(wid, "echo v1 > /workspace/keep && mkdir -p /workspace/api/d")
        r = srv.http.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "v1"})
        assert r.status_code == 201, r.text
        srv.exec(wid, "echo v2 > /workspace/keep")
        yield srv, wid, r.json()["id"], [wid]
    finally:
        srv.close()


def _wait(cond: Callable[[], bool], timeout_s: float = 90) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _repo(srv: Crashing) -> str:
    return str(Path(json.loads(srv.env["DEN_LOCAL_REPO_ROOTS"])[0]) / "api.git")


def _assert_data(srv: Crashing, wid: str, keep: str) -> None:
    """The file is there with ``keep`` and the repo directory is dev's (never root 700)."""
    out = srv.exec(wid, "cat /workspace/keep; stat -c '%U %a' /workspace/api /workspace/api/d")
    assert out["stdout"] == f"{keep}\ndev 755\ndev 755\n", out


# --- each fault point once -----------------------------------------------------------------


def test_crash_while_cloning_a_new_workspace(world: tuple[Crashing, str, str, list[str]]
                                             ) -> None:
    srv, _, _, ids = world
    srv.crash_at("create.clone", lambda: srv.http.post(
        "/api/v1/workspaces", json={"name": "c1", "repo": {"url": _repo(srv)}}))
    wid = _only_new(srv, "c1")
    ids.append(wid)
    ws = srv.ws(wid)
    assert ws["state"] == "error" and "restarted while" in ws["state_reason"], ws
    assert any("restarted while" in m for m in srv.events(wid))
    srv.check_consistent(ids)
    assert srv.http.delete(f"/api/v1/workspaces/{wid}").status_code == 204


def test_crash_while_a_fork_copies_its_volume(world: tuple[Crashing, str, str, list[str]]
                                              ) -> None:
    srv, _, sid, ids = world
    srv.crash_at("fork.copy", lambda: srv.http.post(
        "/api/v1/workspaces", json={"name": "f1", "from_snapshot": sid}))
    wid = _only_new(srv, "f1")
    ids.append(wid)
    ws = srv.ws(wid)  # issue 16: it stayed "creating", its volume held by the copy helper
    assert ws["state"] == "error" and "restarted while" in ws["state_reason"], ws
    assert "could not all be removed" not in ws["state_reason"]
    assert engine_objects(f"{srv.prefix}-{wid}") == []
    srv.check_consistent(ids)
    assert srv.http.delete(f"/api/v1/workspaces/{wid}").status_code == 204


def test_crash_while_a_restore_copies_keeps_the_workspace_as_it_was(
        world: tuple[Crashing, str, str, list[str]]) -> None:
    srv, wid, sid, ids = world
    srv.crash_at("restore.copy", lambda: srv.http.post(f"/api/v1/snapshots/{sid}/restore"))
    ws = srv.ws(wid)
    assert ws["state"] == "stopped", ws
    assert "exactly as it was" in srv.events(wid)[-1]
    srv.check_consistent(ids)
    _assert_data(srv, wid, "v2")  # the pre-restore data, whole


def test_crash_after_a_restore_copied_finishes_it(world: tuple[Crashing, str, str, list[str]]
                                                  ) -> None:
    srv, wid, sid, ids = world
    srv.crash_at("restore.swap", lambda: srv.http.post(f"/api/v1/snapshots/{sid}/restore"))
    ws = srv.ws(wid)
    assert ws["state"] == "stopped", ws
    assert "it is finished now" in srv.events(wid)[-1]
    srv.check_consistent(ids)
    _assert_data(srv, wid, "v1")  # the snapshot's data
    srv.exec(wid, "echo v2 > /workspace/keep")


def test_crash_while_a_snapshot_is_made_leaves_no_half_snapshot(
        world: tuple[Crashing, str, str, list[str]]) -> None:
    srv, wid, sid, ids = world
    srv.crash_at("snapshot.commit", lambda: srv.http.post(
        f"/api/v1/workspaces/{wid}/snapshots", json={"name": "half"}))
    assert srv.snapshots() == [sid]
    assert srv.ws(wid)["state"] == "running"
    srv.check_consistent(ids)
    _assert_data(srv, wid, "v2")


def test_crash_while_the_pause_checkpoint_is_written_uses_the_checkpoint(
        world: tuple[Crashing, str, str, list[str]]) -> None:
    """runsc outlives Den: reconcile waits for it and uses the complete checkpoint (issue 16:
    the row said ``running`` while the container had exited, and the image was lost)."""
    srv, wid, _, ids = world
    srv.exec(wid, "tmux new-session -d -s t 'echo alive > /tmp/t; sleep 999'")
    srv.crash_at("pause.checkpoint", lambda: srv.http.post(f"/api/v1/workspaces/{wid}/pause"))
    ws = srv.ws(wid)
    assert ws["state"] == "paused", ws
    assert "checkpoint was complete" in srv.events(wid)[-1]
    srv.check_consistent(ids)
    out = srv.exec(wid, "cat /tmp/t /workspace/keep")
    assert out["stdout"] == "alive\nv2\n", out  # resumed from memory: the process lived
    assert "restored from memory" in srv.events(wid)[-1]


def test_a_checkpoint_whose_writer_died_too_is_removed_and_the_state_is_the_engines(
        world: tuple[Crashing, str, str, list[str]]) -> None:
    """Den and the checkpoint's writers (the marking shell and runsc) all killed: the
    image has no completion marker. Reconcile removes it and records what the container is
    (never ``running`` for an exited one); the files are kept."""
    srv, wid, _, ids = world
    # 160 MB of memory to save, so that the writers are still writing when they are looked
    # for (a bare workspace's checkpoint can be complete before that, and the test would
    # then not test a crash of its writers at all).
    srv.exec(wid, "head -c 160M /dev/urandom > /dev/shm/ballast")
    # Where the checkpoint goes, found before the crash, so that its writers are looked for
    # the moment Den dies (a small checkpoint takes a fraction of a second; two docker CLI
    # calls on a loaded machine took longer, and the writers were gone).
    home = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", f"{srv.prefix}-{wid}"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    root = subprocess.run(["docker", "info", "-f", "{{.DockerRootDir}}"],
                          capture_output=True, text=True, timeout=30).stdout.strip()
    images = Path(root) / "containers" / home / "den-checkpoints"
    srv.stop()
    srv.env[faults.ENV] = "pause.checkpoint"
    try:
        srv.start()
        srv._send_and_die(lambda: srv.http.post(f"/api/v1/workspaces/{wid}/pause"),
                          lambda: None, timeout_s=120)
    finally:
        srv.env.pop(faults.ENV, None)
    killed = _kill_writers(images / "den-pause")
    assert srv.proc is not None and srv.proc.returncode == -9, srv.log_tail()
    assert killed, ("no checkpoint writer found to kill", sorted(
        p.name for p in images.iterdir()) if images.is_dir() else None)
    srv.start(timeout_s=240)
    ws = srv.ws(wid)
    running = _engine_running(f"{srv.prefix}-{wid}")
    assert ws["state"] == ("running" if running else "stopped"), (ws, running)
    assert "pause was interrupted by a restart" in srv.events(wid)[-1]
    assert not (images / "den-pause").exists() or (images / "den-pause.complete").exists()
    srv.check_consistent(ids)
    assert srv.exec(wid, "cat /workspace/keep")["stdout"] == "v2\n"
    srv.exec(wid, "rm -f /dev/shm/ballast")


def _kill_writers(image: Path) -> list[int]:
    """SIGKILL the host processes writing the checkpoint ``image`` (those Den waits for)."""
    killed = processes_naming(str(image))
    for pid in killed:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    return killed


def _engine_running(container: str) -> bool:
    out = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", container],
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip() == "true"


def test_crash_while_deleting_finishes_the_delete(world: tuple[Crashing, str, str, list[str]]
                                                  ) -> None:
    srv, _, _, ids = world
    r = srv.http.post("/api/v1/workspaces", json={"name": "d1", "repo": {"url": _repo(srv)}})
    wid = r.json()["id"]
    ids.append(wid)
    assert _wait(lambda: srv.ws(wid).get("state") == "running")
    srv.crash_at("delete.volume", lambda: srv.http.delete(f"/api/v1/workspaces/{wid}"))
    assert srv.ws(wid) == {"status": 404}
    assert engine_objects(f"{srv.prefix}-{wid}") == []
    srv.check_consistent(ids)


def _only_new(srv: Crashing, name: str) -> str:
    rows = srv.rows()
    found = [w["id"] for w in rows if w["name"] == name]
    assert len(found) == 1, rows
    return str(found[0])


# --- soak: random points and random outside kills (make soak) --------------------------------


@pytest.mark.skipif(SOAK_ROUNDS <= 0, reason="set DEN_CRASH_SOAK=<rounds> (make soak)")
def test_soak_random_crashes(world: tuple[Crashing, str, str, list[str]]) -> None:
    srv, wid, sid, ids = world
    rng = random.Random(os.environ.get("DEN_CRASH_SEED") or None)
    operations: dict[str, Callable[[], object]] = {
        "pause": lambda: srv.http.post(f"/api/v1/workspaces/{wid}/pause"),
        "resume": lambda: srv.http.post(f"/api/v1/workspaces/{wid}/resume"),
        "stop": lambda: srv.http.post(f"/api/v1/workspaces/{wid}/stop"),
        "start": lambda: srv.http.post(f"/api/v1/workspaces/{wid}/start"),
        "restore": lambda: srv.http.post(f"/api/v1/snapshots/{sid}/restore"),
        "snapshot": lambda: srv.http.post(f"/api/v1/workspaces/{wid}/snapshots",
                                          json={"name": "soak"}),
    }
    for round_ in range(SOAK_ROUNDS):
        what = rng.choice(sorted(operations))
        delay_s = rng.uniform(0, 4)
        print(f"round {round_}: kill -9 {delay_s:.2f} s into {what}")
        srv.kill_during(operations[what], delay_s)
        ws = srv.ws(wid)
        assert ws["state"] not in TRANSITIONAL, ws
        srv.check_consistent(ids)
        if ws["state"] == "error":  # explicit, with a reason; a restore mends it
            assert ws["state_reason"], ws
            r = srv.http.post(f"/api/v1/snapshots/{sid}/restore")
            assert r.status_code == 200, r.text
        keep = srv.exec(wid, "cat /workspace/keep")["stdout"]
        assert keep in ("v1\n", "v2\n"), keep  # whole: the old data or the snapshot's
        for other in srv.snapshots():
            if other != sid:
                srv.http.delete(f"/api/v1/snapshots/{other}")
