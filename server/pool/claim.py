"""A claim that runs while the create clones: thaw, host name and firewall overlap the clone
(measured under load: clone and pack 0.15-0.45 s, the claim and the firewall sync 0.3-1 s,
one after the other before this), and the seed overlaps the rest of the claim (the rename
and the firewall sync need the thaw only; the seed needs the thaw and the clone). Whether
the sandbox fits is known only after the clone (a devcontainer.json), so the claim is
settled then; one that does not fit is removed: it was thawed, but nothing of anyone's ran in
it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from server.pool.warm import Pooled, WarmPool


class PendingClaim:
    """Starts claiming ``pooled`` at once: the thaw, then its host name, and ``then`` beside
    them (the firewall sync: the workspace's policy is in force before anything of the
    user's runs)."""

    def __init__(self, pool: WarmPool, pooled: Pooled, *, hostname: str,
                 then: Callable[[], Awaitable[None]]) -> None:
        self.pool = pool
        self.pooled = pooled
        self._then = then
        name = f"claim-{pooled.workspace_id}"
        self._thawed = asyncio.create_task(pool.thaw(pooled), name=f"{name}-thaw")
        self._named = asyncio.create_task(self._name(hostname), name=name)

    async def _name(self, hostname: str) -> str | None:
        # The firewall sync needs no thaw (the sandbox has its address since it booted), so
        # it runs beside the claim; both end before the workspace runs, so before anything
        # of the user's can. After a failed claim the create's own path syncs again.
        async def named() -> str | None:
            problem = await asyncio.shield(self._thawed)
            return problem if problem is not None else \
                await self.pool.name(self.pooled, hostname=hostname)

        problem, _ = await asyncio.gather(named(), self._then())
        return problem

    async def settle(self, *, fits: bool, seed: Callable[[], Awaitable[None]]
                     ) -> tuple[bool, str | None]:
        """(whether the workspace took the sandbox, why the claim failed if it did). A
        sandbox that fits is seeded by ``seed`` as soon as it is thawed, beside the rest of
        the claim; a seed that fails raises (the sandbox is the workspace's by then: the
        create's clean-up removes it)."""
        problem = await asyncio.shield(self._thawed)
        if problem is not None or not fits:
            # the firewall sync is not cut short; a sandbox whose rename failed is gone
            if await self._ended() is None and problem is None:
                await self.pool.discard(self.pooled)
            return False, problem
        seeded, named = await asyncio.gather(seed(), self._named,
                                             return_exceptions=True)
        if isinstance(named, BaseException):
            raise named
        if named is not None:  # the sandbox is gone: the seed's outcome does not matter
            return False, named
        if isinstance(seeded, BaseException):
            raise seeded
        return True, None

    async def _ended(self) -> str | None:
        """The rest of the claim, once it has ended (its problem; None when it went well or
        was cancelled: the sandbox is then removed by whoever cancelled it)."""
        with contextlib.suppress(BaseException):
            return await self._named
        return None

    async def abandon(self) -> None:
        """The create has ended (the claim stops if it has not: the create failed or was
        cancelled, and its clean-up removes the sandbox under the workspace's names); the
        pool may refill. Idempotent."""
        for task in (self._thawed, self._named):
            if not task.done():
                task.cancel()
        for task in (self._thawed, self._named):
            with contextlib.suppress(BaseException):
                await task
        self.pool.ended(self.pooled)
