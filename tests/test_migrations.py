"""The Alembic migrations create exactly the schema of the ORM models, from empty."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service import migrate
from service.db import make_engine
from service.models import Base


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.sqlite'}"
    return request.getfixturevalue("pg_database")


def test_upgrade_from_empty_creates_the_models_schema_and_downgrade_removes_it(empty_database):
    engine = make_engine(empty_database)
    assert not inspect(engine).get_table_names()

    migrate.upgrade(empty_database)
    inspector = inspect(engine)
    assert {"experiments", "metrics", "alembic_version"} <= set(inspector.get_table_names())
    assert {c["name"] for c in inspector.get_columns("experiments")} >= {
        "id", "status", "spec", "progress", "result", "error", "created_at", "started_at", "finished_at", "K", "d",
    }
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []

    migrate.downgrade(empty_database)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
