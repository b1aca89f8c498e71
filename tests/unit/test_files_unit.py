"""The files API's pure parts (path normalisation, listing parser, exit-code contract) and its
routes over a scripted fake runtime."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from server.errors import (
    Conflict,
    DenError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ValidationFailed,
)
from server.runtime.base import ExecRequest, ExecResult, WorkspaceSpec
from server.runtime.fake import FakeRuntime
from server.workspaces.files import (
    DELETE_SCRIPT,
    LIST_SCRIPT,
    MKDIR_SCRIPT,
    READ_SCRIPT,
    RENAME_SCRIPT,
    STAT_SCRIPT,
    WRITE_SCRIPT,
    FileEntry,
    _raise_for,
    parse_listing,
    script_argv,
)
from server.workspaces.service import path_in_workspace
from tests.conftest import ApiClient

# --- path_in_workspace --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("", "/workspace"),
        (".", "/workspace"),
        ("./", "/workspace"),
        ("api", "/workspace/api"),
        ("api/README.md", "/workspace/api/README.md"),
        ("api/./src//app.py", "/workspace/api/src/app.py"),
        ("api/../other/x", "/workspace/other/x"),
        ("a/b/../../c", "/workspace/c"),
        ("~/x", "/workspace/~/x"),
        ("/workspace", "/workspace"),
        ("/workspace/", "/workspace"),
        ("/workspace/api/x.txt", "/workspace/api/x.txt"),
        ("/workspace/api/../x", "/workspace/x"),
        ("name with spaces\tand\nnewline", "/workspace/name with spaces\tand\nnewline"),
    ],
)
def test_paths_inside_the_workspace(path: str, expected: str) -> None:
    assert path_in_workspace(path) == expected


@pytest.mark.parametrize(
    "path",
    [
        "..",
        "../",
        "../etc/passwd",
        "api/../../etc/passwd",
        "a/b/../../../x",
        "/",
        "/etc/passwd",
        "/workspacefoo",
        "/workspace-other/x",
        "/workspace/../etc",
        "/workspace/api/../../root",
        "/tmp/../workspace/../etc",
        "//workspace/../etc",
    ],
)
def test_paths_outside_the_workspace_are_refused(path: str) -> None:
    # the same answer as when the sandbox's realpath check refuses (exit code 3)
    with pytest.raises(Forbidden) as info:
        path_in_workspace(path)
    assert info.value.code == "path_outside"
    assert info.value.status_code == 403


@pytest.mark.parametrize("path", ["a\x00b", "\x00", "/workspace/x\x00/../../etc"])
def test_nul_in_a_path_is_refused(path: str) -> None:
    with pytest.raises(ValidationFailed, match="NUL"):
        path_in_workspace(path)


# --- parse_listing ------------------------------------------------------------------------------


def test_parse_listing_of_crafted_output() -> None:
    raw = (
        b"f\t12\t1700000000.25\t644\tREADME.md\0"
        b"d\t4096\t1700000001.0000000000\t755\tsrc\0"
        b"l\t9\t1700000002.5\t777\tlink\0"
        b"f\t3\t5.0\t600\tname\twith\ttabs\0"
        b"f\t4\t6.0\t640\tline\nbreak\0"
        b"p\t0\t7.0\t644\tfifo\0"
        b"f\t0\t8.0\t644\t .hidden \0"
    )
    assert parse_listing(raw) == [
        FileEntry(name=" .hidden ", type="file", size=0, mtime=8.0, mode="644"),
        FileEntry(name="README.md", type="file", size=12, mtime=1700000000.25, mode="644"),
        FileEntry(name="fifo", type="other", size=0, mtime=7.0, mode="644"),
        FileEntry(name="line\nbreak", type="file", size=4, mtime=6.0, mode="640"),
        FileEntry(name="link", type="symlink", size=9, mtime=1700000002.5, mode="777"),
        FileEntry(name="name\twith\ttabs", type="file", size=3, mtime=5.0, mode="600"),
        FileEntry(name="src", type="dir", size=4096, mtime=1700000001.0, mode="755"),
    ]


def test_parse_listing_of_nothing() -> None:
    assert parse_listing(b"") == []
    assert parse_listing(b"\0") == []


def test_parse_listing_keeps_non_utf8_names_distinct() -> None:
    entries = parse_listing(b"f\t1\t1.0\t644\ta\xffb\0f\t1\t1.0\t644\ta\xfeb\0")
    assert len({e.name for e in entries}) == 2


# --- the exit-code contract between the scripts and FileService ----------------------------------


@pytest.mark.parametrize(
    ("code", "stderr", "error", "slug"),
    [
        (2, b"", NotFound, "not_found"),
        (3, b"", Forbidden, "path_outside"),
        (4, b"", ValidationFailed, "is_a_directory"),
        (5, b"", PayloadTooLarge, "too_large"),
        (6, b"", Forbidden, "forbidden"),
        (7, b"", Conflict, "not_empty"),
        (8, b"", Conflict, "exists"),
        (9, b"", ValidationFailed, "not_a_directory"),
        (1, b"mkdir: cannot create directory '/workspace/f': Not a directory\n",
         ValidationFailed, "not_a_directory"),
        (1, b"cat: /workspace/x: Permission denied\n", Forbidden, "forbidden"),
        (1, b"cat: write error: No space left on device\n", DenError, "disk_full"),
        (1, b"something odd\n", ValidationFailed, "invalid"),
    ],
)
def test_exit_codes_map_to_errors(code: int, stderr: bytes, error: type[DenError],
                                  slug: str) -> None:
    with pytest.raises(error) as info:
        _raise_for(ExecResult(code, b"", stderr), "/workspace/x")
    assert info.value.code == slug


def test_exit_code_4_when_a_directory_is_wanted() -> None:
    with pytest.raises(ValidationFailed) as info:
        _raise_for(ExecResult(4, b"", b""), "/workspace/x", want_dir=True)
    assert info.value.code == "not_a_directory"


def test_exit_codes_of_a_rename_say_rename() -> None:
    with pytest.raises(Forbidden, match="cannot be renamed"):
        _raise_for(ExecResult(6, b"", b""), "/workspace/x", op="rename")
    with pytest.raises(Conflict, match="target is a directory that is not empty") as info:
        _raise_for(ExecResult(7, b"", b""), "/workspace/x", op="rename")
    assert info.value.code == "not_empty"


def test_exit_code_0_is_success() -> None:
    _raise_for(ExecResult(0, b"data", b""), "/workspace/x")


def test_script_argv_passes_paths_as_arguments_not_code() -> None:
    argv = script_argv(READ_SCRIPT, "/workspace/$(reboot)", "10")
    assert argv == ["/bin/sh", "-c", READ_SCRIPT, "den-files", "/workspace/$(reboot)", "10"]
    for script in (READ_SCRIPT, WRITE_SCRIPT, LIST_SCRIPT, DELETE_SCRIPT, STAT_SCRIPT,
                   MKDIR_SCRIPT, RENAME_SCRIPT):
        assert "/workspace|/workspace/*) ;; *) exit 3" in script
        assert '"$1"' in script


def test_the_new_scripts_check_every_path_they_touch() -> None:
    # stat and rename act on the entry itself: its directory resolved, its name kept
    assert STAT_SCRIPT == (
        'd=$(realpath -e -- "$(dirname -- "$1")") || exit 2; p="${d%/}/$(basename -- "$1")"; '
        'case "$p" in /workspace|/workspace/*) ;; *) exit 3;; esac; '
        '[ -e "$p" ] || [ -L "$p" ] || exit 2; '
        "exec find \"$p\" -maxdepth 0 -printf '%y\\t%s\\t%T@\\t%m\\t%f\\0'"
    )
    assert MKDIR_SCRIPT.startswith('p=$(realpath -m -- "$1") || exit 2; case "$p" in ')
    assert 'case "$s" in /workspace|/workspace/*) ;; *) exit 3;; esac; ' in RENAME_SCRIPT
    assert 'case "$t" in /workspace|/workspace/*) ;; *) exit 3;; esac; ' in RENAME_SCRIPT
    assert RENAME_SCRIPT.index('case "$t"') < RENAME_SCRIPT.index("mv -f -T")
    assert '[ "$s" = /workspace ] && exit 6; ' in RENAME_SCRIPT
    assert '[ "$t" = /workspace ] && exit 6; ' in RENAME_SCRIPT


# --- the routes over a scripted runtime ---------------------------------------------------------


@dataclass
class ScriptedRuntime(FakeRuntime):
    """The fake, plus canned replies to the files scripts (``den-files`` argv)."""

    replies: list[ExecResult] = field(default_factory=list)
    seen: list[ExecRequest] = field(default_factory=list)

    async def exec(self, spec: WorkspaceSpec, req: ExecRequest) -> ExecResult:
        argv = list(req.argv)
        if argv[:2] == ["/bin/sh", "-c"] and argv[3:4] == ["den-files"]:
            await super().exec(spec, ExecRequest(argv=["true"]))  # running check
            self.seen.append(req)
            return self.replies.pop(0)
        return await super().exec(spec, req)


@pytest.fixture
def fake_runtime() -> ScriptedRuntime:
    return ScriptedRuntime()


@pytest.fixture
def files_url(fake_api: ApiClient, make_repo: Callable[..., Path]) -> str:
    ws = fake_api.create(make_repo("api"), name="api")
    assert ws["state"] == "running"
    return f"/api/v1/workspaces/{ws['id']}/files"


def test_read_write_list_delete_through_the_routes(fake_api: ApiClient, files_url: str,
                                                   fake_runtime: ScriptedRuntime) -> None:
    fake_runtime.replies = [
        ExecResult(0, b"hello\n", b""),
        ExecResult(0, b"5\n", b""),
        ExecResult(0, b"f\t6\t1.5\t644\tREADME.md\0d\t0\t2.0\t755\tsrc\0", b""),
        ExecResult(0, b"", b""),
    ]
    r = fake_api.get(files_url, params={"path": "api/README.md"})
    assert (r.status_code, r.content) == (200, b"hello\n")
    r = fake_api.put(files_url, params={"path": "/workspace/api/new.txt"}, content=b"hello")
    assert (r.status_code, r.json()) == (200, {"path": "/workspace/api/new.txt", "size": 5})
    r = fake_api.get(f"{files_url}/list", params={"path": "api"})
    assert r.status_code == 200
    assert r.json() == {"path": "/workspace/api", "entries": [
        {"name": "README.md", "type": "file", "size": 6, "mtime": 1.5, "mode": "644"},
        {"name": "src", "type": "dir", "size": 0, "mtime": 2.0, "mode": "755"},
    ], "truncated": False}
    r = fake_api.delete(files_url, params={"path": "api/src", "recursive": "true"})
    assert r.status_code == 204

    read, write, listing, delete = fake_runtime.seen
    assert list(read.argv[2:]) == [READ_SCRIPT, "den-files", "/workspace/api/README.md",
                                   str(64 * 1024 * 1024)]
    assert list(write.argv[2:]) == [WRITE_SCRIPT, "den-files", "/workspace/api/new.txt"]
    assert write.stdin == b"hello"
    assert list(listing.argv[2:]) == [LIST_SCRIPT, "den-files", "/workspace/api"]
    assert list(delete.argv[2:]) == [DELETE_SCRIPT, "den-files", "/workspace/api/src", "1"]
    assert {(r.user, r.cwd) for r in fake_runtime.seen} == {("dev", "/workspace")}


def test_file_errors_through_the_routes(fake_api: ApiClient, files_url: str,
                                        fake_runtime: ScriptedRuntime) -> None:
    fake_runtime.replies = [ExecResult(2, b"", b""), ExecResult(3, b"", b""),
                            ExecResult(5, b"", b""), ExecResult(7, b"", b"")]
    cases = [
        (fake_api.get(files_url, params={"path": "nope"}), 404, "not_found"),
        (fake_api.get(files_url, params={"path": "link-out"}), 403, "path_outside"),
        (fake_api.get(files_url, params={"path": "huge"}), 413, "too_large"),
        (fake_api.delete(files_url, params={"path": "dir"}), 409, "not_empty"),
    ]
    for r, status, code in cases:
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def test_paths_outside_are_refused_before_the_engine(fake_api: ApiClient, files_url: str,
                                                     fake_runtime: ScriptedRuntime) -> None:
    for r in (
        fake_api.get(files_url, params={"path": "../etc/passwd"}),
        fake_api.get(f"{files_url}/list", params={"path": "/etc"}),
        fake_api.put(files_url, params={"path": "/etc/cron.d/x"}, content=b"x"),
        fake_api.delete(files_url, params={"path": "../../root"}),
    ):
        assert (r.status_code, r.json()["error"]["code"]) == (403, "path_outside"), r.text
    r = fake_api.put(files_url, params={"path": "/workspace"}, content=b"x")
    assert r.status_code == 422
    assert fake_runtime.seen == []


def test_listing_a_directory_with_a_non_utf8_name(fake_api: ApiClient, files_url: str,
                                                  fake_runtime: ScriptedRuntime) -> None:
    # anything in the sandbox can create such a file: `touch $'a\xffb'`
    fake_runtime.replies = [ExecResult(0, b"f\t1\t1.0\t644\ta\xffb\0f\t1\t1.0\t644\tok\0", b"")]
    r = fake_api.get(f"{files_url}/list", params={"path": "api"})
    assert r.status_code == 200, r.text
    names: list[Any] = [e["name"] for e in r.json()["entries"]]
    assert len(names) == 2 and "ok" in names


# --- stat, mkdir, rename ------------------------------------------------------------------------

ENTRY = {"name": "src", "type": "dir", "size": 4096, "mtime": 2.5, "mode": "755"}


def test_stat_mkdir_rename_through_the_routes(fake_api: ApiClient, files_url: str,
                                              fake_runtime: ScriptedRuntime) -> None:
    record = b"d\t4096\t2.5\t755\tsrc\0"
    fake_runtime.replies = [
        ExecResult(0, record, b""),
        ExecResult(0, b"+" + record, b""),
        ExecResult(0, b"=" + record, b""),
        ExecResult(0, b"f\t6\t1.5\t644\tNEW.md\0", b""),
    ]
    r = fake_api.get(f"{files_url}/stat", params={"path": "api/src"})
    assert (r.status_code, r.json()) == (200, ENTRY)
    r = fake_api.post(f"{files_url}/mkdir", params={"path": "/workspace/api/src"})
    assert (r.status_code, r.json()) == (201, ENTRY)
    r = fake_api.post(f"{files_url}/mkdir", params={"path": "api/src", "parents": "true"})
    assert (r.status_code, r.json()) == (200, ENTRY)
    r = fake_api.post(f"{files_url}/rename", json={"from": "api/README.md", "to": "api/NEW.md"})
    assert (r.status_code, r.json()) == (200, {"name": "NEW.md", "type": "file", "size": 6,
                                               "mtime": 1.5, "mode": "644"})

    stat, made, found, rename = fake_runtime.seen
    assert list(stat.argv[2:]) == [STAT_SCRIPT, "den-files", "/workspace/api/src"]
    assert list(made.argv[2:]) == [MKDIR_SCRIPT, "den-files", "/workspace/api/src", "0"]
    assert list(found.argv[2:]) == [MKDIR_SCRIPT, "den-files", "/workspace/api/src", "1"]
    assert list(rename.argv[2:]) == [RENAME_SCRIPT, "den-files", "/workspace/api/README.md",
                                     "/workspace/api/NEW.md"]
    assert {(r.user, r.cwd) for r in fake_runtime.seen} == {("dev", "/workspace")}


def test_stat_mkdir_rename_errors_through_the_routes(fake_api: ApiClient, files_url: str,
                                                     fake_runtime: ScriptedRuntime) -> None:
    fake_runtime.replies = [ExecResult(2, b"", b""), ExecResult(3, b"", b""),
                            ExecResult(8, b"", b""), ExecResult(9, b"", b""),
                            ExecResult(7, b"", b""), ExecResult(3, b"", b""),
                            ExecResult(6, b"", b"")]
    cases = [
        (fake_api.get(f"{files_url}/stat", params={"path": "nope"}), 404, "not_found"),
        (fake_api.get(f"{files_url}/stat", params={"path": "out/x"}), 403, "path_outside"),
        (fake_api.post(f"{files_url}/mkdir", params={"path": "f"}), 409, "exists"),
        (fake_api.post(f"{files_url}/mkdir", params={"path": "f/d"}), 422, "not_a_directory"),
        (fake_api.post(f"{files_url}/rename", json={"from": "a", "to": "full"}), 409,
         "not_empty"),
        (fake_api.post(f"{files_url}/rename", json={"from": "a", "to": "out/a"}), 403,
         "path_outside"),
        (fake_api.post(f"{files_url}/rename", json={"from": "a", "to": "root/workspace"}),
         403, "forbidden"),
    ]
    for r, status, code in cases:
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert fake_runtime.replies == []


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"from": "a", "to": "/etc/a"}, 403, "path_outside"),
        ({"from": "a", "to": "../a"}, 403, "path_outside"),
        ({"from": "/etc/passwd", "to": "a"}, 403, "path_outside"),
        ({"from": "/workspace", "to": "a"}, 403, "forbidden"),
        ({"from": ".", "to": "a"}, 403, "forbidden"),
        ({"from": "a", "to": "/workspace/"}, 403, "forbidden"),
        ({"from": "a", "to": "api/.."}, 403, "forbidden"),
        ({"from": "a\u0000", "to": "b"}, 422, "invalid"),
        ({"from": "a"}, 422, "invalid"),
        ({"to": "a"}, 422, "invalid"),
        ({"src": "a", "to": "b"}, 422, "invalid"),
        ({"from": "a", "to": "b", "overwrite": True}, 422, "invalid"),
        ({"from": 1, "to": "b"}, 422, "invalid"),
        ({"from": ["a"], "to": "b"}, 422, "invalid"),
        ({"from": "a", "to": "x" * 5000}, 422, "invalid"),
    ],
)
def test_rename_bodies_refused_before_the_engine(fake_api: ApiClient, files_url: str,
                                                  fake_runtime: ScriptedRuntime,
                                                  body: dict[str, Any], status: int,
                                                  code: str) -> None:
    r = fake_api.post(f"{files_url}/rename", json=body)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert fake_runtime.seen == []


def test_stat_and_mkdir_outside_are_refused_before_the_engine(
        fake_api: ApiClient, files_url: str, fake_runtime: ScriptedRuntime) -> None:
    for r in (
        fake_api.get(f"{files_url}/stat", params={"path": "/etc/passwd"}),
        fake_api.get(f"{files_url}/stat", params={"path": "../workspace2"}),
        fake_api.post(f"{files_url}/mkdir", params={"path": "../x", "parents": "true"}),
        fake_api.post(f"{files_url}/mkdir", params={"path": "/tmp/x"}),
    ):
        assert (r.status_code, r.json()["error"]["code"]) == (403, "path_outside"), r.text
    assert fake_api.get(f"{files_url}/stat").status_code == 422  # path is required
    r = fake_api.post(f"{files_url}/mkdir", params={"path": "d", "parents": "maybe"})
    assert r.status_code == 422
    assert fake_runtime.seen == []


def test_stat_mkdir_rename_need_a_token(fake_api: ApiClient, files_url: str) -> None:
    for r in (
        fake_api.client.get(f"{files_url}/stat", params={"path": "a"}),
        fake_api.client.post(f"{files_url}/mkdir", params={"path": "a"}),
        fake_api.client.post(f"{files_url}/rename", json={"from": "a", "to": "b"}),
    ):
        assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized"), r.text
