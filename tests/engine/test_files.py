"""The files API on the real engine: binary round trips, and no way out of /workspace."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ApiClient

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
