"""Pause and resume with memory on the real engine: processes and their memory survive."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ApiClient

pytestmark = pytest.mark.engine

# A loop in dev's tmux (whose server descends from the container's main process, so gVisor
# restores it) that keeps its count in shell memory and writes it out.
COUNTER = ("tmux new-session -d -s count "
           "'i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done'")


def _count(api: ApiClient, wid: str) -> int:
    for _ in range(20):  # the loop truncates the file before it writes: read again
        out = api.exec(wid, "cat /tmp/count")["stdout"].strip()
        if out:
            return int(out)
        time.sleep(0.05)
    raise AssertionError("/tmp/count stays empty")


def _count_moves_on(api: ApiClient, wid: str, before: int, timeout_s: float = 10) -> int:
    """The count once it has moved past ``before`` (or where it stands at the deadline).
    After a restore, a sleeping process may take a moment to be scheduled again."""
    deadline = time.monotonic() + timeout_s
    while True:
        time.sleep(0.25)
        now = _count(api, wid)
        if now > before or time.monotonic() > deadline:
            return now


def _pane_pid(api: ApiClient, wid: str) -> str:
    """The pid of the counting loop (read from /proc, not with a tmux client)."""
    return str(api.exec(wid, "pgrep -o -f 'i=0; while'")["stdout"].strip())


def _engine(api: ApiClient, wid: str, fmt: str) -> str:
    name = f"{api.app.state.settings.engine_prefix}-{wid}"
    return subprocess.run(["docker", "inspect", "--format", fmt, name], capture_output=True,
                          text=True, check=True).stdout.strip()


def _images_dir(api: ApiClient, wid: str) -> Path:
    """Where the runtime writes the workspace's checkpoint images (beside Docker's links)."""
    root = subprocess.run(["docker", "info", "--format", "{{.DockerRootDir}}"],
                          capture_output=True, text=True, check=True).stdout.strip()
    return Path(root) / "containers" / _engine(api, wid, "{{.Id}}") / "den-checkpoints"


def _checkpoints(api: ApiClient, wid: str) -> list[str]:
    name = f"{api.app.state.settings.engine_prefix}-{wid}"
    out = subprocess.run(["docker", "checkpoint", "ls", name], capture_output=True, text=True)
    return out.stdout.split()[2:]  # after the "CHECKPOINT NAME" header


def test_a_process_and_its_memory_survive_pause_and_resume(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    wid = real_api.create(make_repo())["id"]
    assert real_api.exec(wid, COUNTER)["exit_code"] == 0
    time.sleep(0.5)

    r = real_api.post(f"/api/v1/workspaces/{wid}/pause")
    assert (r.status_code, r.json()["state"]) == (200, "paused"), r.text
    assert _engine(real_api, wid, "{{.State.Running}}") == "false"  # CPU and RAM are freed
    assert _checkpoints(real_api, wid) == ["den-pause"]
    r = real_api.post(f"/api/v1/workspaces/{wid}/resume")
    assert (r.status_code, r.json()["state"]) == (200, "running"), r.text
    # Memory is back: /tmp is in the sandbox's memory under gVisor, so the count written
    # there exists only if memory was restored. (The process itself: see the next test.)
    assert _count(real_api, wid) > 3
    events = real_api.get(f"/api/v1/workspaces/{wid}/events").json()["events"]
    assert "restored from memory" in events[-1]["message"]
    # One checkpoint stays while running (gVisor may still read from it); a stop removes it.
    assert _checkpoints(real_api, wid) == ["den-pause"]
    real_api.post(f"/api/v1/workspaces/{wid}/stop")
    assert _checkpoints(real_api, wid) == []


def test_a_restored_loop_keeps_running_cycle_after_cycle(
        real_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    """The same process, still counting, after each of five cycles: some right after an
    exec (the pause waits for descriptors to drop), some after a quiet moment."""
    wid = real_api.create(make_repo())["id"]
    real_api.exec(wid, COUNTER)
    time.sleep(0.5)
    pid = _pane_pid(real_api, wid)
    for cycle in range(5):
        if cycle % 2:
            time.sleep(2.5)  # no exec for a while: the pause skips the settle step
        assert real_api.post(f"/api/v1/workspaces/{wid}/pause").json()["state"] == "paused"
        assert real_api.post(f"/api/v1/workspaces/{wid}/resume").json()["state"] == "running"
        events = real_api.get(f"/api/v1/workspaces/{wid}/events").json()["events"]
        seen = (cycle, events[-1]["message"])
        assert _pane_pid(real_api, wid) == pid, seen  # the same process
        before = _count(real_api, wid)
        assert _count_moves_on(real_api, wid, before) > before, seen  # still running


def test_twenty_cycles_leave_nothing_behind(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    """Twenty pause/resume cycles: restored from memory every time, files always there,
    one checkpoint (and its one image) and one shim, never a pile."""
    wid = real_api.create(make_repo())["id"]
    real_api.exec(wid, COUNTER + " && echo kept > /workspace/kept")
    for cycle in range(20):
        assert real_api.post(f"/api/v1/workspaces/{wid}/pause").json()["state"] == "paused"
        assert real_api.post(f"/api/v1/workspaces/{wid}/resume").json()["state"] == "running"
        events = real_api.get(f"/api/v1/workspaces/{wid}/events").json()["events"]
        assert "restored from memory" in events[-1]["message"], (cycle, events[-1])
        assert real_api.exec(wid, "cat /workspace/kept")["stdout"] == "kept\n"
    assert _checkpoints(real_api, wid) == ["den-pause"]
    images = _images_dir(real_api, wid)
    # The image and its completion marker (docs/architecture.md, "Pause and resume").
    assert sorted(p.name for p in images.iterdir()) == ["den-pause", "den-pause.complete"]
    container_id = _engine(real_api, wid, "{{.Id}}")
    shims = subprocess.run(["pgrep", "-c", "-f", f"containerd-shim.*{container_id}"],
                           capture_output=True, text=True).stdout.strip()
    assert shims == "1", shims  # one shim for the one running sandbox


def test_exec_on_a_paused_workspace_wakes_it(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    wid = real_api.create(make_repo())["id"]
    real_api.exec(wid, COUNTER)
    real_api.post(f"/api/v1/workspaces/{wid}/pause")
    assert real_api.exec(wid, "cat README.md")["stdout"] == "# api\n"
    assert real_api.get(f"/api/v1/workspaces/{wid}").json()["state"] == "running"
    assert _count(real_api, wid) > 0
    got = real_api.get(f"/api/v1/workspaces/{wid}/files", params={"path": "api/README.md"})
    assert got.content == b"# api\n"


def test_a_missing_checkpoint_falls_back_to_a_cold_start(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    wid = real_api.create(make_repo())["id"]
    real_api.exec(wid, "echo kept > /workspace/note")
    real_api.post(f"/api/v1/workspaces/{wid}/pause")
    name = f"{real_api.app.state.settings.engine_prefix}-{wid}"
    subprocess.run(["docker", "checkpoint", "rm", name, "den-pause"], check=True)
    r = real_api.post(f"/api/v1/workspaces/{wid}/resume")
    assert (r.status_code, r.json()["state"]) == (200, "running"), r.text
    assert real_api.exec(wid, "cat /workspace/note")["stdout"] == "kept\n"
    events = real_api.get(f"/api/v1/workspaces/{wid}/events").json()["events"]
    assert "started cold from disk" in events[-1]["message"]


def test_pause_and_resume_when_already_there_change_nothing(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    wid = real_api.create(make_repo())["id"]
    assert real_api.post(f"/api/v1/workspaces/{wid}/resume").json()["state"] == "running"
    real_api.post(f"/api/v1/workspaces/{wid}/stop")
    assert real_api.post(f"/api/v1/workspaces/{wid}/pause").json()["state"] == "stopped"
    r = real_api.post(f"/api/v1/workspaces/{wid}/resume")
    assert r.status_code == 409


def test_a_disk_full_during_the_checkpoint_leaves_the_workspace_usable(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    """The checkpoint image goes to a 1 MiB filesystem (ENOSPC): the pause is an error, the
    workspace is running or stopped (never half-paused), the event log says why, nothing of
    the image is left, and the next call works."""
    wid = real_api.create(make_repo())["id"]
    real_api.exec(wid, "echo kept > /workspace/note")
    images = _images_dir(real_api, wid)
    images.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "den-test-full", str(images)],
                   check=True)
    try:
        r = real_api.post(f"/api/v1/workspaces/{wid}/pause")
        assert r.status_code == 502, r.text
        assert "checkpoint" in r.json()["error"]["message"]
        state = real_api.get(f"/api/v1/workspaces/{wid}").json()["state"]
        assert state in ("running", "stopped")
        events = real_api.get(f"/api/v1/workspaces/{wid}/events").json()["events"]
        assert events[-1]["message"].startswith("pause failed: ")
        assert f"the workspace is {state}" in events[-1]["message"]
        assert list(images.iterdir()) == []
        assert _checkpoints(real_api, wid) == []
    finally:
        subprocess.run(["umount", str(images)], check=False)
    assert real_api.exec(wid, "cat /workspace/note")["stdout"] == "kept\n"
    assert real_api.post(f"/api/v1/workspaces/{wid}/pause").json()["state"] == "paused"
