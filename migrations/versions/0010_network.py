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
    for table in ("workspaces", "snapshots"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(sa.Column("network", sa.JSON(), nullable=False,
                                          server_default=sa.text("'{}'")))


def downgrade() -> None:
    for table in ("workspaces", "snapshots"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column("network")
