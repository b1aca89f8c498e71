"""sleep: how a paused workspace sleeps ("frozen" in place, or "saved" to disk)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN: a batch copy of `workspaces` on SQLite would drop the old table and,
    # through ON DELETE CASCADE, every row that refers to it.
    op.add_column("workspaces", sa.Column("sleep", sa.String(length=8), nullable=True))
    # Every workspace paused before this revision has its memory on disk.
    op.execute("UPDATE workspaces SET sleep = 'saved' WHERE state = 'paused'")


def downgrade() -> None:
    op.drop_column("workspaces", "sleep")  # SQLite 3.35+ drops a column in place
