"""MicroVM workspaces of other images (docs/microvm.md, "Images"): an engine image converted
into a root filesystem of its own, shared by its VMs and removed with the last of them, and a
repository's devcontainer.json built as on gVisor, then converted. Through the HTTP API of a
real server with real VMs (TCG here: one VM per image, two for the shared base)."""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.runtime.microvm import process
from server.runtime.microvm.argv import VmFiles
from server.runtime.microvm.images import backing_file
from tests.conftest import (
    RUN_PREFIX,
    ApiClient,
    bare_repo,
    microvm_subnet,
    remove_microvm_network,
    users,
)
from tests.engine.test_microvm import BOOT_DIR, _require_setup, vm_dir

pytestmark = pytest.mark.engine

IMAGES_DIR = BOOT_DIR / "images"


def _settings(root: Path, prefix: str, image: str, **extra: Any) -> Settings:
    """A microVM server's settings; its bridge for the VMs' NICs a /24 of its own (each
    server's forwarder listens on its bridge's address): remove it with
    ``remove_microvm_network`` once the server is gone."""
    extra.setdefault("local_repo_roots", [root / "repos"])
    extra.setdefault("microvm_subnet", microvm_subnet())
    return Settings(allowed_images=[image, f"{image}-nope"], data_dir=root / "data",
                    backend="microvm",
                    engine_prefix=prefix, microvm_dir=BOOT_DIR, default_disk_gb=1,
                    default_memory_mb=512, default_cpus=1.0, stop_timeout_s=5,
                    reaper_interval_s=0, ssh_port=0, gpus="none", devcontainer_builds="on",
                    **extra)


@pytest.fixture(scope="module")
def api(engine: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiClient]:
    """A microVM server, the repository ``api.git``, and ``api.image``: an image built FROM
    the default one with a marker file (its content unique to this run, so is its id)."""
    _require_setup()
    root = tmp_path_factory.mktemp("vm-images")
    (root / "repos").mkdir()
    prefix = f"{RUN_PREFIX}-{secrets.token_hex(2)}"
    image = f"{prefix}-marker:1"
    subprocess.run(["docker", "build", "-q", "-t", image, "-"], check=True, timeout=300,
                   capture_output=True,
                   input=(f"FROM den/workspace:latest\nRUN echo {prefix} > /etc/den-marker\n"
                          ).encode())
    settings = _settings(root, prefix, image)
    app = create_app(settings)
    try:
        with TestClient(app) as client:
            api = ApiClient(client, users(app))
            api.repo = bare_repo(root / "repos", root / "src",  # type: ignore[attr-defined]
                                 files={"README.md": "# api\n"})
            api.image = image  # type: ignore[attr-defined]
            try:
                yield api
            finally:
                for ws in api.get("/api/v1/workspaces", user="root").json()["workspaces"]:
                    client.delete(f"/api/v1/workspaces/{ws['id']}", headers=api.h("root"))
                for d in (BOOT_DIR / "vms").glob(f"{prefix}-*"):
                    process.end(VmFiles(d), timeout_s=0)
                    subprocess.run(["rm", "-rf", str(d)], check=False)
    finally:
        subprocess.run(["docker", "rmi", "-f", image], capture_output=True, check=False)
        remove_microvm_network(settings)


def _until(what: str, cond: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.05)


def _image_id(image: str) -> str:
    out = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", image],
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip().removeprefix("sha256:")


def _bases(image_id: str) -> list[Path]:
    return sorted(IMAGES_DIR.glob(f"{image_id[:24]}-*.ext4"))


class _Conversions(logging.Handler):
    """The images module's "root filesystem ... made" lines, from every thread."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if "made in" in record.getMessage():
            with self._lock2:
                self.made.append(record.getMessage())


def test_workspaces_of_another_image_share_one_converted_root_filesystem(
        api: ApiClient) -> None:
    """Two concurrent creates of one image: one conversion, both VMs overlay it and see the
    image's files; the base goes with the last of them."""
    image = str(api.image)  # type: ignore[attr-defined]
    image_id = _image_id(image)
    assert _bases(image_id) == []
    watcher = _Conversions()
    logger = logging.getLogger("server.runtime.microvm.images")
    logger.addHandler(watcher)
    logger.setLevel(logging.INFO)
    try:
        made = [api.create(api.repo, name=n, image=image, wait=False)  # type: ignore[attr-defined]
                for n in ("one", "two")]
        got = [api.wait_state(w["id"], timeout_s=300) for w in made]
    finally:
        logger.removeHandler(watcher)
    assert [w["state"] for w in got] == ["running", "running"], got
    assert len(watcher.made) == 1, watcher.made  # converted once
    [base] = _bases(image_id)
    assert base.stat().st_mode & 0o777 == 0o444  # never written after it was made
    for w in got:
        assert backing_file(VmFiles(vm_dir(api, w["id"])).root) == str(base)
        out = api.exec(w["id"], "cat /etc/den-marker; id -un; pwd; cat README.md")
        prefix = api.app.state.settings.engine_prefix
        assert out["stdout"] == f"{prefix}\ndev\n/workspace/api\n# api\n", out
    first = vm_dir(api, got[0]["id"])
    assert api.delete(f"/api/v1/workspaces/{got[0]['id']}").status_code in (200, 202, 204)
    _until("the first VM's directory is removed", lambda: not first.exists())
    assert _bases(image_id) == [base]  # the other VM still overlays it
    assert api.delete(f"/api/v1/workspaces/{got[1]['id']}").status_code in (200, 202, 204)
    _until("the base goes with the last VM of its image", lambda: _bases(image_id) == [])


