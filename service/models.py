"""ORM models. The schema changes only through Alembic migrations (migrations/)."""

from datetime import UTC, datetime
from typing import TYPE_CHECKING, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JSONDocument = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    if TYPE_CHECKING:
        # Every model maps one Table; DeclarativeBase types __table__ as any FromClause (a join, a subquery).
        __table__: ClassVar[Table]


class Sweep(Base):
    """Experiments submitted together: base x variants x grid (POST /sweeps); members point here."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    tags: Mapped[dict] = mapped_column(JSONDocument, default=dict)
    # The request as given: {"base": {...}, "variants": [...], "grid": {...}}.
    definition: Mapped[dict] = mapped_column(JSONDocument)
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_sweeps_created_at_id", "created_at", "id"),)


class IdempotencyKey(Base):
    """A keyed POST (Idempotency-Key): what it asked for and what it created, kept for 24 h."""

    __tablename__ = "idempotency_keys"

    owner: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # sha256 of the route and the validated request: the same key with another request is refused.
    fingerprint: Mapped[str] = mapped_column(String(64))
    # the experiment or sweep it created (the fingerprint covers the route, so the key says which)
    resource_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class Experiment(Base):
    __tablename__ = "experiments"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict] = mapped_column(JSONDocument)

    # Typed copies of the spec fields that comparisons filter and group on most: search
    # reads these rather than the document (SPEC_COLUMNS).
    kind: Mapped[str] = mapped_column(String(16), index=True)
    normalization: Mapped[str | None] = mapped_column(String(16))
    num_classes: Mapped[int] = mapped_column("K", Integer)
    dim: Mapped[int] = mapped_column("d", Integer)
    dataset: Mapped[str | None] = mapped_column(String(32))
    architecture: Mapped[str | None] = mapped_column(String(32))
    logit_scale: Mapped[float | None] = mapped_column(Float)
    seed: Mapped[int | None] = mapped_column(Integer)
    epochs: Mapped[int | None] = mapped_column(Integer)
    lr: Mapped[float | None] = mapped_column(Float)
    # The queue its messages go to (spec field `resources`): the reconciler re-sends there.
    queue: Mapped[str] = mapped_column(String(16))

    progress: Mapped[float] = mapped_column(Float, default=0.0)
    result: Mapped[dict | None] = mapped_column(JSONDocument)
    error: Mapped[str | None] = mapped_column(Text)

    # Typed copies of the result's metrics (RESULT_COLUMNS): aggregates and sorts read
    # these narrow columns, not the document.
    result_nc1: Mapped[float | None] = mapped_column(Float)
    result_nc1_cdnv: Mapped[float | None] = mapped_column(Float)
    result_nc2_equinorm_m: Mapped[float | None] = mapped_column(Float)
    result_nc2_equinorm_w: Mapped[float | None] = mapped_column(Float)
    result_nc2_equiangle_m: Mapped[float | None] = mapped_column(Float)
    result_nc2_equiangle_w: Mapped[float | None] = mapped_column(Float)
    result_nc2_etf_m: Mapped[float | None] = mapped_column(Float)
    result_nc2_etf_w: Mapped[float | None] = mapped_column(Float)
    result_nc3: Mapped[float | None] = mapped_column(Float)
    result_nc3_etf: Mapped[float | None] = mapped_column(Float)
    result_nc4: Mapped[float | None] = mapped_column(Float)
    result_accuracy: Mapped[float | None] = mapped_column(Float)
    result_loss: Mapped[float | None] = mapped_column(Float)
    result_test_accuracy: Mapped[float | None] = mapped_column(Float)
    result_test_loss: Mapped[float | None] = mapped_column(Float)
    result_optimality_gap: Mapped[float | None] = mapped_column(Float)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # Bookkeeping of the job lifecycle (service/jobs.py).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    send_count: Mapped[int] = mapped_column(Integer, default=0)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    worker: Mapped[str | None] = mapped_column(String(255))
    # Provenance of the latest attempt (worker/environment.py): versions, device, host, worker.
    environment: Mapped[dict | None] = mapped_column(JSONDocument)
    # Training: the epoch of the checkpoint the latest attempt resumed from (None: from the start).
    resumed_from_epoch: Mapped[int | None] = mapped_column(Integer)

    # Who submitted it (the API key's owner) and the user's own labels, editable later.
    owner: Mapped[str] = mapped_column(String(200), index=True, default="anonymous")
    name: Mapped[str | None] = mapped_column(String(200))
    tags: Mapped[dict] = mapped_column(JSONDocument, default=dict)
    sweep: Mapped[str | None] = mapped_column(String(36), ForeignKey("sweeps.id"), index=True)
    # -10..10 (schemas.Priority): orders an owner's queued jobs, breaks ties between owners (service/scheduler.py).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    # PostgreSQL's indexes for search (GIN on the documents, metric orders) are written
    # in SQL by migration 0002; the ORM does not declare them.
    __table_args__ = (
        Index("ix_experiments_created_at_id", "created_at", "id"),
        # The scheduler's reads: a queue's running and queued jobs by owner, an owner's queued ones in order.
        Index("ix_experiments_scheduling", "queue", "status", "owner", "priority", "created_at", "id"),
    )


# What an Integer column holds on PostgreSQL (32-bit signed; SQLite's hold 64 bits), and so
# the range of every integer the API takes for one (a spec's: schemas.SpecBase).
INTEGER_MIN, INTEGER_MAX = -(2**31), 2**31 - 1

# spec field -> attribute of its typed copy; result key -> attribute of its typed copy.
SPEC_COLUMNS = {
    "kind": "kind",
    "normalization": "normalization",
    "K": "num_classes",
    "d": "dim",
    "dataset": "dataset",
    "architecture": "architecture",
    "logit_scale": "logit_scale",
    "seed": "seed",
    "epochs": "epochs",
    "lr": "lr",
    "resources": "queue",
}
RESULT_COLUMNS = {
    column.key.removeprefix("result_"): column.key
    for column in Experiment.__table__.columns
    if column.key.startswith("result_")
}


def spec_copies(spec: dict) -> dict:
    """The typed copies of a spec's fields, as attribute values (null where the kind has no such field)."""
    return {attribute: spec.get(field) for field, attribute in SPEC_COLUMNS.items()}


