"""Prebuilds: which one a create uses and which ones retention removes (pure), and the API
on the fake runtime (make, list, use, opt out, isolation between users, delete)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import update

from server.db.models import Prebuild
from server.prebuilds import matching
from tests.conftest import ApiClient

PB = "/api/v1/prebuilds"
URL = "https://forge.example/acme/api.git"


def row(pid: str, *, state: str = "ready", repo: str = URL, branch: str = "",
        snapshot: str | None = "sn1") -> Prebuild:
    return Prebuild(id=pid, repo_url=repo, branch=branch, state=state, snapshot_id=snapshot)


# --- matching (pure) ------------------------------------------------------------------------


def test_pick_is_the_newest_ready_one_of_the_repo_and_branch_whose_snapshot_exists() -> None:
    rows = [row("a", snapshot="s1"), row("b", snapshot="s2"), row("c", state="building",
                                                                   snapshot=None),
            row("d", state="failed", snapshot=None), row("e", branch="dev", snapshot="s3"),
            row("f", repo="https://forge.example/acme/web.git", snapshot="s4")]
    snaps = {"s1", "s2", "s3", "s4"}
    assert matching.pick(rows, repo_url=URL, branch=None, snapshots=snaps) is rows[1]
    assert matching.pick(rows, repo_url=URL, branch="dev", snapshots=snaps) is rows[4]
    assert matching.pick(rows, repo_url=URL, branch="main", snapshots=snaps) is None
    # b's snapshot was deleted (DELETE /api/v1/snapshots/...): the older a serves
    assert matching.pick(rows, repo_url=URL, branch=None, snapshots={"s1"}) is rows[0]
    assert matching.pick(rows, repo_url=URL, branch=None, snapshots=set()) is None
    assert matching.pick([], repo_url=URL, branch=None, snapshots=snaps) is None


def test_building_finds_the_one_in_progress_of_the_same_repo_and_branch() -> None:
    rows = [row("a"), row("b", state="building", branch="dev")]
    assert matching.building(rows, repo_url=URL, branch="dev") is rows[1]
    assert matching.building(rows, repo_url=URL, branch=None) is None


def test_usable_refuses_what_a_prebuild_was_not_made_with() -> None:
    ok = {"image": "den/base", "gpus": 0, "runtime": "gvisor"}
    assert matching.usable(ok, default_image="den/base", devcontainer=True) is None
    assert matching.usable(ok, default_image="den/base", devcontainer=False) is not None
    assert matching.usable({**ok, "image": "den/other"}, default_image="den/base",
                           devcontainer=True) == "an image of its own"
    assert matching.usable({**ok, "gpus": 1}, default_image="den/base",
                           devcontainer=True) == "GPUs"
    assert matching.usable({**ok, "runtime": "runc"}, default_image="den/base",
                           devcontainer=True) == "runtime runc"


def test_retention_keeps_the_newest_ready_ones_and_the_newest_failure() -> None:
    rows = [row("r1"), row("f1", state="failed"), row("r2"), row("r3"),
            row("f2", state="failed"), row("b1", state="building"), row("x", branch="dev")]
    assert matching.expired(rows, repo_url=URL, branch="", keep=1) == ["r1", "f1", "r2"]
    assert matching.expired(rows, repo_url=URL, branch="", keep=2) == ["r1", "f1"]
    assert matching.expired(rows, repo_url=URL, branch="", keep=5) == ["f1"]
    # a newer success makes every older failure go
    assert matching.expired([row("f1", state="failed"), row("r1")], repo_url=URL, branch="",
                            keep=1) == ["f1"]
    assert matching.expired([row("b1", state="building")], repo_url=URL, branch="",
                            keep=1) == []


def test_is_commit() -> None:
    assert matching.is_commit("a" * 40) and matching.is_commit("0123456789abcdef" * 4)
    for bad in ("", "a" * 39, "A" * 40, "a" * 41, "g" * 40, "a" * 40 + "\n"):
        assert not matching.is_commit(bad), bad


# --- the API on the fake runtime ------------------------------------------------------------


def wait_prebuild(api: ApiClient, pid: str, *, user: str = "alice",
                  timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        pb: dict[str, Any] = api.get(f"{PB}/{pid}", user=user).json()
        if pb["state"] != "building" or time.monotonic() > deadline:
            return pb
        time.sleep(0.05)


def events(api: ApiClient, ws_id: str, user: str = "alice") -> list[str]:
    r = api.get(f"/api/v1/workspaces/{ws_id}/events", user=user)
    return [e["message"] for e in r.json()["events"]]


def test_a_prebuild_is_made_listed_used_by_its_owner_only_and_deleted(
        fake_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    repo = str(make_repo("api"))
    r = fake_api.post(PB, json={"repo": repo})
    assert r.status_code == 202, r.text
    pb = r.json()
    assert pb["state"] == "building" and pb["branch"] is None
    # asking again while it builds answers the same one
    assert fake_api.post(PB, json={"repo": repo}).json()["id"] == pb["id"]
    pb = wait_prebuild(fake_api, pb["id"])
    assert pb["state"] == "ready", pb
    assert pb["snapshot_id"] and pb["workspace_id"] is None
    # its build workspace is gone; its snapshot is the owner's and counts as one
    assert fake_api.get("/api/v1/workspaces").json()["workspaces"] == []
    snaps = fake_api.get("/api/v1/snapshots").json()["snapshots"]
    assert [s["id"] for s in snaps] == [pb["snapshot_id"]] and snaps[0]["memory"] is True
    assert [p["id"] for p in fake_api.get(PB).json()["prebuilds"]] == [pb["id"]]

    ws = fake_api.create(repo, name="api")
    assert ws["state"] == "running", ws
    said = events(fake_api, ws["id"])
    assert any(f"create from prebuild {pb['id']}" in m for m in said), said
    assert any(f"running from snapshot {pb['snapshot_id']}" in m for m in said), said

    # opting out builds from scratch
    ws2 = fake_api.create(repo, name="api2", prebuild=False)
    assert not any("from prebuild" in m for m in events(fake_api, ws2["id"]))

    # another user neither sees nor uses it
    assert fake_api.get(PB, user="bob").json()["prebuilds"] == []
    assert fake_api.get(f"{PB}/{pb['id']}", user="bob").status_code == 404
    assert fake_api.delete(f"{PB}/{pb['id']}", user="bob").status_code == 404
    wb = fake_api.create(repo, name="api", user="bob")
    assert not any("from prebuild" in m for m in events(fake_api, wb["id"], user="bob"))
    # an admin sees it
    assert [p["id"] for p in fake_api.get(PB, user="root").json()["prebuilds"]] == [pb["id"]]

    assert fake_api.delete(f"{PB}/{pb['id']}").status_code == 204
    assert fake_api.get(PB).json()["prebuilds"] == []
    assert fake_api.get("/api/v1/snapshots").json()["snapshots"] == []
    # the fork made from it still runs
    assert fake_api.exec(ws["id"], ["echo", "hi"])["stdout"] == "hi\n"
    assert fake_api.get(f"{PB}/{pb['id']}").status_code == 404


def test_a_prebuild_of_a_repo_that_cannot_be_cloned_fails_and_leaves_nothing(
        fake_api: ApiClient, repos_root: Path) -> None:
    # a path that does not exist is refused as a create refuses it; one that is no repository
    # passes the URL checks and fails in git
    r = fake_api.post(PB, json={"repo": str(repos_root / "nothing-here.git")})
    assert r.status_code == 422, r.text
    empty = repos_root / "empty.git"
    empty.mkdir()
    pb = fake_api.post(PB, json={"repo": str(empty)}).json()
    pb = wait_prebuild(fake_api, pb["id"])
    assert pb["state"] == "failed" and "clone" in pb["reason"], pb
    assert pb["snapshot_id"] is None and pb["workspace_id"] is None
    assert fake_api.get("/api/v1/workspaces").json()["workspaces"] == []
    assert fake_api.get("/api/v1/snapshots").json()["snapshots"] == []
    assert fake_api.delete(f"{PB}/{pb['id']}").status_code == 204


def test_bad_prebuild_input_is_refused(fake_api: ApiClient,
                                       make_repo: Callable[..., Path]) -> None:
    for body in ({}, {"repo": ""}, {"repo": "ftp://x/y.git"}, {"repo": "/etc/passwd"},
                 {"repo": "https://user:pw@forge.example/a.git"},
                 {"repo": str(make_repo("api")), "branch": "--upload-pack=x"},
                 {"repo": "x", "extra": 1}):
        r = fake_api.post(PB, json=body)
        assert 400 <= r.status_code < 500, (body, r.text)
        assert "error" in r.json()
    assert fake_api.get(PB).json()["prebuilds"] == []
    assert fake_api.delete(f"{PB}/pbnothing").status_code == 404


def test_the_snapshot_limit_counts_prebuilds(fake_api: ApiClient,
                                             make_repo: Callable[..., Path]) -> None:
    r = fake_api.put("/api/v1/users/bob/limits", user="root", json={"snapshots": 0})
    assert r.status_code == 200, r.text
    r = fake_api.post(PB, user="bob", json={"repo": str(make_repo("api"))})
    assert r.status_code == 409 and r.json()["error"]["code"] == "quota_exceeded", r.text


def test_a_prebuild_left_building_by_a_stopped_server_fails_at_the_next_start(
        fake_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    # A finished prebuild put back as a stop in the middle of its build leaves it: building,
    # with its workspace (here a fork of it) and its snapshot already taken.
    repo = str(make_repo("api"))
    pb = wait_prebuild(fake_api, fake_api.post(PB, json={"repo": repo}).json()["id"])
    ws = fake_api.create(repo, name="left")
    with fake_api.app.state.sessions.begin() as s:
        s.execute(update(Prebuild).where(Prebuild.id == pb["id"]).values(
            state="building", workspace_id=ws["id"]))
    fake_api.call(fake_api.app.state.prebuilds.recover)
    after = fake_api.get(f"{PB}/{pb['id']}").json()
    assert after["state"] == "failed" and "server stopped" in after["reason"], after
    assert after["workspace_id"] is None and after["snapshot_id"] is None
    assert fake_api.get("/api/v1/workspaces").json()["workspaces"] == []
    assert fake_api.get("/api/v1/snapshots").json()["snapshots"] == []
