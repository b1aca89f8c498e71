"""The microVM backend's converted root filesystems (server/runtime/microvm/images.py), without
an engine: the qcow2 backing-file reader, the size limit, what a failed conversion leaves, the
guest files written over an untrusted image's links, and garbage collection."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from server.runtime.errors import EngineError
from server.runtime.microvm.images import (
    ImageTooLarge,
    RootImages,
    _put,
    _real_dir,
    backing_file,
    check_overlay,
)


def _qcow2(path: Path, backing: str) -> None:
    """A qcow2 header naming ``backing`` (what qemu-img writes: magic, version, the name's
    offset and length)."""
    name = backing.encode()
    head = b"QFI\xfb" + struct.pack(">I", 3) + struct.pack(">Q", 104) + struct.pack(">I",
                                                                                    len(name))
    path.write_bytes(head.ljust(104, b"\0") + name)


def _images(tmp_path: Path, *, max_mb: int = 100) -> RootImages:
    (tmp_path / "vms").mkdir()
    setup = tmp_path / "rootfs-abc.ext4"
    setup.write_bytes(b"setup")
    (tmp_path / "rootfs.ext4").symlink_to(setup.name)
    return RootImages(default_rootfs=tmp_path / "rootfs.ext4", default_image="den/workspace",
                      vms_dir=tmp_path / "vms", images_dir=tmp_path / "images",
                      prefix="dentest", max_mb=max_mb)


def test_backing_file_reads_the_qcow2_header(tmp_path: Path) -> None:
    _qcow2(tmp_path / "a.qcow2", "/x/base.ext4")
    assert backing_file(tmp_path / "a.qcow2") == "/x/base.ext4"
    (tmp_path / "raw").write_bytes(b"\0" * 64)
    assert backing_file(tmp_path / "raw") is None
    assert backing_file(tmp_path / "missing") is None


def test_the_setup_image_needs_no_engine_and_others_are_bounded(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    images = _images(tmp_path)
    monkeypatch.setattr(images, "inspect", lambda image: {
        "small": ("sha256:" + "a" * 64, 10 << 20), "big": ("sha256:" + "b" * 64, 101 << 20),
    }.get(image))
    assert images.exists("den/workspace") and images.exists("small")
    assert not images.exists("absent")
    with pytest.raises(ImageTooLarge, match=r"at most 100 MB .*DEN_MICROVM_IMAGE_MAX_MB"):
        images.exists("big")
    with images.base("den/workspace") as base:
        assert base == tmp_path / "rootfs-abc.ext4"
    with pytest.raises(ImageTooLarge), images.base("big"):
        pass
    assert not (tmp_path / "images").exists() or not list((tmp_path / "images").glob("*.ext4"))


def test_a_failed_conversion_leaves_nothing(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    images = _images(tmp_path)
    monkeypatch.setattr(images, "inspect", lambda image: ("sha256:" + "c" * 64, 1 << 20))

    def export(image: str, root: Path) -> None:
        (root / "bin").mkdir()
        raise EngineError("exporting image x failed: the engine went away")

    monkeypatch.setattr(images, "_export", export)
    with pytest.raises(EngineError, match="went away"), images.base("x"):
        pass
    left = [p.name for p in (tmp_path / "images").iterdir() if not p.name.endswith(".lock")]
    assert left == []  # no base, no temporary directory


def test_guest_files_replace_the_images_links_instead_of_following_them(tmp_path: Path
                                                                        ) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "hosts").write_text("the host's own\n")
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").symlink_to(host)  # an image whose /etc points at a host directory
    (root / ".den").symlink_to(host)
    _real_dir(root, "etc")
    _real_dir(root, ".den")
    _put(root / "etc" / "hosts", b"127.0.0.1 localhost\n", 0o644)
    (root / "etc" / "resolv.conf").symlink_to(host / "hosts")  # a link to a host file
    _put(root / "etc" / "resolv.conf", b"", 0o644)
    assert (host / "hosts").read_text() == "the host's own\n"
    assert not (root / "etc").is_symlink() and not (root / ".den").is_symlink()
    assert (root / "etc" / "hosts").read_bytes() == b"127.0.0.1 localhost\n"
    assert not (root / "etc" / "resolv.conf").is_symlink()
    assert os.stat(root / "etc" / "hosts").st_mode & 0o777 == 0o644


def test_a_base_goes_with_the_last_overlay_on_it(tmp_path: Path) -> None:
    images = _images(tmp_path)
    (tmp_path / "images").mkdir()
    base = tmp_path / "images" / "abc-def.ext4"
    base.write_bytes(b"base")
    for vm in ("den-vm-1", "den-snap-2"):
        (tmp_path / "vms" / vm).mkdir()
        _qcow2(tmp_path / "vms" / vm / "root.qcow2", str(base))
    assert not images.collect(str(base))  # two users
    (tmp_path / "vms" / "den-vm-1" / "root.qcow2").unlink()
    assert not images.collect(str(base))  # a snapshot still overlays it
    (tmp_path / "vms" / "den-snap-2" / "root.qcow2").unlink()
    assert images.collect(str(base)) and not base.exists()
    assert list((tmp_path / "images").iterdir()) == []  # its lock file went too
    # The setup's root filesystem, or a file elsewhere, is never collected here.
    assert not images.collect(str(tmp_path / "rootfs-abc.ext4"))
    assert not images.collect(None)
    assert (tmp_path / "rootfs-abc.ext4").exists()


def _overlay(tmp_path: Path, backing: Path, *opts: str) -> Path:
    qcow2 = tmp_path / f"root-{len(list(tmp_path.iterdir()))}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw",
                    *opts, str(qcow2)], check=True, capture_output=True)
    return qcow2


def test_a_root_overlay_must_be_backed_by_one_of_dens_root_filesystems(tmp_path: Path) -> None:
    """QEMU writes the overlay's header: a QEMU taken over by its guest could name another
    VM's disk or a host file as the backing file (or an external data file), and the next
    QEMU would open it as root. Each launch checks the header first."""
    bases = tmp_path / "bases"
    bases.mkdir()
    base = bases / "rootfs-1.ext4"
    base.write_bytes(b"\0" * 65536)
    other = tmp_path / "workspace.img"  # another VM's disk, a host file
    other.write_bytes(b"\0" * 65536)
    check_overlay(_overlay(tmp_path, base), [bases])  # as Den makes them
    refused = [_overlay(tmp_path, other),
               _overlay(tmp_path, bases / ".." / "workspace.img"),
               _overlay(tmp_path, base, "-o", f"data_file={tmp_path / 'data.raw'}")]
    (bases / "link.ext4").symlink_to(other)
    refused.append(_overlay(tmp_path, bases / "link.ext4"))
    not_qcow2 = tmp_path / "raw.img"
    not_qcow2.write_bytes(b"\0" * 512)
    for qcow2 in [*refused, not_qcow2]:
        with pytest.raises(EngineError, match="root disk"):
            check_overlay(qcow2, [bases])
