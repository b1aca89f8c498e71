"""devcontainer: what a workspace keeps of its devcontainer.json, and port labels

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (SQLite has it): a batch operation that copies a table would drop the
    # old one, and with it, through ON DELETE CASCADE, every row that refers to it.
    # Empty: the workspace was not made from a devcontainer.json.
    op.add_column("workspaces", sa.Column("devcontainer", sa.JSON(), nullable=False,
                                          server_default=sa.text("'{}'")))
    op.add_column("preview_ports", sa.Column("label", sa.String(64), nullable=False,
                                             server_default=""))


def downgrade() -> None:
    op.drop_column("preview_ports", "label")  # SQLite 3.35+ drops a column in place
    op.drop_column("workspaces", "devcontainer")
