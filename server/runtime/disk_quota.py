"""Enforcing ``disk_gb``: one sparse ext4 image per workspace volume, loop-mounted on the host.

Measured on Docker 20.10 (overlay2 on ext4) with runsc 20240729 and ``--overlay2=none``:
neither the engine (``--storage-opt size`` needs XFS with project quotas) nor the local volume
driver (it calls mount(2) itself, so no ``-o loop``) nor gVisor (its rootfs overlay medium is
memory, lost at stop) can bound a workspace's disk here. So Den does it below the engine:

- ``<root>/<volume>.img`` is a sparse file holding an ext4 filesystem of ``disk_gb`` GiB,
  mounted (``loop,nodev,discard``) at ``<root>/<volume>/``;
- the volume is a local-driver bind of ``<root>/<volume>/workspace`` (``/workspace``), which
  exists only while the image is mounted, so an unmounted disk fails the start instead of
  writing to the host's disk;
- the container's own writable layer (overlay2's ``diff`` and ``work``, what ``apt`` writes) is
  moved into ``<root>/<volume>/layers/<layer id>`` and bind-mounted over the engine's layer
  directory (upper and work dirs must sit under one mount, so the whole directory is bound).

``/workspace`` and the root filesystem thus share one budget; filling it is ``ENOSPC`` inside
(gVisor's gofer passes the host's error through) and the host disk holds at most the image.
The mounts are kernel state: they outlive a killed ``den serve``, not a host reboot, so every
start (and a snapshot's commit) calls :meth:`Disks.ready` first. A volume without an image (a
workspace made before Den enforced disks) is left as it is.

All methods block (mount, mkfs): the Docker backend calls them on its executor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.runtime.errors import EngineError

log = logging.getLogger(__name__)

GIB = 1024**3
DATA_DIR = "workspace"
LAYERS_DIR = "layers"
MOUNT_OPTIONS = "loop,nodev,discard"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_TIMEOUT_S = 120


class DiskError(EngineError):
    """A disk image could not be made, mounted or removed (the message says which and why;
    host paths only in the detail)."""


def check_name(volume: str) -> str:
    """A volume name safe as a file name under the disks directory."""
    if not _NAME.match(volume) or ".." in volume:
        raise DiskError(f"not a volume name Den makes: {volume!r}")
    return volume


def mkfs_argv(image: Path) -> list[str]:
    """ext4 with no blocks reserved for root (the sandbox's gofer writes as root on the
    host, so a reserve would hold nothing back) and lazy initialisation (fast on any size)."""
    return ["mkfs.ext4", "-q", "-F", "-m", "0", "-E",
            "lazy_itable_init=1,lazy_journal_init=1", str(image)]


def mount_argv(image: Path, mountpoint: Path) -> list[str]:
    return ["mount", "-o", MOUNT_OPTIONS, str(image), str(mountpoint)]


def volume_options(data_dir: Path) -> dict[str, str]:
    """``driver_opts`` of a local volume that binds ``data_dir``."""
    return {"type": "none", "o": "bind", "device": str(data_dir)}


def layer_dir(inspect: Mapping[str, Any]) -> Path | None:
    """The engine's directory of a container's writable layer (holding ``diff`` and
    ``work``), from its inspect; None for a storage driver other than overlay2."""
    driver = inspect.get("GraphDriver") or {}
    upper = str((driver.get("Data") or {}).get("UpperDir") or "")
    if driver.get("Name") != "overlay2" or not upper.endswith("/diff"):
        return None
    return Path(upper).parent


class Disks:
    """The disk images under ``root`` (``<data_dir>/disks``), one per volume."""

    def __init__(self, root: Path):
        self.root = root

    def image(self, volume: str) -> Path:
        return self.root / f"{check_name(volume)}.img"

    def mountpoint(self, volume: str) -> Path:
        return self.root / check_name(volume)

    def data_dir(self, volume: str) -> Path:
        return self.mountpoint(volume) / DATA_DIR

    def has(self, volume: str) -> bool:
        return self.image(volume).exists()

    def owner_file(self, volume: str) -> Path:
        return self.root / f"{check_name(volume)}.workspace"

    def create(self, volume: str, *, size_gb: int, workspace_id: str) -> dict[str, str]:
        """Make and mount the volume's image (idempotent; an image already there is kept,
        whatever its size) and return the volume's ``driver_opts``. The workspace's id is
        kept beside it, for :meth:`orphans`."""
        image = self.image(volume)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.owner_file(volume).write_text(workspace_id)
        if not image.exists():
            tmp = image.with_name(image.name + ".new")
            tmp.unlink(missing_ok=True)
            with tmp.open("wb") as fh:
                fh.truncate(size_gb * GIB)
            _run(mkfs_argv(tmp), f"formatting the disk of {volume}")
            tmp.rename(image)
            log.info("volume %s: disk image of %d GiB made", volume, size_gb)
        self._mount(volume)
        data = self.data_dir(volume)
        data.mkdir(exist_ok=True)
        data.chmod(0o755)  # as a fresh local volume's _data (root, 0755)
        return volume_options(data)

    def _mount(self, volume: str) -> bool:
        """Mount the image when it is not mounted yet; False when the volume has none."""
        image, mnt = self.image(volume), self.mountpoint(volume)
        if not image.exists():
            return False
        mnt.mkdir(mode=0o700, exist_ok=True)
        if not os.path.ismount(mnt):
            _run(mount_argv(image, mnt), f"mounting the disk of {volume}")
            self._direct_io(volume, mnt)
        return True

    @staticmethod
    def _direct_io(volume: str, mnt: Path) -> None:
        """The loop device reads and writes its file with O_DIRECT: without, every block is
        cached twice (the image's pages and the loop device's), and large writes were slower
        in both runs of docs/benchmarks.md, "Disk quota".
        Best effort: a file system without O_DIRECT (tmpfs) keeps buffered I/O."""
        try:
            device = subprocess.run(["findmnt", "-no", "SOURCE", str(mnt)], capture_output=True,
                                    text=True, timeout=_TIMEOUT_S).stdout.strip()
            if device.startswith("/dev/loop"):
                _run(["losetup", "--direct-io=on", device], f"direct I/O for {volume}")
        except (OSError, subprocess.SubprocessError, DiskError) as exc:
            log.warning("volume %s: its disk stays on buffered I/O: %s", volume, exc)

    def ready(self, volume: str, layer: Path | None) -> bool:
        """Before a container of ``volume`` starts or is committed: its image mounted and
        the container's writable layer ``layer`` kept on it (moved there at first use, bound
        again after a reboot). Idempotent; False (nothing done) for a volume without image."""
        if not self._mount(volume):
            return False
        if layer is None or os.path.ismount(layer):
            return True
        kept = self.mountpoint(volume) / LAYERS_DIR / check_name(layer.name)
        if not kept.exists():
            # Leftovers of the volume's earlier containers (a load replaced it) go first.
            with contextlib.suppress(FileNotFoundError):
                for old in kept.parent.iterdir():
                    shutil.rmtree(old, ignore_errors=True)
            tmp = kept.with_name(kept.name + ".new")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(exist_ok=True)
            _run(["cp", "-a", f"{layer}/.", str(tmp)], f"moving the layer of {volume}")
            tmp.rename(kept)
        _run(["mount", "--bind", str(kept), str(layer)], f"binding the layer of {volume}")
        return True

    def remove(self, volume: str) -> None:
        """Unmount and delete the volume's image (idempotent). Call after the engine removed
        the volume and its containers (their layer binds went with them)."""
        image, mnt = self.image(volume), self.mountpoint(volume)
        if os.path.ismount(mnt):
            done = subprocess.run(["umount", str(mnt)], capture_output=True, text=True,
                                  timeout=_TIMEOUT_S)
            if done.returncode != 0:
                # Still held (a bind the engine left): detach now, the kernel frees the loop
                # device once the last user goes.
                log.warning("volume %s: disk busy (%s); detaching it lazily", volume,
                            done.stderr.strip())
                _run(["umount", "--lazy", str(mnt)], f"unmounting the disk of {volume}")
        with contextlib.suppress(FileNotFoundError):
            mnt.rmdir()
        image.unlink(missing_ok=True)
        image.with_name(image.name + ".new").unlink(missing_ok=True)
        self.owner_file(volume).unlink(missing_ok=True)

    def volumes(self) -> list[str]:
        """Volumes that have an image (or its owner file: a create cut short) here."""
        if not self.root.is_dir():
            return []
        return sorted({p.stem for p in self.root.iterdir()
                       if p.suffix in (".img", ".workspace") and _NAME.match(p.stem)})

    def orphans(self, engine_volumes: set[str]) -> list[tuple[str, str]]:
        """(volume, workspace id) of each image whose volume the engine does not have: a
        crash between the two, or a create cut short (reconcile decides, by workspace)."""
        found = []
        for volume in self.volumes():
            if volume not in engine_volumes:
                try:
                    owner = self.owner_file(volume).read_text().strip()
                except OSError:
                    owner = ""
                found.append((volume, owner))
        return found


def _run(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DiskError(f"{what} failed: {exc}") from exc
    if done.returncode != 0:
        raise DiskError(f"{what} failed: {(done.stderr or done.stdout).strip()[-300:]}")
