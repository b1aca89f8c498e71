"""The in-workspace agent on the real engine: every process survives sleep, the deadline
holds whatever the command does, and a killed agent comes back."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from tests.conftest import ApiClient

pytestmark = pytest.mark.engine

# Two counters that are not in tmux: one left behind by a one-shot exec with nohup, one
# started through the processes API. Each keeps its count in shell memory.
NOHUP = ("nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/nohup-count; sleep 0.1; "
         "done' >/dev/null 2>&1 & echo $!")
SPAWNED = "i=0; while :; do i=$((i+1)); echo $i > /tmp/api-count; echo tick $i; sleep 0.1; done"


def _count(api: ApiClient, wid: str, name: str) -> int:
    for _ in range(40):  # the loop truncates the file before it writes: read again
        out = api.exec(wid, f"cat /tmp/{name}")["stdout"].strip()
        if out:
            return int(out)
        time.sleep(0.05)
    raise AssertionError(f"/tmp/{name} stays empty")


def _moves_on(api: ApiClient, wid: str, name: str, timeout_s: float = 10) -> None:
    before = _count(api, wid, name)
    deadline = time.monotonic() + timeout_s
    while _count(api, wid, name) <= before:
        assert time.monotonic() < deadline, f"{name} stuck at {before}"
        time.sleep(0.1)


def _alive(api: ApiClient, wid: str, pid: int) -> bool:
    return bool(api.exec(wid, f"kill -0 {pid}")["exit_code"] == 0)


def test_background_processes_keep_their_pid_and_count_across_pauses_and_a_memory_fork(
        real_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    api = real_api
    wid = api.create(make_repo())["id"]
    # Commands go through the agent: it is the workspace's main process.
    assert "den-agent" in api.exec(wid, "tr '\\0' ' ' < /proc/1/cmdline")["stdout"]
    r = api.exec(wid, NOHUP)
    assert r["exit_code"] == 0, r
    nohup_pid = int(r["stdout"])
    r = api.post(f"/api/v1/workspaces/{wid}/processes", json={"cmd": SPAWNED})
    assert r.status_code == 201, r.text
    api_pid = r.json()["pid"]

    for cycle in range(20):
        assert api.post(f"/api/v1/workspaces/{wid}/pause").json()["state"] == "paused"
        assert api.post(f"/api/v1/workspaces/{wid}/resume").json()["state"] == "running"
        events = api.get(f"/api/v1/workspaces/{wid}/events").json()["events"]
        assert "restored from memory" in events[-1]["message"], (cycle, events[-1])
        if cycle % 5 == 4:
            assert _alive(api, wid, nohup_pid) and _alive(api, wid, api_pid), cycle
            _moves_on(api, wid, "nohup-count")
            _moves_on(api, wid, "api-count")

    listed = {p["pid"]: p
              for p in api.get(f"/api/v1/workspaces/{wid}/processes").json()["processes"]}
    assert listed[api_pid]["running"] is True
    logs = api.get(f"/api/v1/workspaces/{wid}/processes/{api_pid}/logs").text
    assert "tick" in logs

    r = api.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "mem", "memory": True})
    assert r.status_code == 201, r.text
    r = api.post("/api/v1/workspaces", json={"name": "memfork", "from_snapshot": r.json()["id"]})
    fork = api.wait_state(r.json()["id"])
    assert fork["state"] == "running", fork
    for pid, name in ((nohup_pid, "nohup-count"), (api_pid, "api-count")):
        assert _alive(api, fork["id"], pid), name  # the same pid in the fork
        _moves_on(api, fork["id"], name)
    # The fork's agent knows the process it inherited, and can end it.
    r = api.post(f"/api/v1/workspaces/{fork['id']}/processes/{api_pid}/signal",
                 json={"signal": "KILL"})
    assert r.status_code in (200, 204), r.text
    deadline = time.monotonic() + 10
    while _alive(api, fork["id"], api_pid):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _alive(api, wid, api_pid)  # the origin's is its own


def test_the_deadline_holds_for_a_flood_and_the_agent_comes_back_when_killed(
        real_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    api = real_api
    wid = api.create(make_repo())["id"]
    # `yes` at its deadline used to wedge the workspace's exec for good (issue 16).
    r = api.exec(wid, ["yes"], timeout_s=2)
    assert r["timed_out"] is True and r["truncated"] is True, {k: r[k] for k in r if k != "stdout"}
    assert api.exec(wid, "echo after")["stdout"] == "after\n"
    # Not found and not executable answer as a shell would.
    assert api.exec(wid, ["no-such-command"])["exit_code"] == 127
    assert api.exec(wid, ["/workspace"])["exit_code"] == 126

    # A signal sent over the streaming exec reaches the process's group.
    with api.client.websocket_connect(f"/api/v1/workspaces/{wid}/exec/stream",
                                      headers=api.h()) as sock:
        sock.send_json({"cmd": "trap 'echo got-int; exit 9' INT; echo ready; "
                               "while :; do sleep 0.1; done"})
        assert sock.receive_json() == {"type": "stdout", "data": "ready\n"}
        sock.send_json({"type": "signal", "signal": "INT"})
        messages = [sock.receive_json()]
        while messages[-1]["type"] not in ("exit", "error"):
            messages.append(sock.receive_json())
    assert messages[-1] == {"type": "exit", "exit_code": 9}, messages

    serve = api.exec(wid, "pgrep -f 'den-agent serve'")["stdout"].split()
    assert len(serve) == 1, serve
    r = api.post(f"/api/v1/workspaces/{wid}/exec", json={"cmd": f"sudo kill -KILL {serve[0]}"})
    assert r.status_code in (200, 502), r.text  # the answer may die with the agent
    deadline = time.monotonic() + 20
    while True:  # init restarts it; the next calls reach the new one
        r = api.post(f"/api/v1/workspaces/{wid}/exec", json={"cmd": "pgrep -f 'den-agent serve'"})
        if r.status_code == 200 and r.json()["stdout"].split() not in ([], serve):
            break
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert api.get(f"/api/v1/workspaces/{wid}").json()["state"] == "running"
    assert api.exec(wid, "cat README.md")["stdout"] == "# api\n"


def test_tmux_clients_do_not_eat_the_sandbox_and_sudo_waits_for_its_broker(
        real_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    """Each tmux client closes descriptor INT_MAX, and gVisor 20240729 kept ~35 MB of sandbox
    memory per such call: about fifteen `tmux ls` (or web terminal connections) got a 512 MB
    workspace OOM-killed, its memory lost. The image preloads libden-closefix.so into tmux."""
    api = real_api
    wid = api.create(make_repo())["id"]
    api.exec(wid, "echo here > /tmp/sandbox-marker")  # /tmp is in the sandbox's memory
    r = api.exec(wid, "for i in $(seq 30); do tmux ls >/dev/null && echo ok; done",
                 timeout_s=120)
    assert (r["exit_code"], r["stdout"].count("ok")) == (0, 30), r
    assert api.exec(wid, "cat /tmp/sandbox-marker")["stdout"] == "here\n"  # no cold restart
    # The library takes itself out of tmux's environment: shells in tmux do not inherit it.
    r = api.exec(wid, "tmux new-session -d -s probe 'env > /tmp/probe-env; sleep 60'; "
                      "for i in $(seq 100); do [ -s /tmp/probe-env ] && break; sleep 0.05; done; "
                      "grep -c LD_PRELOAD /tmp/probe-env")
    assert r["stdout"] == "0\n", r

    # sudo waits for its broker (den-init starts it as the workspace starts): here the broker
    # is gone and comes back a second later, as at boot.
    ctr = docker.from_env().containers.list(filters={"label": f"den.workspace={wid}"})[0]
    code, out = ctr.exec_run(["sh", "-c", "pkill -f [d]en-sudo-broker; rm -f /run/den-sudo.sock"],
                             user="root")
    assert code == 0, out
    ctr.exec_run(["sh", "-c", "sleep 1; exec /usr/local/lib/den/den-sudo-broker"], user="root",
                 detach=True)
    r = api.exec(wid, "sudo -n id -u")
    assert (r["exit_code"], r["stdout"]) == (0, "0\n"), r
