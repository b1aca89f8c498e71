"""Shedding: long calls are admitted through a gate with a bounded queue; one more is a 503
with Retry-After, and short calls (state reads, files) do not wait behind them. The fake
runtime's exec of ``["block"]`` waits on an event, so the queue fills deterministically."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.errors import Overloaded
from server.runtime.fake import FakeRuntime
from server.workspaces.admission import Gate
from tests.conftest import ApiClient, users
from tests.unit.test_api_fake import assert_error
from tests.unit.test_metrics import parse, value

WS = "/api/v1/workspaces"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- the gate ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_gate_admits_up_to_its_limit_queues_up_to_its_bound_then_sheds() -> None:
    gate = Gate(limit=1, queue_max=1)
    release = asyncio.Event()
    order: list[str] = []

    async def hold(name: str) -> None:
        async with gate.enter():
            order.append(name)
            await release.wait()

    first = asyncio.create_task(hold("first"))
    while gate.running < 1:
        await asyncio.sleep(0)
    second = asyncio.create_task(hold("second"))
    while gate.waiting < 1:
        await asyncio.sleep(0)
    with pytest.raises(Overloaded) as refused:
        async with gate.enter():
            pass
    assert refused.value.status_code == 503 and refused.value.code == "overloaded"
    assert refused.value.headers == {"Retry-After": "2"}
    assert gate.counts() == (1, 1, 1)
    release.set()
    await asyncio.gather(first, second)
    assert order == ["first", "second"]  # first come, first served
    assert gate.counts() == (0, 0, 1)
    async with gate.enter():  # room again
        assert gate.counts() == (1, 0, 1)


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    gate = Gate(limit=1, queue_max=1)
    release = asyncio.Event()

    async def hold() -> None:
        async with gate.enter():
            await release.wait()

    first = asyncio.create_task(hold())
    while gate.running < 1:
        await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    while gate.waiting < 1:
        await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.counts() == (1, 0, 0)
    release.set()
    await first
    assert gate.counts() == (0, 0, 0)


def test_gate_bounds_are_checked() -> None:
    with pytest.raises(ValueError):
        Gate(limit=0, queue_max=1)
    with pytest.raises(ValueError):
        Gate(limit=1, queue_max=-1)


# --- through the API ---------------------------------------------------------------------------


@pytest.fixture
def small_api(make_settings: Callable[..., Settings], fake_runtime: FakeRuntime
              ) -> Iterator[ApiClient]:
    """An app that runs one exec at a time and queues one more."""
    app = create_app(make_settings(exec_concurrency=1, exec_queue_max=1), runtime=fake_runtime)
    with TestClient(app) as client:
        yield ApiClient(client, users(app))


def _wait_for(cond: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_a_full_exec_queue_answers_503_and_short_calls_still_pass(
        small_api: ApiClient, fake_runtime: FakeRuntime, make_repo: Callable[..., Path]
) -> None:
    ws = small_api.create(make_repo("api"), name="api")
    ws_id = ws["id"]
    gate = small_api.app.state.workspaces.long_calls
    results: dict[str, Any] = {}

    def blocked(name: str) -> None:
        results[name] = small_api.post(f"{WS}/{ws_id}/exec", json={"cmd": ["block"]})

    threads = [threading.Thread(target=blocked, args=(n,)) for n in ("a", "b")]
    threads[0].start()
    _wait_for(lambda: gate.running == 1)
    threads[1].start()
    _wait_for(lambda: gate.waiting == 1)
    try:
        r = small_api.post(f"{WS}/{ws_id}/exec", json={"cmd": ["true"]})
        assert_error(r, 503, "overloaded")
        assert r.headers["retry-after"] == "2"
        # Short calls do not pass the gate: a state read and a files call answer now.
        assert small_api.get(f"{WS}/{ws_id}").json()["state"] == "running"
        files = small_api.get(f"{WS}/{ws_id}/files/list", params={"path": "."})
        assert files.status_code != 503, files.text
        assert gate.counts() == (1, 1, 1)
        m = parse(small_api.get("/metrics", user="root").text)
        assert value(m, "den_exec_in_flight") == 1 and value(m, "den_exec_queued") == 1
        assert value(m, "den_exec_shed_total") == 1
        assert value(m, "den_exec_duration_seconds_count", kind="exec", outcome="shed") == 1
    finally:
        small_api.call(fake_runtime.release.set)
        for t in threads:
            t.join(timeout=30)
    assert [results[n].status_code for n in ("a", "b")] == [200, 200]
    assert results["a"].json()["stdout"] == "released\n"
    assert gate.counts() == (0, 0, 1)
    assert small_api.exec(ws_id, ["true"])["exit_code"] == 0  # room again
