"""Reading and writing a workspace's files from the host, in the directory its volume binds.

Through the agent a file's bytes cross the sandbox (the agent's reads and writes under
gVisor), the engine's exec stream and Den's framing: 45-60 MB/s here. The engine's own
archive API reaches the same files at 250-600 MB/s because it works in the volume's
directory on the host. This module does that for the files API's reads and writes, acting
as the workspace user and never outside that directory:

* Every path is looked up relative to a descriptor of the volume's directory with
  ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)``: symlinks inside
  the directory are followed as the workspace would follow them; one that is absolute or
  climbs out of it, a ``/proc`` magic link, or a mount crossing fails in the kernel, however
  the sandbox renames things meanwhile. Everything after that lookup is one component
  relative to a directory descriptor, without following links (``O_NOFOLLOW``, ``O_EXCL``).
* The thread doing it takes the user's file system ids first (``setfsuid``, ``setfsgid`` and
  its supplementary groups, raw system calls that change only the calling thread), so the
  kernel checks the workspace's permission bits for that user, as the agent does inside (it
  runs as root and checks them itself: agent/users.go ``can``), and new files are the user's.
  The ids come from the agent (``user`` op); they only ever lower what the thread may do,
  and ids of 0 are refused. The threads are this module's own, and give the ids back after
  each call.
* Only the plain cases are done here; anything else answers None before a byte is read or
  written and the caller asks the agent, whose answers (errors included) stay the API's:
  a path that does not resolve beneath the directory, a link as the last component of a
  write or on the way to a parent it makes, a non-regular file, a file larger
  than the limit, a file to replace that is not the user's own or has set-id bits, a sticky
  directory, a permission the kernel refuses.

What the host cannot see: a mount made inside the sandbox over part of /workspace (the host
writes beneath it). gVisor shares a bind mount's files with the host (runsc's
``--file-access-mounts=shared``, its default): each side sees the other's changes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import platform
import posixpath
import secrets
import stat
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHUNK = 1024 * 1024  # one read from the file, one write to it
GROUPS_MAX = 256  # supplementary groups taken from the agent's answer, at most
TEMP_PREFIX = ".den-write-"  # the agent's too (agent/files.go)

_RESOLVE_NO_XDEV, _RESOLVE_NO_MAGICLINKS, _RESOLVE_BENEATH = 0x01, 0x02, 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV
# System call numbers: (setgroups, setfsuid, setfsgid, openat2).
_SYSCALLS = {"x86_64": (116, 122, 123, 437), "aarch64": (159, 151, 152, 437)}


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class _Kernel:
    """The raw system calls (glibc's ``setgroups`` would change every thread of Den)."""

    def __init__(self) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        self._setgroups, self._setfsuid, self._setfsgid, self._openat2 = numbers or (0,) * 4
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self.host_groups = tuple(os.getgroups())
        self.usable = numbers is not None and os.geteuid() == 0 and self._can_switch()

    def _can_switch(self) -> bool:
        """Whether a thread can take other file system ids and give them back (root without
        CAP_SETUID cannot: setfsuid then fails silently). Tried on a throwaway thread."""
        answer: list[bool] = []

        def attempt() -> None:
            try:
                self.setfsuid(65534)
                answer.append(self.setfsuid(-1) == 65534)
            finally:
                self.setfsuid(0)

        thread = threading.Thread(target=attempt, name="den-host-files-probe")
        thread.start()
        thread.join()
        return answer == [True]

    def _call(self, *args: Any) -> int:
        result = int(self._libc.syscall(*args))
        if result < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return result

    def setgroups(self, groups: Sequence[int]) -> None:
        arr = (ctypes.c_uint32 * max(len(groups), 1))(*groups)
        self._call(ctypes.c_long(self._setgroups), ctypes.c_long(len(groups)), arr)

    def setfsuid(self, uid: int) -> int:
        """The previous fsuid (the call cannot fail; -1 only asks)."""
        return self._call(ctypes.c_long(self._setfsuid), ctypes.c_long(uid))

    def setfsgid(self, gid: int) -> int:
        return self._call(ctypes.c_long(self._setfsgid), ctypes.c_long(gid))

    def openat2(self, dirfd: int, path: str, flags: int, mode: int = 0) -> int:
        how = _OpenHow(flags | os.O_CLOEXEC, mode, _RESOLVE)
        try:
            return self._call(ctypes.c_long(self._openat2), ctypes.c_long(dirfd),
                              ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                              ctypes.c_long(ctypes.sizeof(how)))
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, path) from None


