"""Workspaces built from a repository's devcontainer.json, on the real engine with gVisor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.runtime.docker_build import DockerImageBuilder
from tests.conftest import ApiClient, _admin, engine_objects, users

pytestmark = pytest.mark.engine

COMMAND_TIMEOUT_S = 5


BUILD_TIMEOUT_S = 4


def _api(settings: Settings) -> Iterator[ApiClient]:
    app = create_app(settings)
    with TestClient(app) as client:
        yield ApiClient(client, users(app))
        for ws in app.state.workspaces.list_for(_admin(app)):
            with contextlib.suppress(Exception):
                client.delete(f"/api/v1/workspaces/{ws.id}", headers={
                    "Authorization": f"Bearer {users(app)['root']}"})


# This machine's engine runs builds on runc (its default runtime): the tests' repositories are
# trusted, as an operator says with DEN_DEVCONTAINER_BUILDS=on.
@pytest.fixture
def api(engine: None, make_settings: Callable[..., Settings]) -> Iterator[ApiClient]:
    yield from _api(make_settings(devcontainer_command_timeout_s=COMMAND_TIMEOUT_S,
                                  devcontainer_builds="on"))


@pytest.fixture
def impatient_api(engine: None, make_settings: Callable[..., Settings]) -> Iterator[ApiClient]:
    """Builds cancelled after BUILD_TIMEOUT_S."""
    yield from _api(make_settings(devcontainer_build_timeout_s=BUILD_TIMEOUT_S,
                                  devcontainer_builds="on"))


def test_the_engines_default_runtime_decides_whether_builds_are_sandboxed(engine: None) -> None:
    """What `auto` asks of the real engine: its default runtime, as `docker info` says."""
    default = subprocess.run(["docker", "info", "--format", "{{.DefaultRuntime}}"],
                             capture_output=True, text=True, check=True, timeout=30
                             ).stdout.strip()
    sandboxed = asyncio.run(DockerImageBuilder(gvisor_runtime="runsc").builds_sandboxed())
    assert sandboxed is (default == "runsc"), default


def _prefix(api: ApiClient) -> str:
    return str(api.app.state.settings.engine_prefix)


def _events(api: ApiClient, ws_id: str) -> list[dict[str, Any]]:
    r = api.get(f"/api/v1/workspaces/{ws_id}/events")
    assert r.status_code == 200, r.text
    return list(r.json()["events"])


def _messages(api: ApiClient, ws_id: str, kind: str) -> str:
    return "\n".join(e["message"] for e in _events(api, ws_id) if e["kind"] == kind)


def _left_behind(api: ApiClient, ws_id: str) -> list[tuple[str, str]]:
    return [o for o in engine_objects(_prefix(api)) if ws_id in o[1]]


def _images(prefix: str) -> list[str]:
    out = subprocess.run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
                         capture_output=True, text=True, check=True).stdout.split()
    return [i for i in out if i.startswith(prefix)]


def test_image_with_lifecycle_commands_ports_and_unused_keys(
    api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    config = """{
      // JSON with comments, as editors write it
      "image": "den/workspace:latest",
      "remoteEnv": {"STAGE": "dev"},
      "onCreateCommand": ["sh", "-c", "id -un > /tmp/on-create-user; echo created > oncreate.txt"],
      "postCreateCommand": "echo \\"post $STAGE\\" > post.txt && pwd > where.txt",
      "postStartCommand": {"count": "echo start >> /workspace/starts.txt"},
      "forwardPorts": [3000],
      "portsAttributes": {"3000": {"label": "web app", "visibility": "users"}},
      "customizations": {"vscode": {"extensions": ["ms-python.python"]}},
    }"""
    repo = make_repo("api", {".devcontainer/devcontainer.json": config, "README.md": "x\n"})
    ws = api.create(repo)
    assert ws["state"] == "running", (ws, _events(api, ws["id"]))
    assert ws["image"].startswith(f"{_prefix(api)}-devc:"), ws
    assert ws["env"]["STAGE"] == "dev"

    out = api.exec(ws["id"], "cat oncreate.txt post.txt where.txt /workspace/starts.txt "
                             "/tmp/on-create-user; id -un; sudo -n id -un")
    assert out["exit_code"] == 0, out
    assert out["stdout"].split("\n")[:7] == ["created", "post dev", "/workspace/api", "start",
                                             "dev", "dev", "root"], out
    devc = _messages(api, ws["id"], "devcontainer")
    assert "using .devcontainer/devcontainer.json" in devc
    assert "not acted on by Den: customizations" in devc
    assert "postCreateCommand done" in devc
    assert "forwarded ports: 3000 (web app): users" in devc

    ports = api.get(f"/api/v1/workspaces/{ws['id']}/ports").json()["ports"]
    assert [(p["port"], p["label"], p["share"]) for p in ports] == [(3000, "web app", "users")]

    # postStartCommand runs again on every cold start.
    assert api.post(f"/api/v1/workspaces/{ws['id']}/stop").status_code == 200
    assert api.post(f"/api/v1/workspaces/{ws['id']}/start").status_code == 200
    out = api.exec(ws["id"], "cat /workspace/starts.txt")
    assert out["stdout"] == "start\nstart\n", out

    # Opting out: the same repository on the default image, nothing run.
    plain = api.create(repo, name="plain", devcontainer=False)
    assert plain["state"] == "running" and plain["image"] == "den/workspace:latest", plain
    assert api.exec(plain["id"], "ls")["stdout"] == "README.md\n"
    assert _messages(api, plain["id"], "devcontainer") == ""


DOCKERFILE = """ARG BASE=den/base:bookworm
FROM ${BASE}
ARG GREETING=unset
RUN echo "built with $GREETING" > /built.txt && ls /sys/class/net > /build-nets.txt
COPY tool.sh /usr/local/bin/tool
RUN chmod 0755 /usr/local/bin/tool && groupadd -g 1000 node && useradd -u 1000 -g 1000 -m node
COPY . /ctx/
"""


def test_dockerfile_from_the_local_base_with_container_env_is_built_once(
    api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    config = json.dumps({
        "build": {"dockerfile": "Dockerfile", "context": "..", "args": {"GREETING": "args"}},
        "containerEnv": {"MODE": "container"},
        "workspaceFolder": "/workspace/svc",
        "postCreateCommand": "tool > from-tool.txt",
    })
    repo = make_repo("svc", {".devcontainer/devcontainer.json": config,
                             ".devcontainer/Dockerfile": DOCKERFILE,
                             "tool.sh": "#!/bin/sh\necho tool ran\n",
                             ".dockerignore": "secret.env\n*.md\n!KEEP.md\n",
                             "secret.env": "TOKEN=x", "notes.md": "mine", "KEEP.md": "k"})
    ws = api.create(repo)
    assert ws["state"] == "running", (ws, _events(api, ws["id"]))
    out = api.exec(ws["id"], "cat /built.txt /build-nets.txt from-tool.txt; echo $MODE; "
                             "id -u; touch mine && echo writable")
    assert out["exit_code"] == 0, out
    # The RUN step had no network: only the loopback interface. The image's own user 1000
    # (node) and dev are one uid, which owns the repository's files.
    assert out["stdout"] == "built with args\nlo\ntool ran\ncontainer\n1000\nwritable\n", out
    # The context left out what its .dockerignore says (and the clone's .git).
    out = api.exec(ws["id"], "ls -A /ctx")
    assert out["stdout"] == ".devcontainer\n.dockerignore\nKEEP.md\ntool.sh\n", out
    build = _messages(api, ws["id"], "build")
    assert "Step 1/" in build and "den-layer.sh" in build
    assert "(built)" in _messages(api, ws["id"], "devcontainer")

    # The same recipe again: the image is shared, not rebuilt.
    again = api.create(repo, name="svc2")
    assert again["state"] == "running", again
    assert again["image"] == ws["image"]
    assert "(cached)" in _messages(api, again["id"], "devcontainer")
    assert _messages(api, again["id"], "build") == ""
    assert not [i for i in _images(_prefix(api)) if "-devc-build:" in i]


def test_refused_keys_end_in_error_with_nothing_left(
    api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    config = """{"image": "den/workspace:latest", "privileged": true,
                 "mounts": ["source=/,target=/host,type=bind"], "runArgs": ["--cap-add=ALL"]}"""
    ws = api.create(make_repo("bad", {".devcontainer.json": config}))
    assert ws["state"] == "error", ws
    for key in ("privileged", "mounts", "runArgs"):
        assert key in ws["state_reason"], ws
    assert "--no-devcontainer" in ws["state_reason"]
    assert _left_behind(api, ws["id"]) == []

    missing = api.create(make_repo("gone", {".devcontainer.json": '{"image": "den/nope:1"}'}),
                         name="gone")
    assert missing["state"] == "error", missing
    assert "'den/nope:1' is not on this server" in missing["state_reason"]
    assert _left_behind(api, missing["id"]) == []

    broken = api.create(make_repo("json", {".devcontainer.json": '{"image": "x",, }'}),
                        name="json")
    assert broken["state"] == "error" and "line 1" in broken["state_reason"], broken


def test_failing_build_and_hanging_command_end_in_error(
    api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    dockerfile = ("FROM den/base:bookworm\nRUN echo step-one > /one\n"
                  "RUN echo about-to-fail && exit 7\n")
    ws = api.create(make_repo("fails", {
        ".devcontainer/devcontainer.json": '{"build": {"dockerfile": "Dockerfile"}}',
        ".devcontainer/Dockerfile": dockerfile}))
    assert ws["state"] == "error", ws
    assert "the image build failed" in ws["state_reason"], ws
    assert "about-to-fail" in ws["state_reason"], ws  # the tail of the log
    build = _messages(api, ws["id"], "build")
    assert "about-to-fail" in build
    assert _left_behind(api, ws["id"]) == []
    # The image of the step that worked is removed with the failed build.
    step = re.search(r"Step 2/\d+ : RUN echo step-one.*?\n ---> ([0-9a-f]{12})\n", build, re.S)
    assert step is not None, build
    assert subprocess.run(["docker", "image", "inspect", step.group(1)],
                          capture_output=True).returncode != 0
    assert not [i for i in _images(_prefix(api)) if "-devc-build:" in i]

    hangs = api.create(make_repo("hangs", {
        ".devcontainer.json": '{"image": "den/workspace:latest", '
                              '"postCreateCommand": "echo started; sleep 600"}'}), name="hangs")
    assert hangs["state"] == "error", hangs
    assert (f"postCreateCommand did not finish within {COMMAND_TIMEOUT_S} s"
            in hangs["state_reason"]), hangs
    assert "started" in hangs["state_reason"]
    assert _left_behind(api, hangs["id"]) == []

    fails = api.create(make_repo("exits", {
        ".devcontainer.json": '{"image": "den/workspace:latest", '
                              '"postCreateCommand": ["sh", "-c", "echo oops >&2; exit 4"]}'}),
        name="exits")
    assert fails["state"] == "error", fails
    assert "postCreateCommand failed (exit code 4)" in fails["state_reason"]
    assert "oops" in fails["state_reason"]


def test_a_build_past_its_deadline_is_cancelled(
    impatient_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    api = impatient_api
    dockerfile = "FROM den/base:bookworm\nRUN echo sleeping && sleep 300\n"
    ws = api.create(make_repo("slow", {
        ".devcontainer/devcontainer.json": '{"build": {"dockerfile": "Dockerfile"}}',
        ".devcontainer/Dockerfile": dockerfile}))
    assert ws["state"] == "error", ws
    assert f"took longer than {BUILD_TIMEOUT_S} s" in ws["state_reason"], ws
    assert _left_behind(api, ws["id"]) == []
    # The step's container is gone once the engine has cancelled the build.
    running = re.search(r"---> Running in ([0-9a-f]{12})", _messages(api, ws["id"], "build"))
    assert running is not None
    deadline = time.monotonic() + 60
    while subprocess.run(["docker", "container", "inspect", running.group(1)],
                         capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "the build's container is still there"
        time.sleep(0.2)
