"""Alembic environment: migrates the database of NCLAB_DATABASE_URL (or the embedded SQLite)."""

from alembic import context

from service.db import make_engine
from service.models import Base
from service.settings import get_settings

url = context.config.attributes.get("database_url") or get_settings().resolved_database_url
engine = make_engine(url)
with engine.connect() as connection:
    if url.startswith("sqlite"):
        # SQLite alters a table by copying it and dropping the original; with foreign keys
        # on, that drop would cascade to the metric history.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
