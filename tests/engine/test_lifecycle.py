"""Workspaces on the real Docker engine with gVisor: create, exec, stop/start, delete. (Exec
options, timeouts and the streaming exec are tests/engine/test_backends.py, on both backends.)"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ApiClient, engine_objects

pytestmark = pytest.mark.engine


def _prefix(api: ApiClient) -> str:
    return str(api.app.state.settings.engine_prefix)


def test_create_from_local_bare_repo_runs_under_gvisor(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    repo = make_repo("api", {"README.md": "# api\n", "src/main.py": "print('hi')\n"})
    ws = real_api.create(repo)
    assert ws["state"] == "running", ws
    assert ws["runtime"] == "gvisor"
    assert ws["repo"] == {"url": str(repo), "branch": "main", "path": "/workspace/api"}

    out = real_api.exec(ws["id"], "pwd; ls; id -un; git log --format=%s -1")
    assert out["exit_code"] == 0, out
    assert out["stdout"].split("\n")[:5] == ["/workspace/api", "README.md", "src", "dev",
                                             "initial"]
    # The kernel seen inside is gVisor's Sentry, not the host's.
    kernel = real_api.exec(ws["id"], ["sh", "-c", "dmesg | head -1; uname -r"])
    assert "gVisor" in kernel["stdout"], kernel
    host_release = subprocess.run(["uname", "-r"], capture_output=True, text=True).stdout
    assert kernel["stdout"].split("\n")[1] != host_release.strip()

    inspect = subprocess.run(
        ["docker", "inspect", "--format", "{{.HostConfig.Runtime}} {{.HostConfig.PidsLimit}} "
         "{{.HostConfig.Privileged}} {{.HostConfig.CapAdd}} {{json .Config.Labels}}",
         f"{_prefix(real_api)}-{ws['id']}"], capture_output=True, text=True, check=True,
    ).stdout
    assert inspect.startswith("runsc 4096 false []"), inspect  # host pids: room for gVisor
    assert real_api.exec(ws["id"], "ulimit -u")["stdout"] == "1024\n"  # the workspace's limit
    assert f'"den.workspace":"{ws["id"]}"' in inspect
    assert "docker.sock" not in subprocess.run(
        ["docker", "inspect", f"{_prefix(real_api)}-{ws['id']}"],
        capture_output=True, text=True).stdout


def test_default_image_has_the_tools_and_dev_user(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    ws = real_api.create(make_repo())
    out = real_api.exec(
        ws["id"],
        "for t in bash git curl python3 tmux sudo; do command -v $t >/dev/null || echo missing $t;"
        " done; id -u; echo $HOME; getent passwd dev | cut -d: -f6,7",
    )
    assert out["stdout"] == "1000\n/home/dev\n/home/dev:/bin/bash\n", out


def test_exec_stream_on_a_terminal_has_its_size_and_takes_resizes(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    ws = real_api.create(make_repo())
    url = f"/api/v1/workspaces/{ws['id']}/exec/stream"
    script = "stty size; test -t 0 && echo IS-TTY; read _; stty size; echo err >&2; exit 3"
    with real_api.client.websocket_connect(url, headers=real_api.h()) as sock:
        sock.send_json({"cmd": ["bash", "-c", script], "tty": True, "cols": 123, "rows": 40})
        out = ""
        while "IS-TTY" not in out:
            msg = sock.receive_json()
            assert msg["type"] == "stdout", msg
            out += msg["data"]
        sock.send_json({"type": "resize", "cols": 90, "rows": 31})
        sock.send_json({"type": "stdin", "data": "go\r"})
        messages: list[dict[str, Any]] = []
        while not messages or messages[-1]["type"] not in ("exit", "error"):
            messages.append(sock.receive_json())
    out += "".join(m["data"] for m in messages if m["type"] == "stdout")
    assert "40 123\r\n" in out and "31 90\r\n" in out and "err\r\n" in out, out
    assert not [m for m in messages if m["type"] == "stderr"]
    assert messages[-1] == {"type": "exit", "exit_code": 3}


def test_stop_start_keeps_workspace_and_container_changes(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    ws = real_api.create(make_repo())
    wid = ws["id"]
    setup = real_api.exec(
        wid,
        "echo note > /workspace/notes.txt && echo wip >> README.md && "
        "mkdir -p ~/.cache && echo home > ~/.cache/x && "
        "sudo sh -c 'echo pkg > /usr/local/share/den-marker'",
    )
    assert setup["exit_code"] == 0, setup

    r = real_api.post(f"/api/v1/workspaces/{wid}/stop")
    assert (r.status_code, r.json()["state"]) == (200, "stopped")
    again = real_api.post(f"/api/v1/workspaces/{wid}/stop")
    assert (again.status_code, again.json()["state"]) == (200, "stopped")
    status = subprocess.run(["docker", "inspect", "--format", "{{.State.Running}}",
                             f"{_prefix(real_api)}-{wid}"], capture_output=True, text=True)
    assert status.stdout.strip() == "false"

    r = real_api.post(f"/api/v1/workspaces/{wid}/start")
    assert (r.status_code, r.json()["state"]) == (200, "running")
    out = real_api.exec(wid, "cat /workspace/notes.txt README.md ~/.cache/x "
                             "/usr/local/share/den-marker")
    assert out["stdout"] == "note\n# api\nwip\nhome\npkg\n", out


def test_exec_on_stopped_workspace_starts_it(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    ws = real_api.create(make_repo())
    real_api.post(f"/api/v1/workspaces/{ws['id']}/stop")
    out = real_api.exec(ws["id"], "echo awake")
    assert out["stdout"] == "awake\n"
    assert real_api.get(f"/api/v1/workspaces/{ws['id']}").json()["state"] == "running"


def test_delete_leaves_nothing_in_the_engine(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    ws = real_api.create(make_repo())
    prefix = f"{_prefix(real_api)}-{ws['id']}"
    assert sorted(k for k, _ in engine_objects(prefix)) == ["container", "volume"]

    r = real_api.delete(f"/api/v1/workspaces/{ws['id']}")
    assert r.status_code == 204
    assert engine_objects(prefix) == []
    assert real_api.get(f"/api/v1/workspaces/{ws['id']}").status_code == 404
    assert real_api.delete(f"/api/v1/workspaces/{ws['id']}").status_code == 404
    with real_api.app.state.sessions() as s:
        from sqlalchemy import func, select

        from server.db.models import Event

        left = s.scalar(select(func.count()).select_from(Event)
                        .where(Event.workspace_id == ws["id"]))
    assert left == 0


def test_events_record_every_transition(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    ws = real_api.create(make_repo())
    real_api.post(f"/api/v1/workspaces/{ws['id']}/stop")
    real_api.post(f"/api/v1/workspaces/{ws['id']}/start")
    events = real_api.get(f"/api/v1/workspaces/{ws['id']}/events").json()["events"]
    moves = [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "state"]
    assert moves == [(None, "creating"), ("creating", "running"), ("running", "stopping"),
                     ("stopping", "stopped"), ("stopped", "starting"), ("starting", "running")]
    assert {e["actor"] for e in events if e["from_state"] == "running"} == {"alice"}


def test_sudo_works_for_dev_through_the_broker(
    real_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    """gVisor ignores set-user-ID bits; the image's sudo asks a root broker instead."""
    wid = real_api.create(make_repo())["id"]
    out = real_api.exec(
        wid,
        "sudo id -u; sudo -u nobody id -un; echo piped | sudo cat; sudo sh -c 'pwd; exit 7'",
    )
    assert (out["stdout"], out["exit_code"]) == ("0\nnobody\npiped\n/workspace/api\n", 7), out
    missing = real_api.exec(wid, "sudo no-such-command")
    assert missing["exit_code"] == 1 and "command not found" in missing["stderr"]
    # Only the users listed in /etc/den/sudoers may use it.
    nobody = real_api.exec(wid, "sudo -u nobody sudo id", timeout_s=30)
    assert nobody["exit_code"] == 1 and "not allowed" in nobody["stderr"], nobody
    # With no-new-privileges and the dropped capabilities (issue 11), root still does what
    # package installs do: own files to other users, write where only root may.
    root = real_api.exec(wid, "sudo sh -c 'touch /usr/local/share/x && chown nobody "
                              "/usr/local/share/x && chmod 4755 /usr/local/share/x && "
                              "stat -c %U /usr/local/share/x && dpkg --version >/dev/null'")
    assert (root["exit_code"], root["stdout"]) == (0, "nobody\n"), root


def test_a_container_killed_from_outside_is_known_within_seconds(
        real_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    """Den follows the engine's events: `docker kill` from outside turns the workspace
    `stopped` without any call touching it, and the event log says what happened."""
    import time

    ws = real_api.create(make_repo())
    assert ws["state"] == "running", ws
    container = f"{_prefix(real_api)}-{ws['id']}"
    subprocess.run(["docker", "kill", container], check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while real_api.get(f"/api/v1/workspaces/{ws['id']}").json()["state"] != "stopped":
        assert time.monotonic() < deadline, subprocess.run(
            ["docker", "inspect", "--format", "{{json .State}}", container],
            capture_output=True, text=True).stdout
        time.sleep(0.1)
    last = real_api.get(f"/api/v1/workspaces/{ws['id']}/events").json()["events"][-1]
    assert last["actor"] == "engine", last
    assert last["message"].startswith("the container exited (code 137, killed by SIGKILL)"), last
    # The next access starts it again.
    assert real_api.exec(ws["id"], "true")["exit_code"] == 0
