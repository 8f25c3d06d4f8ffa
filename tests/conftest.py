"""Shared fixtures: real PostgreSQL, Redis, Celery workers and HTTP servers in subprocesses.

Tests that need PostgreSQL or Redis skip with the reason when those are unreachable, and
fail instead when NCLAB_REQUIRE_SERVICES=1 (CI sets it).
"""

import itertools
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from tests.support import free_port, wait_ready

PG_ADMIN_URL = os.environ.get("NCLAB_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("NCLAB_TEST_REDIS", "redis://127.0.0.1:6379")
REQUIRE_SERVICES = os.environ.get("NCLAB_REQUIRE_SERVICES") == "1"

# Short lifecycle timings so that crash recovery is observable within a test.
FAST_LIFECYCLE = {
    "NCLAB_HEARTBEAT_INTERVAL": "0.5",
    "NCLAB_HEARTBEAT_TIMEOUT": "4",
    "NCLAB_RECONCILE_INTERVAL": "0.5",
    "NCLAB_RESEND_AFTER": "30",
}


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} unreachable ({exc.__class__.__name__}: {exc})"
    if REQUIRE_SERVICES:
        pytest.fail(f"{message}, and NCLAB_REQUIRE_SERVICES=1")
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_admin() -> str:
    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=3).close()
    except Exception as exc:
        _unavailable(f"PostgreSQL at {PG_ADMIN_URL}", exc)
    return PG_ADMIN_URL


@contextmanager
def fresh_pg_database(admin_url: str) -> Iterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards; its SQLAlchemy URL."""
    name = f"nclab_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_database(pg_admin) -> Iterator[str]:
    with fresh_pg_database(pg_admin) as url:
        yield url


_redis_databases = itertools.count(1)


def fresh_redis_broker() -> str:
    """An emptied Redis database of its own, so that concurrent stacks never share a queue."""
    url = f"{REDIS_URL.rstrip('/')}/{next(_redis_databases) % 16}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).flushdb()
    except Exception as exc:
        _unavailable(f"Redis at {REDIS_URL}", exc)
    return url


@dataclass
class Processes:
    """Subprocesses of one test, each in its own process group, all stopped at teardown."""

    env: dict
    log_dir: Path
    running: list[subprocess.Popen] = field(default_factory=list)

    def start(self, *args: str, name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.running.append(process)
        return process

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if process.poll() is None:
            os.killpg(process.pid, sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def stop_all(self) -> None:
        for process in reversed(self.running):
            self.stop(process)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.log_dir.glob("*.log")))


def make_processes(directory: Path) -> Processes:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCLAB_")}
    env.update(FAST_LIFECYCLE, NCLAB_DATA_DIR=str(directory / "data"), PYTHONUNBUFFERED="1")
    return Processes(env=env, log_dir=directory)


@contextmanager
def running(processes: Processes) -> Iterator[Processes]:
    """Stops the processes afterwards and prints their logs (pytest shows them when a test failed)."""
    try:
        yield processes
    finally:
        processes.stop_all()
        print(processes.logs())


@pytest.fixture
def processes(tmp_path) -> Iterator[Processes]:
    with running(make_processes(tmp_path)) as procs:
        yield procs


@dataclass
class Stack:
    client: httpx.Client
    processes: Processes
    api: subprocess.Popen
    worker: subprocess.Popen  # in embedded mode, the `nclab serve` that is also the API

    @property
    def base_url(self) -> str:
        return str(self.client.base_url)

    @property
    def database_url(self) -> str:
        embedded = f"sqlite:///{self.processes.env['NCLAB_DATA_DIR']}/nclab.sqlite"
        return self.processes.env.get("NCLAB_DATABASE_URL", embedded)


@contextmanager
def production_stack(processes: Processes, database_url: str, broker_url: str) -> Iterator[Stack]:
    """nclab api + nclab worker on PostgreSQL and Redis, over real HTTP."""
    processes.env.update(NCLAB_DATABASE_URL=database_url, NCLAB_BROKER_URL=broker_url)
    port = free_port()
    api = processes.start("api", "--host", "127.0.0.1", "--port", str(port), name="api")
    worker = processes.start("worker", name="worker")
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, api)
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield Stack(client, processes, api, worker)


@pytest.fixture(scope="module")
def production(pg_admin, tmp_path_factory) -> Iterator[Stack]:
    """One production stack shared by a module's tests, on a fresh database."""
    with (
        fresh_pg_database(pg_admin) as database_url,
        running(make_processes(tmp_path_factory.mktemp("production"))) as procs,
        production_stack(procs, database_url, fresh_redis_broker()) as stack,
    ):
        yield stack


@pytest.fixture
def own_production(pg_database, processes) -> Iterator[Stack]:
    """A production stack for one test that may kill its processes."""
    with production_stack(processes, pg_database, fresh_redis_broker()) as stack:
        yield stack


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Iterator[Stack]:
    """`nclab serve` (SQLite, SQLite-backed queue, its own worker) shared by a module's tests."""
    with running(make_processes(tmp_path_factory.mktemp("embedded"))) as processes:
        port = free_port()
        serve = processes.start("serve", "--port", str(port), name="serve")
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, serve)
        with httpx.Client(base_url=base_url, timeout=30) as client:
            yield Stack(client, processes, serve, serve)


@pytest.fixture(params=["embedded", "production"])
def stack(request) -> Stack:
    """Each test twice: on the embedded service, and on PostgreSQL + Redis + a worker."""
    return request.getfixturevalue(request.param)
