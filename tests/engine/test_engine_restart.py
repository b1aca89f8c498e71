"""The real Docker engine restarted under a running Den (issue 16): Den learns that its
workspace's container exited without any access to it, says why, tells /healthz the truth
while the engine is away, starts the workspace again on the next exec, and the workspace's
network policy still holds after the engine rebuilt its own firewall rules.

This restarts the one engine every engine test shares, so it runs last (tests/conftest.py
moves tests marked ``engine_restart`` to the end of the run). dockerd is stopped and started
the way scripts/setup-host.sh does it (systemd where the host has it, else a background
dockerd), and is running again whatever the test's outcome.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.conftest import ApiClient, free_port, users
from tests.engine.test_network import _host_http

pytestmark = [pytest.mark.engine, pytest.mark.engine_restart]
WS = "/api/v1/workspaces"
DOCKERD_LOG = "/var/log/den-dockerd.log"


def _wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"not reached within {timeout_s:g} s: {what}"
        time.sleep(0.1)


def _docker_up() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


def _systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


def _stop_dockerd() -> None:
    if _systemd():
        subprocess.run(["systemctl", "stop", "docker"], check=True, timeout=120)
        return
    pid = int(Path("/var/run/docker.pid").read_text().strip())
    subprocess.run(["kill", "-TERM", str(pid)], check=True)
    _wait_for(lambda: not Path(f"/proc/{pid}").exists(), 90, "dockerd to stop")


def _start_dockerd() -> None:
    if _systemd():
        subprocess.run(["systemctl", "start", "docker"], check=True, timeout=120)
    else:
        with open(DOCKERD_LOG, "ab") as out:
            subprocess.Popen(["dockerd"], stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    _wait_for(_docker_up, 90, "dockerd to answer")


@pytest.fixture
def dockerd_back() -> Iterator[None]:
    """Whatever happens in the test, the engine is running after it."""
    yield
    if not _docker_up():
        _start_dockerd()


@pytest.fixture
def host_server() -> Iterator[int]:
    """A host service on 0.0.0.0: what a workspace must never reach."""
    srv = _host_http(free_port())
    yield srv.server_port
    srv.shutdown()


def test_an_engine_restart_is_followed_and_the_policy_still_holds(
        engine: None, dockerd_back: None, host_server: int,
        make_settings: Callable[..., Settings], make_repo: Callable[..., Path]) -> None:
    settings = make_settings(stop_timeout_s=2)
    app = create_app(settings)
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        ws = api.create(make_repo())
        assert ws["state"] == "running", ws
        wid = ws["id"]
        gateway = subprocess.run(
            ["docker", "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}",
             settings.resolved_network_name()], capture_output=True, text=True, check=True,
            timeout=30).stdout.strip()

        def reaches_the_host() -> bool:
            probe = ("import socket,sys\ntry:\n socket.create_connection"
                     f"(({gateway!r}, {host_server}), timeout=2).close()\nexcept OSError:\n"
                     " sys.exit(1)")
            r = api.exec(wid, ["python3", "-c", probe])
            assert r["exit_code"] in (0, 1), r
            return bool(r["exit_code"] == 0)

        # Control: the host's service answers on the host.
        socket.create_connection(("127.0.0.1", host_server), timeout=2).close()
        assert not reaches_the_host()

        _stop_dockerd()
        try:
            def engine_down() -> bool:
                r = client.get("/healthz")
                return r.status_code == 503 and not r.json()["engine"]["ok"]

            _wait_for(engine_down, 60, "/healthz to say the engine is down")
        finally:
            _start_dockerd()

        # No access to the workspace: the event stream (or the reconcile that follows its
        # reconnection) records what the engine did to the container.
        def state() -> str:
            return str(api.get(f"{WS}/{wid}").json()["state"])

        _wait_for(lambda: state() == "stopped", 90, "the workspace to be recorded stopped")
        last = [e for e in api.get(f"{WS}/{wid}/events").json()["events"]
                if e["kind"] == "state"][-1]
        assert (last["from_state"], last["to_state"]) == ("running", "stopped"), last
        assert last["actor"] == "engine" or "reconcile" in last["message"], last
        assert last["message"], last
        _wait_for(lambda: client.get("/healthz").status_code == 200, 60,
                  "/healthz to be 200 again")

        # The next access starts it again, and the engine's rebuilt firewall did not open
        # the host to it.
        assert api.exec(wid, ["true"])["exit_code"] == 0
        assert state() == "running"
        assert not reaches_the_host()
        assert client.delete(f"{WS}/{wid}", headers=api.h()).status_code in (200, 202, 204)
