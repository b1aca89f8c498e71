"""Reading a devcontainer from a cloned repository on the host, which is untrusted: every path
it names (the file itself, its Dockerfile, its build context) must resolve inside the clone,
symbolic links included, and the build context goes to the engine as a tar archive that Den
writes itself (links stored as links, never followed), so no host file can reach a build.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.devcontainer import dockerignore
from server.devcontainer.parse import DevContainerInvalid, DevContainerRefused

CANDIDATES = (".devcontainer/devcontainer.json", ".devcontainer.json")
DOCKERFILE_NAME = ".den-devcontainer.Dockerfile"  # where the Dockerfile goes in the context
MAX_DOCKERFILE_BYTES = 256 * 1024
SKIP = frozenset({".git"})  # Den's clone metadata (and its hooks) stays out of builds
# Appended to the context's .dockerignore (or all of one Den adds): the engine's builder
# removes the files it names among the Dockerfile and .dockerignore before the build, so that
# a `COPY . ...` never copies the Dockerfile Den adds (a .dockerignore Den adds names itself).
HIDE = b"\n" + DOCKERFILE_NAME.encode() + b"\n"


@dataclass(frozen=True)
class Found:
    path: str  # relative to the repository, e.g. ".devcontainer/devcontainer.json"
    data: bytes


def inside(root: Path, relative: str, *, what: str) -> Path:
    """``root/relative`` with every link resolved, refused unless it stays in ``root``."""
    if "\x00" in relative or posixpath.isabs(relative):
        raise DevContainerRefused(f"{what} {relative!r} must be a path inside the repository")
    real_root = root.resolve()
    target = (real_root / relative).resolve()
    if target != real_root and real_root not in target.parents:
        raise DevContainerRefused(
            f"{what} {relative!r} is outside the repository (a build may only use the "
            "repository's own files)")
    return target


def read_inside(root: Path, relative: str, *, what: str, limit: int) -> bytes:
    """A regular file's content, at most ``limit`` bytes."""
    target = inside(root, relative, what=what)
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise DevContainerInvalid(f"{what} {relative!r} cannot be read: "
                                  f"{exc.strerror}") from exc
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise DevContainerInvalid(f"{what} {relative!r} is not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise DevContainerInvalid(f"{what} {relative!r} is larger than {limit // 1024} KiB")
    return data


def find(repo: Path) -> Found | None:
    """The repository's devcontainer.json, or None when it has none."""
    for rel in CANDIDATES:
        if os.path.lexists(repo / rel):
            return Found(path=rel, data=read_inside(repo, rel, what="devcontainer file",
                                                    limit=256 * 1024))
    return None


class _Discard(io.RawIOBase):
    """A file that forgets what is written (hashing a context without writing it)."""

    def __init__(self) -> None:
        self._pos = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def write(self, data: Any) -> int:
        self._pos += len(data)
        return len(data)


def ignored(repo: Path, context: str, *, dockerfile: str) -> dockerignore.Ignore:
    """The context's ``.dockerignore`` (none: nothing left out). As ``docker build`` does,
    the file itself and the Dockerfile (``dockerfile``, relative to the repository) stay in
    the context whatever it says."""
    inside(repo, context, what="build context")
    rel = posixpath.join(context, dockerignore.NAME) if context not in ("", ".") \
        else dockerignore.NAME
    if not os.path.lexists(repo / rel):
        return dockerignore.Ignore([])
    data = read_inside(repo, rel, what=".dockerignore", limit=dockerignore.MAX_BYTES)
    try:
        patterns = dockerignore.parse(data.decode())
    except UnicodeDecodeError as exc:
        raise DevContainerInvalid(f"{rel} is not UTF-8") from exc
    except ValueError as exc:
        raise DevContainerInvalid(f"{rel}: {exc}") from exc
    ignore = dockerignore.Ignore(patterns)
    keep = [dockerignore.NAME]
    in_context = posixpath.relpath(posixpath.normpath(dockerfile),
                                   posixpath.normpath(context or "."))
    if not in_context.startswith("../"):
        keep.append(in_context)
    for path in keep:
        if ignore.excluded(path):
            patterns.append(dockerignore.parse("!" + path)[0])
    return dockerignore.Ignore(patterns)


def context_tar(repo: Path, context: str, *, dockerfile: bytes, out: Path | None,
                max_bytes: int, ignore: dockerignore.Ignore | None = None) -> str:
    """Write the build context ``context`` (relative to the repository) as a tar at ``out``
    (None: only hash it), without what ``ignore`` leaves out, with ``dockerfile`` added as
    :data:`DOCKERFILE_NAME`; return the hash of its content (paths, types, modes, link
    targets, file bytes)."""
    root = inside(repo, context, what="build context")
    if not root.is_dir():
        raise DevContainerInvalid(f"build context {context!r} is not a directory")
    ignore = ignore or dockerignore.Ignore([])
    has_ignore = False
    digest = hashlib.sha256()
    total = 0
    sink: Any = _Discard() if out is None else out.open("wb")
    with sink, tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            here = Path(dirpath)

            def walked(d: str, here: Path = here) -> bool:
                arc = (here / d).relative_to(root).as_posix()
                return not (here == root and d in SKIP) and not (
                    ignore.excluded(arc) and not ignore.may_hold_exceptions(arc))

            dirnames[:] = sorted(d for d in dirnames if walked(d))
            for name in sorted(dirnames) + sorted(filenames):
                full = here / name
                arc = full.relative_to(root).as_posix()
                if arc == DOCKERFILE_NAME or ignore.excluded(arc):
                    continue
                info = tar.gettarinfo(str(full), arcname=arc)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mtime = 0
                digest.update(f"{arc}\0{info.type!r}\0{info.mode:o}\0{info.linkname}\0".encode())
                if info.isreg():
                    total += info.size
                    if total > max_bytes:
                        raise DevContainerInvalid(
                            f"build context {context!r} is larger than "
                            f"{max_bytes // (1024 * 1024)} MiB")
                    with full.open("rb") as fh:
                        data = fh.read(info.size)
                    if arc == dockerignore.NAME:
                        data, has_ignore = data + HIDE, True
                    info.size = len(data)
                    digest.update(hashlib.sha256(data).digest())
                    tar.addfile(info, io.BytesIO(data))
                elif info.isdir() or info.issym():
                    tar.addfile(info)
                # sockets, fifos and devices: not part of a build
        extra = [(DOCKERFILE_NAME, dockerfile)]
        if not has_ignore:
            extra.append((dockerignore.NAME, HIDE + dockerignore.NAME.encode() + b"\n"))
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
            digest.update(f"{name}\0".encode() + data)
    return digest.hexdigest()


_FROM = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?\s*$", re.IGNORECASE)
_ARG = re.compile(r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(\S*))?\s*$", re.IGNORECASE)
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def base_images(dockerfile: str, args: dict[str, str]) -> list[str]:
    """The images a Dockerfile builds FROM (stage names left out; ARGs before the first FROM
    substituted, with ``args`` overriding their defaults)."""
    defaults: dict[str, str] = {}
    stages: set[str] = set()
    found: list[str] = []
    seen_from = False
    for line in dockerfile.splitlines():
        if not seen_from and (m := _ARG.match(line)):
            defaults[m.group(1)] = args.get(m.group(1), (m.group(2) or "").strip("\"'"))
            continue
        if m := _FROM.match(line):
            seen_from = True
            image = _VAR.sub(lambda v: defaults.get(v.group(1), ""), m.group(1))
            if image.lower() not in stages and image != "scratch" and image not in found:
                found.append(image)
            if m.group(2):
                stages.add(m.group(2).lower())
    return found
