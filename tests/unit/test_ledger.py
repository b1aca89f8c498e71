"""The ledger's writes of fields that are not state (Ledger.change): one transaction with
their event and the rows that belong with them, nothing written when any part fails, and
never a state change. On the fake runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from server.errors import NotFound
from server.workspaces.service import WorkspaceService
from server.workspaces.states import State
from tests.conftest import running_workspace


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def svc(make_service: Callable[..., WorkspaceService]) -> WorkspaceService:
    return make_service()


@pytest.mark.anyio
async def test_a_change_writes_its_fields_and_event_together(
        svc: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    ws_id = await running_workspace(svc, make_repo())
    svc.ledger.change(ws_id, lambda ws: {"engine": {**ws.engine, "extra": "x"},
                                         "image": "den/other:1"},
                      event=("restore", "switched"), actor="bob")
    ws = svc.get(ws_id)
    assert ws.engine["extra"] == "x" and ws.image == "den/other:1"
    assert ws.state == "running"
    last = svc.events(ws_id)[-1]
    assert (last.kind, last.actor, last.message) == ("restore", "bob", "switched")


@pytest.mark.anyio
async def test_a_failing_part_writes_nothing(
        svc: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    ws_id = await running_workspace(svc, make_repo())
    events = len(svc.events(ws_id))

    def fail(s: Session) -> None:
        raise RuntimeError("the ports could not be written")

    with pytest.raises(RuntimeError):
        svc.ledger.change(ws_id, {"image": "den/half:1"}, also=fail, event=("x", "half"))
    assert svc.get(ws_id).image != "den/half:1"
    assert len(svc.events(ws_id)) == events


@pytest.mark.anyio
async def test_state_is_not_a_field_to_change_and_a_missing_row_is_not_found(
        svc: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    ws_id = await running_workspace(svc, make_repo())
    for field in ("state", "sleep"):
        with pytest.raises(ValueError, match="transition"):
            svc.ledger.change(ws_id, {field: "stopped"})
    assert svc.get(ws_id).state == "running"
    with pytest.raises(NotFound):
        svc.ledger.change("nope", {"image": "x"})


@pytest.mark.anyio
async def test_a_failing_watcher_does_not_undo_or_fail_a_committed_transition(
        svc: WorkspaceService, make_repo: Callable[..., Path]) -> None:
    """Watchers (the memory guard) are told after the commit: one that raises is logged,
    the others are still told, and the caller sees the transition done."""
    ws_id = await running_workspace(svc, make_repo())
    seen: list[str] = []

    def broken(workspace_id: str, state: State) -> None:
        raise RuntimeError("the database went away")

    svc.ledger.watchers[:0] = [broken]
    svc.ledger.watchers.append(lambda wid, state: seen.append(state.value))
    svc.ledger.transition(ws_id, State.RUNNING, State.STOPPING, actor="bob")
    assert svc.get(ws_id).state == "stopping" and seen == ["stopping"]
