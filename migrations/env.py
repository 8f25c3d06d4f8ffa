"""Alembic environment: migrates the database of NCLAB_DATABASE_URL (or the embedded SQLite)."""

from alembic import context

from service.db import make_engine
from service.models import Base
from service.settings import get_settings

url = context.config.attributes.get("database_url") or get_settings().resolved_database_url
engine = make_engine(url)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
