"""Files read and written from the host as the workspace user (server/runtime/host_files.py):
only the plain cases, never outside the directory, never as root."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from server.runtime import host_files
from server.runtime.host_files import Ids

pytestmark = pytest.mark.skipif(not host_files.usable(),
                                reason="needs root on Linux x86-64 or arm64 (CI runs as root)")

DEV = Ids(uid=4242, gid=4242, groups=(4242,))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A workspace directory owned by DEV, beside a file that must stay out of reach."""
    (tmp_path / "secret").write_text("host secret")
    ws = tmp_path / "ws"
    ws.mkdir()
    os.chown(ws, DEV.uid, DEV.gid)
    os.chmod(tmp_path, 0o755)
    return ws


def _mine(path: Path, data: bytes = b"", mode: int = 0o644) -> Path:
    path.write_bytes(data)
    os.chown(path, DEV.uid, DEV.gid)
    os.chmod(path, mode)
    return path


async def _read(root: Path, rel: str, ids: Ids = DEV, max_bytes: int = 1 << 30) -> bytes | None:
    opened = await host_files.open_read(root, rel, ids, max_bytes=max_bytes)
    if opened is None:
        return None
    data = b"".join([c async for c in opened.chunks()])
    assert len(data) == opened.size
    return data


async def _write(root: Path, rel: str, data: bytes, ids: Ids = DEV) -> bool:
    writer = await host_files.open_write(root, rel, ids)
    if writer is None:
        return False
    await writer.write(data)
    await writer.commit()
    return True


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob(f"{host_files.TEMP_PREFIX}*")]


def _thread_ids() -> list[tuple[int, int]]:
    """The file system ids of every thread of the module's pool (all of them busy at once)."""
    kernel = host_files._kernel
    pool = host_files._threads
    barrier = threading.Barrier(pool._max_workers, timeout=10)

    def ids() -> tuple[int, int]:
        barrier.wait()
        return kernel.setfsuid(-1), kernel.setfsgid(-1)

    futures = [pool.submit(ids) for _ in range(pool._max_workers)]
    return [f.result() for f in futures]


def test_plain_files_are_read_and_links_inside_are_followed(root: Path) -> None:
    _mine(root / "a.txt", b"hello")
    (root / "sub").mkdir()
    _mine(root / "sub" / "big.bin", os.urandom(3 * host_files.CHUNK + 5))
    os.symlink("../a.txt", root / "sub" / "up")
    os.symlink("sub", root / "dirlink")
    assert asyncio.run(_read(root, "a.txt")) == b"hello"
    assert asyncio.run(_read(root, "sub/up")) == b"hello"
    assert asyncio.run(_read(root, "dirlink/up")) == b"hello"
    assert asyncio.run(_read(root, "sub/big.bin")) == (root / "sub" / "big.bin").read_bytes()


def test_reads_the_agent_must_answer_are_left_to_it(root: Path) -> None:
    _mine(root / "a.txt", b"hello")
    os.symlink("/etc/passwd", root / "abs")  # absolute: the workspace's /, not the host's
    os.symlink("../secret", root / "out")
    os.symlink("/workspace/a.txt", root / "abs_inside")
    os.mkfifo(root / "fifo")
    (root / "dir").mkdir()
    _mine(root / "private", b"p", mode=0o600)
    os.chown(root / "private", 0, 0)
    for rel in ("abs", "out", "abs_inside", "fifo", "dir", ".", "missing", "private",
                "a.txt/x"):
        assert asyncio.run(_read(root, rel)) is None, rel
    assert asyncio.run(_read(root, "a.txt", max_bytes=4)) is None  # too large: its 413
    with pytest.raises(ValueError):
        asyncio.run(_read(root, "../secret"))
    assert asyncio.run(_read(root / "gone", "a.txt")) is None  # the workspace deleted
    assert not asyncio.run(_write(root / "gone", "a.txt", b"x"))


def test_permissions_are_the_users(root: Path) -> None:
    shared = _mine(root / "shared", b"g", mode=0o640)
    os.chown(shared, 0, 4444)
    closed = root / "closed"
    closed.mkdir(mode=0o700)
    _mine(closed / "f", b"f")
    os.chown(closed, 0, 0)
    assert asyncio.run(_read(root, "shared")) is None
    member = Ids(uid=DEV.uid, gid=DEV.gid, groups=(DEV.gid, 4444))
    assert asyncio.run(_read(root, "shared", member)) == b"g"
    assert asyncio.run(_read(root, "closed/f")) is None
    assert not asyncio.run(_write(root, "closed/new", b"x"))
    root_dir = root / "rootdir"
    root_dir.mkdir(mode=0o755)
    assert not asyncio.run(_write(root, "rootdir/new", b"x"))  # not writable for DEV
    assert not (root_dir / "new").exists() and not _leftovers(root)
    assert _thread_ids() == [(0, 0)] * host_files._threads._max_workers


