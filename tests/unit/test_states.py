"""The state machine as data: every legal edge, every refused one, and the lifecycle plans."""

from __future__ import annotations

import itertools

import pytest

from server.workspaces.states import (
    PAUSE,
    RESUME,
    START,
    STOP,
    TRANSITIONAL,
    State,
    can_transition,
    plan,
)

S = State

# Every legal (from, to) besides "any -> error" (the design: "any -> error (with a reason)";
# a failed delete goes deleting -> error so that it can be retried) and "anything but
# deleting -> deleting".
EXPECTED_EDGES = {
    (S.CREATING, S.RUNNING),
    (S.RUNNING, S.STOPPING),
    (S.RUNNING, S.PAUSING),
    (S.RUNNING, S.STOPPED),
    (S.STOPPING, S.STOPPED),
    (S.STOPPED, S.STARTING),
    (S.STOPPED, S.RUNNING),
    (S.STARTING, S.RUNNING),
    (S.STARTING, S.STOPPED),
    (S.PAUSING, S.PAUSED),
    (S.PAUSING, S.RUNNING),
    (S.PAUSING, S.STOPPED),  # a failed checkpoint that left the container stopped
    (S.PAUSED, S.RESUMING),
    (S.PAUSED, S.STOPPING),  # STOP is allowed from paused, through stopping
    (S.PAUSED, S.STOPPED),
    (S.PAUSED, S.PAUSING),  # a frozen workspace's memory saved to disk (frozen -> saved)
    (S.PAUSED, S.CREATING),  # a prebuild's fork made ahead, taken by a create
    (S.RESUMING, S.RUNNING),
    (S.RESUMING, S.STOPPED),
    (S.RESUMING, S.PAUSED),  # reconcile: a resume interrupted by a restart
    (S.ERROR, S.STARTING),
}


def _expected(src: State, dst: State) -> bool:
    if dst is S.ERROR:
        return True
    if dst is S.DELETING:
        return src is not S.DELETING
    return (src, dst) in EXPECTED_EDGES


def test_transition_table_matches_the_design() -> None:
    actual = {
        (src, dst): can_transition(src, dst) for src, dst in itertools.product(State, State)
    }
    expected = {(src, dst): _expected(src, dst) for src, dst in itertools.product(State, State)}
    assert actual == expected


def test_deleting_ends_with_the_row_gone_or_in_error() -> None:
    # WorkspaceService.finish_delete moves a failed delete to error ("delete again to retry")
    assert [dst for dst in State if can_transition(S.DELETING, dst)] == [S.ERROR]


def test_only_error_transitions_to_itself() -> None:
    # error -> error records a new reason (a failed retry); nothing else loops.
    assert [s for s in State if can_transition(s, s)] == [S.ERROR]


def test_transitional_states() -> None:
    assert frozenset(
        {S.CREATING, S.STOPPING, S.STARTING, S.PAUSING, S.RESUMING, S.DELETING}
    ) == TRANSITIONAL


def test_states_persist_as_their_lowercase_names() -> None:
    assert {s.value for s in State} == {
        "creating", "running", "stopping", "stopped", "starting", "pausing", "paused",
        "resuming", "error", "deleting",
    }


# plan(op, current): the transitional state, None (already satisfied), or "conflict".
START_PLAN = {
    S.STOPPED: S.STARTING,
    S.ERROR: S.STARTING,
    S.RUNNING: None,
    S.CREATING: "conflict",
    S.STOPPING: "conflict",
    S.STARTING: "conflict",
    S.PAUSING: "conflict",
    S.PAUSED: "conflict",
    S.RESUMING: "conflict",
    S.DELETING: "conflict",
}
STOP_PLAN = {
    S.RUNNING: S.STOPPING,
    S.PAUSED: S.STOPPING,
    S.STOPPED: None,
    S.CREATING: "conflict",
    S.STOPPING: "conflict",
    S.STARTING: "conflict",
    S.PAUSING: "conflict",
    S.RESUMING: "conflict",
    S.ERROR: "conflict",
    S.DELETING: "conflict",
}


def _plan_or_conflict(op: object, current: State) -> State | str | None:
    try:
        return plan(op, current)  # type: ignore[arg-type]
    except ValueError:
        return "conflict"


def test_start_plan() -> None:
    assert {s: _plan_or_conflict(START, s) for s in State} == START_PLAN


def test_stop_plan() -> None:
    assert {s: _plan_or_conflict(STOP, s) for s in State} == STOP_PLAN


@pytest.mark.parametrize("state", sorted(TRANSITIONAL))
def test_every_transitional_state_conflicts_with_start_and_stop(state: State) -> None:
    with pytest.raises(ValueError, match=f"cannot start a workspace that is {state.value}"):
        plan(START, state)
    with pytest.raises(ValueError, match=f"cannot stop a workspace that is {state.value}"):
        plan(STOP, state)


@pytest.mark.parametrize("op", [START, STOP], ids=["start", "stop"])
def test_plans_only_walk_legal_edges(op: object) -> None:
    for src in State:
        step = _plan_or_conflict(op, src)
        if isinstance(step, State):
            assert can_transition(src, step), (src, step)
            assert can_transition(step, op.final), (step, op.final)  # type: ignore[attr-defined]
            assert step in TRANSITIONAL


PAUSE_PLAN = {
    S.RUNNING: S.PAUSING,
    S.PAUSED: None,
    S.STOPPED: None,  # pause of a stopped workspace: nothing to do
    S.CREATING: "conflict",
    S.STOPPING: "conflict",
    S.STARTING: "conflict",
    S.PAUSING: "conflict",
    S.RESUMING: "conflict",
    S.ERROR: "conflict",
    S.DELETING: "conflict",
}
RESUME_PLAN = {
    S.PAUSED: S.RESUMING,
    S.RUNNING: None,
    S.STOPPED: "conflict",
    S.CREATING: "conflict",
    S.STOPPING: "conflict",
    S.STARTING: "conflict",
    S.PAUSING: "conflict",
    S.RESUMING: "conflict",
    S.ERROR: "conflict",
    S.DELETING: "conflict",
}


@pytest.mark.parametrize(("op", "table"), [(PAUSE, PAUSE_PLAN), (RESUME, RESUME_PLAN)])
def test_pause_and_resume_plans(op: object, table: dict[State, object]) -> None:
    assert {st: _plan_or_conflict(op, st) for st in State} == table
