"""Database engine and sessions.

SQLite (embedded mode) is shared by the API process and the worker process, so it runs
in WAL mode with a generous busy timeout; PostgreSQL needs nothing special.

A forked process (Celery's pool processes, a pool process that replaces a crashed one)
starts with connections of its own: it inherits its parent's engines, whose pooled
connections are sockets the parent goes on using. Two processes talking over one socket
interleave their messages and collide on the connection's prepared statements.
"""

import json
import os
import weakref
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import orjson
from sqlalchemy import CursorResult, Engine, Result, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from service.search import sqlite_functions
from service.settings import get_settings


def _json_text(document) -> str:
    # The worker's numbers may be numpy scalars, which json.dumps wrote as floats.
    try:
        return orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    except TypeError:  # an integer beyond 64 bits (in a sweep's definition, say): JSON allows it
        return json.dumps(document)


_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()
# Every server connection this process opened (sockets; SQLite's are files and need nothing).
_sockets: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _forget_inherited_connections() -> None:
    """In a forked child: new pools for every engine, leaving the parent's connections to the parent.

    ``dispose(close=False)`` drops the inherited pool without closing its connections, which
    would end the parent's sessions on the server (SQLAlchemy's advice for os.fork()). The
    inherited sockets themselves, a connection the parent had checked out at the fork
    included, are pointed at /dev/null in the child: the child holds none of the parent's
    sessions open, and whatever it writes to one by accident (a finalizer's goodbye) goes nowhere.
    """
    for engine in list(_engines):
        engine.dispose(close=False)
    inherited = [connection.fileno() for connection in list(_sockets) if not connection.closed]
    _sockets.clear()
    if inherited:
        nowhere = os.open(os.devnull, os.O_RDWR)
        for descriptor in inherited:
            os.dup2(nowhere, descriptor)
        os.close(nowhere)


os.register_at_fork(after_in_child=_forget_inherited_connections)


def make_engine(url: str, autocommit: bool = False) -> Engine:
    """The engine for ``url``; with ``autocommit``, the API's for one-statement requests (see get_autocommit_engine)."""
    engine = _make_engine(url, autocommit)
    _engines.add(engine)
    if engine.dialect.name == "postgresql":
        event.listen(engine, "connect", lambda connection, _record: _sockets.add(connection))
    return engine


def _make_engine(url: str, autocommit: bool) -> Engine:
    # orjson reads and writes the JSON documents (specs, results, history rows) several times faster.
    options: dict = {"json_deserializer": orjson.loads, "json_serializer": _json_text}
    if autocommit:
        options.update(isolation_level="AUTOCOMMIT", pool_size=2, max_overflow=2)
    elif not url.startswith("sqlite"):
        # A few more for the streams (CSV exports) that hold one after their route returns.
        options.update(pool_size=get_settings().api_connections, max_overflow=4)
    if url.startswith("sqlite"):
        database_file = make_url(url).database
        if database_file and database_file != ":memory:":
            Path(database_file).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **options)

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
    settings = "-c jit=off -c random_page_cost=1.1 -c work_mem=64MB"
    if autocommit:
        settings += " -c statement_timeout=5s"
    return create_engine(url, pool_pre_ping=True, connect_args={"options": settings, "connect_timeout": 5}, **options)


def bound_connections(engine: Engine, seconds: float) -> None:
    """Connections of this engine give up on a silent peer within ``seconds`` (PostgreSQL; a worker's).

    A worker cut off from the database (a network partition) would otherwise wait on a
    statement for as long as TCP retransmits (minutes), and the server would keep the
    locks of its open transaction until TCP keepalive noticed (hours): a heartbeat would
    hang instead of failing, and the job's next attempt would wait on a history row's
    lock. Here a send unacknowledged for half of ``seconds`` fails (tcp_user_timeout), an
    idle wait is probed (keepalives), and the server ends a transaction left idle for
    ``seconds`` (idle_in_transaction_session_timeout), so a cut worker's locks go with it.
    """
    if engine.dialect.name != "postgresql":
        return
    milliseconds = int(seconds * 1000)

    @event.listens_for(engine, "do_connect")
    def _bounded(_dialect, _record, _cargs, cparams):
        cparams.update(
            tcp_user_timeout=milliseconds // 2,
            keepalives=1,
            keepalives_idle=max(1, int(seconds / 4)),
            keepalives_interval=1,
            keepalives_count=2,
        )
        cparams["options"] = f"{cparams.get('options', '')} -c idle_in_transaction_session_timeout={milliseconds}"


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url)


@lru_cache
def get_autocommit_engine() -> Engine:
    """Autocommit connections for the one-statement requests the API serves in its event loop
    (status polls, histories, submits without an idempotency key).

    Outside a transaction such a statement is one round trip: no BEGIN before it, no
    COMMIT or ROLLBACK after it. The event loop holds one connection at a time; the
    statement and connect timeouts bound how long a stuck database can hold the loop.
    """
    return make_engine(get_settings().resolved_database_url, autocommit=True)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(get_engine(), expire_on_commit=False)


def get_session() -> Iterator[Session]:
    """FastAPI dependency: one session per request."""
    with get_sessionmaker()() as session:
        yield session


def rowcount(result: Result[Any]) -> int:
    """The rows an UPDATE or DELETE matched.

    ``Session.execute`` is typed as returning a Result; for these statements it is a
    CursorResult, which has ``rowcount``.
    """
    return cast(CursorResult[Any], result).rowcount
