"""The fleet: each job's queue, the live workers, artifacts, provenance and resumed runs.

- experiments.queue: where a job's messages go (its spec's `resources`); existing jobs
  get their kind's default (training on gpu, UFM solves on cpu), and their spec says so.
- experiments.environment: the latest attempt's provenance; resumed_from_epoch: the
  checkpoint's epoch a training attempt resumed from.
- artifacts: the files an experiment produced; workers: live workers and their queues.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

json_document = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
timestamp = sa.DateTime(timezone=True)

# Each kind's default queue, as the specs of this revision declare it.
DEFAULT_QUEUES = {"train": "gpu", "ufm": "cpu"}


def upgrade() -> None:
    with op.batch_alter_table("experiments") as batch:
        batch.add_column(sa.Column("queue", sa.String(16)))
        batch.add_column(sa.Column("environment", json_document))
        batch.add_column(sa.Column("resumed_from_epoch", sa.Integer))
    experiments = sa.table(
        "experiments", sa.column("kind", sa.String), sa.column("queue", sa.String), sa.column("spec", json_document)
    )
    connection = op.get_bind()
    for kind, queue in DEFAULT_QUEUES.items():
        connection.execute(experiments.update().where(experiments.c.kind == kind).values(queue=queue))
        if connection.dialect.name == "postgresql":
            connection.execute(
                sa.text(
                    "UPDATE experiments SET spec = spec || jsonb_build_object('resources', CAST(:queue AS text)) "
                    "WHERE kind = :kind"
                ),
                {"queue": queue, "kind": kind},
            )
        else:
            connection.execute(
                sa.text("UPDATE experiments SET spec = json_set(spec, '$.resources', :queue) WHERE kind = :kind"),
                {"queue": queue, "kind": kind},
            )
    with op.batch_alter_table("experiments") as batch:
        batch.alter_column("queue", existing_type=sa.String(16), nullable=False)

    op.create_table(
        "artifacts",
        sa.Column(
            "experiment_id", sa.String(36), sa.ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("media_type", sa.String(100), nullable=False),
        sa.Column("created_at", timestamp, nullable=False),
    )
    op.create_table(
        "workers",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("queues", json_document, nullable=False),
        sa.Column("processes", sa.Integer, nullable=False),
        sa.Column("gpus", json_document),
        sa.Column("seen_at", timestamp, nullable=False),
    )
    op.create_index("ix_workers_seen_at", "workers", ["seen_at"])


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("artifacts")
    with op.batch_alter_table("experiments") as batch:
        batch.drop_column("resumed_from_epoch")
        batch.drop_column("environment")
        batch.drop_column("queue")
