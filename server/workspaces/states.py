"""The workspace state machine as data: states, legal transitions, operations."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    STARTING = "starting"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    ERROR = "error"
    DELETING = "deleting"


class Sleep(StrEnum):
    """How deeply a ``paused`` workspace sleeps (docs/api.md, "Sleep tiers")."""

    FROZEN = "frozen"  # processes stopped in place by the engine's freezer; memory kept
    SAVED = "saved"  # memory and processes checkpointed to disk; no memory, no CPU


TRANSITIONAL: frozenset[State] = frozenset(
    {State.CREATING, State.STOPPING, State.STARTING, State.PAUSING, State.RESUMING, State.DELETING}
)

# Every legal (from -> to). Any state may go to ERROR (a failed delete included, so that a
# later delete retries) and any state but DELETING may go to DELETING.
_EDGES: dict[State, frozenset[State]] = {
    State.CREATING: frozenset({State.RUNNING}),
    State.RUNNING: frozenset({State.STOPPING, State.PAUSING, State.STOPPED}),
    State.STOPPING: frozenset({State.STOPPED}),
    State.STOPPED: frozenset({State.STARTING, State.RUNNING}),
    State.STARTING: frozenset({State.RUNNING, State.STOPPED}),
    State.PAUSING: frozenset({State.PAUSED, State.RUNNING, State.STOPPED}),
    # paused -> pausing: a frozen workspace's memory is being saved (frozen -> saved).
    # paused -> creating: a create takes a prebuild's fork made ahead, frozen
    # (server/prebuilds/ahead.py).
    State.PAUSED: frozenset({State.RESUMING, State.STOPPING, State.STOPPED, State.PAUSING,
                             State.CREATING}),
    State.RESUMING: frozenset({State.RUNNING, State.STOPPED, State.PAUSED}),
    State.ERROR: frozenset({State.STARTING}),
    State.DELETING: frozenset(),
}


def can_transition(src: State, dst: State) -> bool:
    if dst is State.ERROR:
        return True
    if dst is State.DELETING:
        return src is not State.DELETING
    return dst in _EDGES[src]


@dataclass(frozen=True)
class Operation:
    """A user-visible lifecycle operation: from which states, through which, to which."""

    name: str
    allowed_from: frozenset[State]
    transitional: State
    final: State
    satisfied_in: frozenset[State]


START = Operation(
    "start",
    allowed_from=frozenset({State.STOPPED, State.ERROR}),
    transitional=State.STARTING,
    final=State.RUNNING,
    satisfied_in=frozenset({State.RUNNING}),
)
STOP = Operation(
    "stop",
    allowed_from=frozenset({State.RUNNING, State.PAUSED}),
    transitional=State.STOPPING,
    final=State.STOPPED,
    satisfied_in=frozenset({State.STOPPED}),
)

PAUSE = Operation(
    "pause",
    allowed_from=frozenset({State.RUNNING}),
    transitional=State.PAUSING,
    final=State.PAUSED,
    satisfied_in=frozenset({State.PAUSED, State.STOPPED}),
)
RESUME = Operation(
    "resume",
    allowed_from=frozenset({State.PAUSED}),
    transitional=State.RESUMING,
    final=State.RUNNING,
    satisfied_in=frozenset({State.RUNNING}),
)


def plan(op: Operation, current: State) -> State | None:
    """The transitional state ``op`` moves ``current`` into; None when already satisfied.

    Raises ValueError when ``op`` cannot run from ``current`` (the caller answers 409).
    """
    if current in op.satisfied_in:
        return None
    if current in op.allowed_from:
        return op.transitional
    raise ValueError(f"cannot {op.name} a workspace that is {current.value}")
