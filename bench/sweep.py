"""Time of POST /sweeps with 1,000 members over HTTP, against PostgreSQL, and of the same 1,000 posted one by one.

    .venv/bin/python bench/sweep.py                  # 1 warm-up + 5 timed sweeps, then the baseline
    .venv/bin/python bench/sweep.py --repeats 20

Needs PostgreSQL (--postgres, default postgres@127.0.0.1:5432, allowed to create
databases) and Redis (--broker, default database 14: flushed before and after, so give
it one nothing else uses). No worker: with no worker slot to fill, the fair scheduler
(the default, service/scheduler.py) sends no message, and what is timed is the request's
own work and one scheduling round.

It (re)creates a scratch database ``nclab_bench_sweep``, migrates it
(service.migrate.upgrade), starts the API (``python -m service.cli api``, helpers of
bench/query.py) on it, and times to the last byte, over one kept-alive connection:

- sweep: POST /sweeps of 1,000 UFM members, 2 variants (normalized with logit_scale,
  regularized with lambda_w) x a grid of seed 0-99 x K in (5, 10, 15, 20, 25); one
  warm-up, then --repeats timed. Target: every one <= 2 s (the issue: all members in one
  transaction plus one scheduling round). Each response must say size 1,000 and list
  1,000 members; afterwards the database must hold all 1,000 of each sweep, none sent,
  and the cpu queue (Redis list ``cpu``, where UFM solves go) must hold no message: the
  broker holds no more messages than free slots, and there is none;
- baseline: the same 1,000 specs (with the sweep's name and tags) posted one by one to
  POST /experiments, once, as a script did before sweeps; checked the same way. Its
  ratio is its total time over the sweep's p50.

At the end the API is stopped, the database dropped and the Redis database flushed,
also after an error or Ctrl-C. Exits with 1 if the sweep's target is missed.
"""

import argparse
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, bench/ is on the path but not the project
    sys.path.insert(0, str(ROOT))

from bench.query import api, database_url, drop_database, recreate_database  # noqa: E402
from service.migrate import upgrade  # noqa: E402

DATABASE = "nclab_bench_sweep"
QUEUE = "cpu"  # the Redis list of the queue UFM solves go to (the specs' resources)
TARGET_S = 2.0
MEMBERS = 1000

BASE = {"kind": "ufm", "K": 10, "d": 16, "n_per_class": 20}
VARIANTS = [{"normalization": "normalized", "logit_scale": 10.0},
            {"normalization": "regularized", "lambda_w": 5e-4}]
GRID = {"seed": list(range(100)), "K": [5, 10, 15, 20, 25]}
TAGS = {"bench": "sweep"}


def sweep_body(i: int) -> dict:
    return {"name": f"bench sweep {i}", "tags": TAGS, "base": BASE, "variants": VARIANTS, "grid": GRID}


def member_specs() -> list[dict]:
    """The sweep's members as a client would write them, in the sweep's order (variants, then the grid)."""
    fields = list(GRID)
    return [{**BASE, **variant, **dict(zip(fields, values))}
            for variant in VARIANTS for values in itertools.product(*GRID.values())]


@dataclass
class Row:
    label: str
    n: int
    seconds: list[float]
    target: float | None = None

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    @property
    def met(self) -> str:
        return "-" if self.target is None else ("yes" if self.max <= self.target else "NO")


def queued_messages(broker: redis.Redis) -> int:
    return broker.llen(QUEUE)


def queue_growth(broker: redis.Redis, before: int, settle: float = 1.0) -> int:
    """How much the queue grew, ``settle`` seconds after the last submit: the scheduling round of a
    submit runs just after its response, on the API's dispatcher."""
    time.sleep(settle)
    return queued_messages(broker) - before