_kernel = _Kernel()
# Threads that change their file system ids: never shared with other work.
_threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="den-host-files")


def usable() -> bool:
    """Whether this host can do it (Linux on x86-64 or arm64, Den running as root)."""
    return _kernel.usable


@dataclass(frozen=True)
class Ids:
    """The workspace user's ids, as its agent reported them."""

    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def parse(cls, answer: Any) -> Ids | None:
        """The ids in the agent's ``user`` answer, or None: malformed, or root's (0)."""
        if not isinstance(answer, dict):
            return None
        groups = answer.get("groups")
        if not isinstance(groups, list) or len(groups) > GROUPS_MAX:
            return None
        ids = [answer.get("uid"), answer.get("gid"), *groups]
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**32 - 1
                   for i in ids):
            return None
        uid, gid, *rest = (int(i) for i in ids)
        return cls(uid=uid, gid=gid, groups=tuple(sorted({gid, *rest})))


@contextlib.contextmanager
def _as(ids: Ids) -> Iterator[None]:
    """This thread's file system ids are ``ids`` inside the block, the host's after."""
    try:
        _kernel.setgroups(ids.groups)
        _kernel.setfsgid(ids.gid)
        _kernel.setfsuid(ids.uid)
        if _kernel.setfsuid(-1) != ids.uid or _kernel.setfsgid(-1) != ids.gid:
            raise PermissionError("could not take the workspace user's ids")
        yield
    finally:
        _kernel.setfsuid(0)
        _kernel.setfsgid(0)
        _kernel.setgroups(_kernel.host_groups)


@contextlib.contextmanager
def _in_root(root: Path, ids: Ids) -> Iterator[int | None]:
    """A descriptor of the volume's directory (opened as the host: its parents are root's),
    or None when it is gone (the workspace deleted meanwhile); this thread has ``ids``
    inside the block."""
    try:
        rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        yield None
        return
    try:
        switched = contextlib.ExitStack()
        try:
            switched.enter_context(_as(ids))
        except OSError:  # this host cannot take the ids after all: the agent does it
            yield None
            return
        with switched:
            yield rootfd
    finally:
        os.close(rootfd)


async def _run(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(_threads, fn, *args)


def _relative(rel: str) -> str:
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"{rel!r} is not a plain relative path")
    return "/".join(parts) or "."


