"""Prebuilds on the real engine with gVisor, through a real `den serve` and the Python client:
a prebuild's create commands run once, and a workspace made from it (by taking the fork of it
made ahead and frozen, with its own host name, and a replacement made) has their output and
their running process (its memory); a newer commit on the branch is fetched into the fork,
postStartCommand runs, and a new prebuild replaces the old one; deleting a prebuild leaves its
forks running; a failing postCreateCommand fails the prebuild with its output and leaves
nothing behind. One server and one repository for the module (each prebuild is a create, a
memory snapshot and a delete)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.client import Den, Prebuild, Workspace
from tests.conftest import RUN_PREFIX, engine_objects, git
from tests.server_process import DenServer

pytestmark = pytest.mark.engine

# A process whose value exists only in its memory: it writes it to /tmp/mem again and again.
BACKGROUND = """#!/bin/sh
v="$(date +%s%N)-$$"
echo "$v" > /tmp/remember
while :; do echo "$v" > /tmp/mem; sleep 0.2; done
"""
DEVCONTAINER = """{
  "image": "den/workspace:latest",
  "postCreateCommand": "echo made >> made.txt && (nohup sh bg.sh >/dev/null 2>&1 &)",
  "postStartCommand": "echo started >> /workspace/starts.txt",
  "forwardPorts": [3000],
  "portsAttributes": {"3000": {"label": "web", "visibility": "users"}}
}"""
FAILING = """{
  "image": "den/workspace:latest",
  "postCreateCommand": "echo boom-output; exit 3"
}"""


def wait(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        if value := check():
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class Repo:
    """A bare repository under the server's allowed root, and a work tree to push from."""

    def __init__(self, root: Path, name: str, files: dict[str, str]) -> None:
        self.src = root / f"src-{name}"
        self.bare = root / "repos" / f"{name}.git"
        self.src.mkdir()
        git("init", "-q", "-b", "main", cwd=self.src)
        self.commit(files, "initial")
        git("clone", "-q", "--bare", str(self.src), str(self.bare))
        git("remote", "add", "origin", str(self.bare), cwd=self.src)

    def commit(self, files: dict[str, str], message: str) -> str:
        for rel, content in files.items():
            (self.src / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.src / rel).write_text(content)
        git("add", "-A", cwd=self.src)
        git("commit", "-q", "-m", message, cwd=self.src)
        return git("rev-parse", "HEAD", cwd=self.src).strip()

    def push(self) -> None:
        git("push", "-q", "origin", "main", cwd=self.src)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prebuilds")
    (root / "repos").mkdir()
    return root


@pytest.fixture(scope="module")
def repo(root: Path) -> Repo:
    return Repo(root, "api", {".devcontainer/devcontainer.json": DEVCONTAINER,
                              "bg.sh": BACKGROUND, "README.md": "# api\n"})


@pytest.fixture(scope="module")
def srv(engine: None, root: Path) -> Iterator[DenServer]:
    # The tests' repositories are trusted: their devcontainer images build on the engine's
    # default runtime (as in test_devcontainer.py).
    srv = DenServer(root / "data", root / "repos", f"{RUN_PREFIX}-pb", user="alice",
                    ssh_port=0, reaper_interval_s=0, stop_timeout_s=2,
                    devcontainer_builds="on", default_memory_mb=512)
    srv.start()
    try:
        yield srv
    finally:
        with Den(f"http://127.0.0.1:{srv.port}", srv.token) as den:
            for ws in den.workspaces():
                ws.delete()
            for pb in den.prebuilds():
                if pb.state != "building":
                    den.delete_prebuild(pb.id)
        srv.close()


@pytest.fixture(scope="module")
def den(srv: DenServer) -> Iterator[Den]:
    with Den(f"http://127.0.0.1:{srv.port}", srv.token, timeout_s=120) as den:
        yield den


@pytest.fixture(scope="module")
def prebuild(den: Den, repo: Repo) -> Prebuild:
    pb = den.prebuild(str(repo.bare), branch="main", wait=True, timeout_s=600)
    assert pb.state == "ready", pb
    return pb


def snapshot_ids(srv: DenServer) -> list[str]:
    return [s["id"] for s in srv.http.get("/api/v1/snapshots").json()["snapshots"]]


def messages(ws: Workspace) -> list[str]:
    return [e["message"] for e in ws.events()]


def out(ws: Workspace, cmd: str) -> str:
    result = ws.exec(cmd)
    assert result.exit_code == 0, (cmd, result)
    return result.stdout


