"""Owner, name, tags and sweep on experiments; PostgreSQL indexes for lab-wide search.

Existing rows get owner 'anonymous' and no tags.

Search reads spec and result from their JSON documents (service/search/sql.py). On
PostgreSQL three kinds of index make that fast:
- GIN (jsonb_path_ops) on spec and tags: equality on any spec field or tag compiles to
  containment (``spec @> '{"dataset": "mnist"}'``), which these answer;
- one B-tree per catalogue metric on ``CAST((result ->> 'key') AS DOUBLE PRECISION)``,
  the exact expression the search compiler emits: ordering by a metric walks the index
  and stops after a page, and thresholds on a metric are index ranges;
- (status, created_at, id), the default order within a status.
SQLite (embedded, one lab's history) scans.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

json_document = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")

# The result keys whose order and ranges are indexed (the catalogue's and the common figures).
INDEXED_METRICS = (
    "nc1", "nc1_cdnv", "nc2_etf_m", "nc2_etf_w", "nc3", "nc3_etf", "nc4",
    "accuracy", "loss", "test_accuracy", "test_loss", "optimality_gap",
)


def upgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("owner", sa.String(200), nullable=False, server_default="anonymous"))
        batch.add_column(sa.Column("name", sa.String(200)))
        batch.add_column(sa.Column("tags", json_document, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("sweep", sa.String(36)))
    # The server defaults moved the existing rows over; new rows get theirs from the ORM.
    with op.batch_alter_table("experiments") as batch:
        batch.alter_column("owner", server_default=None)
        batch.alter_column("tags", server_default=None)
    op.create_index("ix_experiments_owner", "experiments", ["owner"])
    op.create_index("ix_experiments_sweep", "experiments", ["sweep"])

    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("CREATE INDEX ix_search_spec ON experiments USING gin (spec jsonb_path_ops)")
    op.execute("CREATE INDEX ix_search_tags ON experiments USING gin (tags jsonb_path_ops)")
    op.execute("CREATE INDEX ix_search_status_created_at_id ON experiments (status, created_at, id)")
    for key in INDEXED_METRICS:
        op.execute(f"CREATE INDEX ix_search_result_{key} ON experiments "
                   f"((CAST((result ->> '{key}') AS DOUBLE PRECISION)))")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for key in INDEXED_METRICS:
            op.execute(f"DROP INDEX ix_search_result_{key}")
        for name in ("spec", "tags", "status_created_at_id"):
            op.execute(f"DROP INDEX ix_search_{name}")
    op.drop_index("ix_experiments_sweep", "experiments")
    op.drop_index("ix_experiments_owner", "experiments")
    with op.batch_alter_table("experiments") as batch:
        for column in ("sweep", "tags", "name", "owner"):
            batch.drop_column(column)
