"""The lifecycle contract a user relies on, run once per backend: `docker` (gVisor) and
`microvm` (QEMU, docs/microvm.md), through the HTTP API of a real server.

One workspace per backend is shared by the tests, in order (a microVM boots in seconds under
TCG): create from Git, exec, files, a streaming exec, every way in (SSH through Den's gateway
with the OpenSSH client: a command, a shell on a terminal, SFTP, ``-L`` to a port inside; the
web terminal; a preview URL), stop and start, background processes (started, listed, logged,
signalled), pause and resume with a running process and a background one, a memory snapshot
forked (the fork's agent knows the background process it inherited) and restored, a fork bomb
stopped at the process limit, delete leaving no engine object, and a fork of the snapshot after
its workspace is gone. A second, short-lived workspace cloned from the test forge opens a pull
request (the forge's token never inside it). What a backend does not support is asserted as the
clear refusal it gets (docs/microvm.md, "What each backend refuses"), never skipped. The docker
run needs the engine (the ``engine`` fixture), the microvm run the boot files of
scripts/setup-microvm.sh: each is skipped on a developer machine without them and fails under
CI, as the other engine tests do.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import pty
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.runtime.microvm import process
from server.runtime.microvm.argv import VmFiles
from tests.conftest import (
    RUN_PREFIX,
    ApiClient,
    bare_repo,
    engine_objects,
    free_port,
    microvm_subnet,
    remove_microvm_network,
    users,
)
from tests.engine.test_microvm import BOOT_DIR, _require_setup, assert_vms_apart, vm_dir
from tests.engine.test_ssh import _keygen, _read_until, _set_size
from tests.forge_server import ForgeServer, make_forge_repo

pytestmark = pytest.mark.engine

BACKENDS = ("docker", "microvm")
PIDS = 100  # the process limit of the module's workspaces (a bomb at 1024 needs GBs)


@pytest.fixture(scope="module", params=BACKENDS)
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[ApiClient]:
    """A server on one backend, with the repository ``api.git`` it may clone."""
    backend: str = request.param
    if backend == "docker":
        request.getfixturevalue("engine")
    else:
        _require_setup()
    root = tmp_path_factory.mktemp(f"backend-{backend}")
    repos = root / "repos"
    repos.mkdir()
    repo = bare_repo(repos, root / "src", files={"README.md": "# api\n",
                                                 "src/main.py": "print('hi')\n"})
    forge = ForgeServer("github", root / "forge").__enter__()
    request.addfinalizer(lambda: forge.__exit__(None, None, None))
    forge.add_user("alice-forge", FORGE_TOKEN, name="Alice Liddell", email="alice@example.com")
    make_forge_repo(forge, "acme/web", {"README.md": "# web\n"})
    key = _keygen(root / "alice-key")
    prefix = f"{RUN_PREFIX}-{secrets.token_hex(2)}"
    extra: dict[str, Any] = ({"microvm_dir": BOOT_DIR, "microvm_accel": "auto",
                              "default_disk_gb": 1, "microvm_subnet": microvm_subnet()}
                             if backend == "microvm" else {})
    settings = Settings(data_dir=root / "data", local_repo_roots=[repos], backend=backend,
                        engine_prefix=prefix, default_memory_mb=512, default_cpus=1.0,
                        default_pids=PIDS,
                        stop_timeout_s=5, reaper_interval_s=0, ssh_port=free_port(),
                        allowed_git_schemes=["http", "https"],
                        outbound_allow=["127.0.0.0/8", "::1"], gpus="none", **extra)
    app = create_app(settings)
    with TestClient(app) as client:
        api = ApiClient(client, users(app))
        api.repo = repo  # type: ignore[attr-defined]
        api.backend = backend  # type: ignore[attr-defined]
        api.forge = forge  # type: ignore[attr-defined]
        api.ssh = Ssh(settings.ssh_port, key, root / "known_hosts")  # type: ignore[attr-defined]
        assert api.add_key(key).status_code == 201
        try:
            yield api
        finally:
            for ws in api.get("/api/v1/workspaces", user="root").json()["workspaces"]:
                client.delete(f"/api/v1/workspaces/{ws['id']}", headers=api.h("root"),
                              params={"snapshots": "true"})
            if backend == "microvm":
                for d in (BOOT_DIR / "vms").glob(f"{prefix}-*"):
                    process.end(VmFiles(d), timeout_s=0)
                    subprocess.run(["rm", "-rf", str(d)], check=False)
                remove_microvm_network(settings)
            # The docker run's leftovers go with the engine fixture's sweep of RUN_PREFIX.


FORGE_TOKEN = "fgt_" + secrets.token_hex(16)


class Ssh:
    """The OpenSSH client's command lines for alice's key against the gateway on ``port``."""

    def __init__(self, port: int, key: Path, known_hosts: Path) -> None:
        self.port = port
        self.opts = ["-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
                     "-o", f"UserKnownHostsFile={known_hosts}", "-o", "BatchMode=yes",
                     "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "-i", str(key)]

    def argv(self, *args: str) -> list[str]:
        return ["ssh", *self.opts, "-p", str(self.port), "api@127.0.0.1", *args]

    def run(self, *args: str, input: bytes | None = None
            ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(*args), input=input, capture_output=True, timeout=120)


def _ssh(api: ApiClient) -> Ssh:
    ssh: Ssh = api.ssh  # type: ignore[attr-defined]
    return ssh


def _backend(api: ApiClient) -> str:
    return str(api.backend)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def ws(api: ApiClient) -> dict[str, Any]:
    """One running workspace made from the repository, on the module's backend."""
    ws = api.create(api.repo, wait=True)  # type: ignore[attr-defined]
    assert ws["state"] == "running", ws
    return ws


