"""GPU allocation through the ledger and the API, on the fake runtime with an
operator-described inventory (DEN_GPUS as JSON): taken at create and start, given back at
stop and pause, refused clearly when none is free, reclaimed by an admin; the reaper stops
an idle GPU workspace instead of pausing it, and counts GPU use as activity."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from server.app import create_app
from server.config import Settings
from server.db.models import Event, GpuAllocation, Workspace
from server.runtime.fake import FakeRuntime
from server.workspaces.reaper import Action, Reaper
from tests.conftest import ApiClient, users
from tests.unit.test_api_fake import assert_error

GPUS = [{"uuid": "GPU-aaaa", "model": "NVIDIA A100-SXM4-40GB", "memory_mb": 40960, "minor": 0},
        {"uuid": "GPU-bbbb", "model": "NVIDIA L4", "memory_mb": 23034, "minor": 1}]
WS = "/api/v1/workspaces"


def make_api(make_settings: Callable[..., Settings], runtime: FakeRuntime, **kw: Any
             ) -> Iterator[ApiClient]:
    app = create_app(make_settings(gpus=json.dumps(GPUS), **kw), runtime=runtime)
    with TestClient(app) as client:
        yield ApiClient(client, users(app))


@pytest.fixture
def api(make_settings: Callable[..., Settings], fake_runtime: FakeRuntime
        ) -> Iterator[ApiClient]:
    yield from make_api(make_settings, fake_runtime)


def held(api: ApiClient) -> dict[str, str]:
    with api.app.state.sessions() as s:
        return {a.gpu_uuid: a.workspace_id for a in s.scalars(select(GpuAllocation))}


def test_create_takes_a_gpu_of_the_model_and_its_container_gets_exactly_that_one(
        api: ApiClient, make_repo: Callable[..., Path], fake_runtime: FakeRuntime) -> None:
    ws = api.create(make_repo(), resources={"gpus": 1, "gpu_model": "l4"})
    assert ws["state"] == "running", ws
    assert ws["resources"]["gpu_uuids"] == ["GPU-bbbb"]
    assert ws["resources"]["gpu_model"] == "l4"
    assert ws["idle_action"] == "stop"
    assert held(api) == {"GPU-bbbb": ws["id"]}
    (container,) = fake_runtime.containers.values()
    assert [g.uuid for g in container.spec.gpus] == ["GPU-bbbb"]
    plain = api.create(make_repo("other"), name="plain")
    assert plain["resources"]["gpu_uuids"] == [] and plain["idle_action"] == "pause"


def test_none_free_is_a_clear_409_and_leaves_nothing(
        api: ApiClient, make_repo: Callable[..., Path], fake_runtime: FakeRuntime) -> None:
    api.create(make_repo(), resources={"gpus": 2})
    before = set(fake_runtime.containers)
    r = api.post(WS, user="bob", json={"name": "late", "repo": {"url": str(make_repo("b"))},
                                       "resources": {"gpus": 1}})
    err = assert_error(r, 409, "gpus_unavailable")
    assert "0 of 2 are free" in err["message"]
    assert api.get(WS, user="bob").json()["workspaces"] == []  # no half-written row
    assert set(fake_runtime.containers) == before


@pytest.mark.parametrize(("resources", "status", "code", "words"), [
    ({"gpus": 3}, 422, "no_gpus", "only 2"),
    ({"gpus": 1, "gpu_model": "H100"}, 422, "no_gpus", "NVIDIA A100-SXM4-40GB, NVIDIA L4"),
    ({"gpus": 2, "gpu_model": "A100"}, 422, "no_gpus", "only 1 'A100'"),
    ({"gpus": 9}, 409, "gpus_unavailable", "at most 8"),
    ({"gpu_model": "A100"}, 422, "invalid", "gpu_model needs resources.gpus"),
])
def test_impossible_requests_are_refused_before_any_row(
        api: ApiClient, make_repo: Callable[..., Path], resources: dict[str, Any], status: int,
        code: str, words: str) -> None:
    r = api.post(WS, json={"name": "x", "repo": {"url": str(make_repo())},
                           "resources": resources})
    assert words in assert_error(r, status, code)["message"]
    assert api.get(WS).json()["workspaces"] == [] and held(api) == {}


def test_stop_releases_start_takes_the_same_gpu_again_or_says_who_holds_it(
        api: ApiClient, make_repo: Callable[..., Path]) -> None:
    a = api.create(make_repo(), resources={"gpus": 1, "gpu_model": "A100"})
    assert api.post(f"{WS}/{a['id']}/stop").json()["state"] == "stopped"
    assert held(api) == {}
    # Its GPU goes to another workspace meanwhile.
    b = api.create(make_repo("b"), name="b", user="bob",
                   resources={"gpus": 1, "gpu_model": "A100"})
    assert held(api) == {"GPU-aaaa": b["id"]}
    err = assert_error(api.post(f"{WS}/{a['id']}/start"), 409, "gpus_unavailable")
    assert "GPU-aaaa (held by workspace 'b')" in err["message"]
    assert api.get(f"{WS}/{a['id']}").json()["state"] == "stopped"  # unchanged
    api.post(f"{WS}/{b['id']}/stop", user="bob")
    assert api.post(f"{WS}/{a['id']}/start").json()["state"] == "running"
    assert held(api) == {"GPU-aaaa": a["id"]}
    api.delete(f"{WS}/{a['id']}")
    assert held(api) == {}


def test_pause_is_refused_without_gpu_checkpointing(
        api: ApiClient, make_repo: Callable[..., Path]) -> None:
    a = api.create(make_repo(), resources={"gpus": 1})
    err = assert_error(api.post(f"{WS}/{a['id']}/pause"), 409, "pause_unsupported")
    assert "stop it instead" in err["message"]
    assert api.get(f"{WS}/{a['id']}").json()["state"] == "running"
    assert held(api) == {"GPU-aaaa": a["id"]}


def test_with_checkpointing_pause_releases_and_resume_takes_again(
        make_settings: Callable[..., Settings], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    for api in make_api(make_settings, fake_runtime, gpu_checkpoint=True):
        a = api.create(make_repo(), resources={"gpus": 2})
        assert a["idle_action"] == "pause"
        assert api.post(f"{WS}/{a['id']}/pause").json()["state"] == "paused"
        assert held(api) == {}
        assert api.post(f"{WS}/{a['id']}/resume").json()["state"] == "running"
        assert held(api) == {"GPU-aaaa": a["id"], "GPU-bbbb": a["id"]}


def test_gpus_listing_admins_see_holders_users_see_counts(
        api: ApiClient, make_repo: Callable[..., Path]) -> None:
    a = api.create(make_repo(), resources={"gpus": 1, "gpu_model": "L4"})
    mine = api.get("/api/v1/gpus").json()
    assert mine == {"total": 2, "free": 1, "idle_action": "stop", "gpus": None,
                    "models": [{"model": "NVIDIA A100-SXM4-40GB", "total": 1, "free": 1},
                               {"model": "NVIDIA L4", "total": 1, "free": 0}]}
    gpus = api.get("/api/v1/gpus", user="root").json()["gpus"]
    assert gpus[1] == {"uuid": "GPU-bbbb", "index": 1, "model": "NVIDIA L4",
                       "memory_mb": 23034, "device": "/dev/nvidia1",
                       "held_by": {"workspace_id": a["id"], "workspace": "api",
                                   "owner": "alice"},
                       "utilization_percent": None}
    assert gpus[0]["held_by"] is None


def test_an_admin_reclaims_a_gpu_by_stopping_its_holder(
        api: ApiClient, make_repo: Callable[..., Path]) -> None:
    a = api.create(make_repo(), resources={"gpus": 1})
    assert_error(api.post("/api/v1/gpus/GPU-aaaa/reclaim"), 403, "forbidden")
    r = api.post("/api/v1/gpus/GPU-aaaa/reclaim", user="root")
    assert r.status_code == 200, r.text
    assert r.json()["held_by"] is None
    assert api.get(f"{WS}/{a['id']}").json()["state"] == "stopped"
    with api.app.state.sessions() as s:
        notes = [e.message for e in s.scalars(select(Event).where(Event.kind == "gpu"))]
    assert notes == ["GPU GPU-aaaa reclaimed by admin root"]
    assert_error(api.post("/api/v1/gpus/GPU-aaaa/reclaim", user="root"), 409, "gpu_free")
    assert_error(api.post("/api/v1/gpus/GPU-zzzz/reclaim", user="root"), 404, "not_found")


def test_no_gpu_host_says_so(fake_api: ApiClient) -> None:
    assert fake_api.get("/api/v1/gpus").json() == {
        "total": 0, "free": 0, "models": [], "idle_action": "stop", "gpus": None}


def test_metrics_export_allocation(api: ApiClient, make_repo: Callable[..., Path]) -> None:
    api.create(make_repo(), resources={"gpus": 1})
    text = api.get("/metrics", user="root").text
    assert 'den_gpus{state="held"} 1.0' in text and 'den_gpus{state="free"} 1.0' in text


def test_reaper_stops_an_idle_gpu_workspace_and_counts_gpu_use_as_activity(
        api: ApiClient, make_repo: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = api.create(make_repo(), resources={"gpus": 1}, idle_timeout_s=1)
    b = api.create(make_repo("b"), name="b", idle_timeout_s=1)
    svc = api.app.state.workspaces
    with svc.sessions.begin() as s:  # both idle for an hour
        for row in s.scalars(select(Workspace)):
            row.last_activity_at = row.last_activity_at.replace(year=2000)
    reaper: Reaper = api.app.state.reaper
    portal = api.client.portal
    assert portal is not None
    # A training run: the GPU is busy though nobody types.
    monkeypatch.setattr(svc.gpus, "utilization", lambda uuids: dict.fromkeys(uuids, 90))
    assert portal.call(reaper.run_once) == [(b["id"], Action.FREEZE)]
    monkeypatch.setattr(svc.gpus, "utilization", lambda uuids: dict.fromkeys(uuids, 0))
    with svc.sessions.begin() as s:
        s.get(Workspace, a["id"]).last_activity_at = s.get(
            Workspace, a["id"]).last_activity_at.replace(year=2000)
    assert portal.call(reaper.run_once) == [(a["id"], Action.STOP)]
    assert svc.get(a["id"]).state == "stopped" and held(api) == {}


def test_an_idle_gpu_workspace_with_checkpointing_is_saved_never_frozen(
        make_settings: Callable[..., Settings], fake_runtime: FakeRuntime,
        make_repo: Callable[..., Path]) -> None:
    """Its GPU goes back to the pool while it sleeps: a frozen process would still hold it."""
    for api in make_api(make_settings, fake_runtime, gpu_checkpoint=True):
        a = api.create(make_repo(), resources={"gpus": 1}, idle_timeout_s=1)
        svc = api.app.state.workspaces
        with svc.sessions.begin() as s:
            row = s.get(Workspace, a["id"])
            row.last_activity_at = row.last_activity_at.replace(year=2000)
        portal = api.client.portal
        assert portal is not None
        svc.gpus.utilization = lambda uuids: dict.fromkeys(uuids, 0)
        assert portal.call(api.app.state.reaper.run_once) == [(a["id"], Action.PAUSE)]
        got = api.get(f"{WS}/{a['id']}").json()
        assert (got["state"], got["sleep"]) == ("paused", "saved") and held(api) == {}
        assert api.post(f"{WS}/{a['id']}/resume").json()["state"] == "running"
        # Asked to freeze it (as the reaper would a workspace without GPUs): saved instead.
        assert portal.call(functools.partial(svc.freeze, a["id"], actor="alice")) is not None
        assert api.get(f"{WS}/{a['id']}").json()["sleep"] == "saved"


def test_dashboard_shows_gpu_holders_to_admins_only(
        api: ApiClient, make_repo: Callable[..., Path]) -> None:
    from tests.unit.test_tokens_and_sessions import _browser_signed_in_with

    api.create(make_repo(), resources={"gpus": 1, "gpu_model": "L4"})
    admin = _browser_signed_in_with(api, api.tokens["root"]).get("/workspaces").text
    assert 'id="gpus-title"' in admin
    assert ">alice/api</a>" in admin and "GPU-aaaa</span> (/dev/nvidia0)" in admin
    assert "1 GPU</td>" in admin
    user = _browser_signed_in_with(api, api.tokens["alice"]).get("/workspaces").text
    assert 'id="gpus-title"' not in user and "1 GPU</td>" in user