def test_an_image_over_the_limit_or_missing_is_refused(api: ApiClient,
                                                      tmp_path: Path) -> None:
    image = str(api.image)  # type: ignore[attr-defined]
    bases_before = set(IMAGES_DIR.glob("*.ext4"))
    r = api.post("/api/v1/workspaces", json={"name": "missing", "image": f"{image}-nope",
                                             "repo": {"url": str(api.repo)}})  # type: ignore[attr-defined]
    assert (r.status_code, r.json()["error"]["code"]) == (422, "image_missing"), r.text
    small_settings = _settings(tmp_path, f"{RUN_PREFIX}-{secrets.token_hex(2)}", image,
                               local_repo_roots=[Path(str(api.repo)).parent],  # type: ignore[attr-defined]
                               microvm_image_max_mb=64, microvm_accel="tcg")
    small = create_app(small_settings)
    try:
        _refuse_over_the_limit(api, small, image, bases_before)
    finally:
        remove_microvm_network(small_settings)


def _refuse_over_the_limit(api: ApiClient, small: Any, image: str,
                           bases_before: set[Path]) -> None:
    with TestClient(small) as client:
        other = ApiClient(client, users(small))
        r = other.post("/api/v1/workspaces", json={"name": "big", "image": image,
                                                   "repo": {"url": str(api.repo)}})  # type: ignore[attr-defined]
        assert (r.status_code, r.json()["error"]["code"]) == (422, "image_too_large"), r.text
        assert "DEN_MICROVM_IMAGE_MAX_MB" in r.text and "64 MB" in r.text, r.text
        assert other.get("/api/v1/workspaces", user="root").json()["workspaces"] == []
        # A devcontainer's image is known after the 202: over the limit, the workspace is
        # `error` with the reason, and neither a VM directory nor a base is left.
        root = Path(str(api.repo)).parent.parent  # type: ignore[attr-defined]
        repo = bare_repo(root / "repos", root / "src-big", name="big", files={
            ".devcontainer/devcontainer.json": '{"image": "den/workspace:latest"}'})
        made = other.create(repo, name="big", wait=False)
        failed = other.wait_state(made["id"], timeout_s=300)
        assert failed["state"] == "error", failed
        assert "DEN_MICROVM_IMAGE_MAX_MB" in failed["state_reason"], failed
        prefix = small.state.settings.engine_prefix
        assert list((BOOT_DIR / "vms").glob(f"{prefix}-*")) == []
        assert set(IMAGES_DIR.glob("*.ext4")) <= bases_before


def test_a_devcontainer_with_a_dockerfile_runs_in_a_microvm(api: ApiClient) -> None:
    """build.dockerfile, containerEnv, postCreateCommand and forwardPorts, as on gVisor."""
    prefix = api.app.state.settings.engine_prefix
    config = {"build": {"dockerfile": "Dockerfile"}, "containerEnv": {"MODE": "container"},
              "postCreateCommand": "echo \"post $MODE\" > post.txt && pwd > where.txt",
              "forwardPorts": [3000]}
    root = Path(str(api.repo)).parent.parent  # type: ignore[attr-defined]
    repo = bare_repo(root / "repos", root / "src-devc", name="devc", files={
        ".devcontainer/devcontainer.json": json.dumps(config),
        ".devcontainer/Dockerfile": (f"FROM den/workspace:latest\n"
                                     f"RUN echo devc-{prefix} > /etc/devc-marker\n")})
    ws = api.create(repo, name="devc", wait=False)
    ws = api.wait_state(ws["id"], timeout_s=300)
    events = api.get(f"/api/v1/workspaces/{ws['id']}/events").json()["events"]
    assert ws["state"] == "running", (ws, events)
    assert ws["image"].startswith(f"{prefix}-devc:"), ws
    out = api.exec(ws["id"], "cat /etc/devc-marker post.txt where.txt; echo $MODE; id -un; "
                             "sudo -n id -un")
    assert out["stdout"].split("\n") == [f"devc-{prefix}", "post container", "/workspace/devc",
                                         "container", "dev", "root", ""], out
    messages = "\n".join(e["message"] for e in events if e["kind"] == "devcontainer")
    assert "postCreateCommand done" in messages, messages
    ports = api.get(f"/api/v1/workspaces/{ws['id']}/ports").json()["ports"]
    assert [p["port"] for p in ports] == [3000], ports
    base = backing_file(VmFiles(vm_dir(api, ws["id"])).root)
    assert base is not None and Path(base).parent == IMAGES_DIR, base
    assert api.delete(f"/api/v1/workspaces/{ws['id']}").status_code in (200, 202, 204)
    _until("the devcontainer's base goes with its VM", lambda: not Path(base).exists())
