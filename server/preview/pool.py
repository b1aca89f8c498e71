"""Idle keep-alive connections to apps inside workspaces, kept for the next request to the
same port (opening one through the agent costs a round trip into the sandbox and a TCP
connect there: a third of a short request).

A connection is put back only after a whole request and response went through it and both
sides left it idle (h11's DONE, nothing left over); while parked, a read waits on it, so an
app that closes it (its keep-alive timeout) or says anything unasked drops it at once. Parked
connections are per (workspace, port), at most ``per_port`` each and ``total`` in all, each
for ``idle_s`` seconds. A connection carries no identity: every request on it has its own
head, from which Den has removed its cookies and tokens, as on a fresh connection.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from server.preview.proxy import Upstream

Key = tuple[str, int]  # workspace id, port


class UpstreamPool:
    def __init__(self, *, per_port: int = 8, total: int = 256, idle_s: float = 4.0) -> None:
        self.per_port = per_port
        self.total = total
        self.idle_s = idle_s
        self._idle: OrderedDict[Upstream, Key] = OrderedDict()  # oldest first
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, workspace_id: str, port: int) -> Upstream | None:
        """The most recently parked live connection to ``port``, or None."""
        key = (workspace_id, port)
        for up in reversed(self._idle):
            if self._idle[up] == key:
                del self._idle[up]
                if up.unpark():
                    return up
                self._close(up)
        return None

    def give(self, workspace_id: str, port: int, up: Upstream) -> None:
        """Park ``up`` (idle, reusable) for the next request to ``port``."""
        key = (workspace_id, port)
        same = [u for u, k in self._idle.items() if k == key]
        if len(same) >= self.per_port:
            self._drop(same[0])
        if len(self._idle) >= self.total:
            self._drop(next(iter(self._idle)))
        self._idle[up] = key
        up.park(on_activity=self._drop, idle_s=self.idle_s)

    async def close(self) -> None:
        """Close every parked connection (the server stops). A workspace that pauses or
        stops needs nothing of this: its agent session ends, and with it every parked
        connection's channel, which drops it."""
        for up in list(self._idle):
            self._drop(up)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _drop(self, up: Upstream) -> None:
        if self._idle.pop(up, None) is not None:
            self._close(up)

    def _close(self, up: Upstream) -> None:
        task = asyncio.get_running_loop().create_task(up.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
