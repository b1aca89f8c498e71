"""Seeding a workspace by writing its repository into its disk from the host.

The engine's archive API (``put_archive``) cost 0.1-0.3 s of a create, and ``tar -x`` run in
the sandbox through its agent 0.1-0.25 s (a process started under gVisor, ~40 files written
through the gofer); the same files written on the host into the directory the volume binds
take a few milliseconds, and the sandbox sees them at once (gVisor revalidates a bind mount's
entries against the host: it is how the engine's own archive API reaches a running sandbox).

The archive is Den's own (server/git/clone.py packs the clone; every entry owned by the
workspace user), but the directory it goes into is the workspace's, which whatever runs in the
sandbox may change while Den writes (a claimed pool sandbox or a fresh one has run nothing of
the user's yet; a prebuild's fork has). So the host never follows a link there and never
writes into anything it did not create: every step is relative to a directory descriptor Den
opened itself (``O_NOFOLLOW``), every file, directory and link is created exclusively
(``O_EXCL``, ``mkdirat``, ``symlinkat``), owners and modes are set on the descriptor or
without following links, and only plain files, directories and symbolic links (their targets
stored, never resolved) are written. Whatever the sandbox does meanwhile can make the seed
fail (the caller then seeds as before, which overwrites a partial one), never write outside
that directory or through a link.
"""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1024 * 1024


class SeedRefused(ValueError):
    """The archive holds something this seed does not write (the caller seeds another way)."""


def _parts(name: str) -> tuple[str, ...]:
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if not parts or name.startswith("/") or ".." in parts:
        raise SeedRefused(f"archive entry {name!r} is not a plain relative path")
    return parts


class _Dirs:
    """Descriptors of the directories along the entry being written (the archive lists a
    directory's entries right after it, so a stack suffices; one that is not on it is opened
    again from the root, component by component, never through a link)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.stack: list[tuple[tuple[str, ...], int]] = []

    def fd(self, path: tuple[str, ...]) -> int:
        while self.stack and self.stack[-1][0] != path[:len(self.stack[-1][0])]:
            os.close(self.stack.pop()[1])
        if not path:
            return self.root
        if self.stack and self.stack[-1][0] == path:
            return self.stack[-1][1]
        at, start = (self.stack[-1] if self.stack else ((), self.root))
        for i in range(len(at), len(path)):
            start = os.open(path[i], _DIR_FLAGS, dir_fd=start)
            self.stack.append((path[:i + 1], start))
        return start

    def close(self) -> None:
        while self.stack:
            os.close(self.stack.pop()[1])


def extract(tar: Path, dest: Path) -> int:
    """Write the archive ``tar`` under ``dest`` (an existing directory, which must not be a
    link); the number of entries written. Raises SeedRefused for an entry it does not write
    (a hard link, a device) and OSError when the file system refuses (an entry that exists
    already, a link where a directory was made, a full disk)."""
    root = os.open(dest, _DIR_FLAGS)
    dirs = _Dirs(root)
    times: list[tuple[tuple[str, ...], int]] = []  # directories' mtimes, set last
    count = 0
    try:
        with tarfile.open(tar, "r:") as archive:
            for member in archive:
                parts = _parts(member.name)
                parent, name = dirs.fd(parts[:-1]), parts[-1]
                mode = stat.S_IMODE(member.mode) & 0o777  # no setuid, setgid or sticky
                if member.isdir():
                    os.mkdir(name, 0o700, dir_fd=parent)
                    fd = dirs.fd(parts)
                    os.fchown(fd, member.uid, member.gid)
                    os.fchmod(fd, mode)
                    times.append((parts, int(member.mtime)))
                elif member.isreg():
                    _write(archive, member, name, parent, mode)
                elif member.issym():
                    os.symlink(member.linkname, name, dir_fd=parent)
                    os.chown(name, member.uid, member.gid, dir_fd=parent,
                             follow_symlinks=False)
                    os.utime(name, (member.mtime, member.mtime), dir_fd=parent,
                             follow_symlinks=False)
                else:
                    raise SeedRefused(f"archive entry {member.name!r} is neither a file, a "
                                      "directory nor a symbolic link")
                count += 1
        for parts, mtime in reversed(times):
            os.utime(dirs.fd(parts), (mtime, mtime))
    finally:
        dirs.close()
        os.close(root)
    return count


def _write(archive: tarfile.TarFile, member: tarfile.TarInfo, name: str, parent: int,
           mode: int) -> None:
    source = archive.extractfile(member)
    if source is None:
        raise SeedRefused(f"archive entry {member.name!r} has no data")
    fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=parent)
    try:
        while chunk := source.read(_CHUNK):
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, mode)
        os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)
