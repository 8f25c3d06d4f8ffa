"""Shared fixtures: the API in-process (TestClient, no server), and real PostgreSQL, Redis,
Celery workers and HTTP servers in subprocesses.

Tests that need PostgreSQL or Redis skip with the reason when those are unreachable, and
fail instead when NCLAB_REQUIRE_SERVICES=1 (CI sets it).

Markers (pyproject.toml): a test that uses a subprocess stack or PostgreSQL is marked
``stack`` here, at collection; ``slow`` and ``browser`` are marked where the tests are.
``make test-fast`` runs what is none of the three.
"""

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psycopg
import pytest
import redis

# `make test` runs two pytest processes on two cores: torch in each, and in the servers and workers they
# start, keeps to one thread, or the threads of one process wait for a core that another holds. Set before
# anything loads torch; a test that wants more threads asks torch for them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.support import free_port, wait_ready

if TYPE_CHECKING:
    from fastapi.testclient import TestClient  # imported where an app is made: it warns at import
    from sqlalchemy import Engine

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


@pytest.fixture
def one_torch_thread():
    """Solve on one thread, and restore torch's setting after the test (modules of small solves use it).

    These problems are small enough that threads buy nothing, and on a busy two-core
    machine every parallel region of a tiny matrix product can wait a scheduler tick
    for its second thread: we measured tests/test_ufm.py at 5 s on one thread and over
    60 s on two while another process kept a core busy.
    """
    import torch  # here, not at the top: most test modules never need it

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@contextmanager
def migrated_engine(request: pytest.FixtureRequest, directory: Path) -> Iterator["Engine"]:
    """An engine on a new, migrated database of the kind ``request.param`` names ("sqlite" in
    ``directory``, or "postgresql"), for a module's in-process tests on both databases."""
    from service import migrate
    from service.db import make_engine

    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{directory / 'nclab.sqlite'}"
        else:
            url = stack.enter_context(fresh_pg_database(request.getfixturevalue("pg_admin")))
        migrate.upgrade(url)
        engine = make_engine(url)
        stack.callback(engine.dispose)
        yield engine



def _redis_databases_of_this_process() -> tuple[int, Iterator[int]]:
    """Redis's databases 1-15 (0, its default, is left alone) split between the suite's processes
    (``make test`` runs pytest-xdist's 2): each takes its shared production stack's database, the last
    of its share, and goes round the others for the stacks it starts."""
    processes = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    share = 15 // processes
    first = 1 + index * share
    return first + share - 1, itertools.cycle(range(first, first + share - 1))


SHARED_REDIS_DATABASE, _redis_databases = _redis_databases_of_this_process()


def fresh_redis_broker(database: int | None = None) -> str:
    """An emptied Redis database of its own, so that concurrent stacks never share a queue."""
    url = f"{REDIS_URL.rstrip('/')}/{next(_redis_databases) if database is None else database}"
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

    def start_api(self, port: int, *args: str, workers: int = 1, name: str = "api") -> subprocess.Popen:
        """`nclab api` on ``port``, in one process unless the test is about several: each more imports
        the app again (about 1.5 s of CPU, on a machine the suite keeps busy)."""
        return self.start("api", "--port", str(port), *args, "--workers", str(workers), name=name)

    def stop(self, process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if process.poll() is None:
            os.killpg(process.pid, sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def stop_all(self, timeout: float = 20) -> None:
        """SIGTERM to every group at once, then each waited for (killed after ``timeout``): the
        shutdowns overlap instead of adding up."""
        signaled = [process for process in self.running if process.poll() is None]
        for process in signaled:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in signaled:  # once: a second signal cuts uvicorn's shutdown short
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.log_dir.glob("*.log")))


def make_processes(directory: Path) -> Processes:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NCLAB_")}
    env.update(FAST_LIFECYCLE, NCLAB_DATA_DIR=str(directory / "data"), PYTHONUNBUFFERED="1")
    # This machine has no GPU: its workers serve the gpu queue too (training on the CPU), as a laptop's would.
    env.update(NCLAB_WORKER_QUEUES="cpu,gpu", NCLAB_WORKER_ALLOW_CPU="1")
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
    """nclab api (one process: Processes.start_api) + nclab worker on PostgreSQL and Redis, over real HTTP."""
    processes.env.update(NCLAB_DATABASE_URL=database_url, NCLAB_BROKER_URL=broker_url)
    port = free_port()
    api = processes.start_api(port, "--host", "127.0.0.1")
    worker = processes.start("worker", name="worker")
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, api)
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield Stack(client, processes, api, worker)


def _cancel_unfinished(stack: Stack) -> None:
    """Cancel what is queued or running: the next module finds the worker free."""
    unfinished = stack.client.get("/experiments", params={"where": "status in ('queued', 'running')", "limit": 500})
    for item in unfinished.raise_for_status().json()["items"]:
        stack.client.post(f"/experiments/{item['id']}/cancel")


@pytest.fixture(scope="session")
def shared_production(pg_admin, tmp_path_factory) -> Iterator[Stack]:
    with (
        fresh_pg_database(pg_admin) as database_url,
        running(make_processes(tmp_path_factory.mktemp("production"))) as procs,
        production_stack(procs, database_url, fresh_redis_broker(SHARED_REDIS_DATABASE)) as stack,
    ):
        yield stack


@pytest.fixture(scope="module")
def production(shared_production) -> Iterator[Stack]:
    """nclab api + nclab worker on PostgreSQL and Redis, started once and shared by the session's
    modules (each filters by what it made); what a module leaves queued or running is canceled after it."""
    yield shared_production
    _cancel_unfinished(shared_production)


@pytest.fixture
def own_production(pg_database, processes) -> Iterator[Stack]:
    """A production stack for one test that may kill its processes."""
    with production_stack(processes, pg_database, fresh_redis_broker()) as stack:
        yield stack


