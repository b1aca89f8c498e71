"""Alembic, driven from code: ``den serve`` upgrades on start or refuses clearly."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from server.errors import DenError

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


class SchemaOutOfDate(DenError):
    code = "schema_out_of_date"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, url: str) -> None:
    """Upgrade the schema to head (a no-op when it is already there)."""
    cfg = alembic_config(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def ensure_schema(engine: Engine, url: str, *, auto_migrate: bool) -> None:
    """Bring the schema to head, or refuse with the command that would."""
    if current_revision(engine) == head_revision(url):
        return
    if auto_migrate:
        upgrade(engine, url)
        return
    raise SchemaOutOfDate(
        "the database schema is not at the current version; run `den admin migrate` "
        "(or set DEN_AUTO_MIGRATE=true) and start again"
    )
