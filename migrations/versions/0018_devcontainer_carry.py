"""devcontainer carry: what a snapshot keeps of its workspace's devcontainer.json (for
forks), and the prebuild a workspace is made for (not listed)

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (never a batch operation: on SQLite it copies the table).
    op.add_column("snapshots", sa.Column("devcontainer", sa.JSON(), nullable=False,
                                         server_default=sa.text("'{}'")))
    op.add_column("workspaces", sa.Column("prebuild_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    op.drop_column("workspaces", "prebuild_id")
    op.drop_column("snapshots", "devcontainer")
