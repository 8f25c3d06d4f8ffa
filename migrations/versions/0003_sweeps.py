"""Sweeps: experiments submitted together, and the members' reference to theirs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

json_document = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
timestamp = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("name", sa.String(200)),
        sa.Column("tags", json_document, nullable=False),
        sa.Column("definition", json_document, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("created_at", timestamp, nullable=False),
    )
    op.create_index("ix_sweeps_owner", "sweeps", ["owner"])
    op.create_index("ix_sweeps_created_at_id", "sweeps", ["created_at", "id"])
    with op.batch_alter_table("experiments") as batch:
        batch.create_foreign_key("fk_experiments_sweep", "sweeps", ["sweep"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.drop_constraint("fk_experiments_sweep", type_="foreignkey")
    op.drop_table("sweeps")
