"""Workers on other hosts: a worker in a network namespace of its own (tests/netns.py) reaches
PostgreSQL and Redis across a veth link, as a worker on another machine would.

The first test runs a job across the link. The second runs one round of bench/chaos.py's
partition scenario: the link is cut mid-job, the job is re-queued once its heartbeat is
stale and finishes on a worker on this side, and when the link returns the old attempt's
late writes change nothing.

Both need root and iproute2 (a namespace and a veth pair): they skip saying what is
missing, and fail instead when NCLAB_REQUIRE_SERVICES=1, as the service-backed tests do.
"""

import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from service.lifetime import children
from tests import netns
from tests.conftest import FAST_LIFECYCLE, REQUIRE_SERVICES, Processes, fresh_redis_broker
from tests.support import free_port, wait_for_status, wait_ready

ROOT = Path(__file__).resolve().parent.parent
# Servers and workers in subprocesses, one of them in a namespace; a chaos round of about a minute.
pytestmark = [pytest.mark.stack, pytest.mark.slow]

QUICK = {"kind": "ufm", "K": 4, "d": 6, "n_per_class": 3, "seed": 7}


def _skip_or_fail(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason}, and NCLAB_REQUIRE_SERVICES=1")
    pytest.skip(reason)


def _require_namespaces() -> None:
    reason = netns.why_unavailable()
    if reason is not None:
        _skip_or_fail(reason)


@pytest.fixture
def remote() -> Iterator[netns.RemoteHost]:
    """Another host: a network namespace with a link to this one, removed afterwards."""
    _require_namespaces()
    with netns.remote_host() as host:
        yield host


@dataclass
class AcrossTheLink:
    client: httpx.Client
    database_url: str
    remote: netns.RemoteHost
    worker: subprocess.Popen  # `nclab worker`, in the remote host


@pytest.fixture
def across_the_link(pg_database, remote, processes: Processes) -> Iterator[AcrossTheLink]:
    """`nclab api` here, and the only worker in the remote host, dialing PostgreSQL and Redis
    through the link. ``remote`` comes before ``processes``: the worker is stopped before its
    namespace goes."""
    broker_url = fresh_redis_broker()
    processes.env.update(NCLAB_DATABASE_URL=pg_database, NCLAB_BROKER_URL=broker_url)
    port = free_port()
    api = processes.start_api(port, "--host", "127.0.0.1")
    remote_env = {**processes.env, "NCLAB_DATABASE_URL": remote.reach(pg_database),
                  "NCLAB_BROKER_URL": remote.reach(broker_url)}
    log = open(processes.log_dir / "remote-worker.log", "ab")
    worker = subprocess.Popen(remote.command([sys.executable, "-m", "service.cli", "worker"]), env=remote_env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    processes.running.append(worker)  # stopped, and its log printed, with the others
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, api)
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield AcrossTheLink(client, pg_database, remote, worker)


def _worker_column(database_url: str, experiment_id: str) -> str:
    """Who ran the job's latest attempt, "<hostname> pid <pid>" (the API does not show it)."""
    with psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://")) as connection:
        return connection.execute("SELECT worker FROM experiments WHERE id = %s", [experiment_id]).fetchone()[0]


def test_a_worker_on_another_host_runs_a_job_across_the_link(across_the_link):
    client = across_the_link.client
    experiment_id = client.post("/experiments", json=QUICK).raise_for_status().json()["id"]

    job = wait_for_status(client, experiment_id, {"succeeded", "failed", "canceled"}, timeout=120)

    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["optimality_gap"] < 1e-8  # the solve reached the UFM's known optimum
    (pool,) = children(across_the_link.worker.pid)  # concurrency 1: one pool process, the one that ran it
    assert _worker_column(across_the_link.database_url, experiment_id) == f"{across_the_link.remote.name} pid {pool}"
    steps = [row["step"] for row in client.get(f"/experiments/{experiment_id}/metrics").json()["items"]]
    assert steps[-1] == job["result"]["iterations"] and len(steps) == len(set(steps))


def test_a_partition_costs_one_attempt_and_the_old_one_changes_nothing():
    """One round of bench/chaos.py's partition scenario, which makes a remote host of its own."""
    _require_namespaces()
    missing = [tool for tool in ("redis-server", "redis-cli", "runuser") if shutil.which(tool) is None]
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        missing.append("initdb")
    if missing:
        _skip_or_fail(f"chaos needs {', '.join(missing)}")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--scenarios", "partition",
                             "--rounds", "1", "--heartbeat-timeout", FAST_LIFECYCLE["NCLAB_HEARTBEAT_TIMEOUT"]],
                            cwd=ROOT, capture_output=True, text=True, timeout=280)
    print(result.stdout, result.stderr[-5000:])
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    table = result.stdout.splitlines()
    assert table[-1] == "targets met"
    rows = {line.split()[0]: line.split()[1:] for line in table[1:-1]}
    # tried, succeeded, failed, canceled, lost, duplicated: the partitioned job, and the job that shows
    # the remote worker at work again once the link is back.
    assert rows["partition"][:6] == ["2", "2", "0", "0", "0", "0"]
