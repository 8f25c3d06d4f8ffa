"""Database engine and sessions.

SQLite (embedded mode) is shared by the API process and the worker process, so it runs
in WAL mode with a generous busy timeout; PostgreSQL needs nothing special.
"""

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import orjson
from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from service.search import sqlite_functions
from service.settings import get_settings


def make_engine(url: str) -> Engine:
    # orjson reads the JSON documents (specs, results, history rows) several times faster.
    if url.startswith("sqlite"):
        database_file = make_url(url).database
        if database_file and database_file != ":memory:":
            Path(database_file).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, json_deserializer=orjson.loads)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            # WAL + NORMAL: durable across crashes of the process, one fsync per checkpoint not per commit.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
            sqlite_functions.register(dbapi_connection)

        return engine
    # Search statements are short and read data that sits in memory: JIT compiling them
    # costs more than it saves, and random reads cost little more than sequential ones.
    # An aggregate's medians sort its rows: in memory, not in temporary files.
    options = "-c jit=off -c random_page_cost=1.1 -c work_mem=64MB"
    return create_engine(url, pool_pre_ping=True, json_deserializer=orjson.loads, connect_args={"options": options})


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


def get_session() -> Iterator[Session]:
    """FastAPI dependency: one session per request."""
    with get_sessionmaker()() as session:
        yield session
