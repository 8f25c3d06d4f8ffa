"""Scheduling: each experiment's priority, and the index the fair scheduler reads by.

- experiments.priority: -10..10, 0 for every existing job (a submit's default).
- ix_experiments_scheduling: a queue's jobs by status and owner, an owner's queued ones in
  the scheduler's order (service/scheduler.py).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default="0"))
    op.create_index(
        "ix_experiments_scheduling", "experiments", ["queue", "status", "owner", "priority", "created_at", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_experiments_scheduling", table_name="experiments")
    with op.batch_alter_table("experiments") as batch:
        batch.drop_column("priority")