def post(client: httpx.Client, path: str, body: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    response = client.post(path, json=body)
    elapsed = time.perf_counter() - start
    if response.status_code != 202:
        raise RuntimeError(f"POST {path}: HTTP {response.status_code}: {response.text[:500]}")
    return elapsed, response.json()


def time_sweeps(client: httpx.Client, broker: redis.Redis, repeats: int) -> tuple[list[float], list[str]]:
    """Seconds of each timed POST /sweeps (after one warm-up), and every sweep's id, the warm-up's too."""
    seconds, sweeps = [], []
    for i in range(1 + repeats):
        before = queued_messages(broker)
        elapsed, sweep = post(client, "/sweeps", sweep_body(i))
        grew = queued_messages(broker) - before
        if sweep["size"] != MEMBERS or len(sweep["members"]) != MEMBERS or grew != 0:
            raise RuntimeError(f"sweep {i}: size {sweep['size']}, {len(sweep['members'])} members, "
                               f"queue grew by {grew}; expected {MEMBERS} members and no message (no slot)")
        sweeps.append(sweep["id"])
        if i:
            seconds.append(elapsed)
    return seconds, sweeps


def time_one_by_one(client: httpx.Client, broker: redis.Redis) -> tuple[float, list[float], list[str]]:
    """Seconds for all of POST /experiments, one per member; each request's seconds; the experiments' ids."""
    before = queued_messages(broker)
    seconds, ids = [], []
    start = time.perf_counter()
    for spec in member_specs():
        elapsed, experiment = post(client, "/experiments", {"spec": spec, "name": "bench one by one", "tags": TAGS})
        seconds.append(elapsed)
        ids.append(experiment["id"])
    total = time.perf_counter() - start
    grew = queue_growth(broker, before)
    if len(set(ids)) != MEMBERS or grew != 0:
        raise RuntimeError(f"baseline: {len(set(ids))} experiments, queue grew by {grew}; expected {MEMBERS} "
                           "and no message (no slot)")
    return total, seconds, ids


def check_stored(postgres: str, sweeps: list[str], singles: list[str]) -> None:
    """Every member of every sweep, and every single experiment, is stored, and none is sent (no slot)."""
    with psycopg.connect(database_url(postgres, DATABASE)) as connection:
        counts = dict((sweep, (stored, sent)) for sweep, stored, sent in connection.execute(
            "SELECT sweep, count(*), count(sent_at) FROM experiments WHERE sweep = ANY(%s) GROUP BY sweep",
            (sweeps,)))
        single = connection.execute("SELECT count(*), count(sent_at) FROM experiments WHERE id = ANY(%s)",
                                    (singles,)).fetchone()
    wrong = {sweep: counts.get(sweep, (0, 0)) for sweep in sweeps if counts.get(sweep) != (MEMBERS, 0)}
    if wrong or tuple(single) != (MEMBERS, 0):
        raise RuntimeError(f"stored/sent: sweeps {wrong or 'all right'}, one by one {tuple(single)}; "
                           f"expected {MEMBERS} stored and 0 sent of each")


def report(rows: list[Row], ratio: float) -> None:
    print(f"\n{'request':<52} {'n':>5} {'p50 s':>8} {'max s':>8}  {'target':<8} {'met':>3}")
    for row in rows:
        target = "-" if row.target is None else f"<= {row.target:g} s"
        print(f"{row.label:<52} {row.n:>5} {row.p50:>8.3f} {row.max:>8.3f}  {target:<8} {row.met:>3}")
    print(f"ratio baseline / sweep (p50): {ratio:.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgres@127.0.0.1:5432", help="user@host:port")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/14",
                        help="a Redis database of its own: it is flushed before and after")
    parser.add_argument("--repeats", type=int, default=5, help="timed sweeps, after one warm-up")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("repeats at least 1")

    broker = redis.Redis.from_url(args.broker)
    broker.ping()  # before anything is made that would need undoing
    try:
        broker.flushdb()
        recreate_database(args.postgres, DATABASE)
        upgrade(f"postgresql+psycopg://{args.postgres}/{DATABASE}")
        with api(args.postgres, DATABASE, args.broker) as (url, _pid), \
                httpx.Client(base_url=url, timeout=120) as client:
            sweep_seconds, sweeps = time_sweeps(client, broker, args.repeats)
            total, single_seconds, singles = time_one_by_one(client, broker)
        check_stored(args.postgres, sweeps, singles)
    finally:
        drop_database(args.postgres, DATABASE)
        broker.flushdb()
        broker.close()

    rows = [Row(f"POST /sweeps, {MEMBERS:,} members", args.repeats, sweep_seconds, TARGET_S),
            Row(f"baseline: {MEMBERS:,} x POST /experiments, total", 1, [total]),
            Row("  (each POST /experiments)", MEMBERS, single_seconds)]
    report(rows, total / rows[0].p50)
    return 0 if rows[0].met == "yes" else 1


if __name__ == "__main__":
    sys.exit(main())
