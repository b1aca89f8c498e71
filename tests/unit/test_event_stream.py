"""``WS /api/v1/workspaces/{ref}/events/stream`` on the fake runtime: the log so far, then
each new event as it is recorded; another user's workspace is 404; a delete ends it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.websockets import WebSocketDisconnect

from tests.conftest import ApiClient

WS = "/api/v1/workspaces"


def _next(ws: Any) -> dict[str, Any]:
    msg: dict[str, Any] = ws.receive_json()
    assert msg["type"] == "event", msg
    return dict(msg["event"])


def test_events_stream_live(fake_api: ApiClient, make_repo: Callable[..., Path]) -> None:
    created = fake_api.create(make_repo("api"), name="api")
    assert created["state"] == "running"
    past = fake_api.get(f"{WS}/api/events").json()["events"]
    with fake_api.client.websocket_connect(f"{WS}/api/events/stream",
                                           headers=fake_api.h()) as ws:
        assert [_next(ws) for _ in past] == past
        assert fake_api.post(f"{WS}/api/stop").status_code == 200
        stopping, stopped = _next(ws), _next(ws)
        assert (stopping["to_state"], stopped["to_state"]) == ("stopping", "stopped")
        assert fake_api.delete(f"{WS}/api").status_code in (200, 204)
        while (msg := ws.receive_json())["type"] == "event":
            pass
        assert msg == {"type": "deleted"}
    # ``after`` skips what the reader has seen.
    again = fake_api.create(make_repo("web"), name="web")
    first = fake_api.get(f"{WS}/web/events").json()["events"]
    with fake_api.client.websocket_connect(f"{WS}/web/events/stream?after={first[-2]['id']}",
                                           headers=fake_api.h()) as ws:
        assert _next(ws) == first[-1]
    assert again["state"] == "running"


def test_events_stream_of_another_users_workspace_is_404(
    fake_api: ApiClient, make_repo: Callable[..., Path]
) -> None:
    fake_api.create(make_repo("api"), name="api")
    with fake_api.client.websocket_connect(f"{WS}/api/events/stream",
                                           headers=fake_api.h("bob")) as ws:
        msg = ws.receive_json()
        assert msg["type"] == "error" and msg["error"]["code"] == "not_found", msg
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 4404
