"""The Python client and the CLI against a real ``den serve`` on the real engine: background
processes (start, list, logs, follow, kill) and exec; `den me`, `den limits` and a user's
exec limit."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.client import Den
from tests.conftest import RUN_PREFIX
from tests.server_process import DenServer

pytestmark = pytest.mark.engine


@pytest.fixture
def server(engine: None, tmp_path: Path, repos_root: Path) -> Iterator[DenServer]:
    srv = DenServer(tmp_path / "data", repos_root, f"{RUN_PREFIX}-cli", user="carol",
                    ssh_port=0, reaper_interval_s=0)
    srv.start()
    try:
        yield srv
    finally:
        for ws in srv.http.get("/api/v1/workspaces").json().get("workspaces", []):
            srv.http.delete(f"/api/v1/workspaces/{ws['id']}")
        srv.close()


def _den(srv: DenServer, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEN_URL": f"http://127.0.0.1:{srv.port}", "DEN_TOKEN": srv.token,
           "HOME": str(srv.log.parent)}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_processes_through_the_client_and_the_cli(
        server: DenServer, make_repo: Callable[..., Path]) -> None:
    # A poll every 10 minutes: polling, the wait would look again only at its deadline
    # (120 s); it returns long before only because the client follows the workspace's event
    # stream (a create takes seconds).
    with Den(f"http://127.0.0.1:{server.port}", server.token, poll_interval_s=600) as den:
        started = time.monotonic()
        ws = den.create(str(make_repo()), name="api", timeout_s=120)
        assert ws.state == "running" and time.monotonic() - started < 100
        proc = ws.processes.start("for i in 1 2 3; do echo line$i; sleep 0.2; done; exit 5")
        chunks = list(ws.processes.logs(proc.pid, follow=True))
        assert "".join(c.data for c in chunks) == "line1\nline2\nline3\n"
        deadline = time.monotonic() + 20
        while (listed := {p.pid: p for p in ws.processes.list()})[proc.pid].running:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert listed[proc.pid].exit_code == 5
        assert ws.exec("echo hi").stdout == "hi\n"

    r = _den(server, "spawn", "api", "--", "sleep", "600")
    assert r.returncode == 0, r.stderr
    pid = int(r.stdout.strip())
    r = _den(server, "ps", "api")
    assert r.returncode == 0 and str(pid) in r.stdout and "sleep 600" in r.stdout, r
    r = _den(server, "kill", "api", str(pid), "-s", "KILL")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 20
    while str(pid) in _den(server, "ps", "api", "--json").stdout.split("running")[0] and \
            '"running": true' in _den(server, "ps", "api", "--json").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = _den(server, "logs", "api", str(pid))
    assert r.returncode == 0, r.stderr


def test_limits_through_the_cli_and_a_users_execs_capped_on_the_engine(
        server: DenServer, make_repo: Callable[..., Path]) -> None:
    """`den me` and `den limits` against a real server; one user's long execs fill their own
    limit (429), not the server's gate (issue 11, finding 5)."""
    import threading

    import httpx

    admin = server._cli("admin", "token", "--user", "root", "--admin")
    r = server.http.post("/api/v1/workspaces",
                         json={"name": "api", "repo": {"url": str(make_repo())}})
    assert r.status_code == 202, r.text
    with Den(f"http://127.0.0.1:{server.port}", server.token) as den:
        den.workspace("api").wait_for("running")

    as_root = {**os.environ, "DEN_TOKEN": admin}
    p = subprocess.run([sys.executable, "-m", "server.cli", "limits", "carol", "workspaces=1",
                        "execs=1"], env={**as_root, "DEN_URL": f"http://127.0.0.1:{server.port}",
                                         "HOME": str(server.log.parent)},
                       text=True, capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr
    p = _den(server, "me")
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in p.stdout.splitlines()[2:]}
    assert rows["workspaces"] == ["1", "1"] and rows["execs"] == ["0", "1"]
    p = _den(server, "create", str(make_repo("other")), "--name", "other")
    assert p.returncode == 1 and "workspaces: 1" in p.stderr, p.stderr

    ws_id = server.http.get("/api/v1/workspaces/api").json()["id"]
    held: list[httpx.Response] = []
    long = threading.Thread(target=lambda: held.append(server.http.post(
        f"/api/v1/workspaces/{ws_id}/exec", json={"cmd": "sleep 8; echo done"})))
    long.start()
    try:
        deadline = time.monotonic() + 30
        while server.http.get("/api/v1/users/me").json()["quotas"]["execs"]["used"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r2 = server.http.post(f"/api/v1/workspaces/{ws_id}/exec", json={"cmd": "true"})
        assert r2.status_code == 429, r2.text
        assert (r2.json()["error"]["limit"], r2.json()["error"]["value"]) == ("execs", 1)
        # another user's exec runs meanwhile (root, on carol's workspace, as an admin may)
        r3 = httpx.post(f"http://127.0.0.1:{server.port}/api/v1/workspaces/{ws_id}/exec",
                        json={"cmd": "echo other"}, headers={"Authorization": f"Bearer {admin}"},
                        timeout=60)
        assert (r3.status_code, r3.json()["stdout"]) == (200, "other\n"), r3.text
    finally:
        long.join()
    assert held[0].status_code == 200 and held[0].json()["stdout"] == "done\n"
