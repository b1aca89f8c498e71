"""server/runtime/inflight.py: engine calls whose caller was cancelled, tracked to their end."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.runtime import inflight

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_running_call_whose_caller_is_cancelled_is_pending_until_its_thread_ends(
) -> None:
    calls = inflight.Calls()
    entered, gate = threading.Event(), threading.Event()

    seen: list[bool] = []

    def blocking() -> str:
        seen.append(inflight.abandoned())
        entered.set()
        gate.wait(30)
        seen.append(inflight.abandoned())  # long work checks it between steps
        return "done"

    task = asyncio.create_task(inflight.run(None, blocking), context=inflight.tracking(calls))
    assert await asyncio.to_thread(entered.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls.pending == 1  # the caller is gone, the thread is not
    assert not await calls.settled(0.01)
    gate.set()
    assert await calls.settled(30)
    assert calls.pending == 0 and seen == [False, True]


async def test_a_queued_call_whose_caller_is_cancelled_never_runs() -> None:
    calls = inflight.Calls()
    pool = ThreadPoolExecutor(max_workers=1)
    entered, gate = threading.Event(), threading.Event()
    ran: list[str] = []

    def busy() -> None:
        entered.set()
        gate.wait(30)

    try:
        first = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(pool, busy))
        assert await asyncio.to_thread(entered.wait, 30)
        task = asyncio.create_task(inflight.run(pool, lambda: ran.append("ran")),
                                   context=inflight.tracking(calls))
        await asyncio.sleep(0)  # it is queued behind ``busy``
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        await first
        await asyncio.get_running_loop().run_in_executor(pool, lambda: None)  # queue drained
        assert ran == [] and calls.pending == 0
    finally:
        gate.set()
        pool.shutdown(wait=True)


async def test_calls_outside_a_tracked_context_are_plain() -> None:
    assert await inflight.run(None, lambda: 42) == 42
    calls = inflight.Calls()
    task = asyncio.create_task(inflight.run(None, lambda: 7), context=inflight.tracking(calls))
    assert await task == 7 and calls.pending == 0