@contextmanager
def embedded_stack(directory: Path) -> Iterator[Stack]:
    """`nclab serve` (SQLite, SQLite-backed queue, its own worker) in ``directory``."""
    with running(make_processes(directory)) as processes:
        port = free_port()
        serve = processes.start("serve", "--port", str(port), name="serve")
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, serve)
        with httpx.Client(base_url=base_url, timeout=30) as client:
            yield Stack(client, processes, serve, serve)


@pytest.fixture(scope="session")
def shared_embedded(tmp_path_factory) -> Iterator[Stack]:
    with embedded_stack(tmp_path_factory.mktemp("embedded")) as stack:
        yield stack


@pytest.fixture(scope="module")
def embedded(shared_embedded) -> Iterator[Stack]:
    """`nclab serve`, started once and shared by the session's modules (each filters by what it
    made); what a module leaves queued or running is canceled after it."""
    yield shared_embedded
    _cancel_unfinished(shared_embedded)


@pytest.fixture(scope="module")
def own_embedded(tmp_path_factory) -> Iterator[Stack]:
    """`nclab serve` on an empty database, for a module that counts what the service holds."""
    with embedded_stack(tmp_path_factory.mktemp("embedded")) as stack:
        yield stack


@pytest.fixture(params=["embedded", "production"])
def stack(request) -> Stack:
    """Each test twice: on the embedded service, and on PostgreSQL + Redis + a worker."""
    return request.getfixturevalue(request.param)


# Markers, applied at collection.

# Fixtures that start servers or processes, or need PostgreSQL or Redis.
STACK_FIXTURES = {"embedded", "production", "stack", "own_production", "own_embedded", "shared_embedded", "s3_store",
                  "shared_production", "processes", "pg_admin", "pg_database"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        params = getattr(item, "callspec", None)
        on_postgresql = params is not None and "postgresql" in params.params.values()
        if on_postgresql or STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)


# The API in-process: FastAPI's TestClient (runs the lifespan: reconciler, dispatcher) on
# a database of its own, no server, no worker. A job runs when the test says so, by the
# worker's own task body (InProcessApi.run).

@dataclass
class InProcessApi:
    client: "TestClient"
    database_url: str
    data_dir: Path

    @property
    def base_url(self) -> str:
        return str(self.client.base_url)

    def run(self, experiment_id: str) -> dict:
        """The job run to its end here, by the worker's task body (worker/tasks.py): the experiment
        as the API then shows it."""
        from worker import tasks

        tasks.run_experiment(experiment_id)
        return self.client.get(f"/experiments/{experiment_id}").raise_for_status().json()


_in_process: list[InProcessApi] = []


def _clear_cached_settings() -> None:
    from service import db, dispatch, settings

    for cached in (settings.get_settings, db.get_engine, db.get_autocommit_engine, db.get_sessionmaker,
                   dispatch.get_dispatcher):
        cached.cache_clear()


@contextmanager
def in_process_api(data_dir: Path, database_url: str | None = None, **env: str) -> Iterator[InProcessApi]:
    """The app from create_app() on a migrated database: SQLite in ``data_dir``, or ``database_url``;
    ``env``: more NCLAB_* settings. Its broker is Celery's in-memory one, which nothing consumes.

    Settings, engines and the dispatcher are process-wide (lru_cache), so one at a time.
    """
    from fastapi.testclient import TestClient

    from service import migrate, queue
    from service.api.routes import health
    from service.db import get_autocommit_engine, get_engine
    from service.settings import get_settings

    assert not _in_process, "one in-process API at a time: settings and engines are process-wide"
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("NCLAB_")]:
            patch.delenv(name)
        patch.setenv("NCLAB_DATA_DIR", str(data_dir))
        patch.setenv("NCLAB_BROKER_URL", "memory://")
        if database_url is not None:
            patch.setenv("NCLAB_DATABASE_URL", database_url)
        for name, value in env.items():
            patch.setenv(name, value)
        _clear_cached_settings()
        # The API sends through service.queue.celery_app, made at import from the settings of then;
        # the worker's task (InProcessApi.run) is bound to that app: it too sends nowhere else.
        patch.setitem(queue.celery_app.conf, "broker_url", "memory://")
        celery_app = queue.make_celery_app()
        patch.setattr(queue, "celery_app", celery_app)
        patch.setattr(health, "celery_app", celery_app)
        try:
            migrate.upgrade()
            from service.api.app import create_app

            with TestClient(create_app()) as client:
                api = InProcessApi(client, get_settings().resolved_database_url, data_dir)
                _in_process.append(api)
                yield api
        finally:
            _in_process.clear()
            get_autocommit_engine().dispose()
            get_engine().dispose()
            _clear_cached_settings()


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[InProcessApi]:
    """The API in-process on SQLite, shared by a module's tests."""
    with in_process_api(tmp_path_factory.mktemp("api")) as app:
        yield app


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def api_each_db(request, tmp_path_factory) -> Iterator[InProcessApi]:
    """The API in-process, shared by a module's tests: once on SQLite, once on a fresh PostgreSQL database."""
    data_dir = tmp_path_factory.mktemp("api")
    if request.param == "sqlite":
        with in_process_api(data_dir) as app:
            yield app
        return
    with fresh_pg_database(request.getfixturevalue("pg_admin")) as database_url, \
            in_process_api(data_dir, database_url) as app:
        yield app


@pytest.fixture
def api_with(tmp_path) -> Callable[..., InProcessApi]:
    """make(**env): an in-process API on SQLite with these NCLAB_* settings, for this test only."""
    with contextlib.ExitStack() as stack:
        yield lambda **env: stack.enter_context(in_process_api(tmp_path / "data", **env))