class HostRead:
    """A regular file opened for reading: ``size`` bytes (its size at open) from
    :meth:`chunks`; fewer (the file shrank) raises. A lock keeps :meth:`close` from closing
    the descriptor under a read still running in a thread (a client that went away): the
    number could be reused meanwhile."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd: int | None = fd
        self.size = size
        self._lock = threading.Lock()

    async def chunks(self) -> AsyncIterator[bytes]:
        left = self.size
        try:
            while left > 0:
                piece = await _run(self._read, min(CHUNK, left))
                if not piece:
                    raise FileShrank(f"the file shrank while it was being read ({left} bytes "
                                     "short)")
                left -= len(piece)
                yield piece
        finally:
            await self.close()

    def _read(self, n: int) -> bytes:
        with self._lock:
            return b"" if self._fd is None else os.read(self._fd, n)

    def _close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    async def close(self) -> None:
        if self._fd is not None:
            await asyncio.shield(_run(self._close))


class FileShrank(OSError):
    """A file read from the host ended before the size it had when it was opened."""


def _open_read(root: Path, rel: str, ids: Ids, max_bytes: int) -> HostRead | None:
    with _in_root(root, ids) as rootfd:
        if rootfd is None:
            return None
        try:
            fd = _kernel.openat2(rootfd, rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError:
            return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        return None
    return HostRead(fd, st.st_size)


async def open_read(root: Path, rel: str, ids: Ids, *, max_bytes: int) -> HostRead | None:
    """``rel`` (relative to the volume's directory ``root``) opened for reading as ``ids``,
    or None when the agent should answer instead (see the module's docstring)."""
    return await _run(_open_read, root, _relative(rel), ids, max_bytes)  # type: ignore[no-any-return]


class HostWrite:
    """A write in progress: a temporary file beside the target, as the user, renamed over
    the target by :meth:`commit`; :meth:`abort` removes it. Each step runs in a thread under
    the write's lock, so an abort waits for a write still running (its caller cancelled)
    before it closes the descriptor."""

    def __init__(self, dirfd: int, fd: int, tmp: str, name: str, ids: Ids) -> None:
        self._dirfd, self._fd, self._tmp, self._name, self._ids = dirfd, fd, tmp, name, ids
        self._done = False
        self._lock = threading.Lock()

    async def write(self, data: bytes | bytearray) -> None:
        await _run(self._write, data)

    def _write(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        with self._lock, _as(self._ids):
            if self._done:
                raise OSError(errno.EBADF, "the write was aborted")
            while view:
                view = view[os.write(self._fd, view):]

    async def commit(self) -> None:
        await _run(self._commit)

    def _commit(self) -> None:
        with self._lock, _as(self._ids):
            if self._done:
                raise OSError(errno.EBADF, "the write was aborted")
            try:
                fd, self._fd = self._fd, -1
                os.close(fd)  # released even when it reports an error: never closed twice
                os.rename(self._tmp, self._name, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd)
            except BaseException:
                self._abort()
                raise
            self._finish()

    async def abort(self) -> None:
        if not self._done:
            await asyncio.shield(_run(self._abort_as_user))

    def _abort_as_user(self) -> None:
        with self._lock, _as(self._ids):
            self._abort()

    def _abort(self) -> None:
        if self._done:
            return
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(self._tmp, dir_fd=self._dirfd)
        self._finish()

    def _finish(self) -> None:
        self._done = True
        os.close(self._dirfd)


def _open_write(root: Path, rel: str, ids: Ids) -> HostWrite | None:
    parent, name = posixpath.split(rel)
    if name in ("", ".", "..") or name.startswith(TEMP_PREFIX):
        return None
    with _in_root(root, ids) as rootfd:
        if rootfd is None:
            return None
        try:
            dirfd = _kernel.openat2(rootfd, parent or ".", os.O_PATH | os.O_DIRECTORY)
        except FileNotFoundError:
            made = _make_dirs(rootfd, parent)
            if made is None:
                return None
            dirfd = made
        except OSError:
            return None
        try:
            writer = _prepare(dirfd, name, ids)
        except OSError:
            writer = None
        if writer is None:
            os.close(dirfd)
        return writer


def _make_dirs(rootfd: int, parent: str) -> int | None:
    """A descriptor of ``parent``, making its missing directories (0755, the user's, as the
    agent makes them), or None when that is not plain: a link on the way (even one that
    stays inside: the agent resolves it), a set-group-id directory, a permission refused.
    Runs as the user."""
    fd = os.dup(rootfd)
    try:
        for name in parent.split("/"):
            try:
                nxt = _kernel.openat2(fd, name, os.O_PATH | os.O_DIRECTORY)
            except FileNotFoundError:
                if os.fstat(fd).st_mode & stat.S_ISGID:
                    return None
                with contextlib.suppress(FileExistsError):  # made meanwhile: open it
                    os.mkdir(name, 0o755, dir_fd=fd)
                nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
                os.fchmod(nxt, 0o755)  # past the host's umask
            os.close(fd)
            fd = nxt
        made, fd = fd, -1
        return made
    except OSError:
        return None
    finally:
        if fd >= 0:
            os.close(fd)


def _prepare(dirfd: int, name: str, ids: Ids) -> HostWrite | None:
    """The temporary file of a write of ``name`` in ``dirfd``, or None (the agent writes)."""
    if os.fstat(dirfd).st_mode & stat.S_ISVTX:
        return None  # who may replace what in a sticky directory: the agent's rules
    mode = 0o644
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        if (not stat.S_ISREG(st.st_mode) or (st.st_uid, st.st_gid) != (ids.uid, ids.gid)
                or st.st_mode & 0o7000):
            return None
        # May the user write it? The kernel says, for these ids (nothing is written).
        os.close(os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dirfd))
        mode = stat.S_IMODE(st.st_mode)
    tmp = TEMP_PREFIX + secrets.token_hex(8)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dirfd)
    try:
        if os.fstat(fd).st_gid != ids.gid:  # a set-group-id directory gave its own group
            os.fchown(fd, -1, ids.gid)
        os.fchmod(fd, mode)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dirfd)
        return None
    return HostWrite(dirfd, fd, tmp, name, ids)


async def open_write(root: Path, rel: str, ids: Ids) -> HostWrite | None:
    """A write of ``rel`` (relative to ``root``) as ``ids``, ready for its bytes, or None
    when the agent should do it (see the module's docstring)."""
    return await _run(_open_write, root, _relative(rel), ids)  # type: ignore[no-any-return]
