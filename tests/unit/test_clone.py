"""Cloning untrusted repo URLs on the host: URL checks, real clones of local bare repos."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.errors import ValidationFailed
from server.git.clone import (
    CloneFailed,
    ExitWatch,
    RepoSource,
    _safe_config,
    clone,
    pack_for_workspace,
    validate_repo_url,
)
from server.outbound import DestinationRefused, OutboundPolicy

DEFAULT_SCHEMES = ["https", "ssh", "git"]
MiB = 1024 * 1024


def git(*args: str, cwd: Path | None = None) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.com"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def check(url: str, *, schemes: list[str] | None = None,
          roots: list[Path] | None = None) -> RepoSource:
    return validate_repo_url(
        url, allowed_schemes=DEFAULT_SCHEMES if schemes is None else schemes,
        local_roots=roots or [],
    )


# --- validate_repo_url: refusals ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("ext::sh -c touch% /tmp/pwned", "remote-helper"),
        ("ext::ssh -oProxyCommand=x host", "remote-helper"),
        ("fd::17", "remote-helper"),
        ("fd::0,1/x", "remote-helper"),
        ("git::https://forge.example/a.git", "remote-helper"),
        ("--upload-pack=touch /tmp/pwned", "start with '-'"),
        ("-u touch /tmp/pwned", "start with '-'"),
        ("--config=core.sshCommand=evil", "start with '-'"),
        ("https://forge.example/a\nb.git", "control characters"),
        ("https://forge.example/a\rb.git", "control characters"),
        ("https://forge.example/a\x00b.git", "control characters"),
        ("https://forge.example/a\x7fb.git", "control characters"),
        ("https://forge.example/a\tb.git", "control characters"),
        ("https://forge.example/" + "a" * 2100, "too long"),
        ("https://alice:hunter2@forge.example/acme/api.git", "password"),
        ("ssh://git:pw@forge.example/acme/api.git", "password"),
        ("http://forge.example/acme/api.git", "scheme 'http' is not allowed"),
        ("ftp://forge.example/acme/api.git", "scheme 'ftp' is not allowed"),
        ("gopher://forge.example/api.git", "not allowed"),
        ("https:///acme/api.git", "no host"),
        ("relative/path/api.git", "not a URL Den understands"),
        ("api.git", "not a URL Den understands"),
    ],
)
def test_refused_urls(url: str, why: str) -> None:
    with pytest.raises(ValidationFailed, match=why) as info:
        check(url)
    assert info.value.status_code == 422


def test_password_is_not_echoed_back() -> None:
    with pytest.raises(ValidationFailed) as info:
        check("https://alice:hunter2@forge.example/acme/api.git")
    assert "hunter2" not in info.value.message


def test_http_only_when_the_operator_allows_it() -> None:
    assert check("http://forge.example/a.git", schemes=["http"]) == RepoSource(
        "http://forge.example/a.git", "http")


def test_scp_like_refused_when_ssh_is_not_allowed() -> None:
    with pytest.raises(ValidationFailed, match="ssh"):
        check("git@forge.example:acme/api.git", schemes=["https"])
    with pytest.raises(ValidationFailed, match="not allowed"):
        check("ssh://git@forge.example/acme/api.git", schemes=["https"])


def test_ssh_host_that_is_an_option_is_refused() -> None:
    # git itself blocks "-o..." ssh host names; Den should refuse them before git runs.
    with pytest.raises(ValidationFailed):
        check("ssh://-oProxyCommand=touch%20pwned/acme/api.git")


def test_local_repositories_are_refused_when_no_roots_are_configured(
        make_repo: Callable[..., Path]) -> None:
    bare = make_repo()
    for url in (str(bare), f"file://{bare}"):
        with pytest.raises(ValidationFailed, match="local repositories are disabled"):
            check(url, roots=[])


def test_local_paths_outside_the_roots_are_refused(tmp_path: Path, repos_root: Path) -> None:
    outside = tmp_path / "elsewhere" / "api.git"
    outside.mkdir(parents=True)
    sibling = tmp_path / "repos-evil" / "api.git"  # shares the root's name as a prefix
    sibling.mkdir(parents=True)
    for url in (
        str(outside),
        f"file://{outside}",
        str(sibling),
        f"{repos_root}/../elsewhere/api.git",
        f"file://{repos_root}/../elsewhere/api.git",
        "/etc",
        "file:///etc/passwd",
    ):
        with pytest.raises(ValidationFailed, match="outside the allowed roots"):
            check(url, roots=[repos_root])


def test_symlink_out_of_the_root_is_refused(tmp_path: Path, repos_root: Path) -> None:
    target = tmp_path / "secret.git"
    target.mkdir()
    (repos_root / "link.git").symlink_to(target)
    with pytest.raises(ValidationFailed, match="outside the allowed roots"):
        check(str(repos_root / "link.git"), roots=[repos_root])


def test_missing_local_repository(repos_root: Path) -> None:
    with pytest.raises(ValidationFailed, match="does not exist"):
        check(str(repos_root / "nope.git"), roots=[repos_root])


# --- validate_repo_url: acceptances ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://forge.example/acme/api.git", "https"),
        ("  https://forge.example/acme/api.git  ", "https"),
        ("HTTPS://forge.example/acme/api.git", "https"),
        ("https://token@forge.example/acme/api.git", "https"),
        ("ssh://git@forge.example:2222/acme/api.git", "ssh"),
        ("git+ssh://git@forge.example/acme/api.git", "ssh"),
        ("git://forge.example/acme/api.git", "git"),
        ("git@forge.example:acme/api.git", "ssh"),
        ("forge.example:acme/api.git", "ssh"),
    ],
)
def test_accepted_urls(url: str, kind: str) -> None:
    src = check(url)
    assert src == RepoSource(url=url.strip(), kind=kind)


def test_allowed_local_path_and_file_url(make_repo: Callable[..., Path],
                                         repos_root: Path) -> None:
    bare = make_repo()
    real = str(bare.resolve())
    assert check(str(bare), roots=[repos_root]) == RepoSource(real, "file")
    assert check(f"file://{bare}", roots=[repos_root]) == RepoSource(real, "file")
    assert check(f"{bare}/", roots=[repos_root]) == RepoSource(real, "file")


# --- the git config every clone runs under --------------------------------------------------


def test_safe_config_switches_off_code_running_features() -> None:
    opts = _safe_config("https")
    pairs = dict(v.split("=", 1) for k, v in zip(opts[::2], opts[1::2], strict=True)
                 if k == "-c")
    assert len(pairs) * 2 == len(opts)
    assert pairs["core.hooksPath"] == "/dev/null"
    assert pairs["core.fsmonitor"] == "false"
    assert pairs["submodule.recurse"] == "false"
    assert pairs["protocol.allow"] == "never"
    assert pairs["protocol.https.allow"] == "always"
    assert pairs["credential.helper"] == ""
    assert not any(k.startswith("protocol.") and k.endswith(".allow") and v == "always"
                   and k != "protocol.https.allow" for k, v in pairs.items())


# --- real clones -------------------------------------------------------------------------------


def _clone(bare: Path, dest: Path, *, branch: str | None = None,
           max_bytes: int = 64 * MiB, roots: list[Path] | None = None) -> str:
    src = check(str(bare), roots=roots or [bare.parent])
    return clone(src, branch=branch, dest=dest, timeout_s=60, max_bytes=max_bytes)


def test_clone_returns_the_default_branch(make_repo: Callable[..., Path],
                                          tmp_path: Path) -> None:
    bare = make_repo("api", {"README.md": "hello\n", "src/app.py": "print(1)\n"})
    dest = tmp_path / "out"
    assert _clone(bare, dest) == "main"
    assert (dest / "README.md").read_text() == "hello\n"
    assert (dest / "src" / "app.py").read_text() == "print(1)\n"


def test_clone_of_a_named_branch(make_repo: Callable[..., Path], tmp_path: Path) -> None:
    bare = make_repo("lib", branch="trunk")
    src = tmp_path / "work"
    git("clone", "-q", str(bare), str(src))
    git("checkout", "-q", "-b", "feature", cwd=src)
    (src / "feature.txt").write_text("f\n")
    git("add", "-A", cwd=src)
    git("commit", "-q", "-m", "feature", cwd=src)
    git("push", "-q", "origin", "feature", cwd=src)

    assert _clone(bare, tmp_path / "a") == "trunk"
    assert not (tmp_path / "a" / "feature.txt").exists()
    assert _clone(bare, tmp_path / "b", branch="feature") == "feature"
    assert (tmp_path / "b" / "feature.txt").read_text() == "f\n"


def test_clone_of_a_missing_branch_fails_with_gits_reason(make_repo: Callable[..., Path],
                                                          tmp_path: Path) -> None:
    bare = make_repo()
    dest = tmp_path / "out"
    with pytest.raises(CloneFailed) as info:
        _clone(bare, dest, branch="no-such-branch")
    assert info.value.status_code == 422
    assert "no-such-branch" in info.value.message
    assert "not found" in info.value.message
    assert not dest.exists()


@pytest.mark.parametrize("branch", ["-b", "--upload-pack=x", " ", ""])
def test_clone_refuses_option_like_branches(make_repo: Callable[..., Path], tmp_path: Path,
                                            branch: str) -> None:
    bare = make_repo()
    with pytest.raises(ValidationFailed, match="invalid branch"):
        _clone(bare, tmp_path / "out", branch=branch)
    assert not (tmp_path / "out").exists()


def test_clone_over_the_size_limit_fails_and_leaves_nothing(make_repo: Callable[..., Path],
                                                            tmp_path: Path) -> None:
    bare = make_repo("big", {"blob.txt": "x" * 200_000})
    dest = tmp_path / "out"
    with pytest.raises(CloneFailed, match="larger than"):
        _clone(bare, dest, max_bytes=1024)
    assert not dest.exists()


def test_clone_of_a_path_that_is_not_a_repository(repos_root: Path, tmp_path: Path) -> None:
    (repos_root / "empty").mkdir()
    dest = tmp_path / "out"
    with pytest.raises(CloneFailed, match="failed"):
        _clone(repos_root / "empty", dest, roots=[repos_root])
    assert not dest.exists()


def _write_hook(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho ran >> {marker}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_clone_runs_no_hooks_of_the_source_repository(make_repo: Callable[..., Path],
                                                      tmp_path: Path) -> None:
    marker = tmp_path / "hook-ran"
    bare = make_repo("hooked", {"README.md": "x\n", "hooks/post-checkout": "#!/bin/sh\n"})
    for hook in ("post-checkout", "post-merge", "pre-upload-pack", "reference-transaction"):
        _write_hook(bare / "hooks" / hook, marker)
    # prove the hook works when git is allowed to run it
    git("--git-dir", str(bare), "update-ref", "refs/heads/probe", "HEAD")
    assert marker.exists(), "the probe hook should run under plain git"
    marker.unlink()

    dest = tmp_path / "out"
    assert _clone(bare, dest) == "main"
    assert not marker.exists()
    assert (dest / "README.md").exists()
    # the clone's own hooks dir holds nothing runnable either
    hooks = dest / ".git" / "hooks"
    runnable = [p.name for p in hooks.iterdir() if not p.name.endswith(".sample")] \
        if hooks.exists() else []
    assert runnable == []


def test_clone_does_not_run_an_ssh_proxy_command(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    src = RepoSource(url=f"ssh://-oProxyCommand=touch%20{marker}/x.git", kind="ssh")
    with pytest.raises((CloneFailed, DestinationRefused)):
        clone(src, branch=None, dest=tmp_path / "out", timeout_s=30, max_bytes=MiB)
    assert not marker.exists()


def test_pack_for_workspace_owns_every_entry_by_the_workspace_user(
        make_repo: Callable[..., Path], tmp_path: Path) -> None:
    bare = make_repo("api", {"README.md": "x\n", "a/b/c.txt": "c\n"})
    repo = tmp_path / "repo"
    _clone(bare, repo)
    os.symlink("README.md", repo / "link")
    out = tmp_path / "seed.tar"
    pack_for_workspace(repo, arcname="api", out=out)
    with tarfile.open(out) as tar:
        members = tar.getmembers()
    names = {m.name for m in members}
    assert {"api", "api/README.md", "api/a/b/c.txt", "api/link", "api/.git/HEAD"} <= names
    assert all(m.name == "api" or m.name.startswith("api/") for m in members)
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(1000, 1000, "dev", "dev")}
    link = next(m for m in members if m.name == "api/link")
    assert link.issym() and link.linkname == "README.md"


@contextlib.contextmanager
def silent_git_server() -> Iterator[tuple[RepoSource, list[socket.socket]]]:
    """A git:// server that accepts and never answers: its source, and the connections it
    holds (one, once git has connected)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    try:
        yield validate_repo_url(f"git://127.0.0.1:{port}/slow.git", allowed_schemes=["git"],
                                local_roots=[]), held
    finally:
        for s in [*held, listener]:
            s.close()


