"""user limits: an admin's overrides of the per-user limits (issue 11 §2)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Empty: the server's limits (DEN_MAX_*_PER_USER) apply. A plain ADD COLUMN, not a batch
    # operation: on SQLite a batch may copy the table into a new one and drop the old, and
    # dropping `users` cascades to every row that refers to it (tokens, workspaces, keys).
    op.add_column("users", sa.Column("limits", sa.JSON(), nullable=False,
                                     server_default=sa.text("'{}'")))


def downgrade() -> None:
    op.drop_column("users", "limits")  # SQLite 3.35+ drops a column in place