def _engine_objects(api: ApiClient, ws_id: str) -> list[str]:
    """What the engine holds of a workspace: its containers and volumes (docker), its VM
    directories and QEMU processes (microvm)."""
    prefix = api.app.state.settings.engine_prefix
    if _backend(api) == "docker":
        return [f"{kind} {name}" for kind, name in engine_objects(prefix) if ws_id in name]
    found = []
    for d in (BOOT_DIR / "vms").glob(f"{prefix}-vm-{ws_id}*"):
        found.append(f"directory {d}")
        if process.running(VmFiles(d)) is not None:
            found.append(f"qemu of {d}")
    return found


def _events(api: ApiClient, ws_id: str) -> list[str]:
    r = api.get(f"/api/v1/workspaces/{ws_id}/events")
    assert r.status_code == 200, r.text
    return [f"{e['kind']} {e['to_state'] or ''} {e['message']}" for e in r.json()["events"]]


def _error(r: Any) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


# --- create, exec, files, streams ------------------------------------------------------------


def test_create_from_git_puts_the_repo_in_workspace(api: ApiClient, ws: dict[str, Any]) -> None:
    assert ws["runtime"] == ("microvm" if _backend(api) == "microvm" else "gvisor"), ws
    out = api.exec(ws["id"], "pwd; ls; id -un; git log --format=%s -1; git status --short")
    assert out["exit_code"] == 0, out
    assert out["stdout"].split("\n") == ["/workspace/api", "README.md", "src", "dev",
                                         "initial", ""], out


