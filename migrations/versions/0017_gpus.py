"""gpus: GPU allocations (one row per GPU held) and a workspace's wanted GPU model

Revision ID: 0017
Revises: 0010
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gpu_allocations",
        sa.Column("gpu_uuid", sa.String(length=64), nullable=False),
        sa.Column("workspace_id", sa.String(length=32), nullable=False),
        sa.Column("allocated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("gpu_uuid"),
    )
    with op.batch_alter_table("gpu_allocations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_gpu_allocations_workspace_id"), ["workspace_id"],
                              unique=False)
    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gpu_model", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.drop_column("gpu_model")
    with op.batch_alter_table("gpu_allocations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_gpu_allocations_workspace_id"))
    op.drop_table("gpu_allocations")
