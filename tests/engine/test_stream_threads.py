"""Long waits stay off the shared thread pools (issue 11, finding 5): the end of a streaming
exec through the engine (a workspace without its agent) is awaited on the event loop. Before,
``wait()`` joined the reader thread on the loop's default pool: one thread held per open
stream for as long as its command ran, and with the pool full, no stream could end."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ApiClient

pytestmark = pytest.mark.engine


def test_a_stream_ends_while_the_default_pool_is_full(
        real_api: ApiClient, make_repo: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ws = real_api.create(make_repo())
    svc = real_api.app.state.workspaces

    async def no_agent(*_args: Any) -> None:  # the engine's exec, as without an agent
        return None

    monkeypatch.setattr(svc.runtime, "_agent_or_fallback", no_agent)

    async def go() -> tuple[bytes, int]:
        loop = asyncio.get_running_loop()
        release = threading.Event()
        full = ThreadPoolExecutor(max_workers=1)  # the default pool, its one thread busy
        full.submit(release.wait)
        loop.set_default_executor(full)
        try:
            req = svc.exec_request(svc.get(ws["id"]), "sleep 1; echo out; exit 7")
            stream = await svc.exec_stream(ws["id"], req, actor="alice")
            out = b"".join([chunk.data async for chunk in stream.output()])
            async with asyncio.timeout(60):
                code = await stream.wait()
            return out, code
        finally:
            release.set()
            loop.set_default_executor(ThreadPoolExecutor())
            full.shutdown(wait=False)

    out, code = real_api.call(go)
    assert (out, code) == (b"out\n", 7)
