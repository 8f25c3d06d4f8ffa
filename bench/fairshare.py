"""Fair share against FIFO, on a real stack: who gets the worker slots, and what scheduling costs.

    .venv/bin/python bench/fairshare.py
    .venv/bin/python bench/fairshare.py --scenarios throughput --repeats 5

Needs PostgreSQL (--postgres, default postgres@127.0.0.1:5432, allowed to create
databases) and Redis (--broker, default database 13: flushed before each run and at the
end, so give it one nothing else uses). Each scenario runs twice in this one run, on a
fresh database and broker each time: with NCLAB_SCHEDULER=fair (the default) and with
NCLAB_SCHEDULER=fifo (sending every job at its submit, the baseline), each time with
``nclab api`` and ``nclab worker`` processes of their own, API keys for alice and bob.

- overtake (one worker slot): alice submits a sweep of --members tiny UFM solves; once
  her first runs, bob submits one. Counted: how many of alice's jobs started after bob's
  submit and before his job. Target (fair): at most 1, i.e. bob's job starts no later than
  the second slot that frees after his submit. FIFO: all of alice's that were left.
- share (one worker slot): alice submits sweeps of 20 and bob single experiments, both
  without pause, from two threads, until 200 slots have been handed out; each one's share
  of those 200. Target (fair): each 50% +- 10%.
- throughput (two `nclab worker` processes): alice and bob each submit a sweep of
  --jobs / 2 tiny UFM solves; seconds from the first submit to the last job's end.
  Target: fair within 5% of FIFO (ratio fair / FIFO <= 1.05), the best of --repeats (3)
  each, the policies alternating: on a machine shared with other work single runs vary
  by tens of percent, and the best run is the one least disturbed.
- hot path (no worker; alice has a sweep of 1,000 queued): bob's POST /experiments and a
  GET of his queued experiment, --requests each, one after another on one kept-alive
  httpx connection; requests per second. Under fair both answer with the queued job's
  ``place`` (a count over the owner's queued jobs in the index, and whose the next slot
  is, read at most once a second) and the submit is followed by a scheduling round; FIFO's
  answer has no place, as before the fair scheduler. No target: the cost is printed.

Prints each figure beside FIFO's and the ratio; exits 1 when a target is missed.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, bench/ is on the path but not the project
    sys.path.insert(0, str(ROOT))

from bench.query import database_url, drop_database, free_port, recreate_database, wait_ready  # noqa: E402
from service.migrate import upgrade  # noqa: E402

DATABASE = "nclab_bench_fairshare"
KEYS = {"alice": "alice-key", "bob": "bob-key"}
TINY = {"kind": "ufm", "K": 4, "d": 6, "n_per_class": 3}
SHARE_SLOTS = 200
SHARE_SWEEP = 20
POLICIES = ("fair", "fifo")


def headers(owner: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[owner]}"}


@dataclass
class Stack:
    url: str
    postgres: str

    def query(self, statement: str, parameters=()) -> list[tuple]:
        with psycopg.connect(database_url(self.postgres, DATABASE)) as connection:
            return connection.execute(statement, parameters).fetchall()


@contextmanager
def stack(postgres: str, broker: str, policy: str, workers: int) -> Iterator[Stack]:
    """A fresh database and broker; `nclab api` and ``workers`` `nclab worker` processes of one slot each."""
    redis.Redis.from_url(broker).flushdb()
    recreate_database(postgres, DATABASE)
    upgrade(f"postgresql+psycopg://{postgres}/{DATABASE}")
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "NCLAB_DATABASE_URL": f"postgresql+psycopg://{postgres}/{DATABASE}",
               "NCLAB_BROKER_URL": broker, "NCLAB_DATA_DIR": data_dir, "NCLAB_SCHEDULER": policy,
               "NCLAB_API_KEYS": ",".join(f"{owner}:{key}" for owner, key in KEYS.items()),
               "NCLAB_WORKER_QUEUES": "cpu", "OMP_NUM_THREADS": "1"}
        processes = []

        def start(*args: str, name: str) -> subprocess.Popen:
            with open(Path(data_dir) / f"{name}.log", "ab") as log:
                process = subprocess.Popen([sys.executable, "-m", "service.cli", *args], cwd=ROOT, env=env,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            processes.append(process)
            return process

        try:
            api = start("api", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", name="api")
            for index in range(workers):
                start("worker", name=f"worker-{index}")
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, api)
            consumers = f'nclab_queue_consumers{{queue="cpu"}} {float(workers)}'
            deadline = time.monotonic() + 60
            while workers and consumers not in httpx.get(f"{url}/metrics", headers=headers("alice")).text:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {workers} workers did not announce themselves within 60 s")
                time.sleep(0.2)
            yield Stack(url, postgres)
        except Exception:
            for log in sorted(Path(data_dir).glob("*.log")):
                print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(0.05)
    return value


def post(client: httpx.Client, path: str, body: dict, owner: str) -> dict:
    response = client.post(path, json=body, headers=headers(owner))
    if response.status_code != 202:
        raise RuntimeError(f"POST {path}: HTTP {response.status_code}: {response.text[:300]}")
    return response.json()


def sweep(members: int, first_seed: int = 0) -> dict:
    return {"base": TINY, "grid": {"seed": list(range(first_seed, first_seed + members))}}


def overtake(postgres: str, broker: str, policy: str, members: int) -> int:
    """How many of alice's jobs started after bob's submit and before his job."""
    with stack(postgres, broker, policy, workers=1) as running, httpx.Client(base_url=running.url,
                                                                              timeout=60) as client:
        alices = post(client, "/sweeps", sweep(members), "alice")
        wait_until(lambda: running.query("SELECT 1 FROM experiments WHERE status <> 'queued'"), 60,
                   "alice's first job to start")
        submitted_at = running.query("SELECT now()")[0][0]
        bobs = post(client, "/experiments", {"spec": {**TINY, "seed": 10**6}}, "bob")["id"]
        started = wait_until(lambda: running.query("SELECT started_at FROM experiments WHERE id = %s AND "
                                                   "started_at IS NOT NULL", (bobs,)), 600, "bob's job to start")
        overtaking = running.query(
            "SELECT count(*) FROM experiments WHERE sweep = %s AND started_at > %s AND started_at < %s",
            (alices["id"], submitted_at, started[0][0]))[0][0]
        client.post(f"/sweeps/{alices['id']}/cancel", headers=headers("alice"))
    return overtaking


def share(postgres: str, broker: str, policy: str) -> float:
    """Alice's share of the first SHARE_SLOTS jobs started, both submitting without pause."""
    with stack(postgres, broker, policy, workers=1) as running:
        done = threading.Event()
        errors: list[Exception] = []

        def submit_forever(owner: str) -> None:
            try:
                with httpx.Client(base_url=running.url, timeout=60) as client:
                    seed = 0
                    while not done.is_set():
                        if owner == "alice":
                            post(client, "/sweeps", sweep(SHARE_SWEEP, seed), owner)
                            seed += SHARE_SWEEP
                        else:
                            post(client, "/experiments", {"spec": {**TINY, "seed": seed}}, owner)
                            seed += 1
            except Exception as exc:  # reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=submit_forever, args=(owner,)) for owner in KEYS]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: errors or running.query("SELECT count(started_at) FROM experiments")[0][0]
                       >= SHARE_SLOTS, 900, f"{SHARE_SLOTS} jobs to start")
        finally:
            done.set()
            for thread in threads:
                thread.join()
        if errors:
            raise errors[0]
        owners = running.query("SELECT owner FROM experiments WHERE started_at IS NOT NULL "
                               "ORDER BY started_at LIMIT %s", (SHARE_SLOTS,))
    return sum(owner == "alice" for (owner,) in owners) / SHARE_SLOTS


