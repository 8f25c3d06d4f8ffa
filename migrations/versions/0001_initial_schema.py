"""Initial schema: experiments and their metric history.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

json_document = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec", json_document, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("normalization", sa.String(16)),
        sa.Column("K", sa.Integer, nullable=False),
        sa.Column("d", sa.Integer, nullable=False),
        sa.Column("dataset", sa.String(32)),
        sa.Column("architecture", sa.String(32)),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("result", json_document),
        sa.Column("error", sa.Text),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("started_at", timestamp),
        sa.Column("finished_at", timestamp),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("sent_at", timestamp),
        sa.Column("send_count", sa.Integer, nullable=False),
        sa.Column("heartbeat_at", timestamp),
        sa.Column("worker", sa.String(255)),
    )
    op.create_index("ix_experiments_status", "experiments", ["status"])
    op.create_index("ix_experiments_kind", "experiments", ["kind"])
    op.create_index("ix_experiments_created_at_id", "experiments", ["created_at", "id"])
    op.create_table(
        "metrics",
        sa.Column(
            "experiment_id", sa.String(36), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("step", sa.Integer, primary_key=True),
        sa.Column("values", json_document, nullable=False),
        sa.Column("recorded_at", timestamp, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("metrics")
    op.drop_table("experiments")
