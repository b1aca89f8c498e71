"""gpus: GPU allocations (one row per GPU held) and a workspace's wanted GPU model

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
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
    op.create_index("ix_gpu_allocations_workspace_id", "gpu_allocations", ["workspace_id"],
                    unique=False)
    # Plain ADD COLUMN: a batch copy of `workspaces` on SQLite would drop the old table and,
    # through ON DELETE CASCADE, every row that refers to it.
    op.add_column("workspaces", sa.Column("gpu_model", sa.String(length=255), nullable=True))


def downgrade() -> None:
    op.drop_column("workspaces", "gpu_model")  # SQLite 3.35+ drops a column in place
    op.drop_index("ix_gpu_allocations_workspace_id", table_name="gpu_allocations")
    op.drop_table("gpu_allocations")
