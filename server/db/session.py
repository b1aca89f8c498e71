"""Engine and session factory (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

PRIVATE_DIRS = ("mirrors", "snapshots")  # forge mirrors, saved memory of snapshots


def prepare_data_dir(data_dir: Path) -> None:
    """Make the data directory (and the private ones in it) readable by the server's user
    only: it holds the database, keys, mirrors and memory images (issue 11, finding 8)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    for name in PRIVATE_DIRS:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(data_dir / name, 0o700)


def restrict_sqlite_files(url: str) -> None:
    """SQLite's database file, and its WAL and shared-memory files, 0600."""
    if not url.startswith("sqlite:///"):
        return
    path = url[len("sqlite:///"):]
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path + suffix, 0o600)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys, WAL and a busy timeout."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
            restrict_sqlite_files(url)  # the files exist once the first connection is made

        return engine
    return create_engine(url, pool_pre_ping=True)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