def test_exec_exit_codes_streams_cwd_env_and_timeout(api: ApiClient,
                                                     ws: dict[str, Any]) -> None:
    wid = ws["id"]
    out = api.exec(wid, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert out | {"duration_ms": 0} == {"exit_code": 3, "stdout": "out\n", "stderr": "err\n",
                                        "timed_out": False, "duration_ms": 0,
                                        "truncated": False}, out
    assert api.exec(wid, ["no-such-command"])["exit_code"] == 127
    assert api.exec(wid, "echo $GREETING", env={"GREETING": "hello"})["stdout"] == "hello\n"
    assert api.exec(wid, "pwd", cwd="..")["stdout"] == "/workspace\n"
    assert api.exec(wid, "pwd", cwd="/tmp")["stdout"] == "/tmp\n"
    assert api.exec(wid, ["cat"], stdin="piped")["stdout"] == "piped"
    slow = api.exec(wid, "sleep 31 & sleep 32; echo never", timeout_s=1)
    assert slow["timed_out"] is True and "never" not in slow["stdout"], slow
    left = api.exec(wid, "pgrep -c -f 'sleep 3[12]' || true")
    assert left["stdout"].strip() == "0", left  # nothing of the timed-out command is left


def test_files_write_read_list_stat_remove(api: ApiClient, ws: dict[str, Any]) -> None:
    url = f"/api/v1/workspaces/{ws['id']}/files"
    blob = bytes(range(256)) * 300
    r = api.put(url, params={"path": "api/data/blob.bin"}, content=blob)
    assert r.status_code == 200, r.text
    assert r.json() == {"path": "/workspace/api/data/blob.bin", "size": len(blob)}
    got = api.get(url, params={"path": "/workspace/api/data/blob.bin"})
    assert got.status_code == 200 and got.content == blob
    assert api.exec(ws["id"], "stat -c %U data/blob.bin")["stdout"] == "dev\n"
    listing = api.get(f"{url}/list", params={"path": "api"}).json()
    names = {e["name"]: e["type"] for e in listing["entries"]}
    assert listing["path"] == "/workspace/api"
    assert (names["data"], names["README.md"], names[".git"]) == ("dir", "file", "dir"), names
    stat = api.get(f"{url}/stat", params={"path": "api/data/blob.bin"})
    assert stat.status_code == 200, stat.text
    assert (stat.json()["type"], stat.json()["size"]) == ("file", len(blob)), stat.json()
    assert _error(api.get(url, params={"path": "/etc/passwd"})) == (403, "path_outside")
    assert _error(api.delete(url, params={"path": "api/data"})) == (409, "not_empty")
    assert api.delete(url, params={"path": "api/data/blob.bin"}).status_code == 204
    assert _error(api.get(url, params={"path": "api/data/blob.bin"})) == (404, "not_found")
    assert api.delete(url, params={"path": "api/data", "recursive": "true"}).status_code == 204
    assert api.exec(ws["id"], "test -e data || echo gone")["stdout"] == "gone\n"


def test_exec_stream_over_the_websocket(api: ApiClient, ws: dict[str, Any]) -> None:
    url = f"/api/v1/workspaces/{ws['id']}/exec/stream"
    with api.client.websocket_connect(url, headers=api.h()) as sock:
        sock.send_json({"cmd": ["sh", "-c", "read line; echo got:$line; echo oops >&2; exit 4"]})
        sock.send_json({"type": "stdin", "data": "hello\n"})
        sock.send_json({"type": "close_stdin"})
        messages: list[dict[str, Any]] = []
        while not messages or messages[-1]["type"] not in ("exit", "error"):
            messages.append(sock.receive_json())
    out = "".join(m["data"] for m in messages if m["type"] == "stdout")
    err = "".join(m["data"] for m in messages if m["type"] == "stderr")
    assert (out, err, messages[-1]) == ("got:hello\n", "oops\n",
                                        {"type": "exit", "exit_code": 4}), messages


# --- every way in: SSH, the web terminal, previews; a pull request ---------------------------


def test_ssh_command_stdin_sftp_and_a_shell_on_a_terminal(
        api: ApiClient, ws: dict[str, Any], tmp_path: Path) -> None:
    """Through Den's gateway with the OpenSSH client, as `ssh api@den` users do."""
    ssh = _ssh(api)
    r = ssh.run("pwd; id -un; hostname; echo to-err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"/workspace/api\ndev\napi\n",
                                                  b"to-err\n"), r
    blob = os.urandom(1 << 20)
    r = ssh.run("cat > ssh.bin && sha256sum ssh.bin", input=blob)
    assert r.stdout.split()[0].decode() == hashlib.sha256(blob).hexdigest(), r
    # SFTP: put, get back, and the file is dev's in the repo directory.
    src, back = tmp_path / "up.bin", tmp_path / "back.bin"
    src.write_bytes(os.urandom(1 << 20))
    batch = tmp_path / "batch"
    batch.write_text(f"put {src} up.bin\nget up.bin {back}\npwd\n")
    r = subprocess.run(["sftp", *ssh.opts, "-P", str(ssh.port), "-b", str(batch),
                        "api@127.0.0.1"], capture_output=True, timeout=120)
    assert r.returncode == 0 and b"/workspace/api" in r.stdout, r
    assert back.read_bytes() == src.read_bytes()
    owner = api.exec(ws["id"], "stat -c %U up.bin; rm up.bin ssh.bin")
    assert owner["stdout"] == "dev\n", owner
    # A shell on a terminal: its size, a resize, Ctrl-C, and its exit status.
    pid, fd = pty.fork()
    if pid == 0:  # the child: ssh on the terminal whose other side the test holds
        argv = ssh.argv("-tt")
        os.execvpe(argv[0], argv, {**os.environ, "TERM": "xterm-256color"})
    try:
        _set_size(fd, 40, 123)
        os.kill(pid, signal.SIGWINCH)

        def run(line: str, until: bytes) -> str:
            os.write(fd, line.encode() + b"\r")
            return _read_until(fd, until).decode(errors="replace")

        # (computed markers: the terminal echoes the typed line, which must not match)
        out = run("stty size; echo T-$TERM; pwd; echo S-$((6*7))", b"S-42\r\n")
        assert "40 123" in out and "T-xterm-256color" in out and "/workspace/api" in out, out
        _set_size(fd, 31, 90)  # the kernel sends ssh SIGWINCH; ssh sends window-change
        deadline = time.monotonic() + 30
        while "31 90" not in (out := run("stty size; echo R-$((1+1))", b"R-2\r\n")):
            assert time.monotonic() < deadline, out
        os.write(fd, b"sleep 300\r")
        deadline = time.monotonic() + 60  # it runs in the foreground (a condition)
        while api.exec(ws["id"], "pgrep -fx 'sleep 300'")["exit_code"] != 0:
            assert time.monotonic() < deadline, "sleep did not start"
        os.write(fd, b"\x03")  # Ctrl-C reaches sleep through the terminal
        run("echo C-$?", b"C-130")
        os.write(fd, b"exit 3\r")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 3
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


HTTP_SERVER = ("setsid python3 -m http.server 8000 --bind 127.0.0.1 "
               "</dev/null >/dev/null 2>&1 &")


def _serving(api: ApiClient, ws_id: str) -> None:
    """``python3 -m http.server 8000`` in the repo directory, listening (waited for)."""
    probe = "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8000))'"
    if api.exec(ws_id, probe)["exit_code"] == 0:
        return
    assert api.exec(ws_id, HTTP_SERVER)["exit_code"] == 0
    deadline = time.monotonic() + 60
    while api.exec(ws_id, probe)["exit_code"] != 0:
        assert time.monotonic() < deadline, "the server inside did not start listening"
        time.sleep(0.2)


def test_ssh_local_forwarding_reaches_a_port_inside(api: ApiClient, ws: dict[str, Any]) -> None:
    _serving(api, ws["id"])
    local = free_port()
    argv = _ssh(api).argv("-N", "-o", "ExitOnForwardFailure=yes",
                          "-L", f"{local}:localhost:8000")
    tunnel = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{local}/README.md", timeout=30)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and tunnel.poll() is None, "no tunnel"
                time.sleep(0.2)
        assert (r.status_code, r.text) == (200, "# api\n"), r
    finally:
        tunnel.terminate()
        tunnel.communicate(timeout=30)


def test_web_terminal_output_input_and_resize(api: ApiClient, ws: dict[str, Any]) -> None:
    """The browser's terminal: a shell (tmux) on a terminal of the size asked for, typed
    input, a resize message, and the end of the session."""
    url = f"/api/v1/workspaces/{ws['id']}/terminal?cols=90&rows=30&session=backends"
    with api.client.websocket_connect(url, headers=api.h()) as sock:

        def run(line: str, until: str) -> str:
            sock.send_json({"type": "stdin", "data": line + "\r"})
            out = ""
            while until not in out:
                msg = sock.receive_json()
                assert msg["type"] in ("status", "stdout"), msg
                out += msg.get("data", "")
            return out

        out = run("stty size; pwd; echo T$((6*7))", "T42")
        assert "/workspace/api" in out, out
        # tmux keeps a status line: the pane is a row shorter than the terminal
        assert "29 90" in out or "30 90" in out, out
        sock.send_json({"type": "resize", "cols": 100, "rows": 40})
        deadline = time.monotonic() + 30
        while "39 100" not in (out := run("stty size; echo R$((1+1))", "R2")) and (
                "40 100" not in out):
            assert time.monotonic() < deadline, out
        sock.send_json({"type": "stdin", "data": "exit\r"})
        while (msg := sock.receive_json())["type"] != "exit":
            assert msg["type"] in ("status", "stdout"), msg
    left = api.exec(ws["id"], "tmux ls 2>&1 | grep -c den-web-backends || true")
    assert left["stdout"] == "0\n", left  # the session ended with its shell


def test_preview_url_of_a_port_served_inside(api: ApiClient, ws: dict[str, Any]) -> None:
    _serving(api, ws["id"])
    r = api.get(f"/preview/{ws['id']}/8000/README.md")
    assert (r.status_code, r.text) == (200, "# api\n"), r.text
    r = api.get("/preview/api/8000/src/main.py")  # by name
    assert (r.status_code, r.text) == (200, "print('hi')\n"), r.text
    assert api.get(f"/preview/{ws['id']}/8000/", user="bob").status_code == 404
    assert api.get(f"/preview/{ws['id']}/8001/").status_code == 502  # nothing listens
    assert api.exec(ws["id"], "pkill -f 'http.server 8000'")["exit_code"] == 0


def test_pull_request_from_the_workspaces_commits(api: ApiClient) -> None:
    """A workspace cloned from the test forge with alice's linked account commits, pushes
    and opens a pull request; the forge's token is nowhere inside it."""
    forge: ForgeServer = api.forge  # type: ignore[attr-defined]
    r = api.post("/api/v1/users/me/forges",
                 json={"kind": "github", "base_url": forge.url, "token": FORGE_TOKEN})
    assert r.status_code == 201, r.text
    ws = api.create(forge.repo_url("acme/web"), name="web")
    assert ws["state"] == "running", ws
    try:
        assert api.exec(ws["id"], "echo change >> README.md && echo new > NEW.md")[
            "exit_code"] == 0
        r = api.post(f"/api/v1/workspaces/{ws['id']}/pull-requests",
                     json={"title": "A change", "branch": "feature/x", "base": "main"})
        assert r.status_code == 201, r.text
        pr = r.json()
        assert (pr["number"], pr["created"], pr["push"]) == (1, True, "create"), pr
        bare = ["git", "--git-dir", str(forge.bare("acme/web"))]
        shown = subprocess.run([*bare, "show", "feature/x:NEW.md"], capture_output=True,
                               text=True, check=True).stdout
        assert shown == "new\n"
        assert subprocess.run([*bare, "rev-parse", "feature/x"], capture_output=True,
                              text=True, check=True).stdout.strip() == pr["head_sha"]
        assert len(forge.pulls["acme/web"]) == 1
        _assert_no_token_inside(api, ws["id"])
    finally:
        assert api.delete(f"/api/v1/workspaces/{ws['id']}").status_code in (200, 202, 204)
        deadline = time.monotonic() + 60
        while api.get(f"/api/v1/workspaces/{ws['id']}").status_code != 404:
            assert time.monotonic() < deadline, "the workspace was not deleted"
            time.sleep(0.1)


def _assert_no_token_inside(api: ApiClient, ws_id: str) -> None:
    """The token (plain, or a slice of the Basic header git sends) in no file a workspace
    writes or reads its settings from, no process's environment or command line, and not in
    what the engine was given to run it (the container's spec; the VM's labels and QEMU's
    command line)."""
    basic = base64.b64encode(f"x:{FORGE_TOKEN}".encode()).decode()[4:20]
    # As patterns that do not contain the strings, so that grep's own command line does not
    # match. The whole root file system of a microVM is too slow to read under TCG: the
    # places a token could be left (home, the repo, /etc, /tmp, /run, /var) are searched.
    needles = " ".join(f"-e '{n[:5]}[{n[5]}]{n[6:]}'" for n in (FORGE_TOKEN, basic))
    # grep lists what matched; its errors are shown too, but for a file or process that went
    # away while it ran (a process's /proc entry, a temporary file): then it ends with 2.
    vanished = "-e ': No such file or directory$' -e ': No such process$'"
    script = (f"{{ grep -rla {needles} /workspace /home /root /etc /tmp /run /var "
              f"/proc/[0-9]*/environ /proc/[0-9]*/cmdline; echo rc=$? >&2; }} 2>&1 "
              f"| grep -v {vanished}")
    svc = api.app.state.workspaces
    req = svc.exec_request(svc.get(ws_id), ["sh", "-c", script], user="root", timeout_s=120)
    out = api.call(functools.partial(svc.exec, ws_id, req, actor="test")).stdout.decode()
    assert out.strip() in ("rc=1", "rc=2"), out  # nothing matched, no other error
    if _backend(api) == "docker":
        spec = subprocess.run(["docker", "inspect", *[n.split(" ", 1)[1] for n in
                                                      _engine_objects(api, ws_id)]],
                              capture_output=True, text=True).stdout
    else:
        files = VmFiles(vm_dir(api, ws_id))
        pid = process.running(files)
        assert pid is not None
        spec = (files.dir / "vm.json").read_text() + Path(f"/proc/{pid}/cmdline").read_text()
    assert spec and FORGE_TOKEN not in spec and basic not in spec


# --- stop and start, pause and resume ---------------------------------------------------------


def test_stop_then_start_keeps_workspace_files(api: ApiClient, ws: dict[str, Any]) -> None:
    wid = ws["id"]
    assert api.exec(wid, "echo kept > /workspace/api/note")["exit_code"] == 0
    r = api.post(f"/api/v1/workspaces/{wid}/stop")
    assert r.status_code in (200, 202), r.text
    assert api.wait_state(wid, settled=("stopped", "error"))["state"] == "stopped"
    if _backend(api) == "microvm":
        assert process.running(VmFiles(vm_dir(api, wid))) is None  # no QEMU left running
    r = api.post(f"/api/v1/workspaces/{wid}/start")
    assert r.status_code in (200, 202), r.text
    assert api.wait_state(wid, settled=("running", "error"))["state"] == "running"
    out = api.exec(wid, "cat /workspace/api/note; git -C /workspace/api status --short")
    assert out["stdout"] == "kept\n?? note\n", out


COUNTER = ("setsid sh -c 'i=0; while true; do i=$((i+1)); echo $$ $i > /tmp/.c; "
           "mv /tmp/.c /tmp/count; sleep 0.2; done' </dev/null >/dev/null 2>&1 &")


def _counter(api: ApiClient, ws_id: str) -> tuple[int, int]:
    """(pid, count) of the workspace's counter, from /tmp (memory only on a microVM)."""
    out = api.exec(ws_id, "cat /tmp/count")
    pid, count = out["stdout"].split()
    return int(pid), int(count)


def _counts_on(api: ApiClient, ws_id: str, pid: int, above: int) -> None:
    """The same counter process goes on counting (a condition, waited for)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = _counter(api, ws_id)
        assert now[0] == pid, now
        if now[1] > above:
            return
        time.sleep(0.2)
    raise AssertionError(f"the counter stayed at {above}")


# A background process started through the API (the agent's child): it prints a tick every
# 0.2 s, with the count it reached, which only its memory holds.
TICKER = "i=0; while :; do i=$((i+1)); echo tick $i; sleep 0.2; done"


def _ticks(api: ApiClient, ws_id: str, pid: int) -> int:
    """The last count in the process's kept output."""
    r = api.get(f"/api/v1/workspaces/{ws_id}/processes/{pid}/logs")
    assert r.status_code == 200, r.text
    text = "".join(c["data"] for c in r.json()["chunks"] if c["stream"] == "stdout")
    ticks = [int(line.split()[1]) for line in text.splitlines() if line.startswith("tick ")]
    return ticks[-1] if ticks else 0


def _ticks_on(api: ApiClient, ws_id: str, pid: int, above: int) -> int:
    """Waits until the process's output counts past ``above`` (a condition, not a sleep)."""
    deadline = time.monotonic() + 60
    while (now := _ticks(api, ws_id, pid)) <= above:
        assert time.monotonic() < deadline, f"process {pid} stayed at tick {now}"
        time.sleep(0.2)
    return now


def _process(api: ApiClient, ws_id: str, pid: int) -> dict[str, Any]:
    r = api.get(f"/api/v1/workspaces/{ws_id}/processes")
    assert r.status_code == 200, r.text
    found = [p for p in r.json()["processes"] if p["pid"] == pid]
    assert found, r.json()
    return dict(found[0])


def test_background_processes_start_list_log_and_signal(api: ApiClient,
                                                          ws: dict[str, Any]) -> None:
    wid = ws["id"]
    r = api.post(f"/api/v1/workspaces/{wid}/processes", json={"cmd": TICKER})
    assert r.status_code == 201, r.text
    pid = r.json()["pid"]
    api.ticker = pid  # type: ignore[attr-defined]
    _ticks_on(api, wid, pid, 0)
    listed = _process(api, wid, pid)
    assert listed["running"] is True and TICKER in listed["cmd"], listed
    assert api.exec(wid, f"kill -0 {pid}")["exit_code"] == 0  # a real process in the guest
    # A signal goes to the process's group; the list then says how it ended.
    r = api.post(f"/api/v1/workspaces/{wid}/processes", json={"cmd": "sleep 600"})
    assert r.status_code == 201, r.text
    sleeper = r.json()["pid"]
    r = api.post(f"/api/v1/workspaces/{wid}/processes/{sleeper}/signal",
                 json={"signal": "TERM"})
    assert r.status_code == 204, r.text
    deadline = time.monotonic() + 30
    while (info := _process(api, wid, sleeper))["running"]:
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    assert info["signal"] == "TERM", info
    r = api.post(f"/api/v1/workspaces/{wid}/processes/999999/signal", json={"signal": "TERM"})
    assert r.status_code == 404, r.text


def test_pause_then_resume_keeps_a_running_process(api: ApiClient, ws: dict[str, Any]) -> None:
    wid = ws["id"]
    assert api.exec(wid, COUNTER)["exit_code"] == 0
    deadline = time.monotonic() + 30
    while api.exec(wid, "test -s /tmp/count")["exit_code"] and time.monotonic() < deadline:
        time.sleep(0.1)
    pid, count = _counter(api, wid)
    ticks = _ticks(api, wid, api.ticker)  # type: ignore[attr-defined]
    r = api.post(f"/api/v1/workspaces/{wid}/pause")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "paused"
    saved = None
    if _backend(api) == "microvm":
        files = VmFiles(vm_dir(api, wid))
        assert process.running(files) is None  # no QEMU: no CPU, no RAM held
        saved = files.dir / "checkpoints" / "den-pause" / "state"
        assert saved.stat().st_size > 1 << 20
    r = api.post(f"/api/v1/workspaces/{wid}/resume")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "running"
    _counts_on(api, wid, pid, count)  # the process (and /tmp) came back
    ticker = api.ticker  # type: ignore[attr-defined]
    assert _process(api, wid, ticker)["running"] is True  # the agent still knows it
    _ticks_on(api, wid, ticker, ticks)  # its count went on from where it was
    if saved is not None:
        assert not saved.exists()  # QEMU read all of it; nothing kept while running
        assert any("restored from memory" in e for e in _events(api, wid))


# --- snapshots, forks, restores ---------------------------------------------------------------


def test_memory_snapshot_forks_with_its_processes_and_files_and_restores(
        api: ApiClient, ws: dict[str, Any]) -> None:
    wid = ws["id"]
    assert api.exec(wid, "echo before > /workspace/api/snap")["exit_code"] == 0
    pid, _ = _counter(api, wid)
    r = api.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "m", "memory": True})
    assert r.status_code in (200, 201), r.text
    snap = r.json()
    api.snapshot_id = snap["id"]  # type: ignore[attr-defined]
    assert api.get(f"/api/v1/workspaces/{wid}").json()["state"] == "running"
    r = api.post("/api/v1/workspaces", json={"name": "twin", "from_snapshot": snap["id"]})
    assert r.status_code in (201, 202), r.text
    fork = api.wait_state(r.json()["id"])
    assert fork["state"] == "running", fork
    out = api.exec(fork["id"], "hostname; cat /workspace/api/snap")
    assert out["stdout"] == "twin\nbefore\n", out  # its own name, the snapshot's files
    _counts_on(api, fork["id"], pid, 0)  # the snapshot's process, running in the fork
    ticker = api.ticker  # type: ignore[attr-defined]
    assert _process(api, fork["id"], ticker)["running"] is True  # the fork's agent knows it
    r = api.post(f"/api/v1/workspaces/{fork['id']}/processes/{ticker}/signal",
                 json={"signal": "KILL"})
    assert r.status_code == 204, r.text
    deadline = time.monotonic() + 30
    while _process(api, fork["id"], ticker)["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert _process(api, wid, ticker)["running"] is True  # the origin's is its own
    if _backend(api) == "microvm":  # each VM's QEMU is a uid of its own
        assert_vms_apart(VmFiles(vm_dir(api, wid)), VmFiles(vm_dir(api, fork["id"])))
    assert api.exec(wid, "hostname")["stdout"] == "api\n"
    r = api.delete(f"/api/v1/workspaces/{fork['id']}")
    assert r.status_code in (200, 202, 204), r.text
    # Restore: the workspace's files replaced by the snapshot's, its process back too.
    assert api.exec(wid, "echo after > /workspace/api/snap")["exit_code"] == 0
    old = _engine_objects(api, wid)
    r = api.post(f"/api/v1/snapshots/{snap['id']}/restore")
    assert r.status_code in (200, 202), r.text
    assert api.wait_state(wid)["state"] == "running"
    assert api.exec(wid, "cat /workspace/api/snap")["stdout"] == "before\n"
    assert _counter(api, wid)[0] == pid
    if _backend(api) == "microvm":
        assert not [o for o in old if o.startswith("directory ")
                    and Path(o.split(" ", 1)[1]).exists()]  # the replaced disks are gone


# --- what a backend does not support: refused clearly -----------------------------------------


def test_what_the_backend_does_not_support_is_refused_clearly(
        api: ApiClient, ws: dict[str, Any]) -> None:
    """docs/microvm.md, "What each backend refuses": each row, as a user meets it."""
    repo = {"url": str(api.repo)}  # type: ignore[attr-defined]
    create = "/api/v1/workspaces"
    if _backend(api) == "docker":
        r = api.post(create, json={"name": "v", "runtime": "microvm", "repo": repo})
        assert _error(r) == (422, "invalid") and "DEN_BACKEND=microvm" in r.text, r.text
        return
    for runtime in ("gvisor", "runc"):
        r = api.post(create, json={"name": "g", "runtime": runtime, "repo": repo})
        assert _error(r) == (422, "invalid") and "DEN_BACKEND=microvm" in r.text, r.text
    # Nothing was made by the refusals.
    names = [w["name"] for w in api.get(create, user="root").json()["workspaces"]]
    assert names == ["api"], names


# --- the process limit ----------------------------------------------------------------------

# Forks as dev until the kernel refuses; prints how many it made and the errno, then ends
# them. Each child becomes `sleep` at once (a Python child would copy its parent's pages).
FORK_UNTIL_REFUSED = """
import os, signal
kids = []
try:
    while True:
        pid = os.fork()
        if pid == 0:
            os.execv("/bin/sleep", ["sleep", "120"])
        kids.append(pid)
except OSError as exc:
    print(len(kids), exc.errno)
for pid in kids:
    os.kill(pid, signal.SIGKILL)
"""


def test_a_fork_bomb_stops_at_the_process_limit_and_the_workspace_answers(
        api: ApiClient, ws: dict[str, Any]) -> None:
    """The workspace's ``pids_limit`` holds inside it (gVisor: RLIMIT_NPROC in the sandbox;
    microVM: RLIMIT_NPROC in the guest, from the kernel command line): dev's forks stop at
    the limit with EAGAIN, counting dev's processes already there."""
    wid = ws["id"]
    forks = api.exec(wid, ["python3", "-c", FORK_UNTIL_REFUSED], timeout_s=120)
    assert len(forks["stdout"].split()) == 2, forks
    count, errno = forks["stdout"].split()
    assert errno == "11" and PIDS - 30 < int(count) < PIDS, forks
    assert api.exec(wid, "echo alive")["stdout"] == "alive\n"  # its forks were ended
    bomb = api.exec(wid, "bomb() { bomb | bomb & }; bomb; sleep 5; echo survived", timeout_s=8)
    assert bomb["exit_code"] in (0, 124, 137), bomb
    # The server, the workspace and its agent answer; what is left of the bomb holds dev's
    # process slots (dev's execs may be refused) until a stop and start clears it.
    assert api.client.get("/healthz").json()["status"] == "ok"
    assert api.get(f"/api/v1/workspaces/{wid}").json()["state"] == "running"
    assert api.get(f"/api/v1/workspaces/{wid}/processes").status_code == 200
    assert api.post(f"/api/v1/workspaces/{wid}/stop").json()["state"] == "stopped"
    assert api.post(f"/api/v1/workspaces/{wid}/start").json()["state"] == "running"
    assert api.exec(wid, "echo alive", timeout_s=60)["stdout"] == "alive\n"


# --- delete, and a snapshot that outlives its workspace ---------------------------------------


def test_delete_leaves_no_engine_object(api: ApiClient, ws: dict[str, Any]) -> None:
    assert _engine_objects(api, ws["id"])  # it has some now
    pids = [process.running(VmFiles(vm_dir(api, ws["id"])))] if _backend(
        api) == "microvm" else []
    r = api.delete(f"/api/v1/workspaces/{ws['id']}")
    assert r.status_code in (200, 202, 204), r.text
    deadline = time.monotonic() + 60
    while _engine_objects(api, ws["id"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _engine_objects(api, ws["id"]) == []
    for pid in pids:  # not even a QEMU process that lost its directory
        assert pid is not None
        assert not Path(f"/proc/{pid}").exists() or b"qemu" not in Path(
            f"/proc/{pid}/cmdline").read_bytes()


def test_a_snapshot_outlives_its_workspace(api: ApiClient) -> None:
    """After the workspace's delete, a fork of its memory snapshot still starts, with the
    snapshot's files; deleting the snapshot leaves nothing of it."""
    snap = getattr(api, "snapshot_id", None)
    assert snap is not None, "the snapshot test did not run"
    r = api.post("/api/v1/workspaces", json={"name": "orphan", "from_snapshot": snap})
    assert r.status_code in (201, 202), r.text
    fork = api.wait_state(r.json()["id"])
    assert fork["state"] == "running", fork
    out = api.exec(fork["id"], "hostname; cat /workspace/api/snap")
    assert out["stdout"] == "orphan\nbefore\n", out
    r = api.delete(f"/api/v1/snapshots/{snap}")
    assert r.status_code in (200, 204), r.text
    if _backend(api) == "microvm":
        assert not list((BOOT_DIR / "vms").glob(f"*-snap-{snap}"))
