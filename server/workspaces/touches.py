"""Coalescing activity writes: at most one ``last_activity_at`` write per workspace a second.

Every API call on a workspace marks activity (:meth:`server.workspaces.ledger.Ledger.touch`).
The database already ignores a touch within ``ACTIVITY_DEBOUNCE`` of the last one, but
asking it costs a write transaction per call (about a quarter of an exec route's CPU,
measured). This process remembers when it last asked, per workspace, and skips the database
for ``window_s`` after that: the recorded activity can lag by ``window_s`` more, far below
any idle timeout. Only this process's own touches are remembered; another process's write,
or an operator's, is seen by the database's debounce as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

WINDOW_S = 1.0
MAX_ENTRIES = 4096


class TouchCoalescer:
    """Which touches need the database. Thread-safe; at most ``max_entries`` remembered."""

    def __init__(self, *, window_s: float = WINDOW_S, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, workspace_id: str) -> bool:
        """True when ``workspace_id``'s touch must go to the database (and is then counted
        as done now); False within ``window_s`` of the last one that did."""
        now = self._clock()
        with self._lock:
            last = self._last.get(workspace_id)
            if last is not None and now - last < self.window_s:
                return False
            if last is None and len(self._last) >= self.max_entries:
                self._prune(now)
            self._last[workspace_id] = now
            return True

    def forget(self, workspace_id: str) -> None:
        """The next touch of ``workspace_id`` goes to the database."""
        with self._lock:
            self._last.pop(workspace_id, None)

    def _prune(self, now: float) -> None:
        """Drop the entries past their window; if all are within it, the oldest half."""
        self._last = {k: t for k, t in self._last.items() if now - t < self.window_s}
        if len(self._last) >= self.max_entries:
            keep = sorted(self._last.items(), key=lambda kv: kv[1])[len(self._last) // 2:]
            self._last = dict(keep)
