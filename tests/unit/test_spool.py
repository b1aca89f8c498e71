"""A command's stdout spooled to a file (pull request bundles, issue 11 finding 6): written as
it comes, cut past the limit, stderr kept apart; on the fake runtime."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from server.forges.spool import spool_stdout
from server.workspaces.service import WorkspaceService
from tests.unit.test_service_fake import create, user

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_stdout_goes_to_the_file_and_a_big_one_is_cut(
        make_service: Callable[..., WorkspaceService], make_repo: Callable[..., Path],
        tmp_path: Path) -> None:
    svc = make_service()
    ws = await create(svc, user(svc), make_repo())
    req = svc.exec_request(ws, ["echo", "hello", "bundle"])
    out = await spool_stdout(svc, ws.id, req, dest=tmp_path / "a", limit=1000, timeout_s=30,
                             actor="alice")
    assert (out.exit_code, out.size, out.too_large, out.timed_out) == (0, 13, False, False)
    assert (tmp_path / "a").read_bytes() == b"hello bundle\n"
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o600

    out = await spool_stdout(svc, ws.id, req, dest=tmp_path / "b", limit=5, timeout_s=30,
                             actor="alice")
    assert out.too_large and (tmp_path / "b").read_bytes() == b""  # nothing past the limit
    assert svc.long_calls.counts()[:2] == (0, 0)  # its slot is back

    failing = svc.exec_request(ws, ["exit", "31"])
    out = await spool_stdout(svc, ws.id, failing, dest=tmp_path / "c", limit=5, timeout_s=30,
                             actor="alice")
    assert (out.exit_code, out.size) == (31, 0)
