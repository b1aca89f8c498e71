"""``disk_gb`` enforced on the real engine: /workspace and the root filesystem share one disk
image per workspace (server/runtime/disk_quota.py); filling it is ENOSPC inside, and the
limit survives stop/start, pause/resume, a lost mount (host reboot), fork and restore."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.git.clone import pack_for_workspace
from server.runtime.disk_quota import Disks
from server.runtime.docker_specs import container_of, volume_of
from tests.conftest import ApiClient

pytestmark = pytest.mark.engine

GIB = 1024**3
# More than the 1 GiB disk, in one go, as dev and as root.
FILL_WS = "dd if=/dev/zero of=/workspace/fill bs=1M count=1300 2>&1; echo rc=$?"
FILL_ROOT = "sudo dd if=/dev/zero of=/var/fill bs=1M count=1300 2>&1; echo rc=$?"
SIZE = "df -B1 --output=size {} | tail -1"


def _disks(api: ApiClient) -> Path:
    return Path(api.app.state.settings.data_dir) / "disks"


def _volume(api: ApiClient, wid: str) -> str:
    ws = api.app.state.workspaces.get(wid)
    return str(volume_of(api.app.state.workspaces.spec_for(ws)))


def _mounts_under(path: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mnt = line.split()[4].replace("\\040", " ")
        if mnt == str(path) or mnt.startswith(f"{path}/"):
            found.append(mnt)
    return found


def _inspect(name: str) -> dict[str, Any]:
    out = subprocess.run(["docker", "inspect", name], capture_output=True, text=True,
                         check=True).stdout
    return dict(json.loads(out)[0])


def _size_inside(api: ApiClient, wid: str, path: str) -> int:
    out = api.exec(wid, SIZE.format(path))
    assert out["exit_code"] == 0, out
    return int(out["stdout"].strip())


def _assert_full(out: dict[str, Any]) -> None:
    assert "No space left on device" in out["stdout"], out
    assert "rc=0" not in out["stdout"], out


def _assert_one_gib(api: ApiClient, wid: str) -> None:
    for path in ("/workspace", "/"):
        size = _size_inside(api, wid, path)
        assert 0.8 * GIB < size <= GIB, (path, size)


def test_disk_gb_bounds_workspace_and_root(real_api: ApiClient,
                                           make_repo: Callable[..., Path]) -> None:
    api = real_api
    wid = api.create(make_repo(), resources={"disk_gb": 1})["id"]
    other = api.create(make_repo("other"), name="other", resources={"disk_gb": 1})["id"]
    volume = _volume(api, wid)
    image = _disks(api) / f"{volume}.img"
    assert image.exists()
    dio = subprocess.run(["losetup", "--list", "-n", "-O", "DIO", "-j", str(image)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert dio == ["1"]  # one loop device, on direct I/O
    _assert_one_gib(api, wid)

    # As dev in /workspace, then as root in the root filesystem: both hit the same wall.
    _assert_full(api.exec(wid, FILL_WS))
    _assert_full(api.exec(wid, FILL_ROOT))
    _assert_full(api.exec(wid, "dd if=/dev/zero of=/workspace/more bs=1M count=8 2>&1; echo rc=$?"))
    # What was written went into the image, nowhere else on the host.
    assert os.stat(image).st_blocks * 512 <= GIB + 64 * 1024**2

    # The server and the other workspace are fine; so is this one, once it frees space.
    assert api.exec(other, "echo hi > /workspace/x && sudo sh -c 'echo hi > /var/x' && "
                    "cat /workspace/x /var/x")["stdout"] == "hi\nhi\n"
    assert api.get(f"/api/v1/workspaces/{wid}").json()["state"] == "running"

    # A full disk stops and starts again (its files kept), and pauses and resumes.
    assert api.post(f"/api/v1/workspaces/{wid}/stop").json()["state"] == "stopped"
    assert api.post(f"/api/v1/workspaces/{wid}/start").json()["state"] == "running"
    assert api.exec(wid, "ls /var/fill /workspace/fill")["exit_code"] == 0
    assert api.exec(wid, "rm /workspace/fill && sudo rm /var/fill && echo v1 > /workspace/a && "
                    "sudo sh -c 'echo v1 > /etc/den-root-file'")["exit_code"] == 0
    assert api.post(f"/api/v1/workspaces/{wid}/pause").json()["state"] == "paused"
    assert api.post(f"/api/v1/workspaces/{wid}/resume").json()["state"] == "running"
    _assert_one_gib(api, wid)

    # After a host reboot the mounts are gone: the next start makes them again, with the
    # files on the disk image (not the engine's empty layer underneath).
    assert api.post(f"/api/v1/workspaces/{wid}/stop").json()["state"] == "stopped"
    container = container_of(api.app.state.workspaces.spec_for(
        api.app.state.workspaces.get(wid)))
    layer = Path(_inspect(container)["GraphDriver"]["Data"]["UpperDir"]).parent
    assert str(layer) in _mounts_under(layer)
    subprocess.run(["umount", str(layer)], check=True)
    subprocess.run(["umount", str(_disks(api) / volume)], check=True)
    assert api.post(f"/api/v1/workspaces/{wid}/start").json()["state"] == "running"
    assert api.exec(wid, "cat /workspace/a /etc/den-root-file")["stdout"] == "v1\nv1\n"
    _assert_full(api.exec(wid, FILL_ROOT))

    # Delete leaves nothing: no image, no mount, no loop device.
    assert api.delete(f"/api/v1/workspaces/{wid}").status_code == 204
    assert not image.exists()
    assert _mounts_under(_disks(api) / volume) == []
    assert _mounts_under(layer) == []
    loops = subprocess.run(["losetup", "--list", "-n", "-O", "BACK-FILE"], capture_output=True,
                           text=True, check=True).stdout
    assert volume not in loops  # also not as "<image> (deleted)"


def test_fork_and_restore_keep_the_limit(real_api: ApiClient,
                                         make_repo: Callable[..., Path]) -> None:
    api = real_api
    wid = api.create(make_repo(), resources={"disk_gb": 1})["id"]
    api.exec(wid, "echo v1 > /workspace/notes && sudo sh -c 'echo v1 > /var/state'")
    r = api.post(f"/api/v1/workspaces/{wid}/snapshots", json={"name": "before"})
    assert r.status_code == 201, r.text
    snap = r.json()["id"]

    r = api.post("/api/v1/workspaces", json={"name": "fork", "from_snapshot": snap})
    assert r.status_code == 202, r.text
    fork = api.wait_state(r.json()["id"])
    assert fork["state"] == "running" and fork["resources"]["disk_gb"] == 1, fork
    assert api.exec(fork["id"], "cat /workspace/notes /var/state")["stdout"] == "v1\nv1\n"
    _assert_one_gib(api, fork["id"])
    _assert_full(api.exec(fork["id"], FILL_ROOT))

    old_volume = _volume(api, wid)
    api.exec(wid, "echo v2 > /workspace/notes")
    r = api.post(f"/api/v1/snapshots/{snap}/restore")
    assert (r.status_code, r.json()["state"]) == (200, "running"), r.text
    assert api.exec(wid, "cat /workspace/notes /var/state")["stdout"] == "v1\nv1\n"
    _assert_one_gib(api, wid)
    _assert_full(api.exec(wid, FILL_WS))
    # The restore's new volume has a disk of its own; the old one's is gone.
    assert _volume(api, wid) != old_volume
    assert not (_disks(api) / f"{old_volume}.img").exists()
    assert _mounts_under(_disks(api) / old_volume) == []

    # A disk whose volume is gone (Den killed between removing the two) goes at reconcile;
    # the workspaces' own stay.
    orphan = f"{api.app.state.settings.engine_prefix}-wsgone-data"
    Disks(_disks(api)).create(orphan, size_gb=1, workspace_id="wsgone")
    assert _mounts_under(_disks(api) / orphan)
    assert api.client.portal is not None
    api.client.portal.call(api.app.state.workspaces.reconcile)
    assert not (_disks(api) / f"{orphan}.img").exists()
    assert _mounts_under(_disks(api) / orphan) == []
    assert api.exec(wid, "cat /workspace/notes")["stdout"] == "v1\n"
    assert sorted(Disks(_disks(api)).volumes()) == sorted(
        [_volume(api, wid), _volume(api, fork["id"])])


def test_a_workspace_made_before_keeps_its_plain_volume(engine: None, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    """A workspace whose volume has no disk image (made before disk_gb was enforced, or
    with DEN_ENFORCE_DISK_GB off) starts, stops and is deleted as before, unlimited. Its
    repository is written from the host into the local driver's directory; a seed the host
    cannot write (its entries are there already) goes through the engine, over them."""
    from server.runtime.base import WorkspaceSpec, labels_for
    from server.runtime.docker import DockerRuntime
    from tests.conftest import RUN_PREFIX

    name = f"{RUN_PREFIX}-legacy"
    spec = WorkspaceSpec(
        workspace_id="wslegacy", handle={"container": name, "volume": f"{name}-data"},
        image="den/workspace:latest", runtime="gvisor", cpus=1, memory_mb=512, pids_limit=256,
        hostname="legacy", labels=labels_for(instance=name, workspace_id="wslegacy", owner="0"),
        disk_gb=1)
    disks = Disks(tmp_path / "disks")
    before = DockerRuntime(disks=None)
    after = DockerRuntime(disks=disks)

    def sh(script: str) -> str:
        return subprocess.run(["docker", "exec", name, "sh", "-c", script], capture_output=True,
                              text=True, check=True).stdout

    async def scenario() -> None:
        await before.create(spec)  # the old code: a plain volume
        await after.start(spec)  # the new code starts it as it is
        assert int(sh(SIZE.format("/workspace"))) > 2 * GIB  # the host's disk, not 1 GiB
        assert disks.volumes() == []
        sh("echo kept > /workspace/a && echo kept > /var/b")
        await after.seed(spec, _packed(tmp_path, "one"))
        assert "seeding from the host failed" not in caplog.text
        assert sh("cat /workspace/proj/f && stat -c %U:%G /workspace/proj/f") == "one\ndev:dev\n"
        await after.seed(spec, _packed(tmp_path, "two"))
        assert "seeding from the host failed" in caplog.text
        assert sh("cat /workspace/proj/f && stat -c %U:%G /workspace/proj/f") == "two\ndev:dev\n"
        await after.stop(spec, timeout_s=2)
        await after.start(spec)
        assert sh("cat /workspace/a /var/b") == "kept\nkept\n"
        await after.destroy(spec)

    caplog.set_level(logging.INFO, logger="server.runtime.docker")
    try:
        asyncio.run(scenario())
    finally:
        before.close()
        after.close()
    assert disks.volumes() == []


def _packed(tmp_path: Path, content: str) -> Path:
    src = tmp_path / f"src-{content}"
    src.mkdir()
    (src / "f").write_text(f"{content}\n")
    pack_for_workspace(src, arcname="proj", out=tmp_path / f"{content}.tar")
    return tmp_path / f"{content}.tar"


def test_the_limit_survives_a_kill9_and_a_delete_cut_short_leaves_no_disk(
        engine: None, tmp_path: Path, repos_root: Path, make_repo: Callable[..., Path]) -> None:
    from tests.conftest import RUN_PREFIX
    from tests.engine.test_reconcile import Server, _kill9_during

    server = Server(tmp_path / "data", repos_root, f"{RUN_PREFIX}-kq{os.getpid() % 1000}")
    server.start()
    try:
        r = server.http.post("/api/v1/workspaces", json={
            "name": "api", "repo": {"url": str(make_repo())}, "resources": {"disk_gb": 1}})
        assert r.status_code == 202, r.text
        wid = r.json()["id"]

        def exec_(cmd: str) -> dict[str, Any]:
            out = server.http.post(f"/api/v1/workspaces/{wid}/exec", json={"cmd": cmd})
            assert out.status_code == 200, out.text
            return dict(out.json())

        deadline = time.monotonic() + 120
        while server.ws(wid).get("state") != "running" and time.monotonic() < deadline:
            time.sleep(0.1)
        server.kill9()
        server.start()
        assert server.ws(wid)["state"] == "running"
        assert 0.8 * GIB < int(exec_(SIZE.format("/"))["stdout"]) <= GIB
        _assert_full(exec_(FILL_ROOT))

        disks = tmp_path / "data" / "disks"
        assert Disks(disks).volumes() != []
        _kill9_during(server, wid, lambda: server.http.delete(f"/api/v1/workspaces/{wid}"),
                      ("deleting", None), timeout_s=30)
        server.start()
        assert server.ws(wid) == {"status": 404}
        assert Disks(disks).volumes() == [] and _mounts_under(disks) == []
    finally:
        server.close()
