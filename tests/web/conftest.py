"""Fixtures of the browser tests: Chromium from Debian driven by Playwright, a real
``den serve``, and a real OpenID provider (the npm package oidc-provider, tests/oidc).

Browser tests are marked ``browser``: skipped on a developer machine without Chromium,
Playwright or Node, **failed** under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI, RUN_PREFIX
from tests.server_process import DenServer, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
OIDC_DIR = REPO_ROOT / "tests" / "oidc"
# Screenshots for the README: written into docs/ only when DEN_UPDATE_SCREENSHOTS=1, so that a
# test run leaves the working tree as it was; elsewhere into a throwaway directory.
DOCS = (REPO_ROOT / "docs" if os.environ.get("DEN_UPDATE_SCREENSHOTS") == "1"
        else Path(tempfile.mkdtemp(prefix="den-screenshots-")))


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"browser tests need {what} under CI (make test-deps installs it)")
    pytest.skip(f"{what} is missing (make test-deps)")


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's, not a Playwright download), shared by the session."""
    chromium = shutil.which("chromium")
    if chromium is None:
        _missing("the Debian chromium package")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright for Python")
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            yield b
        finally:
            b.close()
    finally:
        pw.stop()


@pytest.fixture
def den(tmp_path: Path, repos_root: Path) -> Iterator[Callable[..., DenServer]]:
    """Make a real ``den serve`` (user alice holds ``.token``) and start it unless
    ``started=False`` (the caller sets ``.env`` and calls ``.start()``); stopped at the end."""
    started: list[DenServer] = []

    def start(*, started_now: bool = True, **settings: Any) -> DenServer:
        srv = DenServer(tmp_path / "data", repos_root, f"{RUN_PREFIX}-{secrets.token_hex(2)}",
                        user="alice", stop_timeout_s=2, default_memory_mb=512,
                        default_cpus=1.0, reaper_interval_s=0, **settings)
        started.append(srv)
        if started_now:
            srv.start()
        return srv

    yield start
    for srv in started:
        with contextlib.suppress(Exception):
            for ws in srv.http.get("/api/v1/workspaces").json().get("workspaces", []):
                srv.http.delete(f"/api/v1/workspaces/{ws['id']}", params={"snapshots": "true"})
        srv.close()


@dataclass
class OidcProvider:
    issuer: str
    client_id: str
    client_secret: str


@pytest.fixture
def oidc_provider() -> Iterator[Callable[..., OidcProvider]]:
    """Start oidc-provider on a loopback port for a Den on ``den_port``."""
    node = shutil.which("node")
    if node is None or not (OIDC_DIR / "node_modules" / "oidc-provider").exists():
        _missing("node and tests/oidc/node_modules")
    procs: list[subprocess.Popen[str]] = []

    def start(den_port: int, accounts: dict[str, dict[str, Any]]) -> OidcProvider:
        port = free_port()
        p = OidcProvider(f"http://127.0.0.1:{port}", "den-test", secrets.token_urlsafe(16))
        env = {**os.environ, "OIDC_PORT": str(port), "OIDC_CLIENT_ID": p.client_id,
               "OIDC_CLIENT_SECRET": p.client_secret,
               "OIDC_REDIRECT_URI": f"http://127.0.0.1:{den_port}/auth/callback",
               "OIDC_ACCOUNTS": json.dumps(accounts)}
        proc = subprocess.Popen([str(node), str(OIDC_DIR / "provider.mjs")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        deadline = time.monotonic() + 30
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("oidc-provider ready"):
                return p
        raise RuntimeError(f"oidc-provider did not start (exit {proc.poll()})")

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def screen_lines(page: Any) -> list[str]:
    """The lines of the xterm.js buffer on ``page`` (scrollback included), right-trimmed."""
    lines: list[str] = page.evaluate(
        """() => { const b = window.denTerminal.buffer.active; const out = [];
                   for (let i = 0; i < b.length; i++) {
                     out.push(b.getLine(i).translateToString(true)); }
                   return out; }""")
    return [line.rstrip() for line in lines]


def wait_for_line(page: Any, pattern: str, *, timeout_s: float = 30) -> str:
    """Wait until a whole line of the terminal matches ``pattern`` (a regex); return it."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    while True:
        for line in screen_lines(page):
            if rx.fullmatch(line.strip()):
                return line
        if time.monotonic() > deadline:
            lines = screen_lines(page)
            while lines and not lines[-1]:
                lines.pop()
            shown = "\n".join(f"{n:3} |{line}" for n, line in enumerate(lines)
                              if line or n >= len(lines) - 40)
            raise AssertionError(f"no terminal line matches {pattern!r}; screen (blank lines "
                                 f"left out, {len(lines)} in all):\n{shown}")
        page.wait_for_timeout(100)


class CuttableProxy:
    """A TCP forwarder on a loopback port whose open connections ``cut()`` drops at once:
    a network blip between the browser and Den, as the browser sees it."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self._socket, self._threading = socket, threading
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._conns: list[Any] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = self._socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                self._threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(2)

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(2)
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()