def test_a_clone_that_hangs_is_killed_at_the_time_limit(tmp_path: Path) -> None:
    """A git:// server that accepts and never answers: the clone stops at timeout_s."""
    with silent_git_server() as (source, _held):
        with pytest.raises(CloneFailed, match="took longer than 1 s"):
            clone(source, branch=None, dest=tmp_path / "out", timeout_s=1, max_bytes=MiB,
                  outbound=OutboundPolicy.of(["127.0.0.1"]))
        assert not (tmp_path / "out").exists()


def test_a_clone_whose_workspace_is_deleted_stops_at_once(tmp_path: Path) -> None:
    """A delete cancels the create and waits for its clone's thread (server/runtime/
    inflight.py): git is killed at once, not at the time limit, and its files go."""
    import asyncio

    from server.runtime import inflight

    async def delete_while_cloning(source: RepoSource, held: list[socket.socket]) -> bool:
        calls = inflight.Calls()
        cloning = asyncio.create_task(inflight.to_thread(
            clone, source, branch=None, dest=tmp_path / "out", timeout_s=120, max_bytes=MiB,
            outbound=OutboundPolicy.of(["127.0.0.1"])), context=inflight.tracking(calls))
        for _ in range(600):  # until git has connected
            if held:
                break
            await asyncio.sleep(0.05)
        cloning.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cloning
        return await calls.settled(30)  # well before the 120 s limit

    with silent_git_server() as (source, held):
        assert asyncio.run(delete_while_cloning(source, held))
        assert held, "git never connected"
        assert not (tmp_path / "out").exists()


