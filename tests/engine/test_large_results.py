"""Large results are not held in the server's memory (issue 11, finding 6).

A real ``den serve`` (its peak RSS, VmHWM, read from /proc) answers several large calls at
once: one-shot execs each printing ``DEN_EXEC_MAX_OUTPUT_BYTES`` (16 MiB), and reads of a
60 MiB file. File reads stream from the agent's channel with window credit; an exec's answer
is encoded as it is sent from the runtime's bytes (``server/api/exec_body.py``), where it was
held several times over (bytes, text, JSON). The server's peak stays under ``MAX_RSS_MB``.
Measured (docs/operations.md): 127 MB before the calls, 215 MB peak; 243 MB with the exec
answer built as a model, which this load does not push past the limit: the test guards the
bound, it does not tell the two apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RUN_PREFIX
from tests.engine.test_backpressure import wait_for
from tests.server_process import DenServer

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


@pytest.fixture
def den(engine: None, tmp_path: Path, repos_root: Path,
        make_repo: Callable[..., Path]) -> Iterator[tuple[DenServer, str]]:
    srv = DenServer(tmp_path / "data", repos_root, f"{RUN_PREFIX}-big{secrets.token_hex(2)}",
                    user="alice", http_timeout_s=300, default_memory_mb=1024,
                    default_cpus=1.0, reaper_interval_s=0, ssh_port=0)
    srv.start()
    wid = ""
    try:
        r = srv.http.post("/api/v1/workspaces",
                          json={"name": "big", "repo": {"url": str(make_repo())}})
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
    before = peak_mb(srv.proc.pid)

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
