"""The Alembic migrations create exactly the schema of the ORM models, and move data along."""

import json
import uuid
from datetime import UTC, datetime

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from service import migrate
from service.db import make_engine
from service.models import Base
from service.search import queries
from service.search.language import parse_filter, parse_order_by


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.sqlite'}"
    return request.getfixturevalue("pg_database")


def _not_search_index(name, type_, *_args) -> bool:
    # PostgreSQL's expression and GIN indexes for search are written in SQL by 0002, not declared by the ORM.
    return not (type_ == "index" and name and name.startswith("ix_search_"))


def test_upgrade_from_empty_creates_the_models_schema_and_downgrade_removes_it(empty_database):
    engine = make_engine(empty_database)
    assert not inspect(engine).get_table_names()

    migrate.upgrade(empty_database)
    inspector = inspect(engine)
    assert {"experiments", "metrics", "alembic_version"} <= set(inspector.get_table_names())
    assert {c["name"] for c in inspector.get_columns("experiments")} >= {
        "id", "status", "spec", "progress", "result", "error", "created_at", "started_at", "finished_at", "K", "d",
        "owner", "name", "tags", "sweep",
    }
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"include_name": _not_search_index})
        differences = compare_metadata(context, Base.metadata)
    assert differences == []

    migrate.downgrade(empty_database)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()


def _insert_0001_row(connection, K: int, nc1: float, created_at: datetime) -> str:
    """A row as revision 0001's code wrote it: no owner, name, tags or sweep."""
    experiment_id = str(uuid.uuid4())
    spec = {"kind": "ufm", "K": K, "d": 8, "n_per_class": 2, "normalization": "normalized", "logit_scale": 10.0}
    connection.execute(
        text("INSERT INTO experiments (id, status, spec, kind, normalization, \"K\", d, progress, result, "
             "created_at, attempts, cancel_requested, send_count) VALUES (:id, 'succeeded', :spec, 'ufm', "
             "'normalized', :K, 8, 1.0, :result, :created_at, 1, false, 1)"),
        {"id": experiment_id, "spec": json.dumps(spec), "K": K, "result": json.dumps({"nc1": nc1}),
         "created_at": created_at},
    )
    connection.execute(text("INSERT INTO metrics (experiment_id, step, \"values\", recorded_at) "
                            "VALUES (:id, 0, :values, :at)"),
                       {"id": experiment_id, "values": json.dumps({"nc1": nc1 * 10}), "at": created_at})
    return experiment_id


def test_upgrade_from_0001_with_rows_keeps_them_and_makes_them_searchable(empty_database):
    migrate.upgrade(empty_database, "0001")
    engine = make_engine(empty_database)
    now = datetime(2026, 12, 1, tzinfo=UTC)
    with engine.begin() as connection:
        ids = [_insert_0001_row(connection, K, nc1, now) for K, nc1 in [(3, 0.5), (4, 0.25), (3, 0.125)]]

    migrate.upgrade(empty_database)
    with Session(engine) as session:
        page = queries.search(session, parse_filter("spec.K = 3 and owner = 'anonymous'"),
                              parse_order_by("result.nc1"), limit=10)
        assert [e["id"] for e in page.items] == [ids[2], ids[0]]
        assert all(json.loads(e["tags"]) == {} and e["name"] is None and e["sweep"] is None for e in page.items)
        (group,) = queries.aggregate(session, None, [], ["nc1"])
        assert group["count"] == 3 and group["metrics"]["nc1"]["mean"] == pytest.approx(0.875 / 3, rel=1e-15)
        (curve,) = queries.curves(session, None, [], "nc1")  # read from the typed copy the migration made
        assert curve["points"] == [{"step": 0, "n": 3, "mean": pytest.approx(8.75 / 3, rel=1e-15),
                                    "std": pytest.approx(np.std([5.0, 2.5, 1.25], ddof=1), rel=1e-12),
                                    "min": 1.25, "max": 5.0}]
    engine.dispose()
