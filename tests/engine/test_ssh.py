"""The SSH gateway with the real OpenSSH client (ssh, scp, sftp) against real gVisor
workspaces: shells on a terminal, commands, stdin, SFTP and scp, local forwarding, wake on
connect, and refusals."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.client.commands import render_ssh_config
from server.config import Settings
from tests.conftest import ApiClient, free_port, users

pytestmark = pytest.mark.engine


@dataclass
class Gw:
    """An app with the SSH gateway on ``port``, users alice and bob with registered keys,
    and a key nobody registered."""

    api: ApiClient
    port: int
    keys: dict[str, Path]
    known_hosts: Path

    def opts(self, key: str) -> list[str]:
        return ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i", str(self.keys[key])]

    def argv(self, key: str, target: str, *args: str) -> list[str]:
        return ["ssh", *self.opts(key), "-p", str(self.port), f"{target}@127.0.0.1", *args]

    def tool(self, name: str, key: str = "alice") -> list[str]:
        """sftp or scp with the same options (they take the port as -P)."""
        return [name, *self.opts(key), "-P", str(self.port)]

    def ssh(self, target: str, *args: str, key: str = "alice", input: bytes | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(key, target, *args), input=input,
                              capture_output=True, timeout=timeout)


def _keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", path.name, "-f",
                    str(path)], check=True)
    return path


@pytest.fixture
def gw(engine: None, make_settings: Callable[..., Settings], tmp_path: Path) -> Iterator[Gw]:
    port = free_port()
    app = create_app(make_settings(ssh_port=port))
    keydir = tmp_path / "keys"
    keydir.mkdir()
    keys = {"alice": _keygen(keydir / "alice"), "bob": _keygen(keydir / "bob", "ecdsa"),
            "stranger": _keygen(keydir / "stranger")}
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        for user in ("alice", "bob"):
            r = api.add_key(keys[user], user=user)
            assert r.status_code == 201, r.text
        yield Gw(api, port, keys, tmp_path / "known_hosts")
        for ws in api.get("/api/v1/workspaces", user="root").json()["workspaces"]:
            with contextlib.suppress(Exception):
                client.delete(f"/api/v1/workspaces/{ws['id']}", headers=api.h("root"))


def test_command_exit_status_stdout_stderr_and_binary_stdin(
    gw: Gw, make_repo: Callable[..., Path]
) -> None:
    gw.api.create(make_repo())
    r = gw.ssh("api", "pwd; id -un; echo to-err >&2; exit 7")
    assert r.returncode == 7, r
    assert r.stdout == b"/workspace/api\ndev\n"
    assert r.stderr == b"to-err\n"

    blob = os.urandom(3 * 1024 * 1024 + 17)
    r = gw.ssh("api", "cat > blob.bin && sha256sum blob.bin", input=blob)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest()
    r = gw.ssh("api", "cat blob.bin")
    assert r.returncode == 0 and r.stdout == blob

    # the den-<name> alias of `den ssh-config` and the workspace id reach the same workspace
    ws_id = gw.api.get("/api/v1/workspaces/api").json()["id"]
    assert gw.ssh("den-api", "hostname").stdout == b"api\n"
    assert gw.ssh(ws_id, "hostname").stdout == b"api\n"


def test_refusals_look_the_same_and_passwords_are_not_offered(
    gw: Gw, make_repo: Callable[..., Path]
) -> None:
    gw.api.create(make_repo(), user="alice")
    gw.api.create(make_repo("other"), name="other", user="bob")

    def refusal(r: subprocess.CompletedProcess[bytes]) -> str:
        assert r.returncode == 255, r
        return re.sub(rb"^\S+@[0-9.]+: ", b"", r.stderr).decode()

    messages = {
        "unknown workspace": refusal(gw.ssh("nope", "true")),
        "someone else's workspace": refusal(gw.ssh("other", "true", key="alice")),
        "unregistered key": refusal(gw.ssh("api", "true", key="stranger")),
    }
    assert set(messages.values()) == {"Permission denied (publickey).\r\n"}, messages
    assert gw.ssh("other", "echo mine", key="bob").stdout == b"mine\n"

    no_keys = subprocess.run(
        ["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o",
         f"UserKnownHostsFile={gw.known_hosts}", "-o", "BatchMode=yes", "-o",
         "PreferredAuthentications=password,keyboard-interactive", "-o", "LogLevel=ERROR",
         "-p", str(gw.port), "api@127.0.0.1", "true"], capture_output=True, timeout=60)
    assert no_keys.returncode == 255
    assert b"Permission denied (publickey)" in no_keys.stderr


def _read_until(fd: int, pattern: bytes, timeout_s: float = 60) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout_s
    while pattern not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{pattern!r} not seen in {buf[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            if not chunk:
                raise AssertionError(f"EOF before {pattern!r}: {buf[-2000:]!r}")
            buf += chunk
    return buf


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_shell_on_a_terminal_size_resize_ctrl_c_jobs_and_tmux(
    gw: Gw, make_repo: Callable[..., Path]
) -> None:
    gw.api.create(make_repo())
    pid, fd = pty.fork()
    if pid == 0:  # the child: ssh on the terminal whose other side the test holds
        argv = gw.argv("alice", "api", "-tt")
        os.execvpe(argv[0], argv, {**os.environ, "TERM": "xterm-256color"})
    try:
        _set_size(fd, 40, 123)
        os.kill(pid, signal.SIGWINCH)

        def run(line: str, until: bytes) -> str:
            os.write(fd, line.encode() + b"\r")
            return _read_until(fd, until).decode(errors="replace")

        out = run("echo S-$((6*7)); stty size; echo T-$TERM; pwd; id -un", b"dev\r\n")
        assert "S-42" in out and "40 123" in out and "T-xterm-256color" in out, out
        assert "/workspace/api" in out

        _set_size(fd, 31, 90)  # the kernel sends ssh SIGWINCH; ssh sends window-change
        deadline = time.monotonic() + 30
        while "31 90" not in (out := run("stty size; echo R-$((1+1))", b"R-2\r\n")):
            assert time.monotonic() < deadline, out
            time.sleep(0.2)

        os.write(fd, b"sleep 300\r")
        time.sleep(1)
        os.write(fd, b"\x03")  # Ctrl-C reaches sleep through the terminal
        out = run("echo C-$?", b"C-130")

        # (computed markers: the terminal echoes the typed line, which must not match)
        out = run("sleep 200 & jobs; kill %1; wait; echo J-$((2+3))", b"J-5\r\n")
        assert "Running" in out and "sleep 200" in out, out

        os.write(fd, b"tmux new-session -s sshtest\r")
        _read_until(fd, b"\x1b[?1049h")  # tmux took over the screen
        out = run("echo in-$((10+5))-tmux", b"in-15-tmux")
        os.write(fd, b"\x02d")  # prefix, d: detach
        _read_until(fd, b"[detached")
        out = run("tmux ls; tmux kill-session -t sshtest; echo K-$((2+3))", b"K-5\r\n")
        assert "sshtest:" in out, out

        os.write(fd, b"exit 3\r")
        with contextlib.suppress(AssertionError, OSError):
            _read_until(fd, b"never", timeout_s=10)
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 3
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_sftp_10_mb_round_trip_and_scp_both_modes(
    gw: Gw, make_repo: Callable[..., Path], tmp_path: Path
) -> None:
    gw.api.create(make_repo())
    src = tmp_path / "ten.bin"
    src.write_bytes(os.urandom(10 * 1024 * 1024))
    back = tmp_path / "ten.back"
    batch = tmp_path / "batch"
    batch.write_text(f"put {src} ten.bin\nget ten.bin {back}\nls -l ten.bin\npwd\n")
    r = subprocess.run([*gw.tool("sftp"), "-b", str(batch), "api@127.0.0.1"],
                       capture_output=True, timeout=300)
    assert r.returncode == 0, r
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(
        src.read_bytes()).digest()
    assert b"/workspace/api" in r.stdout  # sftp starts in the repo directory
    inside = gw.ssh("api", "stat -c '%U %s' ten.bin; sha256sum < ten.bin")
    assert inside.stdout.decode().split() == [
        "dev", str(10 * 1024 * 1024), hashlib.sha256(src.read_bytes()).hexdigest(), "-"]

    small = tmp_path / "small.txt"
    small.write_text("hello scp\n")
    for mode in ([], ["-O"]):  # SFTP-based (OpenSSH's default) and the legacy protocol
        name = f"s{len(mode)}.txt"
        up = subprocess.run([*gw.tool("scp"), *mode, str(small),
                             f"api@127.0.0.1:{name}"], capture_output=True, timeout=120)
        assert up.returncode == 0, up
        down = tmp_path / f"down-{name}"
        got = subprocess.run([*gw.tool("scp"), *mode,
                              f"api@127.0.0.1:/workspace/api/{name}", str(down)],
                             capture_output=True, timeout=120)
        assert got.returncode == 0, got
        assert down.read_text() == "hello scp\n"
        # the workspace's own permissions: dev cannot write to /etc
        denied = subprocess.run([*gw.tool("scp"), *mode, str(small),
                                 "api@127.0.0.1:/etc/den-x"], capture_output=True, timeout=120)
        assert denied.returncode != 0
        assert b"ermission denied" in denied.stderr, denied


def test_local_forwarding_reaches_a_server_in_the_workspace_remote_is_refused(
    gw: Gw, make_repo: Callable[..., Path]
) -> None:
    ws = gw.api.create(make_repo())
    start = gw.api.exec(ws["id"], "tmux new-session -d -s web "
                        "'python3 -m http.server 8000 --bind 127.0.0.1'")
    assert start["exit_code"] == 0, start
    local = free_port()
    argv = gw.argv("alice", "api", "-N", "-o", "ExitOnForwardFailure=yes",
                   "-L", f"{local}:localhost:8000", "-L", f"{local + 1}:10.9.8.7:80")
    argv[argv.index("LogLevel=ERROR")] = "LogLevel=INFO"  # to see the refused channel
    tunnel = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{local}/README.md", timeout=10)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and tunnel.poll() is None, "no tunnel"
            time.sleep(0.3)
        assert r.text == "# api\n"
        big = gw.api.exec(ws["id"], "head -c 2000000 /dev/urandom > big.bin; sha256sum big.bin")
        r = httpx.get(f"http://127.0.0.1:{local}/big.bin", timeout=60)
        assert hashlib.sha256(r.content).hexdigest() == big["stdout"].split()[0]
        # a destination outside the workspace is refused
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{local + 1}/", timeout=20)
    finally:
        tunnel.terminate()
        _, err = tunnel.communicate(timeout=30)
    assert b"administratively prohibited" in err, err

    remote = gw.ssh("api", "-o", "ExitOnForwardFailure=yes", "-R", "0:localhost:22", "true")
    assert remote.returncode == 255
    assert b"remote port forwarding failed" in remote.stderr, remote


def test_connecting_wakes_a_paused_workspace_and_is_logged_and_agent_is_refused(
    gw: Gw, make_repo: Callable[..., Path], tmp_path: Path
) -> None:
    ws = gw.api.create(make_repo())
    r = gw.api.post(f"/api/v1/workspaces/{ws['id']}/pause")
    assert r.json()["state"] == "paused", r.text

    sock = tmp_path / "agent.sock"
    agent = subprocess.run(["ssh-agent", "-a", str(sock)], capture_output=True, text=True)
    agent_pid = int(re.search(r"SSH_AGENT_PID=(\d+)", agent.stdout).group(1))  # type: ignore[union-attr]
    try:
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        argv = gw.argv("alice", "api", "-A", "echo awake; echo ${SSH_AUTH_SOCK:-none}")
        r2 = subprocess.run(argv, capture_output=True, timeout=120, env=env)
    finally:
        os.kill(agent_pid, signal.SIGTERM)
    assert r2.returncode == 0, r2
    assert r2.stdout == b"awake\nnone\n"
    assert b"agent forwarding is refused" in r2.stderr
    assert gw.api.get(f"/api/v1/workspaces/{ws['id']}").json()["state"] == "running"

    deadline = time.monotonic() + 10
    while True:
        events = gw.api.get(f"/api/v1/workspaces/{ws['id']}/events").json()["events"]
        messages = [e["message"] for e in events if e["kind"] in ("ssh", "wake")]
        if any("closed after" in m for m in messages) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "resumed on access" in messages, messages
    assert any(re.fullmatch(r"ssh connection opened by alice from 127\.0\.0\.1:\d+ "
                            r"\(key 'alice'\)", m) for m in messages), messages
    assert any(re.fullmatch(r"ssh connection from 127\.0\.0\.1:\d+ closed after \d+ s "
                            r"\(1 session\)", m) for m in messages), messages


def test_ssh_config_from_the_api_lets_plain_ssh_connect(
    gw: Gw, make_repo: Callable[..., Path], tmp_path: Path
) -> None:
    gw.api.create(make_repo())
    workspaces: list[dict[str, Any]] = gw.api.get("/api/v1/workspaces").json()["workspaces"]
    assert workspaces[0]["ssh"]["port"] == gw.port
    config = tmp_path / "ssh_config"
    text = render_ssh_config(workspaces, api_host="127.0.0.1", identity=str(gw.keys["alice"]))
    config.write_text(text + f"\nHost *\n  UserKnownHostsFile {gw.known_hosts}\n"
                      "  StrictHostKeyChecking no\n  BatchMode yes\n  LogLevel ERROR\n")
    r = subprocess.run(["ssh", "-F", str(config), "den-api", "echo via-config"],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r
    assert r.stdout == b"via-config\n"


MINIMAL_DOCKERFILE = """FROM den/base:bookworm
RUN useradd --uid 1000 --user-group --create-home --shell /bin/sh dev \\
    && install -d -o dev -g dev /workspace \\
    && dpkg --purge --force-remove-essential --force-depends bash >/dev/null 2>&1 \\
    && ! command -v bash && ! command -v python3 && ! command -v tmux
