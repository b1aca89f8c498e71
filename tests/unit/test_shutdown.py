"""``den serve`` stops promptly on SIGTERM (and Ctrl-C), even with a call in flight that never
ends: a server process (``tests.fake_serve``: the same ``serve`` on the fake runtime) holding a
wedged exec gets the signal and exits within the grace period plus the shutdown margin."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.serve import SHUTDOWN_MARGIN_S
from tests.server_process import DenServer

GRACE_S = 2
WAIT_S = 60  # bound on waiting for the server to do something


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_cuts_a_wedged_call_after_the_grace_period(
        tmp_path: Path, repos_root: Path, make_repo: Callable[..., Path],
        sig: signal.Signals) -> None:
    marker = tmp_path / "wedged"
    srv = DenServer(tmp_path / "data", repos_root, "dentest-shutdown", user="alice",
                    module="tests.fake_serve", ssh_port=0, shutdown_grace_s=GRACE_S,
                    test_wedge_marker=marker)
    try:
        srv.start()
        r = srv.http.post("/api/v1/workspaces",
                          json={"name": "api", "repo": {"url": str(make_repo())}})
        assert r.status_code == 202, r.text
        ws_id = r.json()["id"]
        deadline = time.monotonic() + WAIT_S
        while srv.http.get(f"/api/v1/workspaces/{ws_id}").json()["state"] != "running":
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.05)

        outcome: dict[str, Any] = {}

        def wedged_call() -> None:
            try:
                outcome["response"] = srv.http.post(f"/api/v1/workspaces/{ws_id}/exec",
                                                    json={"cmd": ["wedge"], "timeout_s": 600})
            except httpx.HTTPError as exc:
                outcome["error"] = exc

        caller = threading.Thread(target=wedged_call, daemon=True)
        caller.start()
        deadline = time.monotonic() + WAIT_S
        while not marker.exists():
            assert time.monotonic() < deadline, srv.log_tail()
            time.sleep(0.05)

        assert srv.proc is not None
        srv.proc.send_signal(sig)
        try:
            srv.proc.wait(timeout=GRACE_S + SHUTDOWN_MARGIN_S + 10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {sig.name}:\n{srv.log_tail()}") from None
        caller.join(timeout=WAIT_S)
        assert not caller.is_alive()
        # The cut call is told so.
        response = outcome.get("response")
        assert response is not None, outcome
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "shutting_down"
        log = srv.log_tail(20000)
        assert f"calls in flight have {GRACE_S:g} s to finish" in log, log
        assert "Cancel 1 running task(s), timeout graceful shutdown exceeded" in log, log
        assert f"POST /api/v1/workspaces/{ws_id}/exec cut: the server is stopping" in log, log
        assert "Traceback" not in log, log
        if sig is signal.SIGINT:
            # Ctrl-C ends asyncio.run, which then waits for its threads: the wedged one never
            # ends, and the watchdog exits the process, saying so.
            assert "exiting now" in log, log
    finally:
        srv.close()
