"""network: each workspace's network policy, and the origin's on snapshots (for forks)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # An empty policy reads as the operator's default mode (DEN_NETWORK_DEFAULT_MODE).
    # A plain ADD COLUMN, not a batch operation: on SQLite the batch copied `workspaces` into
    # a new table and dropped the old one, and the drop cascaded to every workspace's events
    # and preview ports (tests/db: a database from 0001 upgraded to head keeps its data).
    for table in ("workspaces", "snapshots"):
        op.add_column(table, sa.Column("network", sa.JSON(), nullable=False,
                                       server_default=sa.text("'{}'")))


def downgrade() -> None:
    for table in ("workspaces", "snapshots"):
        op.drop_column(table, "network")  # SQLite 3.35+ drops a column in place
