"""A crash of the worker's pool process, or a database connection cut mid-job, costs one
attempt of one job and nothing else: every later job succeeds, and no two processes ever
share a database connection."""

import os
import signal
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import make_url, text

from service.db import make_engine
from service.lifetime import children
from tests.conftest import fresh_pg_database, fresh_redis_broker, make_processes, production_stack, running
from tests.support import eventually, wait_for_status

# About 0.2 s an epoch on a 2-core AMD EPYC: long enough to be killed mid-way (after its first
# epoch, seven to go), short enough to finish twice.
TRAINING = {"kind": "train", "dataset": "gaussian", "K": 10, "d": 64, "epochs": 8,
            "gaussian_train_per_class": 1000, "mlp_width": 128, "lr_schedule": "constant"}
QUICK = {"kind": "ufm", "K": 4, "d": 6, "n_per_class": 3}


@pytest.fixture(scope="module")
def faulty_production(pg_admin, tmp_path_factory):
    """A production stack of this module's own, for both tests: they kill pool processes and cut
    database connections, never the worker itself, and each waits for every job it submitted."""
    with (
        fresh_pg_database(pg_admin) as database_url,
        running(make_processes(tmp_path_factory.mktemp("faults"))) as processes,
        production_stack(processes, database_url, fresh_redis_broker()) as stack,
    ):
        yield stack


def _admin_url(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://")


def _socket_holders(server_port: int) -> dict[int, set[int]]:
    """Local TCP port of each client socket connected to ``server_port`` -> the pids holding it, read from
    /proc. The remote port matters: Linux gives the same local port to sockets bound for other servers
    (a Redis connection may share a PostgreSQL connection's local port)."""
    inode_port = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == server_port:
                inode_port[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    holders: dict[int, set[int]] = {}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        except OSError:
            continue  # the process ended meanwhile
        for link in links:
            if link.startswith("socket:[") and (port := inode_port.get(link[8:-1])) is not None:
                holders.setdefault(port, set()).add(int(fd_dir.parent.name))
    return holders


def _connections_by_process(database_url: str, waiting_for_a_lock: bool = False) -> dict[int, set[int]]:
    """Each of the database's client connections (by backend pid), as the server sees it, with the
    local processes that hold its socket; only those waiting for a lock if asked."""
    # A connection of its own each time: within a transaction, pg_stat_activity is a snapshot.
    with psycopg.connect(_admin_url(database_url)) as connection:
        rows = connection.execute(
            "SELECT pid, client_port FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND client_port IS NOT NULL AND (%s OR wait_event_type = 'Lock')",
            [not waiting_for_a_lock],
        ).fetchall()
    holders = _socket_holders(make_url(database_url).port or 5432)
    return {backend: holders.get(port, set()) for backend, port in rows}


def _assert_no_connection_is_shared(database_url: str, worker_pid: int) -> None:
    worker_processes = {worker_pid} | children(worker_pid)
    connections = _connections_by_process(database_url)
    from_the_worker = {backend: pids for backend, pids in connections.items() if pids & worker_processes}
    assert from_the_worker, f"no connection of the worker's processes {worker_processes} seen: {connections}"
    shared = {backend: pids for backend, pids in connections.items() if len(pids) > 1}
    commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:80] for pids in shared.values() for pid in pids}
    assert not shared, f"connections held by more than one process (backend pid: pids): {shared} {commands}"


def _running_with_history(client, experiment_id: str, timeout: float = 60) -> None:
    """Wait until the job runs and has recorded an epoch: killed now, it dies mid-way."""
    eventually(lambda: client.get(f"/experiments/{experiment_id}/metrics").json()["items"], timeout=timeout,
               interval=0.1, message=lambda: str(client.get(f"/experiments/{experiment_id}").json()))