def test_a_write_replaces_the_file_atomically_keeping_its_mode(root: Path) -> None:
    assert asyncio.run(_write(root, "new.txt", b"fresh"))
    st = (root / "new.txt").stat()
    assert ((root / "new.txt").read_bytes(), st.st_uid, st.st_gid,
            stat.S_IMODE(st.st_mode)) == (b"fresh", DEV.uid, DEV.gid, 0o644)

    _mine(root / "script.sh", b"old", mode=0o750)
    before = (root / "script.sh").stat().st_ino
    assert asyncio.run(_write(root, "script.sh", b"#!/bin/sh\n"))
    st = (root / "script.sh").stat()
    assert (root / "script.sh").read_bytes() == b"#!/bin/sh\n"
    assert stat.S_IMODE(st.st_mode) == 0o750 and st.st_ino != before  # renamed over it
    assert not _leftovers(root)


def test_missing_parents_are_made_as_the_user(root: Path) -> None:
    os.umask(old := os.umask(0o077))
    try:
        os.umask(0o077)
        assert asyncio.run(_write(root, "a/b/c.txt", b"deep"))
    finally:
        os.umask(old)
    assert (root / "a" / "b" / "c.txt").read_bytes() == b"deep"
    for d in (root / "a", root / "a" / "b"):
        st = d.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (DEV.uid, DEV.gid, 0o755)
    (root / "team").mkdir()
    os.chown(root / "team", DEV.uid, 4444)
    os.chmod(root / "team", 0o2775)
    assert not asyncio.run(_write(root, "team/sub/f", b"x"))  # the agent's rules there
    assert not (root / "team" / "sub").exists()


def test_a_set_group_id_directory_does_not_give_its_group(root: Path) -> None:
    d = root / "team"
    d.mkdir()
    os.chown(d, DEV.uid, 4444)
    os.chmod(d, 0o2775)
    assert asyncio.run(_write(root, "team/f", b"x"))
    assert (d / "f").stat().st_gid == DEV.gid  # as the agent: the user's own group


def test_writes_the_agent_must_do_are_left_to_it(root: Path, tmp_path: Path) -> None:
    _mine(root / "a.txt", b"a")
    os.symlink("a.txt", root / "link")  # a link as the target: the agent resolves it
    os.symlink("..", root / "up")
    os.symlink(str(tmp_path), root / "abs")
    other = _mine(root / "others", b"o", mode=0o666)
    os.chown(other, 0, 0)  # writable, but not DEV's: the agent keeps its owner
    _mine(root / "setuid", b"s", mode=0o4755)
    _mine(root / "readonly", b"r", mode=0o444)
    (root / "adir").mkdir()
    sticky = root / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    outside = tmp_path / "outdir"  # DEV could write there: only the lookup keeps it out
    outside.mkdir()
    os.chown(outside, DEV.uid, DEV.gid)
    os.symlink("nowhere", root / "dangling")
    for rel in ("link", "up/outdir/new", "abs/outdir/new", "dangling/new", "others", "setuid",
                "readonly", "adir", "tmp/f", ".", "a.txt/x", f"{host_files.TEMP_PREFIX}x"):
        assert not asyncio.run(_write(root, rel, b"pwned")), rel
    assert (tmp_path / "secret").read_text() == "host secret" and not any(outside.iterdir())
    assert (root / "a.txt").read_bytes() == b"a" and other.read_bytes() == b"o"
    assert not (root / "nowhere").exists() and not (sticky / "f").exists()
    assert not _leftovers(root)


def test_an_aborted_write_leaves_nothing_and_the_old_file(root: Path) -> None:
    _mine(root / "keep.txt", b"old")

    async def abort() -> None:
        writer = await host_files.open_write(root, "keep.txt", DEV)
        assert writer is not None
        await writer.write(b"new, half")
        assert len(_leftovers(root)) == 1
        await writer.abort()
        await writer.abort()  # idempotent

    asyncio.run(abort())
    assert (root / "keep.txt").read_bytes() == b"old" and not _leftovers(root)


