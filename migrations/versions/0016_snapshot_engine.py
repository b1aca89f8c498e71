"""snapshot engine handles: the backend's names of a snapshot's engine objects

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_snapshots = sa.table("snapshots", sa.column("id", sa.String), sa.column("image", sa.String),
                      sa.column("volume", sa.String), sa.column("engine", sa.JSON))


def upgrade() -> None:
    # The backend names a snapshot's objects now (server/runtime/base.py, Handle); the Docker
    # backend's were the committed image and the volume, both columns until now. Plain ADD
    # and DROP COLUMN (never a batch operation: on SQLite it copies the table).
    op.add_column("snapshots", sa.Column("engine", sa.JSON(), nullable=False,
                                         server_default=sa.text("'{}'")))
    conn = op.get_bind()
    for sid, image, volume in conn.execute(
            sa.select(_snapshots.c.id, _snapshots.c.image, _snapshots.c.volume)).all():
        conn.execute(_snapshots.update().where(_snapshots.c.id == sid)
                     .values(engine={"image": image, "volume": volume}))
    op.drop_column("snapshots", "volume")  # SQLite 3.35+ drops a column in place


def downgrade() -> None:
    op.add_column("snapshots", sa.Column("volume", sa.String(length=255), nullable=False,
                                         server_default=""))
    conn = op.get_bind()
    for sid, engine in conn.execute(sa.select(_snapshots.c.id, _snapshots.c.engine)).all():
        conn.execute(_snapshots.update().where(_snapshots.c.id == sid)
                     .values(volume=str((engine or {}).get("volume", ""))))
    op.drop_column("snapshots", "engine")
