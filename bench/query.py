"""Latency of lab-wide search, aggregate, curves and CSV export, over HTTP, against PostgreSQL.

    .venv/bin/python bench/query.py                      # 10k and 1M experiments, about 5 minutes
    .venv/bin/python bench/query.py --sizes 10k          # the small database only
    .venv/bin/python bench/query.py --keep --repeats 100 # reuse filled databases, keep them

Needs PostgreSQL (--postgres, default postgres@127.0.0.1:5432, allowed to create
databases) and Redis (--broker: /readyz checks it; nothing is queued). No worker.

For each size it (re)creates a scratch database ``nclab_bench_query_<size>``, migrates
it (service.migrate.upgrade) and fills it with COPY: experiments with complete specs
(every field of UFMSpec / TrainSpec, promoted columns equal to the spec's values), 40%
UFM and 60% training runs, mostly succeeded, created over 90 days, results holding every
result key the kind writes, owners and tags; and 100 history rows (steps 0-99) for each
of 10,000 experiments, the ones tagged paper=fig2 (in the 10k database, all of them).
The secondary indexes are dropped during the COPY and rebuilt from their own
definitions, then everything is VACUUM ANALYZEd. With --keep a database that already holds the
right number of rows is reused, and the databases are left in place at the end.

Then it starts the API (``python -m service.cli api``) on that database and times
requests over one kept-alive connection: 5 warm-ups, then --repeats timed requests (the
CSV export: at most 10), each with slightly different filter values so that no cached
answer helps. The requests and the targets they are held to (milliseconds):

- search: two spec fields and a metric threshold, ordered by that metric, top 100;
  p50 <= 10 and p95 <= 25 at 10k, p50 <= 50 at 1M;
- baseline: the equality query parameters (kind, normalization, dataset), newest
  first, top 100: the path lists took before the filter language. The search's ratio
  is its p50 over this one's, on the same database;
- aggregate: 2 group keys, 3 metrics, over ~10% of the experiments (~100k at 1M);
  p50 <= 150 at 1M;
- curves: nc1 per step, 6 groups, ~1,000 experiments x 100 steps; p50 <= 100;
- export: the whole table as CSV, to the last byte (10k only); p50 <= 1000.

With --export-memory it then exports each whole database once more (1M rows: ~670 MB)
and reports the API process's resident memory before and at most during the stream.

"matches" is what a request covered: the page's items, the aggregate's and curves'
experiments (summed over groups), the CSV's rows.
"""

import argparse
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache
from pathlib import Path

import httpx
import numpy as np
import psycopg
from psycopg import sql

from service.migrate import upgrade
from service.models import HISTORY_COLUMNS, RESULT_COLUMNS, SPEC_COLUMNS, Experiment
from service.schemas import TrainSpec, UFMSpec

ROOT = Path(__file__).resolve().parent.parent

SIZES = {"10k": 10_000, "1m": 1_000_000}
HISTORY_EXPERIMENTS, HISTORY_STEPS = 10_000, 100
WARMUPS, EXPORT_REPEATS = 5, 10

DATASETS = ("mnist", "fashion_mnist", "cifar10", "digits")
LOGIT_SCALES = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0)
DIMS = (64, 128, 512)
OWNERS = ("alice", "bob", "carol", "dave", "anonymous")
OTHER_TAGS = ({"paper": "fig3"}, {"paper": "fig4"}, {"project": "etf_geometry"},
              {"project": "imbalance", "paper": "fig5"})

UFM_TEMPLATE = UFMSpec(kind="ufm", K=10, d=64, n_per_class=20).model_dump(mode="json")
# Constructed, not validated: validating a training spec checks that the data files exist.
TRAIN_TEMPLATE = TrainSpec.model_construct(kind="train", dataset="mnist", K=10).model_dump(mode="json")

CATALOGUE_NC = ("nc1", "nc1_cdnv", "nc2_equinorm_m", "nc2_equinorm_w", "nc2_equiangle_m", "nc2_equiangle_w",
                "nc2_etf_m", "nc2_etf_w", "nc3", "nc3_etf", "nc4")
