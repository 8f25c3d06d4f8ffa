"""Uploads: the files of features users upload for analysis (POST /uploads).

- uploads: id, owner, size, sha256, the layout its header showed, its number of classes.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

json_document = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "uploads",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("layout", json_document, nullable=False),
        sa.Column("classes", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_uploads_owner", "uploads", ["owner"])


def downgrade() -> None:
    op.drop_index("ix_uploads_owner", table_name="uploads")
    op.drop_table("uploads")
