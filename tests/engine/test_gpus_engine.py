"""GPUs on the real engine of a host without one: Den's own discovery (NVML, nvidia-smi)
finds none, says so, and a GPU request is refused before any engine object exists. (The GPU
path itself needs a GPU host: scripts/gpu-check.sh.)"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from tests.conftest import ApiClient, engine_objects, users

pytestmark = pytest.mark.engine


@pytest.fixture
def api(engine: None, make_settings: Callable[..., Settings]) -> Iterator[ApiClient]:
    if shutil.which("nvidia-smi") or Path("/dev/nvidiactl").exists():
        pytest.skip("this host has an NVIDIA driver: run scripts/gpu-check.sh instead")
    app = create_app(make_settings(gpus="auto"))  # discovery as in production
    with TestClient(app) as client:
        yield ApiClient(client, users(app))


def test_a_host_without_gpus_says_so_and_refuses_gpu_requests(
        api: ApiClient, make_repo: Callable[..., Path]) -> None:
    assert api.get("/api/v1/gpus", user="root").json() == {
        "total": 0, "free": 0, "models": [], "idle_action": "stop", "gpus": []}
    r = api.post("/api/v1/workspaces", json={"name": "gpu", "repo": {"url": str(make_repo())},
                                             "resources": {"gpus": 1}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "no_gpus"
    assert "this server has no GPUs" in r.json()["error"]["message"]
    assert api.get("/api/v1/workspaces").json()["workspaces"] == []
    assert engine_objects(str(api.app.state.settings.engine_prefix)) == []
