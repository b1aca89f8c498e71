"""Root filesystems for images other than the setup's: an engine image converted into an ext4
base that VMs overlay (docs/microvm.md, "Images").

The setup (scripts/setup-microvm.sh) builds ``rootfs.ext4`` from ``DEN_IMAGE``. A workspace
whose image differs (a requested ``image``, a devcontainer's built image) gets a base of its
own, made here the same way: the image's filesystem exported through the Docker engine (from
a container created, never started), unpacked, given what the guest needs (Den's agent at
``/.den/den-agent``, copied out of the setup's root filesystem so that it is the agent the
boot files were built with; ``/workspace``; Den's ``/etc/hosts`` and an empty
``/etc/resolv.conf``), and written by ``mkfs.ext4 -d`` (no loop mounts). The kernel's modules
are in the initramfs, not the root filesystem.

A base is named by the image's id and the setup's build (``<images>/<id>-<build>.ext4``):
content-addressed, shared by every VM of that image, made once even under concurrent creates
(an flock per base, across Den processes), written under a temporary name and renamed, never
modified after. An image larger than ``max_mb`` is refused. A base no VM or snapshot overlays
any more is removed when the last one that did goes (:meth:`RootImages.collect`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from server.errors import ValidationFailed
from server.runtime.errors import EngineError, EngineUnavailable
from server.runtime.microvm import disks

log = logging.getLogger(__name__)

AGENT_IN_ROOTFS = "/.den/den-agent"
ROOT_LABEL = "den-root"  # the initramfs mounts the disk with this label
CONVERT_TIMEOUT_S = 900.0  # mkfs.ext4 of a large image under load
STALE_TMP_S = 3600.0  # a temporary directory this old is a crashed conversion's
LABEL_ROLE = "den.role"


class ImageTooLarge(ValidationFailed):
    code = "image_too_large"


def backing_file(qcow2: Path) -> str | None:
    """The backing file a qcow2 image names (its header: offset 8, a big-endian u64 to the
    name, offset 16 its u32 length), or None (no backing file, not a qcow2, unreadable)."""
    try:
        with qcow2.open("rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != b"QFI\xfb":
                return None
            offset = int.from_bytes(head[8:16], "big")
            size = int.from_bytes(head[16:20], "big")
            if not offset or not 0 < size <= 1023:
                return None
            f.seek(offset)
            return f.read(size).decode(errors="replace")
    except OSError:
        return None


QCOW2_EXTERNAL_DATA = 1 << 2  # qcow2 v3's incompatible feature: the guest's data elsewhere


def check_overlay(qcow2: Path, bases: Iterable[Path]) -> None:
    """Refuse a root overlay whose header names anything but one of Den's root filesystems
    (a regular ``.ext4`` file directly in one of ``bases``) as its backing file, or any
    external data file: QEMU writes the header, so a QEMU its guest took over could name
    any host file there (another VM's disk), which the next QEMU would open as root.
    Blocking; EngineError when refused."""
    try:
        with qcow2.open("rb") as f:
            head = f.read(80)
    except OSError as exc:
        raise EngineError(f"cannot read the VM's root disk: {exc}") from exc
    if len(head) < 72 or head[:4] != b"QFI\xfb":
        raise EngineError("the VM's root disk is not a qcow2 image")
    version = int.from_bytes(head[4:8], "big")
    if version >= 3 and (len(head) < 80
                         or int.from_bytes(head[72:80], "big") & QCOW2_EXTERNAL_DATA):
        raise EngineError("the VM's root disk names an external data file; refused")
    backing = backing_file(qcow2)
    path = Path(backing) if backing else None
    if path is None or str(path) != os.path.normpath(backing or "") \
            or path.suffix != ".ext4" or path.parent not in set(bases) \
            or path.is_symlink() or not path.is_file():
        raise EngineError(f"the VM's root disk is backed by {backing!r}, not one of Den's "
                          "root filesystems; refused")


class RootImages:
    """The root filesystem each image's VMs overlay: the setup's for its own image, a
    converted base (made on first use) for any other."""

    def __init__(self, *, default_rootfs: Path, default_image: str, vms_dir: Path,
                 images_dir: Path, prefix: str, engine_url: str = "", max_mb: int = 4096
                 ) -> None:
        self.default_rootfs = default_rootfs
        self.default_image = default_image
        self.vms_dir = vms_dir
        self.dir = images_dir
        self.prefix = prefix
        self.engine_url = engine_url
        self.max_mb = max_mb
        self._api: Any = None
        self._api_lock = threading.Lock()

    # --- the engine -----------------------------------------------------------------------

    def _engine(self) -> Any:
        import docker
        import docker.errors

        with self._api_lock:
            if self._api is None:
                try:
                    self._api = (docker.APIClient(base_url=self.engine_url, timeout=600)
                                 if self.engine_url else
                                 docker.APIClient(timeout=600, **docker.utils.kwargs_from_env()))
                except docker.errors.DockerException as exc:
                    raise EngineUnavailable("the Docker engine is not reachable (microVM "
                                            "images are converted from its images)",
                                            detail=str(exc)) from exc
            return self._api

    def inspect(self, image: str) -> tuple[str, int] | None:
        """The local image's id and size in bytes; None when the engine has no such image
        (nothing is ever pulled)."""
        import docker.errors
        import requests.exceptions

        try:
            attrs = self._engine().inspect_image(image)
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as exc:
            if exc.status_code in (400, 404):
                return None
            raise EngineError(f"image {image}: {exc.explanation}", detail=str(exc)) from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineUnavailable("the Docker engine is not reachable",
                                    detail=str(exc)) from exc
        return str(attrs["Id"]), int(attrs.get("Size") or 0)

    def check_size(self, image: str, size: int) -> None:
        if size > self.max_mb << 20:
            raise ImageTooLarge(
                f"image {image} is {size >> 20} MB: microVMs convert images of at most "
                f"{self.max_mb} MB into a root filesystem (DEN_MICROVM_IMAGE_MAX_MB); use a "
                "smaller image")

    def exists(self, image: str) -> bool:
        """Whether a VM can be made of ``image``: the setup's, or a local engine image within
        the size limit (ImageTooLarge, a 422 naming the limit, when over it)."""
        if image == self.default_image:
            return True
        found = self.inspect(image)
        if found is None:
            return False
        self.check_size(image, found[1])
        return True

    # --- bases ----------------------------------------------------------------------------

    def _build(self) -> str:
        """The setup's build the bases are made with (its agent): ``rootfs-<build>.ext4``."""
        name = self.default_rootfs.resolve().name
        return name.removeprefix("rootfs-").removesuffix(".ext4") or "default"

    @contextlib.contextmanager
    def base(self, image: str) -> Iterator[Path]:
        """The root filesystem to overlay for ``image``, converted when there is none yet;
        held (no :meth:`collect` removes it) until the block ends: make the overlay in it.
        Blocking."""
        if image == self.default_image:
            yield self.default_rootfs.resolve()
            return
        found = self.inspect(image)
        if found is None:
            raise EngineError(f"image {image} is not on this server's engine")
        image_id, size = found
        self.check_size(image, size)
        key = f"{image_id.removeprefix('sha256:')[:24]}-{self._build()}"
        path = self.dir / f"{key}.ext4"
        with self._locked(key):
            if not path.exists():
                self._convert(image, image_id, path)
            yield path

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[Path]:
        """The base's lock file, locked (flock: across threads and processes). A lock file
        that :meth:`collect` removed while this waited for it is not the lock any more: try
        again on the new one."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        path = self.dir / f".{key}.lock"
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if current:
                    yield path
                    return
            finally:
                os.close(fd)  # releases the lock

    def _convert(self, image: str, image_id: str, out: Path) -> None:
        started = time.monotonic()
        self._sweep()
        work = self.dir / f".{out.stem}.{secrets.token_hex(4)}.tmp"
        root = work / "root"
        root.mkdir(parents=True, mode=0o700)
        try:
            self._export(image, root)
            self._add_guest_files(root, work)
            used_mb = _du_mb(root)
            if used_mb > self.max_mb:
                raise ImageTooLarge(f"image {image} unpacks to {used_mb} MB: microVMs convert "
                                    f"images of at most {self.max_mb} MB "
                                    "(DEN_MICROVM_IMAGE_MAX_MB); use a smaller image")
            tmp = work / "rootfs.ext4"
            disks.run_tool(["mkfs.ext4", "-q", "-L", ROOT_LABEL, "-d", str(root), str(tmp),
                            f"{used_mb * 13 // 10 + 256}M"],
                           timeout_s=CONVERT_TIMEOUT_S, what="writing the root filesystem")
            tmp.chmod(0o444)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        # The unpacked tree (thousands of files: seconds under load) goes after the create
        # that waits for the base; a crash before that leaves it to _sweep.
        threading.Thread(target=shutil.rmtree, args=(work,), kwargs={"ignore_errors": True},
                         name="den-vm-image-cleanup", daemon=True).start()
        log.info("microVM root filesystem for %s (%s) made in %.1f s: %s", image, image_id,
                 time.monotonic() - started, out.name)

    def _export(self, image: str, root: Path) -> None:
        """The image's filesystem (a created container's export) unpacked into ``root``.
        The stream goes from the docker CLI straight into tar, as the setup's does (through
        Python it took 1.6 times as long here); its size is the image's, checked before."""
        import docker.errors
        import requests.exceptions

        if shutil.which("docker") is None:
            raise EngineUnavailable("the docker CLI is not installed: the microVM backend "
                                    "exports images with it (scripts/setup-microvm.sh)")
        api = self._engine()
        cid = None
        try:
            cid = api.create_container(
                image, name=f"{self.prefix}-vmconv-{secrets.token_hex(4)}",
                entrypoint=["/.den/never-started"], labels={LABEL_ROLE: "microvm-convert"},
                network_disabled=True)["Id"]
            cli = ["docker", *(["-H", self.engine_url] if self.engine_url else []),
                   "export", str(cid)]
            with tempfile.TemporaryFile() as export_err, tempfile.TemporaryFile() as tar_err:
                export = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=export_err)
                try:
                    tar = subprocess.run(
                        ["tar", "-x", "-C", str(root), "--numeric-owner", "-f", "-"],
                        stdin=export.stdout, stderr=tar_err, timeout=CONVERT_TIMEOUT_S,
                        check=False)
                finally:
                    if export.stdout is not None:
                        export.stdout.close()
                    if export.poll() is None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            export.wait(timeout=10)
                    if export.poll() is None:
                        export.kill()
                        export.wait()
                for code, err, what in ((export.returncode, export_err, "exporting"),
                                        (tar.returncode, tar_err, "unpacking")):
                    if code != 0:
                        err.seek(0)
                        text = err.read()[-1000:].decode(errors="replace").strip()
                        raise EngineError(f"{what} image {image} failed: {text}")
        except subprocess.TimeoutExpired as exc:
            raise EngineError(f"unpacking image {image} took more than "
                              f"{CONVERT_TIMEOUT_S:.0f} s") from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise EngineError(f"exporting image {image} failed: {exc}") from exc
        finally:
            if cid is not None:
                with contextlib.suppress(docker.errors.DockerException,
                                         requests.exceptions.RequestException):
                    api.remove_container(cid, force=True)

    def _add_guest_files(self, root: Path, work: Path) -> None:
        """What the setup adds to its root filesystem. The image is untrusted: a path in it
        that should be a directory or a file is made one (a symbolic link there would point
        the writes at the host's files)."""
        agent = work / "den-agent"
        disks.run_tool(["debugfs", "-R", f"dump -p {AGENT_IN_ROOTFS} {agent}",
                        str(self.default_rootfs.resolve())], what="reading the agent")
        if not agent.is_file() or agent.stat().st_size == 0:
            raise EngineError(f"the setup's root filesystem has no agent at {AGENT_IN_ROOTFS}: "
                              "run scripts/setup-microvm.sh")
        _real_dir(root, ".den")
        _real_dir(root, "workspace")
        _real_dir(root, "etc")
        _put(root / ".den" / "den-agent", agent.read_bytes(), 0o755)
        _put(root / "etc" / "hosts", b"127.0.0.1 localhost\n", 0o644)
        _put(root / "etc" / "resolv.conf", b"", 0o644)

    def _sweep(self) -> None:
        """Temporary directories of conversions that crashed (older than any live one)."""
        with contextlib.suppress(FileNotFoundError):
            for p in self.dir.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    if time.time() - p.lstat().st_mtime > STALE_TMP_S:
                        shutil.rmtree(p, ignore_errors=True)

    # --- garbage collection ---------------------------------------------------------------

    def collect(self, backing: str | None) -> bool:
        """Remove the converted base ``backing`` (an overlay's backing file) when no VM or
        snapshot directory overlays it any more; True when it was removed. The setup's root
        filesystems are never removed here. Blocking."""
        if not backing:
            return False
        path = Path(backing)
        if path.parent != self.dir or path.suffix != ".ext4" or path.name.startswith("."):
            return False
        with self._locked(path.stem) as lock:
            if not path.exists() or self._in_use(str(path)):
                return False
            path.unlink(missing_ok=True)
            lock.unlink()  # a waiter on it sees that and locks a new one
        log.info("microVM root filesystem %s removed: no VM or snapshot uses it", path.name)
        return True

    def _in_use(self, backing: str) -> bool:
        with contextlib.suppress(FileNotFoundError):
            for d in self.vms_dir.iterdir():
                for qcow2 in (d / "root.qcow2", d / ".root.qcow2.tmp"):
                    if backing_file(qcow2) == backing:
                        return True
        return False


def _real_dir(root: Path, name: str) -> None:
    p = root / name
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        p.unlink()
    p.mkdir(mode=0o755, exist_ok=True)


def _put(path: Path, data: bytes, mode: int) -> None:
    if path.is_symlink() or path.is_dir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def _du_mb(root: Path) -> int:
    out = subprocess.run(["du", "-sm", str(root)], capture_output=True, check=False,
                         timeout=CONVERT_TIMEOUT_S)
    try:
        return int(out.stdout.split()[0])
    except (IndexError, ValueError):
        raise EngineError(f"cannot measure the unpacked image: {out.stderr[-500:]!r}") from None
