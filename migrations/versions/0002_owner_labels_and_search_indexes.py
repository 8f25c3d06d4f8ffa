"""Owner, name, tags and sweep; typed copies of common spec fields and of the metrics; search indexes.

Existing rows get owner 'anonymous', no tags, and their typed copies filled from their
spec, result and history documents.

Search (service/search/sql.py) reads a typed column where there is one and the JSON
document elsewhere. On PostgreSQL:
- GIN (jsonb_path_ops) on spec and tags answers equality on any spec field or tag,
  compiled to containment (``spec @> '{"optimizer": "adam"}'``);
- each indexed metric has a B-tree of its own (the best runs overall) and one behind
  (dataset, normalization) (the best runs of one comparison), so that ordering by it
  walks an index and stops after a page;
- one covering index holds every typed copy behind (dataset, normalization): an
  aggregate over typed fields reads it alone (an index-only scan), a few hundred bytes
  an experiment rather than the whole row with its documents;
- (created_at, id) and (status, created_at, id) serve the default order, newest first;
- the history's typed metrics are included in an index on (experiment_id, step): curves
  read them from it alone.
SQLite (embedded, one lab's history) has the columns and scans.

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

SPEC_COLUMNS = {"logit_scale": sa.Float, "seed": sa.Integer, "epochs": sa.Integer, "lr": sa.Float}
RESULT_KEYS = (
    "nc1", "nc1_cdnv", "nc2_equinorm_m", "nc2_equinorm_w", "nc2_equiangle_m", "nc2_equiangle_w", "nc2_etf_m",
    "nc2_etf_w", "nc3", "nc3_etf", "nc4", "accuracy", "loss", "test_accuracy", "test_loss", "optimality_gap",
)
HISTORY_KEYS = (
    "nc1", "nc1_cdnv", "nc2_equinorm_m", "nc2_equinorm_w", "nc2_equiangle_m", "nc2_equiangle_w", "nc2_etf_m",
    "nc2_etf_w", "nc3", "nc3_etf", "nc4", "accuracy", "loss", "train_loss", "train_accuracy", "test_loss",
    "test_accuracy",
)
INDEXED_METRICS = ("nc1", "nc2_etf_w", "nc3_etf", "accuracy", "test_accuracy", "loss", "test_loss", "optimality_gap")


def _number(dialect: str, document: str, key: str) -> str:
    """SQL for the document's value at key where it is a JSON number, else null."""
    if dialect == "postgresql":
        return (f"CASE WHEN jsonb_typeof({document} -> '{key}') = 'number' "
                f"THEN CAST(({document} ->> '{key}') AS DOUBLE PRECISION) END")
    return (f"CASE WHEN json_type({document}, '$.\"{key}\"') IN ('integer', 'real') "
            f"THEN json_extract({document}, '$.\"{key}\"') END")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("owner", sa.String(200), nullable=False, server_default="anonymous"))
        batch.add_column(sa.Column("name", sa.String(200)))
        batch.add_column(sa.Column("tags", json_document, nullable=False, server_default="{}"))
        batch.add_column(sa.Column("sweep", sa.String(36)))
        for name, type_ in SPEC_COLUMNS.items():
            batch.add_column(sa.Column(name, type_()))
        for key in RESULT_KEYS:
            batch.add_column(sa.Column(f"result_{key}", sa.Float))
    # The server defaults moved the existing rows over; new rows get theirs from the ORM.
    with op.batch_alter_table("experiments") as batch:
        batch.alter_column("owner", server_default=None)
        batch.alter_column("tags", server_default=None)
    copies = [f"{name} = {_number(dialect, 'spec', name)}" for name in SPEC_COLUMNS]
    copies += [f"result_{key} = {_number(dialect, 'result', key)}" for key in RESULT_KEYS]
    op.execute(f"UPDATE experiments SET {', '.join(copies)}")
    with op.batch_alter_table("metrics") as batch:
        for key in HISTORY_KEYS:
            batch.add_column(sa.Column(key, sa.Float))
    values = '"values"'  # a reserved word in SQL
    history = [f"{key} = {_number(dialect, values, key)}" for key in HISTORY_KEYS]
    op.execute(f"UPDATE metrics SET {', '.join(history)}")
    op.create_index("ix_experiments_owner", "experiments", ["owner"])
    op.create_index("ix_experiments_sweep", "experiments", ["sweep"])
    if dialect != "postgresql":
        return

    op.execute("CREATE INDEX ix_search_spec ON experiments USING gin (spec jsonb_path_ops)")
    op.execute("CREATE INDEX ix_search_tags ON experiments USING gin (tags jsonb_path_ops)")
    op.execute("CREATE INDEX ix_search_status_created_at_id ON experiments (status, created_at, id)")
    typed = ", ".join(['kind', 'status', 'owner', '"K"', 'd', 'architecture', *SPEC_COLUMNS, 'created_at',
                       *(f"result_{key}" for key in RESULT_KEYS)])
    op.execute(f"CREATE INDEX ix_search_comparisons ON experiments (dataset, normalization) INCLUDE ({typed})")
    op.execute(f"CREATE INDEX ix_search_history ON metrics (experiment_id, step) INCLUDE ({', '.join(HISTORY_KEYS)})")
    for key in INDEXED_METRICS:
        op.execute(f"CREATE INDEX ix_search_{key} ON experiments (result_{key}, id)")
        op.execute(f"CREATE INDEX ix_search_comparison_{key} ON experiments (dataset, normalization, result_{key}, id)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for key in INDEXED_METRICS:
            op.execute(f"DROP INDEX ix_search_{key}")
            op.execute(f"DROP INDEX ix_search_comparison_{key}")
        for name in ("spec", "tags", "status_created_at_id", "comparisons", "history"):
            op.execute(f"DROP INDEX ix_search_{name}")
    op.drop_index("ix_experiments_sweep", "experiments")
    op.drop_index("ix_experiments_owner", "experiments")
    with op.batch_alter_table("metrics") as batch:
        for key in HISTORY_KEYS:
            batch.drop_column(key)
    with op.batch_alter_table("experiments") as batch:
        for key in RESULT_KEYS:
            batch.drop_column(f"result_{key}")
        for column in ("sweep", "tags", "name", "owner", *SPEC_COLUMNS):
            batch.drop_column(column)
