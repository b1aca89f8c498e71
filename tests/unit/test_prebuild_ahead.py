"""A fork of each ready prebuild made ahead and frozen (server/prebuilds/ahead.py), on the fake
runtime: the owner's next matching create takes it (one ledger transaction), it gets the
create's name, host name and settings, and a replacement is made; another user, other
resources or a racing claim do not take it; deleting the prebuild removes it; a fork cut
short is removed and made again at the next start."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from server.db.models import Workspace
from server.prebuilds.ahead import claim_values, fits, fork_name
from server.runtime.docker_specs import container_of
from server.workspaces.states import State
from tests.conftest import ApiClient
from tests.unit.test_prebuilds import PB, events, wait_prebuild


def hidden(api: ApiClient, pid: str) -> list[Workspace]:
    with api.app.state.sessions() as s:
        return list(s.scalars(select(Workspace).where(Workspace.prebuild_id == pid)))


def wait_fork(api: ApiClient, pid: str, *, not_id: str | None = None,
              timeout_s: float = 30) -> Workspace:
    """The prebuild's fork made ahead once it is frozen and waiting (another than
    ``not_id``), checked through the API's ``fork_ready`` too."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [w for w in hidden(api, pid) if w.id != not_id and w.state == "paused"]
        if rows and api.get(f"{PB}/{pid}").json()["fork_ready"]:
            return rows[0]
        assert time.monotonic() < deadline, (hidden(api, pid), "no fork made ahead")
        time.sleep(0.05)


def ready_prebuild(api: ApiClient, repo: str) -> dict[str, Any]:
    pb = wait_prebuild(api, api.post(PB, json={"repo": repo}).json()["id"])
    assert pb["state"] == "ready", pb
    return pb


def test_fits_and_claim_values_are_what_a_create_asks() -> None:
    row = Workspace(repo_url="u", repo_branch="main", repo_dir="api", image="i",
                    runtime="gvisor", cpus=2.0, memory_mb=512, disk_gb=10, gpus=0,
                    devcontainer={"post_start": "x"})
    fields = {k: getattr(row, k) for k in ("repo_url", "repo_branch", "repo_dir", "image",
                                           "runtime", "cpus", "memory_mb", "disk_gb", "gpus",
                                           "devcontainer")}
    assert fits(row, fields) is None
    assert fits(row, {**fields, "memory_mb": 1024}) == "its memory_mb differs"
    assert fits(row, {**fields, "repo_branch": "dev"}) == "its repo_branch differs"
    now = datetime.now(UTC)
    assert claim_values("w", {**fields, "env": {"A": "1"}, "keep_alive": False,
                              "prebuild_id": "pbx", "owner_id": 9}, now) == {
        "name": "w", "created_at": now, "env": {"A": "1"}, "keep_alive": False}
    assert fork_name("pb0123456789ab") == "prebuild-0123456789ab-next"