def test_a_file_that_shrinks_while_read_raises(root: Path) -> None:
    _mine(root / "f", b"x" * (host_files.CHUNK + 10))

    async def read() -> None:
        opened = await host_files.open_read(root, "f", DEV, max_bytes=1 << 30)
        assert opened is not None
        os.truncate(root / "f", 10)
        with pytest.raises(host_files.FileShrank):
            async for _ in opened.chunks():
                pass

    asyncio.run(read())


@pytest.mark.parametrize("answer", [
    None, [], {"uid": 0, "gid": 1000, "groups": []}, {"uid": 1000, "gid": 0, "groups": []},
    {"uid": 1000, "gid": 1000, "groups": [0]}, {"uid": True, "gid": 1000, "groups": []},
    {"uid": "1000", "gid": 1000, "groups": []}, {"uid": 1000, "gid": 1000},
    {"uid": 1000, "gid": 1000, "groups": list(range(1, 300))},
    {"uid": 1000, "gid": 1000, "groups": [-5]}, {"uid": 2**32, "gid": 1000, "groups": []},
])
def test_ids_the_agent_reports_are_checked(answer: Any) -> None:
    assert Ids.parse(answer) is None


def test_ids_include_the_primary_group() -> None:
    assert Ids.parse({"uid": 1000, "gid": 1000, "groups": [27, 1000]}) == Ids(1000, 1000,
                                                                               (27, 1000))
    assert Ids.parse({"uid": 1000, "gid": 100, "groups": []}) == Ids(1000, 100, (100,))


def test_steps_after_an_abort_or_a_close_touch_no_descriptor(root: Path) -> None:
    """A write or read that comes after the end (its caller was cancelled meanwhile) must not
    use the descriptor number, which may belong to another file by then."""
    _mine(root / "f", b"data")

    async def run() -> None:
        writer = await host_files.open_write(root, "g", DEV)
        assert writer is not None
        await writer.abort()
        with pytest.raises(OSError, match="aborted"):
            await writer.write(b"late")
        with pytest.raises(OSError, match="aborted"):
            await writer.commit()
        opened = await host_files.open_read(root, "f", DEV, max_bytes=100)
        assert opened is not None
        await opened.close()
        assert opened._read(4) == b""

    asyncio.run(run())
    assert not (root / "g").exists() and not _leftovers(root)


def test_a_thread_that_cannot_take_the_ids_leaves_it_to_the_agent(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root without CAP_SETUID: setfsuid fails silently. Nothing is done as root then."""
    _mine(root / "a.txt", b"a")
    monkeypatch.setattr(host_files._kernel, "setfsuid", lambda uid: 0)
    assert asyncio.run(_read(root, "a.txt")) is None
    assert not asyncio.run(_write(root, "b.txt", b"b"))
    assert not (root / "b.txt").exists() and not _leftovers(root)


def test_a_body_that_breaks_off_or_runs_over_leaves_no_temporary_file(root: Path) -> None:
    """FileService's host write: a client that goes away mid-body (a write of the previous
    MiB may still be running in its thread), a body past the limit or a workspace that
    stopped meanwhile removes the temporary file and leaves the old one; a whole body is
    renamed over it."""
    from types import SimpleNamespace

    from server.errors import Conflict, PayloadTooLarge
    from server.workspaces.files import FileService

    mib = host_files.CHUNK
    service = FileService(SimpleNamespace(settings=SimpleNamespace(  # type: ignore[arg-type]
        file_max_bytes=4 * mib)))
    running = [True]
    service._still_running = lambda ws_id: running[0]  # type: ignore[method-assign]
    _mine(root / "f", b"old")

    async def body(n: int, fail: BaseException | None = None) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield os.urandom(mib // 2)
        if fail is not None:
            raise fail

    async def write(n: int, fail: BaseException | None = None) -> int:
        writer = await host_files.open_write(root, "f", DEV)
        assert writer is not None
        return await service._write_host("ws1", writer, body(n, fail), "/workspace/f")

    with pytest.raises(ConnectionError):
        asyncio.run(write(5, ConnectionError("client went away")))
    assert (root / "f").read_bytes() == b"old" and not _leftovers(root)
    with pytest.raises(PayloadTooLarge):
        asyncio.run(write(9))
    assert (root / "f").read_bytes() == b"old" and not _leftovers(root)
    running[0] = False  # stopped, paused or deleted under the write: as through the agent
    with pytest.raises(Conflict):
        asyncio.run(write(5))
    assert (root / "f").read_bytes() == b"old" and not _leftovers(root)
    running[0] = True
    assert asyncio.run(write(5)) == 5 * (mib // 2)
    assert (root / "f").stat().st_size == 5 * (mib // 2) and not _leftovers(root)
