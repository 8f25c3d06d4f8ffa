"""Chaos: kill and restart what the service runs on, and count what was lost.

    .venv/bin/python bench/chaos.py              # every scenario but partition, a few minutes
    .venv/bin/python bench/chaos.py --short      # kill -9 the worker once, restart Redis once (CI)
    .venv/bin/python bench/chaos.py --scenarios partition --rounds 3   # as root
    .venv/bin/python bench/chaos.py --short --heartbeat-timeout 4      # the tests' lifecycle

It starts a PostgreSQL cluster and a Redis of its own on free ports (never the
machine's shared ones: it stops them), then `nclab api` and `nclab worker` on them, with
a heartbeat timeout of --heartbeat-timeout seconds (HEARTBEAT_TIMEOUT by default; the service's own
default is 60, the tests' stacks use 4) and a heartbeat every tenth of that, and runs bounded
rounds of:

- worker pool: kill -9 the pool process running a job (the worker stays);
- worker: kill -9 the worker's main process mid-job (its pool process dies with it), and
  start a new worker;
- redis: stop the worker, queue 20 jobs, kill -9 Redis (which keeps nothing), start it
  and the worker again;
- postgres: stop PostgreSQL for --outage seconds while a client submits and polls;
- api: kill -9 `nclab api --workers 2` while a client submits, and start it again;
- partition (root only, asked for by name): a second worker runs on another host, a network
  namespace linked to this one (tests/netns.py), and reaches PostgreSQL and Redis across
  the link. Its link is cut while it runs a job; the job must be re-queued once its
  heartbeat is stale and succeed on the worker on this side. The link comes back, and a
  job that only the remote worker can take shows that its old attempt has ended; that
  attempt's late writes must have changed neither the job's row nor its history once it
  ended (counted as duplicated if they did).

For each it prints: jobs tried, jobs that succeeded, failed and were canceled, jobs lost
(not finished within the time limit, or acknowledged and then gone), jobs whose history
was duplicated or does not end at the result, responses that were neither 2xx-4xx JSON
nor a problem+json, and the recovery time (from the fault to the end of the last job, or
to the first success after the outage) at p50 and max. A fault costs attempts, never
jobs: it exits 1 when a target is missed: every job that was not canceled succeeded
(none failed, none lost), 0 duplicated, 0 bare errors, Redis recovery <= 15 s, worker
and partition recovery <= the heartbeat timeout + 10 s.
"""

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.netns, shared with tests/test_multihost.py

import httpx  # noqa: E402
import psycopg  # noqa: E402
from psycopg.rows import dict_row  # noqa: E402

from service.lifetime import children  # noqa: E402
from tests import netns  # noqa: E402

HEARTBEAT_TIMEOUT = 10
PG_BIN = next(Path("/usr/lib/postgresql").glob("*/bin"), Path("/usr/lib/postgresql/bin"))
PROBLEM_JSON = "application/problem+json"
# A job that runs for a few seconds on this machine's CPU: long enough to be killed mid-way.
RUNNING_SPEC = {"kind": "ufm", "K": 30, "d": 64, "n_per_class": 50, "tol": 1e-300, "max_iters": 1500,
                "checkpoint_every": 100}
QUICK_SPEC = {"kind": "ufm", "K": 4, "d": 6, "n_per_class": 3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(interval)


class Postgres:
    """A cluster of our own, run as the postgres user (initdb refuses root)."""

    def __init__(self, directory: Path):
        self.directory, self.port = directory, free_port()
        directory.mkdir(parents=True)
        shutil.chown(directory, "postgres", "postgres")
        self._as_postgres([str(PG_BIN / "initdb"), "-D", str(directory / "data"), "-A", "trust", "-U", "postgres"])

    def _as_postgres(self, command: list[str]) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def stored(self, experiment_id: str) -> dict:
        """All that a late write could change, as stored: the job's row by column, and its history rows
        by step ("history step N")."""
        with psycopg.connect(self.url.replace("+psycopg", ""), row_factory=dict_row) as connection:
            row = connection.execute("SELECT * FROM experiments WHERE id = %s", [experiment_id]).fetchone()
            history = connection.execute("SELECT * FROM metrics WHERE experiment_id = %s", [experiment_id]).fetchall()
        return {**row, **{f"history step {step_row['step']}": step_row for step_row in history}}

    def worker_of(self, experiment_id: str) -> str:
        """Who ran the job's latest attempt, "<hostname> pid <pid>" (the API does not show it)."""
        with psycopg.connect(self.url.replace("+psycopg", "")) as connection:
            return connection.execute("SELECT worker FROM experiments WHERE id = %s", [experiment_id]).fetchone()[0]

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.directory / "data"), "-o", options,
                           "-l", str(self.directory / "log"), "-w", "start"])

    def stop(self) -> None:
        self._as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.directory / "data"), "-m", "fast", "-w", "stop"])


