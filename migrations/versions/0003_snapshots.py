"""snapshots

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("workspace_id", sa.String(length=32), nullable=True),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("memory", sa.Boolean(), nullable=False),
        sa.Column("image", sa.String(length=255), nullable=False),
        sa.Column("volume", sa.String(length=255), nullable=False),
        sa.Column("repo_url", sa.Text(), nullable=False),
        sa.Column("repo_branch", sa.String(length=255), nullable=True),
        sa.Column("repo_dir", sa.String(length=255), nullable=False),
        sa.Column("runtime", sa.String(length=32), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("snapshots", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_snapshots_owner_id"), ["owner_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_snapshots_workspace_id"), ["workspace_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("snapshots", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_snapshots_workspace_id"))
        batch_op.drop_index(batch_op.f("ix_snapshots_owner_id"))

    op.drop_table("snapshots")
