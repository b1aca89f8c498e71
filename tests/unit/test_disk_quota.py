"""The pure parts of per-workspace disk images (server/runtime/disk_quota.py); mounting and
ENOSPC are tested on the real engine (tests/engine/test_quota_disk.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.runtime.disk_quota import (
    DiskError,
    Disks,
    check_name,
    layer_dir,
    mkfs_argv,
    mount_argv,
    volume_options,
)
from server.runtime.errors import EngineError

ROOT = Path("/data/disks")


def test_paths_of_a_volume() -> None:
    disks = Disks(ROOT)
    assert disks.image("den-ws1-data") == ROOT / "den-ws1-data.img"
    assert disks.mountpoint("den-ws1-data") == ROOT / "den-ws1-data"
    assert disks.data_dir("den-ws1-data") == ROOT / "den-ws1-data" / "workspace"


@pytest.mark.parametrize("name", ["", "../etc", "a/b", ".hidden", "x..y", "a b", "x" * 200])
def test_names_that_are_not_volume_names_are_refused(name: str) -> None:
    with pytest.raises(DiskError):
        check_name(name)
    with pytest.raises(DiskError):
        Disks(ROOT).image(name)


def test_disk_errors_are_engine_errors_without_host_paths() -> None:
    err = DiskError("mounting the disk of v failed: /data/disks/v.img: busy")
    assert isinstance(err, EngineError) and err.status_code == 502
    assert "/data" not in err.message and "/data/disks/v.img" in err.detail


def test_commands() -> None:
    assert mkfs_argv(Path("/d/v.img")) == [
        "mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1",
        "/d/v.img"]
    assert mount_argv(Path("/d/v.img"), Path("/d/v")) == [
        "mount", "-o", "loop,nodev,discard", "/d/v.img", "/d/v"]
    assert volume_options(Path("/d/v/workspace")) == {
        "type": "none", "o": "bind", "device": "/d/v/workspace"}


def test_layer_dir_from_inspect() -> None:
    upper = "/var/lib/docker/overlay2/abc123/diff"
    inspect = {"GraphDriver": {"Name": "overlay2", "Data": {"UpperDir": upper}}}
    assert layer_dir(inspect) == Path("/var/lib/docker/overlay2/abc123")
    assert layer_dir({"GraphDriver": {"Name": "btrfs", "Data": {}}}) is None
    assert layer_dir({}) is None


def test_volumes_and_remove_of_nothing(tmp_path: Path) -> None:
    disks = Disks(tmp_path / "disks")
    assert disks.volumes() == []
    disks.remove("den-ws1-data")  # nothing there: fine
    disks.root.mkdir()
    (disks.root / "den-ws1-data.img").write_bytes(b"")
    (disks.root / "den-ws2-data.img").write_bytes(b"")
    assert disks.volumes() == ["den-ws1-data", "den-ws2-data"]
    assert disks.has("den-ws1-data") and not disks.has("den-ws3-data")
    disks.remove("den-ws1-data")  # not mounted: the image goes
    assert disks.volumes() == ["den-ws2-data"]
    assert not disks.ready("den-ws3-data", None)  # no image: an unenforced volume


def test_orphans_are_images_whose_volume_the_engine_lacks(tmp_path: Path) -> None:
    disks = Disks(tmp_path)
    for volume, owner in (("den-ws1-data", "ws1"), ("den-ws2-data", "ws2")):
        (tmp_path / f"{volume}.img").write_bytes(b"")
        disks.owner_file(volume).write_text(owner)
    (tmp_path / "den-ws3-data.workspace").write_text("ws3")  # a create cut before mkfs
    (tmp_path / "den-ws4-data.img.new").write_bytes(b"")  # not an image (yet)
    (tmp_path / "den-ws1-data").mkdir()  # a mountpoint
    assert disks.orphans({"den-ws1-data"}) == [("den-ws2-data", "ws2"), ("den-ws3-data", "ws3")]
    disks.remove("den-ws3-data")
    assert disks.orphans({"den-ws1-data"}) == [("den-ws2-data", "ws2")]