"""


@pytest.fixture
def minimal_image(tmp_path: Path) -> Iterator[str]:
    """An image with no Python, no bash and no tmux: only what debootstrap's minbase has,
    less bash, and a dev user. Den's agent alone has to make it a workspace."""
    tag = f"den/{tmp_path.name.lower()[:40]}-minimal:test"
    ctx = tmp_path / "minimal"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(MINIMAL_DOCKERFILE)
    subprocess.run(["docker", "build", "-q", "-t", tag, str(ctx)], check=True,
                   capture_output=True, timeout=300)
    yield tag
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)


def test_an_image_without_python_bash_or_tmux_runs_exec_files_terminal_and_ssh(
        gw: Gw, make_repo: Callable[..., Path], minimal_image: str) -> None:
    api = gw.api
    ws = api.create(make_repo(), image=minimal_image)
    assert ws["state"] == "running", ws
    wid = ws["id"]
    r = api.exec(wid, "command -v bash python3 tmux; echo $0; id -un")
    assert r["stdout"] == "sh\ndev\n", r
    url = f"/api/v1/workspaces/{wid}/files"
    assert api.put(url, params={"path": "api/new.txt"}, content=b"made\n").status_code == 200
    assert api.get(url, params={"path": "api/new.txt"}).content == b"made\n"
    assert api.exec(wid, "cat new.txt")["stdout"] == "made\n"
    # SSH: a command (run by sh, the image's only shell) and its exit status.
    done = gw.ssh("api", "echo via-ssh; exit 4")
    assert (done.returncode, done.stdout) == (4, b"via-ssh\n"), done
    # The web terminal: no tmux, so a plain login shell on a terminal.
    with api.client.websocket_connect(f"/api/v1/workspaces/{wid}/terminal?cols=90&rows=30",
                                      headers=api.h()) as sock:
        sock.send_json({"type": "stdin", "data": "stty size; echo T$((6*7))\r"})
        out = ""
        while "T42" not in out:
            msg = sock.receive_json()
            assert msg["type"] in ("status", "stdout"), msg
            out += msg.get("data", "")
        assert "30 90" in out, out
        sock.send_json({"type": "stdin", "data": "exit\r"})
        while (msg := sock.receive_json())["type"] != "exit":
            pass