# The typed copies of spec fields and metrics (service/models.py) by column name.
SPEC_COPIES = {field: Experiment.__mapper__.columns[attribute].name for field, attribute in SPEC_COLUMNS.items()}
RESULT_COPIES = {key: Experiment.__mapper__.columns[attribute].name for key, attribute in RESULT_COLUMNS.items()}
EXPERIMENT_COLUMNS = ("id", "status", "spec", "progress", "result", "error", "created_at", "started_at",
                      "finished_at", "attempts", "cancel_requested", "sent_at", "send_count", "heartbeat_at",
                      "worker", "owner", "name", "tags", "sweep", *SPEC_COPIES.values(), *RESULT_COPIES.values())


# The data.

def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return 10 ** rng.uniform(math.log10(low), math.log10(high))


@cache
def spec_document(kind: str, fields: tuple) -> str:
    """A complete stored spec: the kind's defaults with ``fields`` over them, as JSON (few distinct ones)."""
    return json.dumps({**(UFM_TEMPLATE if kind == "ufm" else TRAIN_TEMPLATE), **dict(fields)})


def ufm_spec(rng: random.Random) -> dict:
    normalization = rng.choice(("normalized", "regularized"))
    spec = {"normalization": normalization, "K": rng.choice((10, 100)), "d": rng.choice(DIMS),
            "n_per_class": rng.choice((20, 50, 100)), "seed": rng.randrange(5),
            "max_iters": rng.choice((10_000, 50_000))}
    if normalization == "normalized":
        spec["logit_scale"] = rng.choice(LOGIT_SCALES)
    else:
        spec["lambda_w"] = spec["lambda_h"] = rng.choice((5e-4, 1e-3, 5e-3))
    return spec


def train_spec(rng: random.Random, epochs: int | None) -> dict:
    """A training run; K = 10, all classes of these data sets."""
    dataset = rng.choice(DATASETS)
    normalization = rng.choice(("normalized", "regularized", "none"))
    architecture = "resnet18" if dataset == "cifar10" else rng.choice(("mlp", "mlp", "vgg11"))
    spec = {"normalization": normalization, "dataset": dataset, "architecture": architecture, "K": 10,
            "d": rng.choice(DIMS), "seed": rng.randrange(5), "lr": rng.choice((0.01, 0.05, 0.1)),
            "epochs": epochs or rng.choice((10, 30, 100)), "optimizer": "adam" if rng.random() < 0.2 else "sgd"}
    if normalization == "normalized":
        spec["logit_scale"] = rng.choice(LOGIT_SCALES)
    if normalization == "regularized":
        spec["feature_decay"] = rng.choice((5e-4, 1e-3))
    return spec


def ufm_result(rng: random.Random, spec: dict) -> dict:
    loss = log_uniform(rng, 1e-6, 2)
    closed_form = spec["normalization"] == "normalized" or rng.random() < 0.5
    result = {**{key: log_uniform(rng, 1e-5, 10) for key in CATALOGUE_NC}, "accuracy": rng.uniform(0.9, 1),
              "loss": loss, "grad_norm": log_uniform(rng, 1e-12, 1e-6), "w_min_angle_deg": rng.uniform(85, 96),
              "optimal_loss": loss * 0.999 if closed_form else None,
              "optimality_gap": log_uniform(rng, 1e-14, 1e-6) if closed_form else None,
              "has_closed_form": closed_form, "iterations": rng.randint(50, spec["max_iters"]),
              "converged": rng.random() < 0.9, "features_merged_at": rng.randint(20, 500), "restarts": 1,
              "global_optimum_fraction": 1.0 if closed_form else None,
              "final_loss_min": loss, "final_loss_max": loss, "final_loss_std": 0.0}
    if spec["normalization"] == "regularized":
        result["cross_entropy"] = loss * 0.9
    return result


