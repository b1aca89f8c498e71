"""The files API on the real engine: binary round trips, and no way out of /workspace."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.workspaces.files import MKDIR_SCRIPT, RENAME_SCRIPT, STAT_SCRIPT
from tests.conftest import ApiClient, users

pytestmark = pytest.mark.engine


@pytest.fixture
def ws(real_api: ApiClient, make_repo: Callable[..., Path]) -> str:
    return str(real_api.create(make_repo())["id"])


def test_binary_round_trip_and_listing(real_api: ApiClient, ws: str) -> None:
    blob = os.urandom(300_000) + bytes(range(256))
    url = f"/api/v1/workspaces/{ws}/files"
    r = real_api.put(url, params={"path": "api/data/blob.bin"}, content=blob)
    assert r.status_code == 200 and r.json() == {"path": "/workspace/api/data/blob.bin",
                                                 "size": len(blob)}, r.text
    got = real_api.get(url, params={"path": "/workspace/api/data/blob.bin"})
    assert got.status_code == 200 and got.content == blob

    # The file belongs to dev, as if dev had written it.
    owner = real_api.exec(ws, "stat -c %U data/blob.bin")
    assert owner["stdout"] == "dev\n"

    listing = real_api.get(f"{url}/list", params={"path": "api"}).json()
    names = {e["name"]: e["type"] for e in listing["entries"]}
    assert listing["path"] == "/workspace/api"
    assert names["data"] == "dir" and names["README.md"] == "file" and names[".git"] == "dir"

    empty = real_api.put(url, params={"path": "empty"}, content=b"")
    assert empty.status_code == 200
    assert real_api.get(url, params={"path": "empty"}).content == b""


def test_delete_files_and_directories(real_api: ApiClient, ws: str) -> None:
    url = f"/api/v1/workspaces/{ws}/files"
    real_api.put(url, params={"path": "d/sub/f.txt"}, content=b"x")
    assert real_api.delete(url, params={"path": "d"}).json()["error"]["code"] == "not_empty"
    assert real_api.delete(url, params={"path": "d/sub/f.txt"}).status_code == 204
    assert real_api.get(url, params={"path": "d/sub/f.txt"}).status_code == 404
    assert real_api.delete(url, params={"path": "d", "recursive": "true"}).status_code == 204
    assert real_api.get(f"{url}/list", params={"path": "d"}).status_code == 404
    assert real_api.delete(url, params={"path": "/workspace"}).status_code == 403
    assert real_api.delete(url, params={"path": "nope"}).status_code == 404


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "api/../../etc/passwd",
                                  "/workspace/../etc/shadow"])
def test_paths_outside_workspace_are_refused(real_api: ApiClient, ws: str, path: str) -> None:
    url = f"/api/v1/workspaces/{ws}/files"
    for r in (real_api.get(url, params={"path": path}),
              real_api.put(url, params={"path": path}, content=b"pwned"),
              real_api.delete(url, params={"path": path}),
              real_api.get(f"{url}/list", params={"path": path})):
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "path_outside"
    assert "pwned" not in real_api.exec(ws, "cat /etc/passwd")["stdout"]


def test_symlinks_pointing_outside_are_refused(real_api: ApiClient, ws: str) -> None:
    real_api.exec(ws, "ln -s /etc/passwd /workspace/link && ln -s /etc /workspace/etc "
                      "&& ln -s /workspace/api/README.md /workspace/inside")
    url = f"/api/v1/workspaces/{ws}/files"
    for r in (real_api.get(url, params={"path": "link"}),
              real_api.put(url, params={"path": "link"}, content=b"pwned"),
              real_api.put(url, params={"path": "etc/new-file"}, content=b"pwned"),
              real_api.get(f"{url}/list", params={"path": "etc"})):
        assert r.status_code == 403, r.text
        assert r.json()["error"]["code"] == "path_outside"
    check = real_api.exec(ws, "cat /etc/passwd; ls /etc/new-file 2>&1")
    assert "pwned" not in check["stdout"] and "No such file" in check["stdout"]
    # A link that stays inside /workspace is fine, and deleting a link removes only the link.
    assert real_api.get(url, params={"path": "inside"}).content == b"# api\n"
    assert real_api.delete(url, params={"path": "link"}).status_code == 204
    assert real_api.exec(ws, "test -f /etc/passwd && echo ok")["stdout"] == "ok\n"


def test_file_errors(real_api: ApiClient, ws: str) -> None:
    url = f"/api/v1/workspaces/{ws}/files"
    assert real_api.get(url, params={"path": "missing"}).json()["error"]["code"] == "not_found"
    assert real_api.get(url, params={"path": "api"}).json()["error"]["code"] == "is_a_directory"
    r = real_api.get(f"{url}/list", params={"path": "api/README.md"})
    assert r.json()["error"]["code"] == "not_a_directory"
    real_api.exec(ws, "sudo install -d -o root -m 700 /workspace/private")
    assert real_api.put(url, params={"path": "private/x"}, content=b"x").status_code == 403


def _transfers(api: ApiClient) -> dict[str, int]:
    return dict(api.client.app.state.files.transfers)  # type: ignore[attr-defined]


def test_plain_files_go_through_the_host_and_both_sides_see_each_others_changes(
        real_api: ApiClient, ws: str) -> None:
    """Reads and writes of plain files are done in the volume's directory on the host (as
    dev); the sandbox sees a write at once even when it had the old file open and cached, and
    the host reads what the sandbox just wrote. Everything else is still the agent's."""
    url = f"/api/v1/workspaces/{ws}/files"
    before = _transfers(real_api)
    assert real_api.put(url, params={"path": "notes/a.txt"}, content=b"one").status_code == 200
    # The sandbox holds the file open and has read it; the host then replaces it.
    real_api.exec(ws, "exec 3< /workspace/notes/a.txt; cat <&3 > /tmp/seen; "
                      "nohup sh -c 'exec 3< /workspace/notes/a.txt; sleep 600' "
                      ">/dev/null 2>&1 &")
    assert real_api.put(url, params={"path": "notes/a.txt"}, content=b"two").status_code == 200
    seen = real_api.exec(ws, "cat /tmp/seen; echo; cat /workspace/notes/a.txt; echo; "
                             "stat -c '%U %G %a' /workspace/notes /workspace/notes/a.txt")
    assert seen["stdout"].split("\n") == ["one", "two", "dev dev 755", "dev dev 644", ""]
    # What the sandbox writes, the host reads at once (no wait: one exec, then the GET).
    real_api.exec(ws, "printf three > /workspace/notes/a.txt")
    assert real_api.get(url, params={"path": "notes/a.txt"}).content == b"three"
    after = _transfers(real_api)
    assert after.get("host", 0) - before.get("host", 0) == 3
    assert after.get("agent", 0) == before.get("agent", 0)

    # A link to an absolute path inside /workspace, a root-owned file dev may write: the
    # agent's (it resolves the link in the sandbox, it keeps the owner).
    real_api.exec(ws, "ln -s /workspace/notes/a.txt /workspace/abs; "
                      "sudo install -o root -m 666 /dev/null /workspace/rootfile")
    assert real_api.get(url, params={"path": "abs"}).content == b"three"
    assert real_api.put(url, params={"path": "rootfile"}, content=b"x").status_code == 200
    assert real_api.exec(ws, "stat -c %U /workspace/rootfile")["stdout"] == "root\n"
    assert _transfers(real_api).get("agent", 0) - after.get("agent", 0) == 2


