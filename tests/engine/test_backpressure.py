"""A client that reads a flood slowly (here: not at all) must not grow ``den serve``.

Issue 10 ("Bad input") / issue 11 finding 1: ``ssh ws@host 'cat /dev/zero' | sleep 30`` once
grew the server by ~2 GB in 35 s, because output was pushed into an unbounded queue. Every
hop is now pull-based: the agent gets window credit back only as Den passes chunks on, and
Den passes a chunk on only once the client's side (the SSH channel's window, the WebSocket's
transport) has room. This runs a real ``den serve`` (its RSS read from /proc) and, on one
workspace, floods a non-reading client over SSH (OpenSSH's client), the exec WebSocket and
the web terminal; then the client goes away and the flooding process must be gone.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import secrets
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import RUN_PREFIX, add_ssh_key
from tests.server_process import DenServer

pytestmark = pytest.mark.engine

FLOOD_S = 15.0  # how long each non-reading client is flooded while RSS is sampled
MAX_GROWTH_MB = 50.0
MAX_RSS_MB = 300.0
STALLED_BYTES = 64 * 1024  # unread output piled up at the client: the flood did flow


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def unread(fd: int) -> int:
    """Bytes waiting to be read on a pipe or socket (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


def wait_for(cond: Callable[[], bool], timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        time.sleep(0.1)


class Flooded:
    """The server's RSS while a client does not read: baseline before, peak during."""

    def __init__(self, srv: DenServer, path: str) -> None:
        assert srv.proc is not None
        self.pid = srv.proc.pid
        self.path = path
        self.baseline = rss_mb(self.pid)
        self.peak = self.baseline

    def sample_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.25)

    def check(self) -> None:
        print(f"\n{self.path}: den serve RSS baseline {self.baseline:.1f} MB, "
              f"peak {self.peak:.1f} MB (+{self.peak - self.baseline:.1f} MB)")
        assert self.peak - self.baseline < MAX_GROWTH_MB, vars(self)
        assert self.peak < MAX_RSS_MB, vars(self)


# --- a raw WebSocket client: it reads only its handshake ------------------------------------


def ws_connect(port: int, token: str, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"Authorization: Bearer {token}\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:  # byte by byte: nothing past the handshake is read
        b = sock.recv(1)
        assert b, "the WebSocket was refused"
        head += b
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def ws_send(sock: socket.socket, payload: bytes, opcode: int = 0x1) -> None:
    """One masked client frame."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


# --- the server, a user with an SSH key, one workspace ----------------------------------------


class Den(DenServer):
    def __init__(self, tmp: Path, repos_root: Path) -> None:
        super().__init__(tmp / "data", repos_root, f"{RUN_PREFIX}-bp{secrets.token_hex(2)}",
                         user="alice", stop_timeout_s=2, default_memory_mb=512,
                         default_cpus=1.0, reaper_interval_s=0)
        self.wid = ""
        self.key = tmp / "id_ed25519"
        self.known_hosts = tmp / "known_hosts"

    def exec(self, cmd: str) -> dict[str, object]:
        r = self.http.post(f"/api/v1/workspaces/{self.wid}/exec", json={"cmd": cmd})
        assert r.status_code == 200, r.text
        out: dict[str, object] = r.json()
        return out

    def count(self, name: str) -> int:
        """Processes called ``name`` in the workspace."""
        return int(str(self.exec(f"pgrep -cx {name} || true")["stdout"]).strip() or 0)

    def ssh_argv(self, *args: str) -> list[str]:
        return ["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i", str(self.key),
                "-p", str(self.ssh_port), f"{self.wid}@127.0.0.1", *args]


@pytest.fixture
def den(engine: None, tmp_path: Path, repos_root: Path,
        make_repo: Callable[..., Path]) -> Iterator[Den]:
    srv = Den(tmp_path, repos_root)
    srv.start()
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(srv.key)],
                       check=True)
        r = add_ssh_key(srv.http.request, srv.key)
        assert r.status_code == 201, r.text
        r = srv.http.post("/api/v1/workspaces",
                          json={"name": "flood", "repo": {"url": str(make_repo())}})
        assert r.status_code == 202, r.text
        srv.wid = r.json()["id"]
        wait_for(lambda: srv.http.get(f"/api/v1/workspaces/{srv.wid}").json()["state"]
                 in ("running", "error"), 120, "the workspace to start")
        assert srv.http.get(f"/api/v1/workspaces/{srv.wid}").json()["state"] == "running"
        yield srv
    finally:
        with contextlib.suppress(Exception):
            srv.http.delete(f"/api/v1/workspaces/{srv.wid}")
        srv.close()


def test_a_flood_to_a_client_that_does_not_read_keeps_the_server_flat(den: Den) -> None:
    # Warm every path once (imports, first allocations) before any baseline is taken; a
    # reading client gets a flood whole: streams have no output cap.
    r = subprocess.run(den.ssh_argv("head -c 40000000 /dev/zero"), capture_output=True,
                       timeout=120)
    assert r.returncode == 0 and len(r.stdout) == 40_000_000, (r.returncode, len(r.stdout))
    assert den.count("cat") == 0

    # (a) SSH, OpenSSH's client with its stdout a pipe nobody reads
    flood = Flooded(den, "ssh")
    ssh = subprocess.Popen(den.ssh_argv("cat /dev/zero"), stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        assert ssh.stdout is not None
        pipe = ssh.stdout.fileno()
        wait_for(lambda: unread(pipe) >= STALLED_BYTES, 60, "the flood to reach ssh")
        flood.sample_for(FLOOD_S)
        assert ssh.poll() is None and den.count("cat") == 1
    finally:
        ssh.kill()
        ssh.wait()
    flood.check()
    wait_for(lambda: den.count("cat") == 0, 30, "cat to end after ssh went away")

    # (b) the exec WebSocket: connect, send the request, never read
    flood = Flooded(den, "exec WebSocket")
    sock = ws_connect(den.port, den.token, f"/api/v1/workspaces/{den.wid}/exec/stream")
    try:
        ws_send(sock, json.dumps({"cmd": "cat /dev/zero"}).encode())
        wait_for(lambda: unread(sock.fileno()) >= STALLED_BYTES, 60,
                 "the flood to reach the exec WebSocket")
        flood.sample_for(FLOOD_S)
        assert den.count("cat") == 1
    finally:
        sock.close()
    flood.check()
    wait_for(lambda: den.count("cat") == 0, 30, "cat to end after the WebSocket went away")

    # (c) the web terminal: type the flood into its shell, never read. tmux ignores NUL
    # bytes (nothing would reach the client), so the zeros become visible characters.
    flood = Flooded(den, "terminal WebSocket")
    sock = ws_connect(den.port, den.token,
                      f"/api/v1/workspaces/{den.wid}/terminal?session=flood")
    try:
        ws_send(sock, b"cat /dev/zero | tr '\\0' x\r", opcode=0x2)
        wait_for(lambda: unread(sock.fileno()) >= STALLED_BYTES, 60,
                 "the flood to reach the terminal WebSocket")
        flood.sample_for(FLOOD_S)
        assert den.count("cat") == 1
    finally:
        sock.close()
    flood.check()
    # The WebSocket was one tmux client: it ends with the socket, while the shell in tmux
    # lives on by design (the next connection re-attaches to it, flood and all).
    def clients() -> object:
        r = den.exec("tmux list-clients -t den-web-flood")
        assert r["exit_code"] == 0, r
        return r["stdout"]
    wait_for(lambda: clients() == "", 30, "the terminal's tmux client to end")
    assert den.count("cat") == 1
    # Interrupt the flood as a user would. (kill-session alone would not do: under gVisor
    # the pane's processes get no SIGHUP when tmux closes its terminal.)
    den.exec("tmux send-keys -t den-web-flood C-c")
    wait_for(lambda: den.count("cat") == 0, 30, "cat to end on Ctrl-C")
    den.exec("tmux kill-session -t den-web-flood")

    # The workspace still works, and so does the server.
    assert den.exec("echo still here")["stdout"] == "still here\n"
    r = subprocess.run(den.ssh_argv("echo via ssh"), capture_output=True, timeout=60)
    assert r.stdout == b"via ssh\n", r
    assert den.proc is not None and den.proc.poll() is None
