"""An exec's output past 256 KiB per stream is spooled to a private file, not held in memory,
and the API's answer is the same document, byte for byte (issue 11, finding 6)."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from server.api.exec_body import exec_document
from server.runtime.base import ExecResult
from server.runtime.output import MEMORY_BYTES, Captured, SpoolFailed
from tests.conftest import ApiClient


def open_files_under(directory: Path) -> list[str]:
    """This process's open files under ``directory`` (unlinked ones included)."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(directory) + "/"):
            found.append(target)
    return found


def document(result: ExecResult) -> bytes:
    async def collect() -> bytes:
        return b"".join([piece async for piece in exec_document(result)])
    return asyncio.run(collect())


def expected(code: int, out: bytes, err: bytes, *, truncated: bool = False) -> bytes:
    """The document as ExecOut was rendered before it was streamed."""
    return json.dumps({"exit_code": code, "stdout": out.decode(errors="replace"),
                       "stderr": err.decode(errors="replace"), "timed_out": False,
                       "duration_ms": 0, "truncated": truncated},
                      ensure_ascii=False, separators=(",", ":")).encode()


def test_small_output_stays_in_memory(tmp_path: Path) -> None:
    c = Captured(1000, spool_dir=tmp_path)
    c.add(b"x" * 999)
    assert not c.spooled and c.read() == b"x" * 999 and list(tmp_path.iterdir()) == []


def test_output_past_the_threshold_goes_to_an_unlinked_private_file(tmp_path: Path) -> None:
    c = Captured(10 * MEMORY_BYTES, spool_dir=tmp_path / "exec")
    data = os.urandom(3 * MEMORY_BYTES + 5)
    for start in range(0, len(data), 10_000):
        c.add(data[start:start + 10_000])
    assert c.spooled and len(c) == len(data)
    assert list((tmp_path / "exec").iterdir()) == []  # no name anyone could open
    [held] = open_files_under(tmp_path / "exec")
    assert held.endswith("(deleted)")
    assert c._file is not None
    assert stat.S_IMODE(os.fstat(c._file.fileno()).st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "exec").stat().st_mode) == 0o700
    assert c.read() == data and c.head(7) == data[:7]

    async def chunks() -> bytes:
        return b"".join([chunk async for chunk in c.chunks(size=100_000)])
    assert asyncio.run(chunks()) == data
    c.close()
    c.close()
    assert open_files_under(tmp_path / "exec") == []


def test_the_limit_cuts_and_says_so(tmp_path: Path) -> None:
    c = Captured(MEMORY_BYTES + 10, spool_dir=tmp_path)

    async def fill() -> None:
        await c.add_async(b"a" * MEMORY_BYTES)
        await c.add_async(b"b" * 20)
        await c.add_async(b"c")
    asyncio.run(fill())
    assert c.truncated and c.read() == b"a" * MEMORY_BYTES + b"b" * 10
    c.close()


@pytest.mark.parametrize("spool", [False, True])
def test_the_document_is_the_same_spooled_or_not(tmp_path: Path, spool: bool) -> None:
    # Multi-byte characters across every slice boundary, bad bytes, characters JSON escapes.
    out = ("é€😀\"\\\n\t\x01" * 200_000).encode() + b"\xff\xfe tail \xe2\x82"
    err = "ошибка\n".encode() * 50_000
    spool_dir = tmp_path if spool else None
    captured = [Captured(1 << 30, spool_dir=spool_dir) for _ in range(2)]
    for c, data in zip(captured, (out, err), strict=True):
        for start in range(0, len(data), 4093):  # odd pieces: characters split between them
            c.add(data[start:start + 4093])
    assert all(c.spooled == spool for c in captured)
    result = ExecResult(3, captured[0], captured[1])
    assert document(result) == expected(3, out, err)
    result.close()


def test_an_api_exec_spools_and_leaves_no_file(fake_api: ApiClient,
                                               make_repo: Callable[..., Path]) -> None:
    ws = fake_api.create(make_repo("api"), name="api")
    spool = fake_api.app.state.settings.data_dir / "tmp" / "exec"
    size = 3 * MEMORY_BYTES
    r = fake_api.post(f"/api/v1/workspaces/{ws['id']}/exec", json={"cmd": f"head -c {size}"})
    assert r.status_code == 200, r.text
    assert r.content == expected(0, b"a" * size, b"e" * size)
    assert spool.is_dir()  # it was spooled there ...
    assert open_files_under(spool) == []  # ... and nothing is left open once it is sent



def test_a_spool_that_cannot_be_written_is_a_clear_503(fake_api: ApiClient,
                                                     make_repo: Callable[..., Path]) -> None:
    ws = fake_api.create(make_repo("api"), name="api")
    tmp = fake_api.app.state.settings.data_dir / "tmp"
    tmp.mkdir(exist_ok=True)
    (tmp / "exec").write_text("not a directory")  # as a full or broken disk would fail
    r = fake_api.post(f"/api/v1/workspaces/{ws['id']}/exec",
                      json={"cmd": f"head -c {2 * MEMORY_BYTES}"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "spool_failed"
    assert "could not keep the command's output" in r.json()["error"]["message"]
    assert str(tmp) not in r.text  # no host path
    small = fake_api.exec(ws["id"], "echo fine")  # small output never needs the spool
    assert small["stdout"] == "fine\n"


def test_spool_failure_frees_what_was_held(tmp_path: Path) -> None:
    (tmp_path / "exec").write_text("")
    c = Captured(4 * MEMORY_BYTES, spool_dir=tmp_path / "exec")
    with pytest.raises(SpoolFailed):
        c.add(b"x" * MEMORY_BYTES)
    assert len(c) == 0 and not c.spooled