def train_result(rng: random.Random, spec: dict) -> dict:
    train_accuracy = rng.uniform(0.8, 1)
    return {"epoch": spec["epochs"], "lr": spec["lr"] * 0.01, "train_loss": log_uniform(rng, 1e-4, 1),
            "train_accuracy": train_accuracy, **{key: log_uniform(rng, 1e-4, 10) for key in CATALOGUE_NC},
            "accuracy": train_accuracy, "loss": log_uniform(rng, 1e-4, 1), "test_loss": rng.uniform(0.05, 1.5),
            "test_accuracy": rng.uniform(0.6, 0.99), "epochs": spec["epochs"],
            "parameters": rng.randint(100_000, 11_000_000)}


def history_rows(rng: np.random.Generator, kind: str, result: dict) -> Iterator[tuple]:
    """Steps 0-99 of a run, ending at its result: accuracies rise from 0.1 of theirs, the rest falls from ~1."""
    keys = [key for key, value in result.items() if isinstance(value, float) and value > 0]
    final = np.array([result[key] for key in keys])
    rising = np.array(["accuracy" in key for key in keys])
    progress = np.linspace(0, 1, HISTORY_STEPS)[:, None]
    noisy = np.where(rising, final * (0.1 + 0.9 * progress), final ** progress) * rng.lognormal(
        0, 0.05, (HISTORY_STEPS, len(keys)))
    values = np.where(rising, np.minimum(noisy, 1.0), noisy).tolist()
    for step, row in enumerate(values):
        document = dict(zip(keys, row))
        if kind == "train":
            document["epoch"] = step + 1
        yield step, json.dumps(document), *(document.get(key) for key in HISTORY_COLUMNS)


@dataclass
class Generated:
    row: tuple  # in the order of EXPERIMENT_COLUMNS
    kind: str
    result: dict | None
    started_at: datetime | None


def experiment(rng: random.Random, index: int, now: datetime, sweeps: list[str]) -> Generated:
    """The index-th experiment; the first HISTORY_EXPERIMENTS are figure 2's (succeeded, with history)."""
    in_figure = index < HISTORY_EXPERIMENTS
    kind = "ufm" if rng.random() < 0.4 else "train"
    spec = ufm_spec(rng) if kind == "ufm" else train_spec(rng, 100 if in_figure else None)
    status = "succeeded" if in_figure else rng.choices(
        ("succeeded", "failed", "canceled", "queued"), (0.9, 0.06, 0.02, 0.02))[0]
    created_at = now - timedelta(days=rng.uniform(0, 90))
    ran = status != "queued"
    started_at = created_at + timedelta(seconds=rng.uniform(1, 120)) if ran else None
    finished_at = started_at + timedelta(seconds=log_uniform(rng, 1, 3e4)) if ran else None
    result = None
    if status == "succeeded":
        result = ufm_result(rng, spec) if kind == "ufm" else train_result(rng, spec)
    tags = {"paper": "fig2"} if in_figure else (rng.choice(OTHER_TAGS) if rng.random() < 0.1 else {})
    document = spec_document(kind, tuple(spec.items()))
    row = (
        str(uuid.uuid4()), status, document,
        {"succeeded": 1.0, "queued": 0.0}.get(status, rng.random()),
        None if result is None else json.dumps(result),
        "RuntimeError: loss is not finite at epoch 3" if status == "failed" else None,
        created_at, started_at, finished_at, int(ran), status == "canceled",
        created_at, 1, finished_at, f"gpu-{rng.randrange(8)}@node" if ran else None,
        rng.choice(OWNERS), f"{kind} run {index}" if rng.random() < 0.2 else None, json.dumps(tags),
        rng.choice(sweeps) if rng.random() < 0.3 else None,
        *(json.loads(document).get(field) for field in SPEC_COPIES),  # the complete spec's: its resources too
        *((result or {}).get(key) for key in RESULT_COPIES),
    )
    return Generated(row, kind, result, started_at)


# The databases.

def database_url(postgres: str, name: str) -> str:
    return f"postgresql://{postgres}/{name}"


