"""sleep: how a paused workspace sleeps ("frozen" in place, or "saved" to disk)

Revision ID: 0012
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sleep", sa.String(length=8), nullable=True))
    # Every workspace paused before this revision has its memory on disk.
    op.execute("UPDATE workspaces SET sleep = 'saved' WHERE state = 'paused'")


def downgrade() -> None:
    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.drop_column("sleep")
