"""The two sleep tiers on the real engine: an idle workspace is frozen in place (``docker
pause``: its processes stop, its memory stays), then saved to disk; each wakes on exec with the
same processes; a frozen workspace can be snapshotted, forked, stopped, deleted, and survives a
``kill -9`` of den serve frozen."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.runtime.cgroup_freezer import control_file
from tests.conftest import RUN_PREFIX, bare_repo, container_state, engine_objects
from tests.server_process import DenServer

pytestmark = pytest.mark.engine

# A loop in tmux (it survives pauses) writing "<its pid> <count>" into the volume five times a
# second; the host reads the file straight from the volume, without waking the workspace.
# The count is written beside and renamed into place, so that a freeze between the truncate
# and the write never leaves the host an empty file to read.
COUNTER = ("tmux new-session -d -s count "
           "'i=0; while :; do i=$((i+1)); echo \"$$ $i\" > /workspace/count.new; "
           "mv /workspace/count.new /workspace/count; sleep 0.2; done'")


class Sleepy(DenServer):
    def ws(self, wid: str) -> dict[str, Any]:
        r = self.http.get(f"/api/v1/workspaces/{wid}")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def exec(self, wid: str, cmd: str) -> dict[str, Any]:
        r = self.http.post(f"/api/v1/workspaces/{wid}/exec", json={"cmd": cmd})
        assert r.status_code == 200, r.text
        return dict(r.json())

    def messages(self, wid: str) -> list[str]:
        r = self.http.get(f"/api/v1/workspaces/{wid}/events")
        return [str(e.get("message") or "") for e in r.json()["events"]]

    def create(self, repo: Path, name: str, **kw: Any) -> str:
        r = self.http.post("/api/v1/workspaces",
                           json={"name": name, "repo": {"url": str(repo)}, **kw})
        assert r.status_code == 202, r.text
        wid = str(r.json()["id"])
        assert wait(lambda: self.ws(wid)["state"] == "running", 120), self.ws(wid)
        return wid

    def hold(self, wid: str, ttl_s: int) -> None:
        """A keepalive lease (0 ends it and lets the reaper put it to sleep again)."""
        r = self.http.post(f"/api/v1/workspaces/{wid}/keepalive", json={"ttl_s": ttl_s})
        assert r.status_code == 200, r.text

    def asleep(self, wid: str, sleep: str, timeout_s: float = 60) -> None:
        assert wait(lambda: (lambda w: (w["state"], w["sleep"]))(self.ws(wid))
                    == ("paused", sleep), timeout_s), (self.ws(wid), self.log_tail())

    def container(self, wid: str) -> str:
        return f"{self.prefix}-{wid}"

    def counted(self, wid: str) -> int:
        """The count so far; 0 before the loop wrote it."""
        try:
            return self.counter(wid)[1]
        except (OSError, ValueError):
            return 0

    def remove_all(self) -> None:
        for ws in self.http.get("/api/v1/workspaces").json()["workspaces"]:
            self.http.delete(f"/api/v1/workspaces/{ws['id']}")

    def counter(self, wid: str) -> tuple[int, int]:
        """(pid, count) from the volume, read on the host."""
        mount = docker("volume", "inspect", "-f", "{{.Mountpoint}}", f"{self.prefix}-{wid}-data")
        pid, count = (Path(mount) / "count").read_text().split()
        return int(pid), int(count)


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()


def engine_state(container: str) -> str:
    """"frozen", "running" or "exited", as the engine and the kernel say."""
    return container_state(container)


def wait(cond: Callable[[], bool], timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def still_for(read: Callable[[], object], window_s: float) -> bool:
    """Whether ``read()`` gives the same value throughout ``window_s`` (a frozen counter)."""
    first = read()
    deadline = time.monotonic() + window_s
    while time.monotonic() < deadline:
        if read() != first:
            return False
        time.sleep(0.1)
    return True


def _server(root: Path, repos: Path, tag: str, **settings: Any) -> Sleepy:
    return Sleepy(root / "data", repos, f"{RUN_PREFIX}-{tag}{os.getpid() % 1000}",
                  user="alice", default_memory_mb=512, stop_timeout_s=2, ssh_port=0,
                  reaper_interval_s=0.5, idle_cpu_percent=50, **settings)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sleep-repo")
    (root / "repos").mkdir()
    return bare_repo(root / "repos", root / "src")


@pytest.fixture(scope="module")
def frozen_srv(engine: None, repo: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Sleepy]:
    """Idle workspaces are frozen and stay frozen (an hour before they would be saved)."""
    srv = _server(tmp_path_factory.mktemp("sleep-frozen"), repo.parent, "frz",
                  frozen_max_s=3600)
    srv.start()
    try:
        yield srv
    finally:
        srv.remove_all()  # frozen containers too (the engine cannot force-remove them)
        srv.close()


def test_idle_freezes_in_place_and_an_exec_thaws_it(frozen_srv: Sleepy, repo: Path) -> None:
    srv = frozen_srv
    wid = srv.create(repo, "frozen", idle_timeout_s=2)
    srv.exec(wid, COUNTER)
    assert wait(lambda: srv.counted(wid) > 2, 30)
    srv.asleep(wid, "frozen")
    assert engine_state(srv.container(wid)) == "frozen"
    # the whole sandbox is frozen by the kernel, not only its tasks by runsc: it uses no CPU
    freezer = control_file(int(docker("inspect", "-f", "{{.State.Pid}}", srv.container(wid))))
    assert freezer is not None and freezer.read_text().strip() in ("FROZEN", "1")
    assert still_for(lambda: srv.counter(wid), 1.5), "the counter advanced while frozen"
    pid, frozen_at = srv.counter(wid)
    out = srv.exec(wid, "cat /workspace/count")  # wakes it: a thaw, not a restore
    assert int(out["stdout"].split()[0]) == pid
    srv.hold(wid, 600)
    assert engine_state(srv.container(wid)) == "running"
    assert any("thawed in" in m for m in srv.messages(wid)), srv.messages(wid)
    assert not any("restored from memory" in m for m in srv.messages(wid))
    assert wait(lambda: srv.counted(wid) > frozen_at + 2, 30)
    assert srv.counter(wid)[0] == pid  # the same process carries on


def test_a_frozen_workspace_can_be_snapshotted_forked_and_saved_by_a_memory_snapshot(
        frozen_srv: Sleepy, repo: Path) -> None:
    srv = frozen_srv
    wid = srv.create(repo, "snapped", idle_timeout_s=2)
    srv.exec(wid, f"echo kept > /workspace/keep && {COUNTER}")
    srv.asleep(wid, "frozen")
    r = srv.http.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "disk"})
    assert r.status_code == 201, r.text
    assert (srv.ws(wid)["sleep"], engine_state(srv.container(wid))) == ("frozen", "frozen")
    fork = srv.http.post("/api/v1/workspaces", json={"name": "fork",
                                                     "from_snapshot": r.json()["id"]})
    assert fork.status_code in (201, 202), fork.text
    fid = fork.json()["id"]
    assert wait(lambda: srv.ws(fid)["state"] == "running", 120), srv.ws(fid)
    assert srv.exec(fid, "cat /workspace/keep")["stdout"] == "kept\n"
    pid, _ = srv.counter(wid)
    r = srv.http.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "mem",
                                                                   "memory": True})
    assert r.status_code == 201, r.text
    # memory comes from a checkpoint: the frozen workspace was saved to disk for it
    assert (srv.ws(wid)["state"], srv.ws(wid)["sleep"]) == ("paused", "saved")
    assert engine_state(srv.container(wid)) == "exited"
    out = srv.exec(wid, "cat /workspace/count")  # wakes it from the saved tier
    assert int(out["stdout"].split()[0]) == pid
    assert any("restored from memory" in m for m in srv.messages(wid)), srv.messages(wid)


def test_stop_and_delete_of_a_frozen_workspace(frozen_srv: Sleepy, repo: Path) -> None:
    srv = frozen_srv
    wid = srv.create(repo, "stopped", idle_timeout_s=2)
    srv.asleep(wid, "frozen")
    r = srv.http.post(f"/api/v1/workspaces/{wid}/stop")
    assert r.status_code == 200 and r.json()["state"] == "stopped", r.text
    assert engine_state(srv.container(wid)) == "exited"
    # runsc's state went with it: the same container starts again
    assert srv.http.post(f"/api/v1/workspaces/{wid}/start").json()["state"] == "running"
    srv.asleep(wid, "frozen")
    r = srv.http.delete(f"/api/v1/workspaces/{wid}")
    assert r.status_code in (200, 202, 204), r.text
    assert wait(lambda: not engine_objects(srv.container(wid)), 60), \
        engine_objects(srv.container(wid))


def test_a_frozen_workspace_stays_frozen_across_a_kill_9_of_den(
        frozen_srv: Sleepy, repo: Path) -> None:
    srv = frozen_srv
    wid = srv.create(repo, "survivor", idle_timeout_s=2)
    srv.exec(wid, COUNTER)
    srv.asleep(wid, "frozen")
    pid, count = srv.counter(wid)
    srv.kill9()
    srv.start(timeout_s=240)
    assert (srv.ws(wid)["state"], srv.ws(wid)["sleep"]) == ("paused", "frozen")
    assert engine_state(srv.container(wid)) == "frozen"
    assert srv.counter(wid) == (pid, count)
    out = srv.exec(wid, "cat /workspace/count")
    assert int(out["stdout"].split()[0]) == pid
    assert any("thawed in" in m for m in srv.messages(wid))


def test_a_frozen_workspace_is_saved_after_frozen_max_s_and_wakes_from_disk(
        engine: None, repo: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = _server(tmp_path_factory.mktemp("sleep-saved"), repo.parent, "sav", frozen_max_s=3)
    srv.start()
    try:
        wid = srv.create(repo, "deep", idle_timeout_s=2)
        srv.exec(wid, COUNTER)
        srv.asleep(wid, "frozen")
        pid, _ = srv.counter(wid)
        srv.asleep(wid, "saved")
        assert engine_state(srv.container(wid)) == "exited"
        messages = srv.messages(wid)
        assert any(m == "saving a frozen workspace's memory to disk" for m in messages)
        out = srv.exec(wid, "cat /workspace/count")
        assert int(out["stdout"].split()[0]) == pid
        assert any("restored from memory" in m for m in srv.messages(wid)), srv.messages(wid)
    finally:
        srv.remove_all()
        srv.close()