def result_copies(result: dict | None) -> dict:
    """The typed copies of a result's metrics (all null for no result)."""
    result = result or {}
    return {attribute: result.get(key) for key, attribute in RESULT_COLUMNS.items()}


class MetricRow(Base):
    """One checkpoint of an experiment's history; a rerun overwrites by (experiment, step)."""

    __tablename__ = "metrics"

    experiment_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    values: Mapped[dict] = mapped_column(JSONDocument)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)

    # Typed copies of the catalogue's metrics and the training figures (HISTORY_COLUMNS):
    # curves over many experiments read these, not the documents.
    nc1: Mapped[float | None] = mapped_column(Float)
    nc1_cdnv: Mapped[float | None] = mapped_column(Float)
    nc2_equinorm_m: Mapped[float | None] = mapped_column(Float)
    nc2_equinorm_w: Mapped[float | None] = mapped_column(Float)
    nc2_equiangle_m: Mapped[float | None] = mapped_column(Float)
    nc2_equiangle_w: Mapped[float | None] = mapped_column(Float)
    nc2_etf_m: Mapped[float | None] = mapped_column(Float)
    nc2_etf_w: Mapped[float | None] = mapped_column(Float)
    nc3: Mapped[float | None] = mapped_column(Float)
    nc3_etf: Mapped[float | None] = mapped_column(Float)
    nc4: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    train_loss: Mapped[float | None] = mapped_column(Float)
    train_accuracy: Mapped[float | None] = mapped_column(Float)
    test_loss: Mapped[float | None] = mapped_column(Float)
    test_accuracy: Mapped[float | None] = mapped_column(Float)


HISTORY_COLUMNS = tuple(
    column.key
    for column in MetricRow.__table__.columns
    if column.key not in ("experiment_id", "step", "values", "recorded_at")
)


def history_copies(values: dict) -> dict:
    """The typed copies of a history row's metrics."""
    return {key: values.get(key) for key in HISTORY_COLUMNS}


class Artifact(Base):
    """A file an experiment produced, kept under NCLAB_ARTIFACT_ROOT/<experiment id>/<name> (service/artifacts.py)."""

    __tablename__ = "artifacts"

    experiment_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("experiments.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Upload(Base):
    """A file of features a user uploaded (POST /uploads), kept under NCLAB_ARTIFACT_ROOT/uploads/<id>.

    The row is written once the file is stored and its header checked (service/feature_files.py):
    ``layout`` is what the header showed, ``classes`` the number of classes (K).
    """

    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    layout: Mapped[dict] = mapped_column(JSONDocument)
    classes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class WorkerPresence(Base):
    """A live worker and the queues it serves, refreshed every heartbeat interval by the worker's main process.

    A worker whose row is older than the heartbeat timeout is gone: a queued job whose queue
    no live worker serves says so (``waiting``), and /metrics counts consumers per queue.
    """

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # Celery's node name, e.g. celery@host
    queues: Mapped[list] = mapped_column(JSONDocument)
    processes: Mapped[int] = mapped_column(Integer)  # pool processes: jobs it runs at once
    gpus: Mapped[list | None] = mapped_column(JSONDocument)  # the device ids its pool processes are pinned to
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class AuditEntry(Base):
    """One change or one refusal (service/audit.py): who, in which role, did what to what, when,
    from where, and the answer. Never updated or deleted by the service.
    """

    __tablename__ = "audit"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    owner: Mapped[str | None] = mapped_column(String(200), index=True)  # None: an unknown key, or none
    role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32))  # service/permissions.py: ACTIONS
    target: Mapped[str | None] = mapped_column(String(36))  # the experiment or the sweep (a submit's: the new one)
    client: Mapped[str | None] = mapped_column(String(255))  # the client's address
    status: Mapped[int] = mapped_column(Integer)  # the HTTP status of the answer
    detail: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index("ix_audit_at_id", "at", "id"),)