def test_the_owners_next_create_takes_the_fork_made_ahead_and_a_replacement_is_made(
        fake_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    repo = str(make_repo("api"))
    pb = ready_prebuild(fake_api, repo)
    fork = wait_fork(fake_api, pb["id"])
    assert fork.name == fork_name(pb["id"]) and fork.sleep == "frozen" and fork.keep_alive
    assert fake_api.get("/api/v1/workspaces").json()["workspaces"] == []  # hidden

    ws = fake_api.create(repo, name="mine", env={"MINE": "1"}, idle_timeout_s=600)
    assert ws["id"] == fork.id and ws["state"] == "running", ws
    said = events(fake_api, ws["id"])
    assert any(f"create from prebuild {pb['id']}" in m and "took the fork made ahead" in m
               for m in said), said
    assert any(f"running from the fork of prebuild {pb['id']} made ahead" in m
               for m in said), said
    assert ws["name"] == "mine" and ws["env"]["MINE"] == "1", ws
    assert [w["id"] for w in fake_api.get("/api/v1/workspaces").json()["workspaces"]] == [
        fork.id]
    svc = fake_api.app.state.workspaces
    row = svc.get(fork.id)
    assert row.prebuild_id is None and row.idle_timeout_s == 600 and not row.keep_alive
    container = svc.runtime.containers[container_of(svc.spec_for(row))]
    assert container.hostname == "mine" and not container.frozen

    # a replacement is made, and the next create takes it
    again = wait_fork(fake_api, pb["id"], not_id=fork.id)
    second = fake_api.create(repo, name="mine2")
    assert second["id"] == again.id
    wait_fork(fake_api, pb["id"], not_id=again.id)


def test_other_users_other_resources_and_a_lost_race_fork_as_usual(
        fake_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    repo = str(make_repo("api"))
    pb = ready_prebuild(fake_api, repo)
    fork = wait_fork(fake_api, pb["id"])
    # bob has no prebuild of his own: his create builds from scratch, the fork stays
    wb = fake_api.create(repo, name="api", user="bob")
    assert wb["id"] != fork.id
    assert not any("from prebuild" in m for m in events(fake_api, wb["id"], user="bob"))
    # other resources than the fork's: forked from the prebuild, not the fork made ahead
    big = fake_api.create(repo, name="big", resources={"memory_mb": fork.memory_mb * 2})
    said = events(fake_api, big["id"])
    assert big["id"] != fork.id and any(f"create from prebuild {pb['id']}" in m
                                        for m in said), said
    assert not any("took the fork made ahead" in m for m in said), said
    # the name is taken: 409, and the fork stays hidden and frozen
    r = fake_api.post("/api/v1/workspaces", json={"name": "big", "repo": {"url": repo}})
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_taken", r.text
    assert [(w.id, w.state, w.sleep) for w in hidden(fake_api, pb["id"])] == [
        (fork.id, "paused", "frozen")]
    # two claims of one fork: the ledger's compare-and-set lets one win
    ledger = fake_api.app.state.workspaces.ledger
    values = {"name": "raced", "keep_alive": False}
    took = [ledger.claim(fork.id, made_for=pb["id"], values=values, check=lambda s: None,
                         actor="alice", message="claim") for _ in range(2)]
    assert took == [True, False]
    assert fake_api.app.state.workspaces.get(fork.id).state == State.CREATING.value


def test_deleting_the_prebuild_removes_its_fork_and_a_fork_cut_short_is_made_again(
        fake_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    repo = str(make_repo("api"))
    pb = ready_prebuild(fake_api, repo)
    fork = wait_fork(fake_api, pb["id"])
    svc = fake_api.app.state.workspaces
    # a fork left in error (a make cut short by kill -9, reconciled) goes at the next start,
    # and a new one is made
    svc.ledger.transition(fork.id, State.PAUSED, State.ERROR, actor="test", reason="cut")
    assert not fake_api.get(f"{PB}/{pb['id']}").json()["fork_ready"]
    fake_api.call(fake_api.app.state.prebuilds.recover)
    new = wait_fork(fake_api, pb["id"], not_id=fork.id)
    assert fork.id not in [w.id for w in hidden(fake_api, pb["id"])]
    spec = svc.spec_for(svc.get(new.id))
    assert container_of(spec) in svc.runtime.containers
    assert fake_api.delete(f"{PB}/{pb['id']}").status_code == 204
    assert hidden(fake_api, pb["id"]) == []
    assert container_of(spec) not in svc.runtime.containers
    assert fake_api.get("/api/v1/snapshots").json()["snapshots"] == []


def test_a_claim_cut_short_by_a_restart_leaves_one_workspace_and_no_sandbox_behind(
        fake_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    repo = str(make_repo("api"))
    pb = ready_prebuild(fake_api, repo)
    fork = wait_fork(fake_api, pb["id"])
    svc = fake_api.app.state.workspaces
    spec = svc.spec_for(svc.get(fork.id))
    # the claim's transaction committed, then Den was killed before the thaw
    assert svc.ledger.claim(fork.id, made_for=pb["id"], values={"name": "cut"},
                            check=lambda s: None, actor="alice", message="claim")
    fake_api.call(svc.reconcile)  # the next start
    fake_api.call(fake_api.app.state.prebuilds.recover)
    ws = fake_api.get(f"/api/v1/workspaces/{fork.id}").json()
    assert ws["name"] == "cut" and ws["state"] == "error", ws  # the owner's, listed
    assert [w["id"] for w in fake_api.get("/api/v1/workspaces").json()["workspaces"]] == [
        fork.id]
    assert container_of(spec) not in svc.runtime.containers  # its sandbox is gone
    # the prebuild gets a new fork made ahead; the claimed one is no longer its
    new = wait_fork(fake_api, pb["id"], not_id=fork.id)
    assert [w.id for w in hidden(fake_api, pb["id"])] == [new.id]


def test_a_prebuild_deleted_while_its_fork_is_being_made_leaves_no_sandbox(
        fake_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    repo = str(make_repo("api"))
    svc = fake_api.app.state.workspaces
    ahead = fake_api.app.state.prebuilds.ahead
    pid = fake_api.post(PB, json={"repo": repo}).json()["id"]
    deadline = time.monotonic() + 30
    while pid not in ahead._making:  # ready, and its fork being made
        assert time.monotonic() < deadline, wait_prebuild(fake_api, pid)
        time.sleep(0.001)
    assert fake_api.delete(f"{PB}/{pid}").status_code == 204
    assert hidden(fake_api, pid) == []
    assert svc.runtime.containers == {}
    assert fake_api.get("/api/v1/snapshots").json()["snapshots"] == []