def test_a_fork_of_a_prebuild_has_its_output_and_its_running_process(
        den: Den, srv: DenServer, repo: Repo, prebuild: Prebuild) -> None:
    assert prebuild.commit == git("rev-parse", "HEAD", cwd=repo.src).strip()
    assert prebuild.snapshot_id is not None
    assert [w.name for w in den.workspaces()] == []  # the build workspace is gone
    # a fork of it is made ahead and frozen (hidden); the create takes it
    forked = wait(lambda: den.get_prebuild(prebuild.id).raw["fork_ready"], 120,
                  "the fork made ahead")
    assert forked and [w.name for w in den.workspaces()] == []
    ws = den.create(str(repo.bare), name="first", branch="main", timeout_s=300)
    said = messages(ws)
    assert any(f"create from prebuild {prebuild.id} (commit {prebuild.commit[:12]})" in m
               and "took the fork made ahead" in m for m in said), said
    assert any(f"running from the fork of prebuild {prebuild.id} made ahead" in m
               for m in said), said
    assert out(ws, "hostname").strip() == "first"  # its own, not the fork's
    assert any(f"running from snapshot {prebuild.snapshot_id} (with its memory and "
               "processes)" in m for m in said), said
    # postCreateCommand ran once, in the prebuild; postStartCommand there and here
    assert out(ws, "cat made.txt /workspace/starts.txt").split() == [
        "made", "started", "started"]
    # the process started by postCreateCommand runs in the fork with its memory: it writes
    # the value it holds again after the file is removed
    remembered = out(ws, "cat /tmp/remember").strip()
    assert remembered
    out(ws, "rm -f /tmp/mem")
    assert wait(lambda: ws.exec("cat /tmp/mem").stdout.strip() == remembered, 30,
                "the prebuild's process to write /tmp/mem again")
    assert out(ws, "git rev-parse HEAD").strip() == prebuild.commit
    # the devcontainer's forwarded port, with its label and share level, as in the prebuild
    ports = srv.http.get(f"/api/v1/workspaces/{ws.id}/ports").json()["ports"]
    assert [(p["label"], p["share"]) for p in ports if p["port"] == 3000] == [("web", "users")]
    # a replacement is made ahead for the next create
    wait(lambda: den.get_prebuild(prebuild.id).raw["fork_ready"], 120, "a replacement fork")
    ws.delete()


def test_a_newer_commit_is_fetched_into_the_fork_and_a_new_prebuild_replaces_the_old(
        den: Den, srv: DenServer, repo: Repo, prebuild: Prebuild) -> None:
    newer = repo.commit({"NEW.md": "newer\n"}, "newer")
    repo.push()
    ws = den.create(str(repo.bare), name="second", branch="main", timeout_s=300)
    said = messages(ws)
    assert any(f"create from prebuild {prebuild.id}" in m for m in said), said
    assert any(f"fetched the branch's newer commits up to {newer[:12]}" in m for m in said), said
    assert out(ws, "git rev-parse HEAD").strip() == newer
    assert out(ws, "cat NEW.md made.txt /workspace/starts.txt").split() == [
        "newer", "made", "started", "started"]
    assert out(ws, "git status --porcelain --untracked-files=no") == ""
    # the out-of-date prebuild is replaced in the background
    assert any("is out of date; prebuild" in m for m in messages(ws)), messages(ws)
    new = wait(lambda: [p for p in den.prebuilds() if p.id != prebuild.id
                        and p.state != "building"], 600, "the new prebuild")[0]
    assert new.state == "ready" and new.commit == newer, new
    # retention, once the new one is ready: the old one and its snapshot go
    wait(lambda: [p.id for p in den.prebuilds()] == [new.id], 60, "the old prebuild to go")
    assert prebuild.snapshot_id not in snapshot_ids(srv)
    # the fork made from the deleted one still runs
    assert out(ws, "cat NEW.md").strip() == "newer"
    ws.delete()


def test_deleting_a_prebuild_leaves_its_running_fork_whole(den: Den, srv: DenServer,
                                                          repo: Repo) -> None:
    [pb] = den.prebuilds()
    ws = den.create(str(repo.bare), name="third", branch="main", timeout_s=300)
    assert any(f"create from prebuild {pb.id}" in m for m in messages(ws))
    den.delete_prebuild(pb.id)
    assert den.prebuilds() == [] and snapshot_ids(srv) == []
    assert out(ws, "cat made.txt").strip() == "made"
    ws.stop()
    ws.start()
    assert out(ws, "cat made.txt README.md").split() == ["made", "#", "api"]
    # with no prebuild left, a create builds from scratch
    cold = den.create(str(repo.bare), name="cold", branch="main", timeout_s=300)
    assert not any("from prebuild" in m for m in messages(cold))
    assert out(cold, "cat made.txt").strip() == "made"
    cold.delete()
    ws.delete()


def test_a_failing_post_create_command_fails_the_prebuild_and_leaves_nothing(
        den: Den, root: Path, srv: DenServer) -> None:
    bad = Repo(root, "bad", {".devcontainer/devcontainer.json": FAILING})
    made = cli(srv, "prebuild", str(bad.bare))  # the CLI, against the same server
    assert made.returncode == 1, made
    [pb] = den.prebuilds()
    assert made.stdout.split() == [pb.id, "failed"], made
    assert pb.state == "failed", pb
    assert "postCreateCommand failed (exit code 3)" in pb.reason, pb.reason
    assert "boom-output" in pb.reason and "boom-output" in made.stderr, (pb.reason, made)
    assert den.workspaces() == [] and snapshot_ids(srv) == []
    assert engine_objects(srv.prefix) == []
    listed = cli(srv, "prebuilds")
    assert listed.returncode == 0 and pb.id in listed.stdout and "failed" in listed.stdout
    gone = cli(srv, "prebuild", "--delete", pb.id)
    assert gone.returncode == 0 and gone.stdout.strip() == f"{pb.id} deleted", gone
    assert den.prebuilds() == []


def cli(srv: DenServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEN_URL": f"http://127.0.0.1:{srv.port}", "DEN_TOKEN": srv.token}
    return subprocess.run([sys.executable, "-m", "server.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600)
