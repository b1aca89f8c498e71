"""Fault points: test-only crashes at named engine steps.

A crash-consistency test sets ``DEN_FAULT=<point>`` in the environment of a ``den serve`` it
runs; when that server reaches the point it kills itself with SIGKILL, as a power cut or an
OOM kill would, leaving whatever the step was making half-made. The test then starts the
server again and checks what reconcile made of it (tests/engine/test_crash.py).

Test-only: an operator never sets ``DEN_FAULT``. The variable is read only when the point is
reached and does nothing when unset (a dictionary lookup per engine step).
``DEN_FAULT=<point>:<n>`` crashes at the n-th time the point is reached (1 is the first).
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "DEN_FAULT"

# Every point, in the order of the operations' steps (docs/operations.md lists them).
POINTS: tuple[str, ...] = (
    "create.clone",  # the repository is cloned on the host; no engine object yet
    "fork.copy",  # a fork's copy helper is copying the snapshot's volume
    "restore.copy",  # a restore's copy helper is copying into the new volume
    "restore.swap",  # the new copy is complete and recorded; the container still uses the old
    "pause.checkpoint",  # runsc is writing the checkpoint
    "resume.session",  # microVM: the saved memory is loaded and the guest runs; no session yet
    "snapshot.commit",  # the snapshot's image is committed; its volume copy not made
    "snapshot.copy",  # a snapshot's copy helper is copying the workspace's volume
    "delete.volume",  # the container is removed, the volume not yet
)

_hits: dict[str, int] = {}
_lock = threading.Lock()


def point(name: str) -> None:
    """Die here (SIGKILL, no clean-up) when ``DEN_FAULT`` names this point."""
    armed = os.environ.get(ENV)
    if not armed:
        return
    target, _, nth = armed.partition(":")
    if target != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        count = _hits[name]
    if count >= (int(nth) if nth.isdigit() else 1):
        os.kill(os.getpid(), signal.SIGKILL)