class Redis:
    def __init__(self):
        self.port, self.process = free_port(), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port),
                                         "--save", "", "--appendonly", "no"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True)
                   .returncode == 0, 10, "redis-server to start")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


@dataclass
class Stack:
    """nclab api and nclab worker, as processes of their own."""

    env: dict
    log_dir: Path
    api_workers: int  # several where the API itself is killed: its workers must end with it
    api_port: int = field(default_factory=free_port)
    api: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None

    def _start(self, *args: str, name: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start_api(self) -> None:
        self.api = self._start("api", "--port", str(self.api_port), "--workers", str(self.api_workers), name="api")
        wait_until(lambda: _ok(f"{self.url}/healthz"), 60, "the API to answer")

    def start_worker(self) -> None:
        self.worker = self._start("worker", name="worker")
        wait_until(lambda: children(self.worker.pid), 60, "the worker's pool process")

    def stop_worker(self) -> None:
        os.killpg(self.worker.pid, signal.SIGTERM)
        self.worker.wait()

    def stop(self) -> None:
        for process in (self.worker, self.api):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class Tally:
    scenario: str
    tried: int = 0
    succeeded: int = 0
    failed: int = 0
    canceled: int = 0
    lost: int = 0
    duplicated: int = 0
    bare: int = 0
    recoveries: list[float] = field(default_factory=list)

    def row(self) -> str:
        p50 = f"{statistics.median(self.recoveries):.1f}" if self.recoveries else "-"
        worst = f"{max(self.recoveries):.1f}" if self.recoveries else "-"
        return (f"{self.scenario:<10} {self.tried:>6} {self.succeeded:>9} {self.failed:>6} {self.canceled:>8} "
                f"{self.lost:>5} {self.duplicated:>11} {self.bare:>12} {p50:>13} {worst:>13}")

    @property
    def missed(self) -> bool:
        return bool(self.failed or self.lost or self.duplicated or self.bare)


class Client:
    """The API over one connection, counting responses that are neither JSON nor problem+json."""

    def __init__(self, url: str, tally: Tally):
        self.http, self.tally = httpx.Client(base_url=url, timeout=10), tally

    def request(self, method: str, path: str, **kwargs) -> httpx.Response | None:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError:
            return None  # the API is down: no response to judge
        media = response.headers.get("content-type", "")
        if response.status_code >= 400 and media != PROBLEM_JSON:
            self.tally.bare += 1
        if response.status_code >= 500 and response.status_code != 503:
            self.tally.bare += 1
        return response

    def submit(self, spec: dict) -> str | None:
        response = self.request("POST", "/experiments", json=spec)
        return response.json()["id"] if response is not None and response.status_code == 202 else None

    def status(self, experiment_id: str) -> dict | None:
        response = self.request("GET", f"/experiments/{experiment_id}")
        return response.json() if response is not None and response.status_code == 200 else None


def settle(client: Client, tally: Tally, ids: list[str], since: float, timeout: float) -> float | None:
    """Wait for the jobs to finish and count them and their histories; the time from ``since``
    to the last one's end (None if some never ended)."""
    pending, finished_at = set(ids), since
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for experiment_id in list(pending):
            body = client.status(experiment_id)
            if body is not None and body["status"] in ("succeeded", "failed", "canceled"):
                pending.discard(experiment_id)
                finished_at = time.monotonic()
                setattr(tally, body["status"], getattr(tally, body["status"]) + 1)
                if body["status"] == "failed":
                    print(f"{tally.scenario}: {experiment_id} failed: {body['error']}", file=sys.stderr)
                _check_history(client, tally, body)
        time.sleep(0.2)
    tally.lost += len(pending)
    return None if pending else finished_at - since


def _check_history(client: Client, tally: Tally, body: dict) -> None:
    response = client.request("GET", f"/experiments/{body['id']}/metrics")
    steps = [row["step"] for row in response.json()["items"]] if response is not None else []
    duplicated = len(steps) != len(set(steps)) or steps != sorted(steps)
    if body["status"] == "succeeded":
        duplicated = duplicated or not steps or steps[-1] != body["result"]["iterations"]
    tally.duplicated += int(duplicated)


def _recovered(tally: Tally, seconds: float | None) -> None:
    if seconds is not None:
        tally.recoveries.append(seconds)


def running_job(client: Client) -> str:
    experiment_id = client.submit(RUNNING_SPEC)
    wait_until(lambda: (client.status(experiment_id) or {}).get("status") == "running", 60, "a job to run")
    return experiment_id


def worker_pool_round(stack: Stack, tally: Tally, rounds: int) -> None:
    client = Client(stack.url, tally)
    for _ in range(rounds):
        experiment_id = running_job(client)
        tally.tried += 1
        (pool,) = children(stack.worker.pid)  # prefork with concurrency 1: one pool process
        os.kill(pool, signal.SIGKILL)
        _recovered(tally, settle(client, tally, [experiment_id], time.monotonic(), HEARTBEAT_TIMEOUT + 120))


def worker_round(stack: Stack, tally: Tally, rounds: int) -> None:
    client = Client(stack.url, tally)
    for _ in range(rounds):
        experiment_id = running_job(client)
        tally.tried += 1
        killed = time.monotonic()
        os.kill(stack.worker.pid, signal.SIGKILL)
        stack.worker.wait()
        stack.start_worker()
        _recovered(tally, settle(client, tally, [experiment_id], killed, HEARTBEAT_TIMEOUT + 120))


def redis_round(stack: Stack, redis: Redis, tally: Tally, rounds: int) -> None:
    client = Client(stack.url, tally)
    for _ in range(rounds):
        stack.stop_worker()
        ids = [client.submit({**QUICK_SPEC, "seed": seed}) for seed in range(20)]
        tally.tried += len(ids)
        time.sleep(1)  # the messages wait in Redis
        redis.kill()
        redis.start()
        restarted = time.monotonic()
        stack.start_worker()
        _recovered(tally, settle(client, tally, [i for i in ids if i], restarted, 120))


@contextmanager
def load(stack: Stack, tally: Tally):
    """A client that submits and polls in a loop; yields the ids it got 202 for."""
    acknowledged, stop = [], threading.Event()

    def run() -> None:
        client = Client(stack.url, tally)
        while not stop.is_set():
            experiment_id = client.submit(QUICK_SPEC)
            if experiment_id:
                acknowledged.append(experiment_id)
                client.status(experiment_id)
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield acknowledged
    finally:
        stop.set()
        thread.join()


def postgres_round(stack: Stack, postgres: Postgres, tally: Tally, outage: float) -> None:
    with load(stack, tally) as acknowledged:
        time.sleep(2)
        postgres.stop()
        time.sleep(outage)
        postgres.start()
        restarted = time.monotonic()
        wait_until(lambda: _ok(f"{stack.url}/experiments"), 60, "the API to read the database again")
        tally.recoveries.append(time.monotonic() - restarted)
        time.sleep(2)
    tally.tried += len(acknowledged)
    settle(Client(stack.url, tally), tally, acknowledged, time.monotonic(), 180)


def api_round(stack: Stack, tally: Tally, rounds: int) -> None:
    for _ in range(rounds):
        with load(stack, tally) as acknowledged:
            time.sleep(2)
            workers = children(stack.api.pid)
            killed = time.monotonic()
            os.kill(stack.api.pid, signal.SIGKILL)  # the supervisor; its workers die with it
            stack.api.wait()
            wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), 10,
                       "the API's workers to end with their supervisor")
            stack.start_api()
            tally.recoveries.append(time.monotonic() - killed)
            time.sleep(2)
        tally.tried += len(acknowledged)
        settle(Client(stack.url, tally), tally, acknowledged, time.monotonic(), 180)