def test_the_clone_gets_a_clean_environment(make_repo: Callable[..., Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11, finding 8: git ran with the server's whole environment (GitPython merges
    os.environ), secrets and the caller's GIT_*, XDG and proxy variables included."""
    bare = make_repo()
    trace = tmp_path / "trace"
    xdg = tmp_path / "xdg"
    (xdg / "git").mkdir(parents=True)
    (xdg / "git" / "config").write_text(f"[url \"/nonexistent/\"]\n\tinsteadOf = {bare}\n")
    monkeypatch.setenv("GIT_TRACE", str(trace))  # a git that sees it writes there
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    monkeypatch.setenv("GIT_CONFIG_PARAMETERS", "'core.hookspath=/tmp/evil'")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    assert _clone(bare, tmp_path / "out") == "main"
    assert not trace.exists()


def test_exit_watch_wakes_when_the_child_ends() -> None:
    """The clone's wait: not done while git runs, done once it has exited (through a pidfd
    on Linux, which wakes at the exit instead of at Popen.wait's polling steps)."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    watch = ExitWatch(child)
    try:
        if sys.platform == "linux":
            assert watch._fd is not None
        assert not watch.within(0.05)
        assert child.stdin is not None
        child.stdin.close()  # the child ends now
        assert watch.within(30)
        assert child.returncode == 0
    finally:
        watch.close()
        watch.close()  # idempotent
        if child.poll() is None:
            child.kill()
            child.wait()
