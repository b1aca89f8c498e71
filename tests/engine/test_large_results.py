"""Large results are not held in the server's memory (issue 11, finding 6).

A real ``den serve`` (its peak RSS, VmHWM, read from /proc) answers several large calls at
once: one-shot execs each printing ``DEN_EXEC_MAX_OUTPUT_BYTES`` (16 MiB), and reads of a
60 MiB file. File reads stream from the agent's channel with window credit; an exec's output
past 256 KiB per stream is spooled to a private, unlinked file under the data directory's
``tmp/exec`` (``server/runtime/output.py``), and its answer is encoded as it is sent from
there (``server/api/exec_body.py``). The first test guards the overall bound
(``MAX_RSS_MB``); the second holds ``HELD`` exec answers at once, unread by their clients,
and shows the server's RSS rises by far less than their 32 MiB each (it rose by about that
before the spool), and that no spool file outlives its call, also when the client goes
away in the middle of the answer. Measured in docs/operations.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RUN_PREFIX, ApiClient, git
from tests.engine.test_backpressure import wait_for
from tests.server_process import DenServer
from tests.unit.test_exec_output import open_files_under

pytestmark = pytest.mark.engine

MAX_RSS_MB = 300.0
EXECS = 4
READS = 4
FILE_MB = 60
OUTPUT = 16 * 1024 * 1024


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


@pytest.fixture(scope="module")
def den(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DenServer, str]]:
    root = tmp_path_factory.mktemp("large-results")
    src, repos = root / "src", root / "repos"
    src.mkdir()
    repos.mkdir()
    git("init", "-q", "-b", "main", cwd=src)
    (src / "README.md").write_text("# big\n")
    git("add", "-A", cwd=src)
    git("commit", "-q", "-m", "initial", cwd=src)
    git("clone", "-q", "--bare", str(src), str(repos / "big.git"))
    srv = DenServer(root / "data", repos, f"{RUN_PREFIX}-big{secrets.token_hex(2)}",
                    user="alice", http_timeout_s=300, default_memory_mb=1024,
                    default_cpus=1.0, reaper_interval_s=0, ssh_port=0)
    srv.start()
    wid = ""
    try:
        r = srv.http.post("/api/v1/workspaces",
                          json={"name": "big", "repo": {"url": str(repos / "big.git")}})
        assert r.status_code == 202, r.text
        wid = r.json()["id"]
        wait_for(lambda: srv.http.get(f"/api/v1/workspaces/{wid}").json()["state"]
                 in ("running", "error"), 120, "the workspace to start")
        assert srv.http.get(f"/api/v1/workspaces/{wid}").json()["state"] == "running"
        yield srv, wid
    finally:
        with contextlib.suppress(Exception):
            srv.http.delete(f"/api/v1/workspaces/{wid}")
        srv.close()


def reset_peak(pid: int) -> float:
    """Set the process's peak RSS (VmHWM) to its RSS now (``clear_refs``); that value."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return peak_mb(pid)


