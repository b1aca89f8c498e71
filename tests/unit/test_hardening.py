"""Issue 11, finding 8, the smaller items that need no engine: the data directory's modes,
and no documentation pages that load third-party scripts."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from server.app import create_app
from server.config import Settings
from server.runtime.fake import FakeRuntime


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_directory_and_database_are_private(
        make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    settings.data_dir.mkdir(parents=True)
    settings.data_dir.chmod(0o755)  # as an older Den (or mkdir) left it
    (settings.data_dir / "mirrors").mkdir()
    (settings.data_dir / "mirrors").chmod(0o755)
    with TestClient(create_app(settings, runtime=FakeRuntime())) as client:
        assert client.get("/healthz").status_code == 200
        assert _mode(settings.data_dir) == 0o700
        assert _mode(settings.data_dir / "mirrors") == 0o700
        db = settings.data_dir / "den.db"
        assert _mode(db) == 0o600
        wal = settings.data_dir / "den.db-wal"
        assert not wal.exists() or _mode(wal) == 0o600
        svc = client.app.state.workspaces  # type: ignore[attr-defined]
        assert _mode(svc.restores.memory_dir("x").parent) == 0o700


def test_no_cdn_documentation_pages(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(), runtime=FakeRuntime())) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/redoc").status_code == 404
        assert client.get("/openapi.json").json()["info"]["title"] == "Den"
