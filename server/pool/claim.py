"""A claim that runs while the create clones: thaw, host name and firewall overlap the clone
(measured under load: clone and pack 0.15-0.45 s, the claim and the firewall sync 0.3-1 s,
one after the other before this). Whether the sandbox fits is known only after the clone (a
devcontainer.json), so the claim is settled then; one that does not fit is removed: it was
thawed and renamed, but nothing of anyone's ran in it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from server.pool.warm import Pooled, WarmPool


class PendingClaim:
    """Starts claiming ``pooled`` at once, and ``then`` beside it (the firewall sync: the
    workspace's policy is in force before anything of the user's runs)."""

    def __init__(self, pool: WarmPool, pooled: Pooled, *, hostname: str,
                 then: Callable[[], Awaitable[None]]) -> None:
        self.pool = pool
        self.pooled = pooled
        self._then = then
        self._task = asyncio.create_task(self._run(hostname),
                                         name=f"claim-{pooled.workspace_id}")

    async def _run(self, hostname: str) -> str | None:
        # The firewall sync needs no thaw (the sandbox has its address since it booted), so
        # it runs beside the claim; both end before the seed, so before anything of the
        # user's can run. After a failed claim the create's own path syncs again.
        problem, _ = await asyncio.gather(self.pool.claim(self.pooled, hostname=hostname),
                                          self._then())
        return problem

    async def settle(self, *, fits: bool) -> tuple[bool, str | None]:
        """(whether the workspace took the sandbox, why the claim failed if it did)."""
        problem = await self._task
        if problem is None and not fits:
            await self.pool.discard(self.pooled)
            return False, None
        return problem is None, problem

    async def abandon(self) -> None:
        """The create failed or was cancelled: the claim stops (the create's clean-up
        removes the sandbox under the workspace's names). Idempotent."""
        if not self._task.done():
            self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