@pytest.mark.slow  # trainings killed and run again, one after another
def test_killing_the_pool_process_again_and_again_fails_no_job(faulty_production):
    client, worker = faulty_production.client, faulty_production.worker
    killed = []
    for attempt in range(2):  # the second kill finds the first one's job re-queued beside its own
        # Each a higher priority than the last (no keys: the caller is the anonymous admin): the scheduler
        # starts it before the killed ones it re-queues, which are older (docs/lifecycle.md, "Scheduling").
        experiment_id = client.post("/experiments", json={"spec": TRAINING, "priority": attempt + 1}).json()["id"]
        # A killed job re-queued while the next one ran may have its place in flight already (the one slot's
        # waiting message): this one then starts after that retry.
        _running_with_history(client, experiment_id, timeout=300)
        (pool,) = children(worker.pid)  # concurrency 1: one pool process, the one running the job
        os.kill(pool, signal.SIGKILL)
        killed.append(experiment_id)
        # The replacement pool process runs the next job, and this one once its heartbeat is stale.
        eventually(lambda pool=pool: pool not in children(worker.pid), message=f"pool process {pool} still there")
    later = [client.post("/experiments", json={**QUICK, "seed": seed}).json()["id"] for seed in range(6)]

    finished = {i: wait_for_status(client, i, {"succeeded", "failed", "canceled"}, timeout=180)
                for i in killed + later}
    assert {i: job["status"] for i, job in finished.items()} == {i: "succeeded" for i in killed + later}, \
        {i: job["error"] for i, job in finished.items() if job["error"]}
    assert all(finished[i]["attempts"] == 2 for i in killed)
    assert all(finished[i]["attempts"] == 1 for i in later)
    for experiment_id in killed:
        steps = [row["step"] for row in client.get(f"/experiments/{experiment_id}/metrics").json()["items"]]
        assert steps == list(range(1, TRAINING["epochs"] + 1))
    _assert_no_connection_is_shared(faulty_production.database_url, worker.pid)


def _cut_a_waiting_write(admin, database_url: str, worker_pid: int, timeout: float = 30) -> bool:
    """Hold the history table locked until a worker's write waits for it, then end that write's
    connection from the server's side: the worker sees its connection cut mid-statement."""
    def a_waiting_write() -> int | None:
        worker_processes = {worker_pid} | children(worker_pid)
        for backend, pids in _connections_by_process(database_url, waiting_for_a_lock=True).items():
            if pids & worker_processes:
                return backend
        return None

    with admin.transaction():
        admin.execute("LOCK TABLE metrics IN ACCESS EXCLUSIVE MODE")
        backend = eventually(a_waiting_write, timeout=timeout, message="no write of the worker's waited for the lock")
        return admin.execute("SELECT pg_terminate_backend(%s)", [backend]).fetchone()[0]


@pytest.mark.slow
def test_connections_cut_mid_write_cost_no_job(faulty_production):
    """The server ends the worker's connection while it records an epoch, three times: the write
    is tried again on a new connection, and every job succeeds with its whole history."""
    client, worker = faulty_production.client, faulty_production.worker
    ids = [client.post("/experiments", json={**TRAINING, "seed": seed}).json()["id"] for seed in range(2)]
    _running_with_history(client, ids[0])
    with psycopg.connect(_admin_url(faulty_production.database_url), autocommit=True) as admin:
        cuts = sum(_cut_a_waiting_write(admin, faulty_production.database_url, worker.pid) for _ in range(3))
    assert cuts == 3
    finished = [wait_for_status(client, i, {"succeeded", "failed", "canceled"}, timeout=120) for i in ids]
    assert [job["status"] for job in finished] == ["succeeded"] * 2, [job["error"] for job in finished]
    for job in finished:
        steps = [row["step"] for row in client.get(f"/experiments/{job['id']}/metrics").json()["items"]]
        assert steps == list(range(1, TRAINING["epochs"] + 1))


def test_a_forked_child_opens_connections_of_its_own(pg_database):
    """What every forking server relies on (Celery's pool, a replacement pool process): an engine
    whose pool holds a connection, used after a fork, connects anew, and the parent's session
    is untouched."""
    engine = make_engine(pg_database)
    with engine.connect() as connection:
        parent_backend = connection.scalar(text("SELECT pg_backend_pid()"))
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child reports through the pipe)
        try:
            with engine.connect() as connection:
                os.write(write, str(connection.scalar(text("SELECT pg_backend_pid()"))).encode())
        finally:
            os._exit(0)
    os.close(write)
    child_backend = int(os.read(read, 64) or b"0")
    os.waitpid(child, 0)
    assert child_backend not in (0, parent_backend)
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT pg_backend_pid()")) == parent_backend
    engine.dispose()