def row_counts(postgres: str, name: str) -> tuple[int, int] | None:
    try:
        with psycopg.connect(database_url(postgres, name)) as connection:
            counts = "SELECT (SELECT count(*) FROM experiments), (SELECT count(*) FROM metrics)"
            return connection.execute(counts).fetchone()
    except psycopg.Error:
        return None


def recreate_database(postgres: str, name: str) -> None:
    with psycopg.connect(database_url(postgres, "postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(postgres: str, name: str) -> None:
    with psycopg.connect(database_url(postgres, "postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def secondary_indexes(connection: psycopg.Connection) -> list[tuple[str, str]]:
    """(name, CREATE INDEX statement) of every index that backs no constraint."""
    return connection.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
        " AND tablename IN ('experiments', 'metrics')"
        " AND indexname NOT IN (SELECT conname FROM pg_constraint)").fetchall()


def fill(postgres: str, name: str, size: int, seed: int = 0) -> None:
    """Experiments and history by COPY into freshly truncated tables, without their secondary indexes."""
    rng, history_rng = random.Random(seed), np.random.default_rng(seed)
    now = datetime.now(UTC)
    sweeps = [str(uuid.uuid4()) for _ in range(max(1, size // 100))]
    history = []
    with psycopg.connect(database_url(postgres, name)) as connection, connection.cursor() as cursor:
        cursor.execute("SET LOCAL maintenance_work_mem = '1GB'")
        cursor.execute("TRUNCATE metrics, artifacts, experiments, sweeps")  # in this transaction, so that COPY can FREEZE
        # The sweeps the experiments name (a foreign key); their sizes are counted once the members exist.
        cursor.executemany("INSERT INTO sweeps (id, owner, tags, definition, size, created_at)"
                           " VALUES (%s, 'anonymous', '{}', '{}', 0, %s)", [(sweep, now) for sweep in sweeps])
        indexes = secondary_indexes(connection)
        for index, _ in indexes:
            cursor.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index)))
        columns = sql.SQL(", ").join(map(sql.Identifier, EXPERIMENT_COLUMNS))
        with cursor.copy(sql.SQL("COPY experiments ({}) FROM STDIN WITH (FREEZE)").format(columns)) as copy:
            for i in range(size):
                made = experiment(rng, i, now, sweeps)
                copy.write_row(made.row)
                if i < HISTORY_EXPERIMENTS:
                    history.append(made)
        history_columns = sql.SQL(", ").join(map(sql.Identifier, HISTORY_COLUMNS))
        copy_history = 'COPY metrics (experiment_id, recorded_at, step, "values", {}) FROM STDIN WITH (FREEZE)'
        with cursor.copy(sql.SQL(copy_history).format(history_columns)) as copy:
            for made in history:
                for step, *values in history_rows(history_rng, made.kind, made.result):
                    copy.write_row((made.row[0], made.started_at + timedelta(seconds=10 * step), step, *values))
        for _, definition in indexes:
            cursor.execute(definition)
        cursor.execute("UPDATE sweeps SET size = (SELECT count(*) FROM experiments WHERE sweep = sweeps.id)")
    with psycopg.connect(database_url(postgres, name), autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")  # and the visibility map, for index-only scans


def prepare(postgres: str, name: str, size: int, keep: bool) -> None:
    expected = (size, HISTORY_EXPERIMENTS * HISTORY_STEPS)
    if keep and row_counts(postgres, name) == expected:
        print(f"{name}: reusing ({size:,} experiments)")
        return
    start = time.perf_counter()
    recreate_database(postgres, name)
    upgrade(f"postgresql+psycopg://{postgres}/{name}")
    fill(postgres, name, size)
    print(f"{name}: filled {size:,} experiments and {expected[1]:,} history rows "
          f"in {time.perf_counter() - start:.1f} s")


# The API.

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def api(postgres: str, name: str, broker: str) -> Iterator[str]:
    """The API on a free port, serving ``name``; yields its base URL once /readyz answers."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "NCLAB_DATABASE_URL": f"postgresql+psycopg://{postgres}/{name}",
               "NCLAB_BROKER_URL": broker, "NCLAB_DATA_DIR": data_dir, "NCLAB_API_KEYS": "",
               # The reconciler runs once at start and never re-sends the few queued experiments.
               "NCLAB_RECONCILE_INTERVAL": "86400", "NCLAB_RESEND_AFTER": "1e9"}
        log = Path(data_dir) / "api.log"
        with log.open("w") as output:
            process = subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--host", "127.0.0.1",
                                        "--port", str(port), "--workers", "1"],
                                       cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, process)
            yield url, process.pid
        except Exception:
            print(f"the API's log ends:\n{log.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the API at {url} was not ready within {timeout} s")


# The requests.

@dataclass
class Target:
    p50: float
    p95: float | None = None

    def met(self, p50: float, p95: float) -> bool:
        return p50 <= self.p50 and (self.p95 is None or p95 <= self.p95)

    def __str__(self) -> str:
        return f"p50<={self.p50:g}" + ("" if self.p95 is None else f", p95<={self.p95:g}")


@dataclass
class Case:
    label: str
    path: str
    params: Callable[[int], dict]  # the i-th request's query parameters
    matches: Callable[[httpx.Response], int]
    target: Target | None = None
    repeats: int | None = None  # at most this many timed requests (None: --repeats)
    compare_with: str | None = None  # the label of the case its ratio divides by


def items(response: httpx.Response) -> int:
    return len(response.json()["items"])


def grouped_experiments(response: httpx.Response) -> int:
    """Experiments over all groups: an aggregate's counts, or the most points of each curve."""
    groups = response.json()["items"]
    return sum(g["count"] if "count" in g else max(p["n"] for p in g["points"]) for g in groups)


def csv_rows(response: httpx.Response) -> int:
    return response.text.count("\n") - 1


def vary(i: int, low: float, high: float) -> float:
    """A threshold that changes with every request, in [low, high)."""
    return round(low + (high - low) * ((i * 0.618034) % 1), 4)


def cases(size: str) -> list[Case]:
    def search(i: int) -> dict:
        return {"where": f"spec.dataset = '{DATASETS[i % 4]}' and spec.normalization = 'normalized' "
                         f"and result.nc1 < {vary(i, 0.3, 0.7)}", "order_by": "result.nc1", "limit": 100}

    def baseline(i: int) -> dict:
        return {"kind": "train", "normalization": "normalized", "dataset": DATASETS[i % 4], "limit": 100}

    def aggregate(i: int) -> dict:
        return {"where": "spec.dataset in ('mnist', 'fashion_mnist') and spec.normalization = 'normalized' "
                         f"and result.nc1 < {vary(i, 9, 10)}",
                "group_by": "spec.normalization,spec.logit_scale", "metrics": "nc1,test_accuracy,nc2_etf_w"}

    def curves(i: int) -> dict:
        return {"where": "tags.paper = 'fig2' and kind = 'train' and spec.normalization = 'normalized' "
                         f"and spec.dataset in ('mnist', 'fashion_mnist') and result.nc1 < {vary(i, 9, 10)}",
                "group_by": "spec.normalization,spec.logit_scale", "metric": "nc1"}

    def export(i: int) -> dict:
        return {"format": "csv"}

    large = size != "10k"
    listed = [
        Case("search: 2 spec fields + nc1 <, by nc1, top 100", "/experiments", search, items,
             Target(50) if large else Target(10, 25), compare_with="baseline"),
        Case("baseline: kind/normalization/dataset params, newest first, top 100", "/experiments", baseline, items),
        Case("aggregate: 2 group keys x 3 metrics", "/experiments/aggregate", aggregate, grouped_experiments,
             Target(150) if large else None),
        Case("curves: nc1, 6 groups x 100 steps", "/experiments/curves", curves, grouped_experiments, Target(100)),
    ]
    if not large:
        listed.append(Case("export: whole table as CSV", "/experiments", export, csv_rows, Target(1000),
                           repeats=EXPORT_REPEATS))
    return listed


@dataclass
class Timing:
    case: Case
    matches: int
    p50: float
    p95: float


def time_case(client: httpx.Client, case: Case, repeats: int) -> Timing:
    """Milliseconds to the last byte of each timed request, after the warm-ups."""
    count = min(repeats, case.repeats or repeats)
    milliseconds, matches = [], 0
    for i in range(WARMUPS + count):
        start = time.perf_counter()
        response = client.get(case.path, params=case.params(i))
        elapsed = (time.perf_counter() - start) * 1000
        if response.status_code != 200:
            raise RuntimeError(f"{case.label}: HTTP {response.status_code}: {response.text[:500]}")
        if i >= WARMUPS:
            milliseconds.append(elapsed)
        matches = case.matches(response)
    p95 = statistics.quantiles(milliseconds, n=100, method="inclusive")[94]
    return Timing(case, matches, statistics.median(milliseconds), p95)


def report(size: str, timings: list[Timing]) -> None:
    by_label = {t.case.label.split(":")[0]: t for t in timings}
    for t in timings:
        target = t.case.target
        met = "-" if target is None else ("yes" if target.met(t.p50, t.p95) else "NO")
        base = by_label.get(t.case.compare_with)
        ratio = f"{t.p50 / base.p50:.2f}x" if base else ""
        print(f"{size:>4}  {t.case.label:<68} {t.matches:>8,} {t.p50:>8.1f} {t.p95:>8.1f}  "
              f"{target or '-'!s:<18} {met:>3}  {ratio}")


def resident_mib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) // 1024


def export_memory(client: httpx.Client, pid: int) -> str:
    """Export every experiment as CSV once, sampling the API's resident memory twice a second."""
    samples, done = [resident_mib(pid)], threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            samples.append(resident_mib(pid))

    threading.Thread(target=sample, daemon=True).start()
    start, size, rows = time.perf_counter(), 0, -1  # the header is not a row
    with client.stream("GET", "/experiments", params={"format": "csv"}, timeout=3600) as response:
        for chunk in response.iter_bytes():
            size += len(chunk)
            rows += chunk.count(b"\n")
    done.set()
    return (f"export of all {rows:,} rows: {size / 1e6:.0f} MB in {time.perf_counter() - start:.1f} s; "
            f"API resident memory {samples[0]} MiB before, at most {max(samples)} MiB during")


def bench_size(args: argparse.Namespace, size: str) -> list[Timing]:
    name = f"nclab_bench_query_{size}"
    prepare(args.postgres, name, SIZES[size], args.keep)
    with api(args.postgres, name, args.broker) as (url, pid), httpx.Client(base_url=url, timeout=120) as client:
        timings = [time_case(client, case, args.repeats) for case in cases(size)]
        if args.export_memory:
            print(f"{size}: {export_memory(client, pid)}")
        return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10k,1m", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--repeats", type=int, default=50, help="timed requests per case (export: at most 10)")
    parser.add_argument("--keep", action="store_true", help="reuse filled databases and keep them at the end")
    parser.add_argument("--postgres", default="postgres@127.0.0.1:5432", help="user@host:port")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--export-memory", action="store_true",
                        help="also export each whole database as CSV once and report the API's memory")
    args = parser.parse_args()
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or args.repeats < 2:
        parser.error(f"sizes are {', '.join(SIZES)}; repeats at least 2" + (f" (got {unknown})" if unknown else ""))

    results = {}
    try:
        for size in sizes:
            results[size] = bench_size(args, size)
    finally:
        if not args.keep:
            for size in sizes:
                drop_database(args.postgres, f"nclab_bench_query_{size}")
    print(f"\n{'size':>4}  {'request':<68} {'matches':>8} {'p50 ms':>8} {'p95 ms':>8}  {'target':<18} met  ratio")
    for size, timings in results.items():
        report(size, timings)


if __name__ == "__main__":
    main()