def spool_files(srv: DenServer) -> list[str]:
    """The files den serve holds open under its exec spool directory."""
    assert srv.proc is not None
    spool = str(Path(srv.env["DEN_DATA_DIR"]) / "tmp" / "exec") + "/"
    found = []
    for fd in Path(f"/proc/{srv.proc.pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith(spool):
                found.append(target)
    return found


def test_several_large_execs_and_file_reads_keep_the_server_small(
        den: tuple[DenServer, str]) -> None:
    srv, wid = den
    assert srv.proc is not None
    base = f"/api/v1/workspaces/{wid}"

    def run(cmd: str) -> dict[str, object]:
        r = srv.http.post(f"{base}/exec", json={"cmd": cmd, "timeout_s": 300})
        assert r.status_code == 200, r.text
        out: dict[str, object] = r.json()
        return out

    made = run(f"head -c {FILE_MB}M /dev/urandom > /workspace/big.bin && "
               "sha256sum /workspace/big.bin && echo hi > /workspace/small.txt")
    digest = str(made["stdout"]).split()[0]
    # Every path once, small, before the baseline (imports, first allocations).
    assert run("head -c 1000 /dev/zero | tr '\\0' a")["stdout"] == "a" * 1000
    assert srv.http.get(f"{base}/files", params={"path": "small.txt"}).content == b"hi\n"
    before = reset_peak(srv.proc.pid)

    problems: list[str] = []

    def big_exec() -> None:
        try:
            out = run(f"head -c {OUTPUT} /dev/zero | tr '\\0' a")
            if out["stdout"] != "a" * OUTPUT or out["truncated"]:
                problems.append(f"exec: {len(str(out['stdout']))} bytes")
        except Exception as exc:  # reported below, with the others
            problems.append(f"exec: {exc!r}")

    def big_read() -> None:
        try:
            h = hashlib.sha256()
            with httpx.Client(base_url=str(srv.http.base_url), headers=srv.http.headers,
                              timeout=300) as client, \
                    client.stream("GET", f"{base}/files", params={"path": "big.bin"}) as r:
                assert r.status_code == 200
                for chunk in r.iter_bytes():
                    h.update(chunk)
            if h.hexdigest() != digest:
                problems.append("read: the file arrived changed")
        except Exception as exc:
            problems.append(f"read: {exc!r}")

    threads = ([threading.Thread(target=big_exec) for _ in range(EXECS)]
               + [threading.Thread(target=big_read) for _ in range(READS)])
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = peak_mb(srv.proc.pid)
    print(f"\nden serve peak RSS: {before:.1f} MB before, {after:.1f} MB after {EXECS} execs "
          f"of {OUTPUT >> 20} MiB and {READS} reads of {FILE_MB} MiB at once")
    assert problems == []
    assert after < MAX_RSS_MB, (before, after)


HELD = 6  # exec answers held at once, 16 MiB of stdout and 16 MiB of stderr each


def test_exec_answers_held_by_slow_clients_are_spooled_not_kept_in_memory(
        den: tuple[DenServer, str]) -> None:
    srv, wid = den
    assert srv.proc is not None
    url = f"http://127.0.0.1:{srv.port}/api/v1/workspaces/{wid}/exec"
    cmd = (f"head -c {OUTPUT} /dev/zero | tr '\\0' a; "
           f"head -c {OUTPUT} /dev/zero | tr '\\0' e >&2")
    # The document each answer must be, byte for byte (hashed: 32 MiB held in the test each).
    want = hashlib.sha256()
    want.update(b'{"exit_code":0,"stdout":"' + b"a" * OUTPUT + b'","stderr":"' + b"e" * OUTPUT)
    srv.http.post(url, json={"cmd": "true"})  # the path once, before the baseline
    before = reset_peak(srv.proc.pid)
    held = threading.Barrier(HELD + 1, timeout=300)
    problems: list[str] = []

    def slow_client() -> None:
        try:
            with httpx.Client(headers=srv.http.headers, timeout=300) as client, \
                    client.stream("POST", url, json={"cmd": cmd, "timeout_s": 300}) as r:
                assert r.status_code == 200  # the exec has ended: its output is in Den
                held.wait()  # every answer is in Den at once, none read yet
                held.wait()  # the test has looked
                got, last = hashlib.sha256(), b""
                for chunk in r.iter_bytes():
                    got.update(chunk)
                    last = (last + chunk)[-200:]
                rest = last.rsplit(b'",', 1)[1]  # "timed_out":...,"truncated":false}
                tail = json.loads(b"{" + rest)
                mine = want.copy()
                mine.update(b'",' + rest)
                if got.hexdigest() != mine.hexdigest() or tail["truncated"] or tail[
                        "timed_out"]:
                    problems.append(f"an answer arrived changed: {tail}")
        except Exception as exc:  # reported below, with the others
            problems.append(repr(exc))
            held.abort()

    threads = [threading.Thread(target=slow_client) for _ in range(HELD)]
    for t in threads:
        t.start()
    try:
        held.wait()
        during = peak_mb(srv.proc.pid)
        open_during = spool_files(srv)
        held.wait()
    finally:
        for t in threads:
            t.join()
    print(f"\nden serve RSS {before:.1f} MB, peak {during:.1f} MB with {HELD} exec answers "
          f"of 2 x {OUTPUT >> 20} MiB held; {len(open_during)} spool files open then")
    assert problems == []
    # Held in memory, the answers were HELD x 32 MiB (192 MiB); spooled, a few MiB.
    assert during - before < HELD * 32 / 4, (before, during)
    assert len(open_during) == 2 * HELD, open_during
    wait_for(lambda: spool_files(srv) == [], 30, "the spool files to be closed")


def test_a_client_that_goes_away_mid_answer_leaves_no_spool_file(
        den: tuple[DenServer, str]) -> None:
    srv, wid = den
    url = f"http://127.0.0.1:{srv.port}/api/v1/workspaces/{wid}/exec"
    cmd = f"head -c {OUTPUT} /dev/zero | tr '\\0' a"
    with httpx.Client(headers=srv.http.headers, timeout=300) as client, \
            client.stream("POST", url, json={"cmd": cmd, "timeout_s": 300}) as r:
        assert r.status_code == 200
        assert len(spool_files(srv)) == 1  # stdout, spooled, being sent
        first = next(r.iter_raw())
        assert first.startswith(b'{"exit_code":0,"stdout":"')
    # The connection is closed with most of the answer unread.
    wait_for(lambda: spool_files(srv) == [], 30, "the spool file to be closed")


def test_an_exec_through_the_engine_is_spooled_too(
        real_api: ApiClient, make_repo: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A workspace without its agent runs one-shot execs through the engine's exec (a
    worker thread reads the multiplexed stream): its output is spooled the same way."""
    ws = real_api.create(make_repo())
    svc = real_api.app.state.workspaces

    async def no_agent(*_args: Any) -> None:
        return None

    monkeypatch.setattr(svc.runtime, "_agent_or_fallback", no_agent)
    size = 3 << 20
    out = real_api.exec(ws["id"], f"head -c {size} /dev/zero | tr '\\0' a; "
                                  f"head -c {size} /dev/zero | tr '\\0' e >&2; exit 3")
    assert out["exit_code"] == 3 and not out["truncated"]
    assert out["stdout"] == "a" * size and out["stderr"] == "e" * size
    spool = real_api.app.state.settings.data_dir / "tmp" / "exec"
    assert spool.is_dir()  # made by the first spill: the engine path spooled
    assert open_files_under(spool) == []