# --- through the agent: large files stream, and the limit holds ------------------------------

MB = 1024 * 1024


@pytest.fixture
def limited_api(engine: None, make_settings: Callable[..., Settings],
                request: pytest.FixtureRequest) -> Iterator[ApiClient]:
    """An API whose file size limit is the test's ``file_max_bytes`` mark, and whose files
    calls must go through the agent (the exec scripts are made to fail)."""
    app = create_app(make_settings(file_max_bytes=request.param))
    with TestClient(app) as client:
        api = ApiClient(client, users(app))

        async def no_scripts(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a files call fell back to the exec scripts")

        app.state.files._run = no_scripts
        yield api
        for ws in list(app.state.workspaces.list_for(_admin_of(app))):
            client.delete(f"/api/v1/workspaces/{ws.id}", headers=api.h("root"))


def _admin_of(app: Any) -> Any:
    from tests.conftest import _admin

    return _admin(app)


@pytest.mark.parametrize("limited_api", [128 * MB], indirect=True)
def test_a_100_mb_file_streams_both_ways(limited_api: ApiClient,
                                         make_repo: Callable[..., Path]) -> None:
    api = limited_api
    ws = str(api.create(make_repo())["id"])
    url = f"/api/v1/workspaces/{ws}/files"
    blob = os.urandom(MB) * 100
    want = hashlib.sha256(blob).hexdigest()

    started = time.monotonic()
    r = api.put(url, params={"path": "big/blob.bin"}, content=blob)
    write_s = time.monotonic() - started
    assert r.status_code == 200 and r.json()["size"] == len(blob), r.text
    del blob

    started, digest, size = time.monotonic(), hashlib.sha256(), 0
    with api.client.stream("GET", url, params={"path": "big/blob.bin"},
                           headers=api.h()) as got:
        assert got.status_code == 200
        assert got.headers["content-length"] == str(100 * MB)
        for chunk in got.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
    read_s = time.monotonic() - started
    assert (size, digest.hexdigest()) == (100 * MB, want)
    inside = api.exec(ws, "sha256sum /workspace/big/blob.bin; stat -c %U big/blob.bin",
                      cwd="/workspace")
    assert inside["stdout"].split() == [want, "/workspace/big/blob.bin", "dev"]
    print(f"\n100 MB through the files API: write {100 / write_s:.0f} MB/s ({write_s:.2f} s), "
          f"read {100 / read_s:.0f} MB/s ({read_s:.2f} s)")


@pytest.mark.parametrize("limited_api", [1 * MB], indirect=True)
def test_a_body_over_the_limit_is_413_and_leaves_no_temporary_file(
        limited_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    api = limited_api
    ws = str(api.create(make_repo())["id"])
    url = f"/api/v1/workspaces/{ws}/files"
    api.put(url, params={"path": "keep.txt"}, content=b"old")

    # Declared too long: refused before the workspace is asked.
    r = api.put(url, params={"path": "keep.txt"}, content=b"x" * (MB + 1))
    assert (r.status_code, r.json()["error"]["code"]) == (413, "too_large"), r.text

    # Chunked (no length): refused once the body passes the limit; the agent's write,
    # which had made its temporary file, is closed before EOF and removes it.
    def body() -> Iterator[bytes]:
        for _ in range(3):
            yield os.urandom(MB)

    r = api.put(url, params={"path": "keep.txt"}, content=body())
    assert (r.status_code, r.json()["error"]["code"]) == (413, "too_large"), r.text
    assert api.get(url, params={"path": "keep.txt"}).content == b"old"
    leftovers = "?"
    for _ in range(50):  # the agent removes it as it reads the CLOSE: no waiting, usually
        leftovers = api.exec(ws, "find /workspace -name '.den-write-*'")["stdout"]
        if not leftovers:
            break
        time.sleep(0.1)
    assert leftovers == ""
    # A file exactly at the limit is fine.
    r = api.put(url, params={"path": "exact.bin"}, content=b"y" * MB)
    assert (r.status_code, r.json()["size"]) == (200, MB), r.text


# --- stat, mkdir, rename: through the agent, and through the exec scripts ---------------------


def _stat_mkdir_rename(api: ApiClient, ws: str) -> None:
    url = f"/api/v1/workspaces/{ws}/files"
    api.put(url, params={"path": "api/notes.txt"}, content=b"hello")
    r = api.get(f"{url}/stat", params={"path": "api/notes.txt"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["name"], got["type"], got["size"], got["mode"]) == ("notes.txt", "file", 5, "644")
    assert got["mtime"] > 1_600_000_000
    assert api.get(f"{url}/stat", params={"path": "api"}).json()["type"] == "dir"
    assert api.get(f"{url}/stat", params={"path": "."}).json()["type"] == "dir"
    assert api.get(f"{url}/stat", params={"path": "nope"}).status_code == 404

    def mkdir(path: str, parents: bool) -> Any:
        return api.post(f"{url}/mkdir", params={"path": path, "parents": str(parents).lower()})

    r = mkdir("d", False)
    assert (r.status_code, r.json()["name"], r.json()["type"]) == (201, "d", "dir"), r.text
    assert mkdir("d", False).json()["error"]["code"] == "exists"
    assert mkdir("d", True).status_code == 200
    assert mkdir("x/y/z", False).status_code == 404
    assert mkdir("x/y/z", True).status_code == 201
    assert mkdir("api/notes.txt", True).json()["error"]["code"] == "exists"
    assert mkdir("api/notes.txt/sub", False).json()["error"]["code"] == "not_a_directory"
    assert api.exec(ws, "stat -c %U /workspace/x/y/z")["stdout"] == "dev\n"

    def rename(src: str, dst: str) -> Any:
        return api.post(f"{url}/rename", json={"from": src, "to": dst})

    r = rename("api/notes.txt", "x/y/z/moved.txt")
    assert (r.status_code, r.json()["name"], r.json()["size"]) == (200, "moved.txt", 5), r.text
    assert api.get(url, params={"path": "x/y/z/moved.txt"}).content == b"hello"
    assert api.get(url, params={"path": "api/notes.txt"}).status_code == 404
    assert rename("x", "api").json()["error"]["code"] == "not_empty"  # api has files
    assert rename("x/y/z/moved.txt", "d").json()["error"]["code"] == "is_a_directory"
    assert rename("d", "x/y/z/moved.txt").json()["error"]["code"] == "not_a_directory"
    r = rename("x/y/z/moved.txt", "/tmp/moved.txt")
    assert (r.status_code, r.json()["error"]["code"]) == (403, "path_outside")
    assert rename("/workspace", "w2").status_code == 403
    # A symlink pointing outside: the link itself moves, its target stays as it was.
    api.exec(ws, "ln -s /etc/hostname /workspace/out && ln -s /etc /workspace/etc")
    r = rename("out", "d/out-link")
    assert (r.status_code, r.json()["type"]) == (200, "symlink"), r.text
    assert rename("d/out-link", "etc/hostname").json()["error"]["code"] == "path_outside"
    check = api.exec(ws, "readlink /workspace/d/out-link; test -e /workspace/out || echo gone; "
                         "test -f /etc/hostname && test ! -L /etc/hostname && echo kept")
    assert check["stdout"] == "/etc/hostname\ngone\nkept\n"


def test_stat_mkdir_rename_through_the_agent(real_api: ApiClient, ws: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_scripts(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a files call fell back to the exec scripts")

    monkeypatch.setattr(real_api.app.state.files, "_run", no_scripts)
    _stat_mkdir_rename(real_api, ws)


def test_stat_mkdir_rename_through_the_scripts(real_api: ApiClient, ws: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A workspace without the agent (created before it, or its agent unreachable)."""
    async def no_agent(*args: Any, **kwargs: Any) -> None:
        return None

    files = real_api.app.state.files
    scripts: list[str] = []
    run = files._run

    async def spy(ws_id: str, actor: str, argv: list[str], **kwargs: Any) -> Any:
        scripts.append(argv[2])
        return await run(ws_id, actor, argv, **kwargs)

    monkeypatch.setattr(real_api.app.state.workspaces.runtime, "agent", no_agent)
    monkeypatch.setattr(files, "_run", spy)
    _stat_mkdir_rename(real_api, ws)
    assert {STAT_SCRIPT, MKDIR_SCRIPT, RENAME_SCRIPT} <= set(scripts)


def _stream(api: ApiClient, ws: str, cmd: str) -> tuple[bytes, bytes, dict[str, Any]]:
    """stdout, stderr and the last message of ``cmd`` over ``WS .../exec/stream`` with
    ``"binary": true``."""
    out, err = bytearray(), bytearray()
    with api.client.websocket_connect(f"/api/v1/workspaces/{ws}/exec/stream",
                                      headers=api.h()) as sock:
        sock.send_json({"cmd": cmd, "binary": True})
        while True:
            msg = sock.receive()
            if msg.get("bytes") is not None:
                frame = msg["bytes"]
                assert frame[:1] in (b"\x01", b"\x02"), frame[:16]
                (out if frame[0] == 1 else err).extend(frame[1:])
                continue
            last: dict[str, Any] = json.loads(msg["text"])
            assert last["type"] in ("exit", "error"), last  # output never comes as text
            return bytes(out), bytes(err), last


def test_large_files_and_a_binary_stream(real_api: ApiClient, ws: str) -> None:
    """More than the agent's windows through the files API, and the same bytes back through
    ``WS .../exec/stream`` with ``"binary": true``: output only as binary frames, stdout and
    stderr apart, the exit code last."""
    url = f"/api/v1/workspaces/{ws}/files"
    blob = os.urandom(3 * 1024 * 1024 + 7)
    r = real_api.put(url, params={"path": "big.bin"}, content=blob)
    assert r.status_code == 200 and r.json()["size"] == len(blob), r.text
    assert real_api.get(url, params={"path": "big.bin"}).content == blob
    out, err, last = _stream(real_api, ws, "cat /workspace/big.bin; echo oops >&2; exit 3")
    assert (out == blob, err, last) == (True, b"oops\n", {"type": "exit", "exit_code": 3})
