"""The stop script the backend runs in a guest, run for real in a PID namespace of its own
(``unshare --pid --mount-proc``: its /proc shows only the namespace's processes, as a
guest's shows only the guest's): every process but PID 1 and the agent's gets SIGTERM, what
they write while exiting is there before it returns, and one that ignores SIGTERM is left
running once the grace is over (QEMU's end ends it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from server.runtime.microvm.guest import STOP_SCRIPT, stop_request


def _unshare_works() -> bool:
    return os.geteuid() == 0 and shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
        check=False).returncode == 0


pytestmark = pytest.mark.skipif(not _unshare_works(),
                                reason="needs root and unshare for a PID namespace")


def test_stop_request_runs_the_script_as_root_with_the_grace() -> None:
    req = stop_request(7)
    assert list(req.argv) == ["bash", "-c", STOP_SCRIPT, "den-stop", "7"]
    assert (req.user, req.cwd, req.timeout_s) == ("root", "/", 17.0)


def test_processes_get_sigterm_and_the_agent_is_spared(tmp_path: Path) -> None:
    agent = tmp_path / "den-agent"  # a process whose command name is the agent's
    shutil.copy(shutil.which("sleep") or "/bin/sleep", agent)
    term, armed = tmp_path / "term", tmp_path / "armed"
    stubborn_armed = tmp_path / "stubborn"
    guest = f"""
        {agent} 60 &
        agent=$!
        setsid sh -c 'trap "echo got-term > {term}; exit 0" TERM; touch {armed};
                      while :; do sleep 0.1; done' &
        sh -c 'trap "" TERM; touch {stubborn_armed}; while :; do sleep 0.1; done' &
        stubborn=$!
        until [ -e {armed} ] && [ -e {stubborn_armed} ]; do sleep 0.02; done
        bash -c "$STOP" den-stop 1
        echo "stop=$?"
        kill -0 $agent && echo agent-alive
        kill -0 $stubborn && echo stubborn-alive
    """
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", guest],
                         env={**os.environ, "STOP": STOP_SCRIPT}, capture_output=True,
                         text=True, timeout=30, check=False)
    assert "stop=0" in out.stdout and "agent-alive" in out.stdout, (out.stdout, out.stderr)
    assert term.read_text() == "got-term\n"
    # The one that ignores SIGTERM was waited for the grace (1 s), then left to QEMU's end.
    assert "stubborn-alive" in out.stdout, out.stdout