def throughput(postgres: str, broker: str, policy: str, jobs: int) -> float:
    """Seconds from the first submit to the end of the last of ``jobs`` tiny solves, on two worker processes."""
    with stack(postgres, broker, policy, workers=2) as running, httpx.Client(base_url=running.url,
                                                                              timeout=120) as client:
        start = time.monotonic()
        for owner in KEYS:
            post(client, "/sweeps", sweep(jobs // 2), owner)
        wait_until(lambda: running.query("SELECT count(*) FROM experiments WHERE status = 'succeeded'")[0][0]
                   >= jobs // 2 * 2, 1800, f"{jobs} jobs to succeed")
        return time.monotonic() - start


def hot_path(postgres: str, broker: str, policy: str, requests: int) -> tuple[float, float]:
    """Requests per second of bob's submits, and of polls of his queued experiment, behind alice's 1,000."""
    with stack(postgres, broker, policy, workers=0) as running, httpx.Client(base_url=running.url,
                                                                              timeout=60) as client:
        post(client, "/sweeps", sweep(1000), "alice")
        start = time.perf_counter()
        ids = [post(client, "/experiments", {"spec": {**TINY, "seed": i}}, "bob")["id"] for i in range(requests)]
        submits = requests / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(requests):
            answer = client.get(f"/experiments/{ids[-1]}", headers=headers("bob"))
            if answer.status_code != 200 or (answer.json()["place"] is None) != (policy == "fifo"):
                raise RuntimeError(f"poll: HTTP {answer.status_code}: {answer.text[:300]}")
        polls = requests / (time.perf_counter() - start)
    return submits, polls


def report(rows: list[tuple[str, str, str, str, str, bool]]) -> None:
    print(f"\n{'figure':<58} {'fair':>8} {'fifo':>8} {'ratio':>7}  {'target (fair)':<22} met")
    for label, fair, fifo, ratio, target, met in rows:
        print(f"{label:<58} {fair:>8} {fifo:>8} {ratio:>7}  {target:<22} {'yes' if met else 'NO'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgres@127.0.0.1:5432", help="user@host:port")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/13",
                        help="a Redis database of its own: it is flushed before each run and at the end")
    parser.add_argument("--members", type=int, default=200, help="alice's sweep in the overtake scenario")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs of the throughput scenario")
    parser.add_argument("--repeats", type=int, default=3,
                        help="throughput runs of each policy, alternating (the best counts: the machine is shared)")
    parser.add_argument("--requests", type=int, default=1000, help="submits, and polls, of the hot-path scenario")
    parser.add_argument("--scenarios", default="overtake,share,throughput,hot", help="comma-separated")
    args = parser.parse_args()

    scenarios = set(args.scenarios.split(","))
    redis.Redis.from_url(args.broker).ping()  # before anything is made that would need undoing
    rows = []
    try:
        if "overtake" in scenarios:
            overtaken = {policy: overtake(args.postgres, args.broker, policy, args.members) for policy in POLICIES}
            print(f"overtake: alice's jobs started between bob's submit and his job: {overtaken}", flush=True)
            rows.append((f"overtake: alice's jobs started before bob's (of {args.members})",
                         str(overtaken["fair"]), str(overtaken["fifo"]), "-", "<= 1", overtaken["fair"] <= 1))
        if "share" in scenarios:
            shares = {policy: share(args.postgres, args.broker, policy) for policy in POLICIES}
            print(f"share: alice's share of {SHARE_SLOTS} slots: {shares}", flush=True)
            rows.append((f"share: alice's of {SHARE_SLOTS} slots (bob's is the rest)", f"{shares['fair']:.0%}",
                         f"{shares['fifo']:.0%}", f"{shares['fair'] / max(shares['fifo'], 1e-9):.2f}",
                         "50% +- 10%", abs(shares["fair"] - 0.5) <= 0.1))
        if "throughput" in scenarios:
            seconds: dict[str, list[float]] = {policy: [] for policy in POLICIES}
            for _ in range(args.repeats):
                for policy in POLICIES:
                    seconds[policy].append(throughput(args.postgres, args.broker, policy, args.jobs))
                    print(f"throughput: {args.jobs} jobs, {policy}: {seconds[policy][-1]:.1f} s", flush=True)
            fair_s, fifo_s = min(seconds["fair"]), min(seconds["fifo"])
            rows.append((f"throughput: {args.jobs} tiny UFM jobs, 2 worker processes, s", f"{fair_s:.1f}",
                         f"{fifo_s:.1f}", f"{fair_s / fifo_s:.3f}", "ratio <= 1.05", fair_s / fifo_s <= 1.05))
        if "hot" in scenarios:
            rates = {policy: hot_path(args.postgres, args.broker, policy, args.requests) for policy in POLICIES}
            for index, what in enumerate(("POST /experiments", "GET /experiments/{id} (queued)")):
                fair, fifo = rates["fair"][index], rates["fifo"][index]
                rows.append((f"hot path: {what}, req/s (sequential)", f"{fair:.0f}", f"{fifo:.0f}",
                             f"{fair / fifo:.2f}", "- (printed)", True))
    finally:
        drop_database(args.postgres, DATABASE)
        redis.Redis.from_url(args.broker).flushdb()

    report(rows)
    return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