def start_remote_worker(stack: Stack, host: netns.RemoteHost, postgres: Postgres, redis: Redis) -> subprocess.Popen:
    """`nclab worker` on the remote host, dialing PostgreSQL and Redis across its link."""
    env = {**stack.env, "NCLAB_DATABASE_URL": host.reach(postgres.url), "NCLAB_BROKER_URL": host.reach(redis.url)}
    log = open(stack.log_dir / "remote-worker.log", "ab")
    worker = subprocess.Popen(host.command([sys.executable, "-m", "service.cli", "worker"]), cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: children(worker.pid), 60, "the remote worker's pool process")
    return worker


def partition_round(stack: Stack, postgres: Postgres, redis: Redis, tally: Tally, rounds: int) -> None:
    client = Client(stack.url, tally)
    with netns.remote_host() as host:
        remote_worker = start_remote_worker(stack, host, postgres, redis)

        def remote(experiment_id: str) -> bool:
            return postgres.worker_of(experiment_id).startswith(f"{host.name} pid ")

        try:
            for _ in range(rounds):
                stack.stop_worker()  # the remote worker alone takes the next job
                experiment_id = running_job(client)
                tally.tried += 1
                assert remote(experiment_id), "the only worker running is the remote one"
                host.cut()
                cut = time.monotonic()
                stack.start_worker()
                recovery = settle(client, tally, [experiment_id], cut, HEARTBEAT_TIMEOUT + 120)
                _recovered(tally, recovery)
                ended = recovery is not None  # else settle counted it lost: it has no end to compare with
                if ended and remote(experiment_id):
                    raise RuntimeError(f"{experiment_id} ended on the remote host before the cut: RUNNING_SPEC "
                                       "is too short on this machine to test a partition")
                settled = postgres.stored(experiment_id)
                host.restore()
                # With one pool process and late acks, the remote worker takes a new job only once the
                # old attempt has ended: by then it has made every late write it was going to make.
                stack.stop_worker()
                probe = client.submit(QUICK_SPEC)
                tally.tried += 1
                settle(client, tally, [probe], time.monotonic(), 180)
                afterwards = postgres.stored(experiment_id)
                changed = sorted(key for key in settled.keys() | afterwards.keys()
                                 if settled.get(key) != afterwards.get(key))
                if ended and changed:
                    tally.duplicated += 1
                    print(f"partition: {experiment_id} changed after it ended: {', '.join(changed)}",
                          file=sys.stderr)
                stack.start_worker()
        finally:
            os.killpg(remote_worker.pid, signal.SIGKILL)  # before its namespace goes
            remote_worker.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="one worker kill and one Redis restart (CI)")
    parser.add_argument("--rounds", type=int, default=10,
                        help="kills of the pool process and of the worker; partitions")
    parser.add_argument("--outage", type=float, default=20.0, help="seconds PostgreSQL stays down")
    parser.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT,
                        help="seconds without a heartbeat before a running job is re-queued")
    parser.add_argument("--scenarios", default="pool,worker,redis,postgres,api",
                        help="comma-separated, of pool, worker, redis, postgres, api, partition (as root)")
    args = parser.parse_args()
    chosen = {"worker", "redis"} if args.short else set(args.scenarios.split(","))
    if "partition" in chosen and (reason := netns.why_unavailable()):
        parser.error(f"partition: {reason}")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        os.chmod(scratch, 0o755)
        postgres, redis = Postgres(scratch / "postgres"), Redis()
        postgres.start()
        redis.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("NCLAB_")}
        env.update(NCLAB_DATABASE_URL=postgres.url, NCLAB_BROKER_URL=redis.url, NCLAB_DATA_DIR=str(scratch / "data"),
                   NCLAB_HEARTBEAT_INTERVAL=str(args.heartbeat_timeout / 10),
                   NCLAB_HEARTBEAT_TIMEOUT=str(args.heartbeat_timeout),
                   NCLAB_RECONCILE_INTERVAL="1", PYTHONUNBUFFERED="1")
        stack = Stack(env, scratch, api_workers=2 if "api" in chosen else 1)
        tallies = []
        try:
            stack.start_api()
            stack.start_worker()
            rounds = 1 if args.short else args.rounds
            scenarios = {
                "pool": lambda tally: worker_pool_round(stack, tally, rounds),
                "worker": lambda tally: worker_round(stack, tally, rounds),
                "redis": lambda tally: redis_round(stack, redis, tally, 1),
                "postgres": lambda tally: postgres_round(stack, postgres, tally, args.outage),
                "api": lambda tally: api_round(stack, tally, 3),
                "partition": lambda tally: partition_round(stack, postgres, redis, tally, rounds),
            }
            for name, run in scenarios.items():
                if name in chosen:
                    tallies.append(Tally(name))
                    run(tallies[-1])
        finally:
            stack.stop()
            redis.kill()
            postgres.stop()
            for log in sorted(scratch.glob("*.log")):
                if any(t.missed for t in tallies):
                    print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)

    print(f"{'scenario':<10} {'tried':>6} {'succeeded':>9} {'failed':>6} {'canceled':>8} {'lost':>5} "
          f"{'duplicated':>11} {'non-problem':>12} {'recovery p50':>13} {'recovery max':>13}")
    for tally in tallies:
        print(tally.row())
    recovery_limit = args.heartbeat_timeout + 10.0
    limits = {"redis": 15.0, "worker": recovery_limit, "pool": recovery_limit, "partition": recovery_limit}
    missed = [t.scenario for t in tallies if t.missed
              or any(r > limits.get(t.scenario, float("inf")) for r in t.recoveries)]
    print("targets met" if not missed else f"targets missed: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
