"""Seeding from the host (server/runtime/host_seed.py): Den's packed clone written under a
directory the sandbox shares, never through a link and never into anything that was there."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from server.git.clone import WORKSPACE_GID, WORKSPACE_UID, pack_for_workspace
from server.runtime.host_seed import SeedRefused, extract


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "src"
    (repo / "pkg" / "deep").mkdir(parents=True)
    (repo / "README.md").write_text("hello\n")
    (repo / "pkg" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (repo / "pkg" / "run.sh").chmod(0o755)
    (repo / "pkg" / "deep" / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 7))
    (repo / "empty").mkdir()
    (repo / "link").symlink_to("pkg/run.sh")
    (repo / "escape").symlink_to("/etc/passwd")  # stored as a link, never followed
    os.utime(repo / "README.md", (1_600_000_000, 1_600_000_000))
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    return repo


def _entries(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """path -> (kind and mode, uid, gid, content or link target) of every entry under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            what = (os.readlink(p) if p.is_symlink() else
                    p.read_bytes().hex()[:64] + str(st.st_size) if p.is_file() else "")
            out[str(p.relative_to(root))] = (st.st_mode if not p.is_symlink()
                                             else stat.S_IFLNK, st.st_uid, st.st_gid, what)
    return out


def test_the_packed_clone_lands_as_tar_would_extract_it(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    tar = tmp_path / "seed.tar"
    pack_for_workspace(repo, arcname="proj", out=tar)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    written = extract(tar, ours)
    subprocess.run(["tar", "-x", "-f", str(tar), "-C", str(theirs), "--same-owner",
                    "--same-permissions"], check=True)
    assert _entries(ours) == _entries(theirs)
    assert written == len(_entries(ours))
    st = (ours / "proj" / "pkg" / "run.sh").stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (WORKSPACE_UID, WORKSPACE_GID,
                                                                0o755)
    assert (ours / "proj" / "README.md").stat().st_mtime == 1_600_000_000
    assert os.readlink(ours / "proj" / "escape") == "/etc/passwd"
    assert (ours / "proj" / ".git" / "HEAD").is_file()


def _tar(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, *, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info


@pytest.mark.parametrize("name", ["../up", "/abs", "a/../../up", "."])
def test_an_entry_outside_the_directory_is_refused(tmp_path: Path, name: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    tar = _tar(tmp_path / "t.tar", (_info(name), b"x"))
    with pytest.raises(SeedRefused, match="not a plain relative path"):
        extract(tar, dest)
    assert not (tmp_path / "up").exists()


@pytest.mark.parametrize("kind", [tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_hard_links_and_special_files_are_refused(tmp_path: Path, kind: bytes) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    tar = _tar(tmp_path / "t.tar", (_info("a"), b"x"), (_info("b", kind, linkname="a"), None))
    with pytest.raises(SeedRefused, match="neither a file"):
        extract(tar, dest)
    assert sorted(os.listdir(dest)) == ["a"]


def test_it_never_writes_through_a_link_the_sandbox_left(tmp_path: Path) -> None:
    """What the sandbox made under the directory (a link where the archive has a directory,
    a file the archive also has) makes the seed fail; nothing is written where they point."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("mine")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "proj").symlink_to(outside)
    # the directory's own entry: mkdir finds the link
    with pytest.raises(FileExistsError):
        extract(_tar(tmp_path / "a.tar", (_info("proj/", tarfile.DIRTYPE), None),
                     (_info("proj/new"), b"x")), dest)
    # no entry of its own: the walk to it refuses the link
    with pytest.raises(OSError):
        extract(_tar(tmp_path / "b.tar", (_info("proj/new"), b"x")), dest)
    # a file planted where the archive has one (a link to a host file, or a hard link)
    os.link(outside / "f", dest / "planted")
    with pytest.raises(FileExistsError):
        extract(_tar(tmp_path / "c.tar", (_info("planted"), b"theirs")), dest)
    assert sorted(os.listdir(outside)) == ["f"]
    assert (outside / "f").read_text() == "mine"


def test_the_directory_itself_must_not_be_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "dest").symlink_to(real)
    with pytest.raises(OSError):
        extract(_tar(tmp_path / "t.tar", (_info("a"), b"x")), tmp_path / "dest")
    assert os.listdir(real) == []
