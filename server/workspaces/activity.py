"""Work in progress on workspaces, which keeps them from being idle."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator


class Activity:
    """Work in progress on workspaces (running execs, open streams and, later, SSH sessions
    and terminals): while held, a workspace is busy and never idle."""

    def __init__(self) -> None:
        self._held: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def hold(self, workspace_id: str) -> AsyncIterator[None]:
        self._held[workspace_id] += 1
        try:
            yield
        finally:
            self._held[workspace_id] -= 1
            if self._held[workspace_id] <= 0:
                del self._held[workspace_id]

    def busy(self, workspace_id: str) -> bool:
        return self._held[workspace_id] > 0
