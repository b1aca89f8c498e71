"""A real ``den serve`` as a child process, for the engine tests and the benchmark.

Not a test module and free of pytest: ``tests.benchmarks.bench_workspaces`` runs without it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DenServer:
    """``den serve`` on a free loopback port, and an httpx client holding a token for it.

    The server keeps its data (SQLite) in ``data_dir``, may clone local repositories under
    ``repos_root`` and names its engine objects ``prefix-...``; ``settings`` are further
    server settings, each passed as ``DEN_<NAME>`` (``stop_timeout_s=2`` is
    ``DEN_STOP_TIMEOUT_S=2``). Its output goes to ``server.log`` next to ``data_dir``.
    ``own_session`` starts it in a new session, out of reach of a Ctrl-C at the terminal
    (the caller stops it). It can be killed with SIGKILL and started again on the same port.
    ``module`` runs another module's ``serve`` instead of ``den serve`` (``tests.fake_serve``:
    the same server on the fake runtime).
    """

    def __init__(self, data_dir: Path, repos_root: Path, prefix: str, *, user: str,
                 http_timeout_s: float = 60, own_session: bool = False,
                 module: str = "server.cli", **settings: object) -> None:
        self.module = module
        self.port = free_port()
        # The SSH gateway's port: a free one, unless settings say (ssh_port=0 turns it off).
        self.ssh_port = int(str(settings.get("ssh_port", free_port())))
        self.prefix = prefix
        self.log = data_dir.parent / "server.log"
        self.own_session = own_session
        self.env = {
            **os.environ,
            "DEN_DATA_DIR": str(data_dir),
            "DEN_ENGINE_PREFIX": prefix,
            "DEN_LOCAL_REPO_ROOTS": json.dumps([str(repos_root)]),
            "DEN_SSH_PORT": str(self.ssh_port),
            "DEN_OUTBOUND_ALLOW": '["127.0.0.0/8", "::1"]',  # the tests' stand-in servers
            **{f"DEN_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = self._cli("admin", "token", "--user", user)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=http_timeout_s,
                                 headers={"Authorization": f"Bearer {self.token}"})

    def _cli(self, *args: str) -> str:
        argv = [sys.executable, "-m", "server.cli", *args]
        p = subprocess.run(argv, env=self.env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
        return p.stdout.strip()

    def start(self, timeout_s: float = 60) -> None:
        """Start it and wait until ``/healthz`` answers 200."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "serve", "--port", str(self.port)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=self.own_session,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"den serve did not start:\n{self.log_tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, and SIGKILL after 30 s; it can be started again."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def close(self) -> None:
        """Stop it and close the client."""
        self.http.close()
        self.stop()

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return "(no server log)"
