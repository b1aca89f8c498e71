"""cancel_and_wait: every task cancelled, every task ended, nothing raised to the caller."""

from __future__ import annotations

import asyncio

from server.tasks import cancel_and_wait


def test_every_task_is_cancelled_and_waited_for() -> None:
    cleaned: list[str] = []

    async def sleeper(name: str) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.01)  # clean-up that takes a while: it is waited for
            cleaned.append(name)

    async def failed() -> None:
        raise RuntimeError("boom")

    async def main() -> list[asyncio.Task[None]]:
        tasks = [asyncio.create_task(sleeper("a")), asyncio.create_task(sleeper("b")),
                 asyncio.create_task(failed())]
        await asyncio.sleep(0)
        await cancel_and_wait(t for t in tasks)  # any iterable, consumed once
        return tasks

    tasks = asyncio.run(main())
    assert sorted(cleaned) == ["a", "b"]
    assert all(t.done() for t in tasks)
    assert tasks[0].cancelled() and isinstance(tasks[2].exception(), RuntimeError)
