"""The nclab API against MLflow's tracking server, side by side, on the same data and the same clients.

    .venv/bin/python bench/api.py                  # every row, about 15 minutes with a cold cache
    .venv/bin/python bench/api.py --keep           # reuse filled databases (and keep them at the end)
    .venv/bin/python bench/api.py --rows poll8,poll32 --rounds 5 --seconds 10
    .venv/bin/python bench/api.py --check          # exit 1 when a target is missed
    .venv/bin/python bench/api.py --rows submit --api-keys file   # nclab with a lab's keys in NCLAB_API_KEYS_FILE

Needs PostgreSQL (--postgres user@host:port, allowed to create databases) and Redis
(--broker: /readyz checks it and the submit row enqueues there; the bench's own Redis
database, flushed at the end when the submit row ran). No worker: submitted experiments
stay queued.

MLflow lives in a scratch virtualenv that the bench makes on first use,
``.bench/mlflow-venv`` (gitignored; ``mlflow==MLFLOW_VERSION`` and psycopg2-binary from
PyPI, about a minute; never in .venv). Both servers start on free ports with 2 worker
processes each, their logs and data in a temporary ``.bench/api-*`` folder: ``nclab api
--workers 2`` and ``mlflow server --workers 2`` (uvicorn, MLflow's default server, with
its default security middleware and access log, like nclab's; the store URI says
postgresql+psycopg2, as SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3), each on
a PostgreSQL database of its own:

- ``nclab_bench_api``: bench/query.py's 10k fill (every experiment succeeded, with a
  complete spec and result and a 100-step history);
- ``nclab_bench_api_mlflow``: the same 10k experiments as MLflow runs (run id = the
  experiment's id without dashes) in one experiment: FINISHED, a param per spec field,
  the result's numeric keys as metrics, the tags (plus mlflow.user and mlflow.runName);
  for 1,000 of them (the history row's runs) the same 100-step history, one metric row per
  key and step (~20 keys). It is written through MLflow's own SQL store: a helper run by the
  scratch venv's python creates the schema and the experiments with SqlAlchemyStore and
  COPYs the rows into its tables (named by MLflow's ORM models), then VACUUM ANALYZE, as
  nclab's fill does; about a minute, where logging them over REST takes many.

With --keep a database is reused when it holds what the fill writes (nclab: the row
counts; MLflow: the same run ids, and the fill's completion mark) and both are left in place
at the end; by default they are dropped.

Two clients measure every load row, the same two for both servers, and the table names which
produced each figure:

- "raw asyncio", the load generator: --loadgen-processes forked processes, each
  running its share of the clients over asyncio (uvloop) on raw kept-alive HTTP/1.1
  connections (TCP_NODELAY), opened 10 ms apart (a burst of connects can all land on one
  server worker); a client sends one request, reads the whole response (unparsed), sends
  the next. What the servers can do, with as little client cost as Python allows.
- "httpx", how users call us: as many threads of the bench's own process as the row has
  clients, started 10 ms apart, each with a synchronous client of its own and its one
  kept-alive connection: service.client.Client on nclab (Client.get for the status poll,
  Client.search's first page for the filter, Client.history, Client.submit; no retries, so
  that a failure is counted), a plain httpx.Client on MLflow; every response parsed as
  JSON, an error status an error. Their figures include the Python client's own cost (and
  the GIL's, with many threads).

Each measurement warms up for 1 s, then counts --seconds seconds: req/s is completed
requests (or operations) begun in that window over its length, p50/p99 their latencies (a
client whose operation outlasts the window goes on until one begun in it has completed),
computed the same way for both clients. The scan and queries rows time one request after
another on one plain httpx.Client, so their figures are httpx's only. Each measurement
prints the CPU that the client (the generator's processes, or the bench's own for httpx),
the server's processes (and its two busiest: its workers, which show how the connections
were spread over them), PostgreSQL's and all other processes took, in % of one core, and
the machine's busy %: to tell a saturated client from a saturated server, and a busy
machine from a quiet one (rows during which other processes took over 20% of a core are
named under the table: their figures are unreliable). Before the rows, each server gets 5
unrecorded seconds of 8 clients, and one request of each kind checks that both hold the
same data.

Every row takes its measurements in turn, nclab's then MLflow's, by the raw generator then by
httpx, round after round for --rounds rounds, and reports the median of the rounds:

  poll1, poll8, poll32  status poll with 1 / 8 / 32 clients: GET /experiments/{id} of random
                        finished experiments vs GET /api/2.0/mlflow/runs/get?run_id= (req/s, p50, p99)
  filter                top 100 by two equality filters, 1 client: GET /experiments?where=spec.dataset
                        = '...' and spec.normalization = '...'&limit=100 vs POST runs/search with
                        "params.dataset = '...' and params.normalization = '...'", max_results 100
                        (the 12 combinations in turn; p50, p95)
  history               metric history of one run, all keys, 100 steps, 1 client: GET
                        /experiments/{id}/metrics vs GET metrics/get-history once per key in
                        sequence (the operation's p50), and vs one key alone
  scan                  all 10k: GET /experiments?format=csv to the last byte, and the JSON pages
                        (limit=500, next_cursor) vs runs/search pages (max_results 1000, page_token)
                        (seconds, one of each per round)
  submit                4 clients: POST /experiments {"spec": {"kind": "ufm", "K": 10, "d": 16,
                        "n_per_class": 20}} with a fresh Idempotency-Key (a uuid4) per request, as
                        Client.submit sends it, vs POST runs/create (req/s, p50, p99; MLflow has no
                        idempotency key); and nclab's without a key: the key's cost is a keyed
                        submit's time (1/req/s) over an unkeyed one's, both by the same client, one
                        right after the other in each round, the median of the rounds' ratios (and the
                        same of p50); what they created, keys included, is deleted afterwards
  queries               bench/query.py's 10k cases (the comparison issue's queries) against this
                        nclab API (--repeats timed requests each); no MLflow counterpart

--rows picks rows by name or number (1-8, in the order above), e.g. --rows 1,2,history.
--api-keys runs nclab with authentication on, every request of the bench's clients carrying
a key: ``env``, a lab of LAB_KEYS keys in NCLAB_API_KEYS; ``file``, the same keys in a file
that NCLAB_API_KEYS_FILE names (looked at once a second, service/api_keys.py); by default
``none`` (no keys, as MLflow's server runs).
The table's ratio is nclab's advantage: MLflow's time over nclab's, or nclab's req/s over
MLflow's (above 1: nclab is better), for each client. "met" judges the issue's targets on
nclab's raw asyncio figures, httpx's are reported beside them (status poll at 8 clients >= 5x
MLflow's req/s and p99 <= 25 ms; at 32 clients req/s not below 8 clients' (5% allowed for
noise) and p99 <= 100 ms; history p50 <= 2 ms; full scan <= 0.5 s (httpx); submit with a
key >= 3x MLflow's create_run; submit key cost: with a key <= 1.3x the time without; the
queries' own targets (httpx)). --check exits 1 when one is missed; by default the bench
prints and exits 0.
"""

import argparse
import asyncio
import json
import math
import multiprocessing
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
from array import array
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import orjson  # noqa: E402
import psycopg  # noqa: E402

from bench.query import (  # noqa: E402
    DATASETS, cases, database_url, drop_database, free_port, prepare, recreate_database, time_case,
    wait_ready,
)
from service.client import Client, NclabError  # noqa: E402

MLFLOW_VERSION = "3.17.2"
PSYCOPG2_VERSION = "2.9.13"
SCRATCH = ROOT / ".bench"
MLFLOW_VENV = SCRATCH / "mlflow-venv"

HOST = "127.0.0.1"
SIZE = 10_000
NCLAB_DB, MLFLOW_DB = "nclab_bench_api", "nclab_bench_api_mlflow"
EXPERIMENT, SUBMIT_EXPERIMENT = "nclab-bench", "nclab-bench-submit"
HISTORY_RUNS = 1_000  # the runs MLflow gets a history for, and the history row's runs on both sides
FILLED_TAG = "nclab.bench.filled"
WORKERS = 2
WARMUP = 1.0
CONNECT_SPACING = 0.01  # seconds between the clients' connects
OVERTIME = 300.0  # seconds past its window a client waits for its first counted operation
OTHER_LOAD = 20  # % of one core: other processes above this make a row's figures unreliable
NORMALIZATIONS = ("normalized", "regularized", "none")
SUBMISSION = {"kind": "ufm", "K": 10, "d": 16, "n_per_class": 20}
SUBMIT_BODY = {"spec": SUBMISSION}  # as service.client.Client.submit(SUBMISSION) posts it
# In a load generator's request, replaced by a fresh uuid4 each time it is sent (as Client.submit makes one).
FRESH_KEY = b"<a-fresh-uuid4-for-each-request-sent>"
KEY_COST_TARGET = 1.3  # a keyed submit's time over an unkeyed one's, at most
MLFLOW_API = "/api/2.0/mlflow"
RAW, HTTPX = "raw asyncio", "httpx"  # the two clients, as the table names them
LAB_KEYS = 50  # with --api-keys: the keys the server compares a presented one with
BENCH_KEY = "bench-key-" + "k" * 32
ROWS = ("poll1", "poll8", "poll32", "filter", "history", "scan", "submit", "queries")


# The scratch virtualenv with MLflow.

def mlflow_python() -> Path:
    """The scratch venv's interpreter, with MLflow installed on first use; never .venv."""
    python = MLFLOW_VENV / "bin" / "python"
    installed = MLFLOW_VENV / f".installed-mlflow-{MLFLOW_VERSION}"
    if not installed.exists():
        print(f"making {MLFLOW_VENV.relative_to(ROOT)} with mlflow=={MLFLOW_VERSION} (first use only)", flush=True)
        start = time.perf_counter()
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(MLFLOW_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-qq", "--disable-pip-version-check",
                        f"mlflow=={MLFLOW_VERSION}", f"psycopg2-binary=={PSYCOPG2_VERSION}"], check=True)
        installed.touch()
        print(f"made {MLFLOW_VENV.relative_to(ROOT)} in {time.perf_counter() - start:.0f} s", flush=True)
    return python


# The servers.

@dataclass
class Server:
    name: str
    url: str
    port: int
    pid: int  # the leader of its process group: the server and every process it started
    experiment: str | None = None  # MLflow's experiment of the 10k runs
    submit_experiment: str | None = None
    headers: dict[str, str] = field(default_factory=dict)  # what every request to it carries (nclab's API key)


@contextmanager
def started(argv: list[str], env: dict, cwd: Path, log: Path) -> Iterator[subprocess.Popen]:
    """A server in a process group of its own, stopped (SIGTERM, then SIGKILL) with everything it started."""
    with log.open("w") as output:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    except BaseException:
        print(f"{argv[0]}'s log ends:\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
        errors = [line for line in log.read_text(errors="replace").splitlines()
                  if "Traceback" in line or " ERROR" in line or line.startswith("ERROR")]
        if errors:
            print(f"{' '.join(argv[1:4])}: {len(errors)} error lines in its log, the first: {errors[0][:300]}",
                  file=sys.stderr)


@contextmanager
def nclab_server(postgres: str, broker: str, scratch: Path, api_keys: str = "none") -> Iterator[Server]:
    port = free_port()
    env = {**os.environ, "NCLAB_DATABASE_URL": f"postgresql+psycopg://{postgres}/{NCLAB_DB}",
           "NCLAB_BROKER_URL": broker, "NCLAB_DATA_DIR": str(scratch / "nclab-data"), "NCLAB_API_KEYS": "",
           # as bench/query.py: the reconciler runs once at start and re-sends nothing during the bench
           "NCLAB_RECONCILE_INTERVAL": "86400", "NCLAB_RESEND_AFTER": "1e9"}
    entries = [f"member{i}:key-{i:04d}-{'x' * 32}" for i in range(LAB_KEYS - 1)] + [f"bench:{BENCH_KEY}"]
    if api_keys == "env":
        env["NCLAB_API_KEYS"] = ",".join(entries)
    elif api_keys == "file":
        keys_file = scratch / "api-keys"
        keys_file.write_text("# the bench's lab\n" + "\n".join(entries) + "\n")
        env["NCLAB_API_KEYS_FILE"] = str(keys_file)
    argv = [sys.executable, "-m", "service.cli", "api", "--host", HOST, "--port", str(port),
            "--workers", str(WORKERS)]
    with started(argv, env, ROOT, scratch / "nclab-api.log") as process:
        url = f"http://{HOST}:{port}"
        wait_ready(url, process, timeout=120)
        headers = {} if api_keys == "none" else {"Authorization": f"Bearer {BENCH_KEY}"}
        yield Server("nclab", url, port, process.pid, headers=headers)


@contextmanager
def mlflow_server(postgres: str, scratch: Path) -> Iterator[Server]:
    port = free_port()
    python = mlflow_python()
    argv = [str(python.parent / "mlflow"), "server", "--backend-store-uri", mlflow_store_uri(postgres),
            "--artifacts-destination", str(scratch / "mlflow-artifacts"), "--workers", str(WORKERS),
            "--host", HOST, "--port", str(port)]
    (scratch / "mlflow").mkdir(exist_ok=True)
    with started(argv, dict(os.environ), scratch / "mlflow", scratch / "mlflow-server.log") as process:
        url = f"http://{HOST}:{port}"
        wait_http(f"{url}/health", process, timeout=180)
        # A worker's first request loads MLflow's store: seconds, and on a busy machine long enough for uvicorn's
        # 5 s health check to kill the worker (it starts another). Each worker's, on connections of their own.
        for _ in range(2 * WORKERS):
            wait_http(f"{url}{MLFLOW_API}/experiments/get-by-name?experiment_name={EXPERIMENT}", process, timeout=180)
        experiments = mlflow_experiments(postgres)
        yield Server("MLflow", url, port, process.pid, experiments[EXPERIMENT], experiments[SUBMIT_EXPERIMENT])


def wait_http(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


# The data: nclab's by bench/query.py's fill; MLflow's copied from it through MLflow's SQL store.

def mlflow_store_uri(postgres: str) -> str:
    return f"postgresql+psycopg2://{postgres}/{MLFLOW_DB}"  # SQLAlchemy 2.1 reads postgresql:// as psycopg 3


def mlflow_experiments(postgres: str) -> dict[str, str]:
    with psycopg.connect(database_url(postgres, MLFLOW_DB)) as connection:
        return {name: str(id_) for name, id_ in connection.execute("SELECT name, experiment_id FROM experiments")}


NCLAB_IDS = """SELECT count(*), md5(string_agg(replace(id, '-', ''), ',' ORDER BY replace(id, '-', '') COLLATE "C"))
               FROM experiments"""
MLFLOW_IDS = """SELECT count(*), md5(string_agg(run_uuid, ',' ORDER BY run_uuid COLLATE "C")) FROM runs
                WHERE experiment_id = (SELECT experiment_id FROM experiments WHERE name = %s)
                AND EXISTS (SELECT 1 FROM experiment_tags WHERE key = %s AND experiment_id = runs.experiment_id)"""


def mlflow_filled(postgres: str) -> bool:
    """Whether MLflow's database holds a completed fill of the runs nclab's database holds."""
    try:
        with psycopg.connect(database_url(postgres, MLFLOW_DB)) as connection:
            mlflow = connection.execute(MLFLOW_IDS, (EXPERIMENT, FILLED_TAG)).fetchone()
    except psycopg.Error:
        return False
    with psycopg.connect(database_url(postgres, NCLAB_DB)) as connection:
        return connection.execute(NCLAB_IDS).fetchone() == mlflow


def document(value) -> dict | None:
    return json.loads(value) if isinstance(value, str) else value


def history_runs(postgres: str) -> list[str]:
    """The experiments the history row reads: the first HISTORY_RUNS with a history, by id."""
    with psycopg.connect(database_url(postgres, NCLAB_DB)) as connection:
        rows = connection.execute("SELECT DISTINCT experiment_id FROM metrics ORDER BY experiment_id LIMIT %s",
                                  (HISTORY_RUNS,))
        return [row[0] for row in rows]


def millis(moment) -> int:
    return int(moment.timestamp() * 1000)


MLFLOW_STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "canceled": "KILLED", "queued": "SCHEDULED",
                 "running": "RUNNING"}


def mlflow_runs(postgres: str, path: Path) -> int:
    """nclab's experiments as MLflow runs, one JSON line each, for the fill helper."""
    with_history = set(history_runs(postgres))
    query = "SELECT id, status, spec, result, tags, owner, name, created_at, finished_at FROM experiments"
    with psycopg.connect(database_url(postgres, NCLAB_DB)) as connection, path.open("w") as out:
        histories: dict[str, list] = {}
        history = connection.execute('SELECT experiment_id, step, recorded_at, "values" FROM metrics'
                                     " WHERE experiment_id = ANY(%s) ORDER BY experiment_id, step",
                                     (list(with_history),))
        for experiment_id, step, recorded_at, values in history:
            histories.setdefault(experiment_id, []).append((step, millis(recorded_at), document(values)))
        count = 0
        for id_, status, spec, result, tags, owner, name, created_at, finished_at in connection.execute(query):
            spec, result = document(spec), document(result) or {}
            metrics = {key: float(value) for key, value in result.items()
                       if isinstance(value, int | float) and value is not None}
            out.write(json.dumps({
                "run": id_.replace("-", ""), "name": name or f"{spec['kind']}-{id_[:8]}", "user": owner,
                "status": MLFLOW_STATUS[status], "start": millis(created_at),
                "end": millis(finished_at) if finished_at else None,
                "params": {key: str(value) for key, value in spec.items() if value is not None},
                "metrics": metrics, "tags": document(tags) or {}, "history": histories.get(id_, []),
            }) + "\n")
            count += 1
    return count


# Run by the scratch venv's python: MLflow's schema and experiments by its SQL store, then the
# runs by COPY into the tables its ORM models name (tables and columns as MLflow defines them).
MLFLOW_FILL = r'''
import csv, io, json, sys
from mlflow.store.tracking.dbmodels.models import (
    SqlExperimentTag, SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag)
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

uri, path, name, submit_name, filled_tag = sys.argv[1:]
store = SqlAlchemyStore(uri, "mlflow-artifacts:/")
experiment = int(store.create_experiment(name))
store.create_experiment(submit_name)
pending = {}

def add(model, **row):
    pending.setdefault(model.__table__.name, []).append(row)

connection = store.engine.raw_connection()
cursor = connection.cursor()

def flush():
    for table, rows in pending.items():  # runs first: the others refer to them
        if rows:
            text = io.StringIO()
            csv.writer(text).writerows([list(row.values()) for row in rows])
            text.seek(0)
            cursor.copy_expert(f"COPY {table} ({', '.join(rows[0])}) FROM STDIN WITH (FORMAT csv)", text)
            rows.clear()

count = 0
for line in open(path):
    r = json.loads(line)
    run = r["run"]
    add(SqlRun, run_uuid=run, name=r["name"], source_type="LOCAL", user_id=r["user"], status=r["status"],
        start_time=r["start"], end_time=r["end"], lifecycle_stage="active",
        artifact_uri=f"mlflow-artifacts:/{experiment}/{run}/artifacts", experiment_id=experiment)
    for key, value in {**r["tags"], "mlflow.user": r["user"], "mlflow.runName": r["name"]}.items():
        add(SqlTag, key=key, value=value, run_uuid=run)
    for key, value in r["params"].items():
        add(SqlParam, key=key, value=value, run_uuid=run)
    latest = {}
    for step, timestamp, values in r["history"]:
        for key, value in values.items():
            add(SqlMetric, key=key, value=value, timestamp=timestamp, step=step, is_nan=False, run_uuid=run)
            latest[key] = (value, timestamp, step)
    final_step = r["history"][-1][0] if r["history"] else 0
    for key, value in r["metrics"].items():
        if key not in latest:
            add(SqlMetric, key=key, value=value, timestamp=r["end"] or r["start"], step=final_step, is_nan=False,
                run_uuid=run)
            latest[key] = (value, r["end"] or r["start"], final_step)
    for key, (value, timestamp, step) in latest.items():
        add(SqlLatestMetric, key=key, value=value, timestamp=timestamp, step=step, is_nan=False, run_uuid=run)
    count += 1
    if count % 1000 == 0:
        flush()
add(SqlExperimentTag, key=filled_tag, value=str(count), experiment_id=experiment)
flush()
connection.commit()
print(json.dumps({"runs": count, "experiment": experiment}))
'''


def prepare_mlflow(postgres: str, keep: bool, scratch: Path) -> None:
    if keep and mlflow_filled(postgres):
        print(f"{MLFLOW_DB}: reusing ({SIZE:,} runs)", flush=True)
        return
    start = time.perf_counter()
    recreate_database(postgres, MLFLOW_DB)
    runs = scratch / "mlflow-runs.jsonl"
    count = mlflow_runs(postgres, runs)
    exported = time.perf_counter()
    subprocess.run([str(mlflow_python()), "-c", MLFLOW_FILL, mlflow_store_uri(postgres), str(runs), EXPERIMENT,
                    SUBMIT_EXPERIMENT, FILLED_TAG], check=True, cwd=scratch, stdout=subprocess.DEVNULL)
    runs.unlink()
    with psycopg.connect(database_url(postgres, MLFLOW_DB), autocommit=True) as connection:
        connection.execute("VACUUM ANALYZE")
        metrics = connection.execute("SELECT count(*) FROM metrics").fetchone()[0]
    print(f"{MLFLOW_DB}: filled {count:,} runs and {metrics:,} metric rows through MLflow's SQL store in "
          f"{time.perf_counter() - start:.1f} s (export from nclab {exported - start:.1f} s)", flush=True)


# The load generator.

def request(server: Server, method: str, path: str, body=None, headers: dict[str, str] | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{server.port}\r\nAccept: application/json\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in {**server.headers, **(headers or {})}.items())
    if body is None:
        return f"{head}\r\n".encode()
    data = json.dumps(body).encode()
    return f"{head}Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data


async def response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, whether the server closes the connection) of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    headers = head.lower()
    closes = b"\r\nconnection: close" in headers
    at = headers.find(b"\r\ncontent-length:")
    if at >= 0:
        body = await reader.readexactly(int(headers[at + 17:headers.index(b"\r\n", at + 2)]))
    elif b"\r\ntransfer-encoding: chunked" in headers:
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            chunks.append((await reader.readexactly(size + 2))[:-2])
        await reader.readuntil(b"\r\n")  # no trailers
        body = b"".join(chunks)
    else:
        body, closes = await reader.read(), True
    return int(head[9:12]), body, closes


@dataclass
class Window:
    begin: float  # perf_counter: the clients start
    start: float  # the counted window
    end: float


@dataclass
class Tally:
    latencies: array = field(default_factory=lambda: array("d"))
    errors: int = 0
    error: str = ""
    last: float = 0.0  # seconds from the window's start to the last recorded operation's end

    def fail(self, what: str) -> None:
        self.errors += 1
        self.error = self.error or what[:300]


async def client(port: int, ops: list[tuple[bytes, ...]], first: int, delay: float, window: Window,
                 tally: Tally) -> None:
    """Operations (requests in sequence on one kept-alive connection) from ops[first] on, until the window ends;
    it connects ``delay`` seconds after the process started."""
    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    await asyncio.sleep(delay)
    reader, writer = await connect()
    await asyncio.sleep(window.begin - time.perf_counter())
    index, recorded = first, 0
    # Until the window ends, and at least one operation begun in it (slow ones can outlast a short window).
    while (began := time.perf_counter()) < window.end or (not recorded and began < window.end + OVERTIME):
        op = ops[index % len(ops)]
        index += 1
        try:
            for message in op:
                if writer is None:
                    reader, writer = await connect()
                if FRESH_KEY in message:
                    message = message.replace(FRESH_KEY, str(uuid.uuid4()).encode())
                writer.write(message)
                status, body, closes = await response(reader)
                if not 200 <= status < 300:
                    tally.fail(f"HTTP {status}: {body[:200]!r}")
                if closes:
                    writer.close()
                    writer = None
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            tally.fail(f"{type(exc).__name__}: {exc}")
            writer = None
            continue
        finished = time.perf_counter()
        if began >= window.start:
            tally.latencies.append(finished - began)
            tally.last = max(tally.last, finished - window.start)
            recorded += 1
    if writer is not None:
        writer.close()


async def generate(port: int, ops: list, delays: list[float], first: int, window: Window) -> tuple[Tally, float]:
    tally = Tally()
    cpu = []

    async def meter() -> None:
        await asyncio.sleep(window.start - time.perf_counter())
        cpu.append(time.process_time())
        await asyncio.sleep(window.end - time.perf_counter())
        cpu.append(time.process_time())

    await asyncio.gather(meter(), *(client(port, ops, first + 7919 * i, delay, window, tally)
                                    for i, delay in enumerate(delays)))
    return tally, cpu[1] - cpu[0]


def generator_process(pipe, port: int, ops: list, delays: list[float], first: int, begin: float, warmup: float,
                      seconds: float) -> None:
    """One process of the generator: a client per delay, each connecting that long after the start, all sending
    from wall-clock time ``begin`` on."""
    offset = time.perf_counter() - time.time()
    window = Window(begin + offset, begin + offset + warmup, begin + offset + warmup + seconds)
    try:
        import uvloop
        tally, cpu = uvloop.run(generate(port, ops, delays, first, window))
    except ImportError:
        tally, cpu = asyncio.run(generate(port, ops, delays, first, window))
    pipe.send((tally.latencies.tobytes(), tally.errors, tally.error, tally.last, cpu))
    pipe.close()


def cpu_ticks(*server_groups: int) -> tuple[dict[int, int], dict[int, int], int]:
    """Clock ticks of CPU so far: per process of the servers' groups, per postgres process, the machine's busy ones."""
    server, postgres = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        comm, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        ticks = int(fields[11]) + int(fields[12])
        if int(fields[2]) in server_groups:
            server[int(entry.name)] = ticks
        elif comm.startswith("postgres"):
            postgres[int(entry.name)] = ticks
    total = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return server, postgres, sum(total) - total[3] - total[4]


def cpu_spent(before: tuple, after: tuple, seconds: float) -> tuple[float, float, float]:
    """% of one core over ``seconds``: the server, postgres (processes that lived through the end), the machine."""
    server, postgres = (sum(per_process(b, a, seconds).values()) for b, a in zip(before[:2], after[:2]))
    return server, postgres, (after[2] - before[2]) / os.sysconf("SC_CLK_TCK") / seconds * 100


def per_process(before: dict[int, int], after: dict[int, int], seconds: float) -> dict[int, float]:
    hz = os.sysconf("SC_CLK_TCK")
    return {pid: (ticks - before.get(pid, 0)) / hz / seconds * 100 for pid, ticks in after.items()}


@dataclass
class Load:
    rate: float  # completed operations per second
    p50: float  # milliseconds
    p95: float
    p99: float
    errors: int
    cpu: str = ""  # client, server, postgres, other processes: % of one core; machine: % busy
    other: float = 0.0  # % of one core that other processes used meanwhile
    rounds: list["Load"] = field(default_factory=list)  # a median's: the rounds' measurements, in order


def load(server: Server, ops: list[tuple[bytes, ...]], clients: int, seconds: float, processes: int,
         required: bool = True) -> Load:
    """Run ``clients`` kept-alive clients over ``processes`` forked processes for WARMUP + seconds."""
    processes = min(processes, clients)
    context = multiprocessing.get_context("fork")
    begin = time.time() + 0.3 + CONNECT_SPACING * clients  # time to fork and connect
    first = random.randrange(len(ops))
    workers = []
    for p in range(processes):
        parent, child = context.Pipe(duplex=False)
        # Connections one at a time, CONNECT_SPACING apart over all processes, as independent clients would
        # open them: a burst of connects can land on one server worker (the first to wake accepts them all).
        delays = [c * CONNECT_SPACING for c in range(p, clients, processes)]
        process = context.Process(target=generator_process, daemon=True,
                                  args=(child, server.port, ops, delays, first + 104_729 * p, begin, WARMUP, seconds))
        process.start()
        child.close()
        workers.append((process, parent))
    time.sleep(max(0.0, begin + WARMUP - time.time()))
    before = cpu_ticks(server.pid)
    time.sleep(max(0.0, begin + WARMUP + seconds - time.time()))
    after = cpu_ticks(server.pid)
    tally, client_cpu = Tally(), 0.0
    for process, pipe in workers:
        if not pipe.poll(OVERTIME + 30):
            raise RuntimeError(f"a load generator process did not report in time ({server.name})")
        data, failed, failure, last, cpu = pipe.recv()
        process.join()
        tally.latencies.frombytes(data)
        tally.errors, tally.error = tally.errors + failed, tally.error or failure
        tally.last, client_cpu = max(tally.last, last), client_cpu + cpu
    return summary(server, tally, client_cpu, before, after, seconds, required)


def summary(server: Server, tally: Tally, client_cpu: float, before: tuple, after: tuple, seconds: float,
            required: bool) -> Load:
    """req/s, quantiles and CPU of a measurement: ``tally`` holds every client's operations begun in the window,
    ``client_cpu`` the seconds of CPU the client took in it, ``before`` and ``after`` cpu_ticks at its ends."""
    latencies, errors, error, elapsed = tally.latencies, tally.errors, tally.error, max(seconds, tally.last)
    if error:
        print(f"    {server.name}: {errors} failed requests, e.g. {error}", flush=True)
    if not latencies and required:
        raise RuntimeError(f"{server.name}: no request completed in the window")
    ordered = sorted(latencies)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else math.nan

    server_cpu, postgres_cpu, busy = cpu_spent(before, after, seconds)
    client_cpu = client_cpu / seconds * 100
    other = max(0.0, busy - server_cpu - postgres_cpu - client_cpu)
    # The server's busiest processes: its workers, which show how the kernel spread the connections.
    split = "/".join(f"{cpu:.0f}" for cpu in sorted(per_process(before[0], after[0], seconds).values(),
                                                    reverse=True)[:WORKERS])
    cpu = (f"cpu: client {client_cpu:.0f}%, server {server_cpu:.0f}% (busiest {split}), postgres {postgres_cpu:.0f}%, "
           f"other {other:.0f}%; machine {busy / os.cpu_count():.0f}% busy")
    return Load(len(ordered) / elapsed, quantile(0.5), quantile(0.95), quantile(0.99), errors, cpu, other)


def httpx_load(server: Server, make_client: Callable[[], httpx.Client | Client],
               operation: Callable[[httpx.Client | Client, int], object], count: int, clients: int,
               seconds: float, required: bool = True) -> Load:
    """The plain-client figure, how users call us: ``clients`` threads of this process, each with a client of
    its own (``make_client()``: a synchronous httpx.Client or service.client.Client, one kept-alive connection),
    calling ``operation(client, i)`` for i = its first, first + 1, ... (index into ``count`` operations) for
    WARMUP + seconds. The clients are made first (an httpx.Client loads its TLS context: milliseconds each), the
    threads start CONNECT_SPACING apart; window, req/s, quantiles and CPU as load()'s."""
    made = [make_client() for _ in range(clients)]
    start = time.perf_counter()
    begin = start + 0.1 + CONNECT_SPACING * clients
    window = Window(begin, begin + WARMUP, begin + WARMUP + seconds)
    first = random.randrange(count)
    tallies = [Tally() for _ in range(clients)]

    def run(c: int, tally: Tally) -> None:
        time.sleep(max(0.0, start + c * CONNECT_SPACING - time.perf_counter()))
        index, recorded = first + 7919 * c, 0
        with made[c] as http:
            while (began := time.perf_counter()) < window.end or (not recorded and began < window.end + OVERTIME):
                try:
                    operation(http, index % count)
                except (httpx.HTTPError, NclabError, ValueError) as exc:
                    tally.fail(f"{type(exc).__name__}: {exc}")
                    continue
                finally:
                    index += 1
                finished = time.perf_counter()
                if began >= window.start:
                    tally.latencies.append(finished - began)
                    tally.last = max(tally.last, finished - window.start)
                    recorded += 1

    threads = [threading.Thread(target=run, args=(c, tally), daemon=True) for c, tally in enumerate(tallies)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, window.start - time.perf_counter()))
    before, own = cpu_ticks(server.pid), time.process_time()
    time.sleep(max(0.0, window.end - time.perf_counter()))
    after, client_cpu = cpu_ticks(server.pid), time.process_time() - own  # every thread of this process
    for thread in threads:
        thread.join(OVERTIME + 30)
        if thread.is_alive():
            raise RuntimeError(f"an httpx client thread did not finish in time ({server.name})")
    tally = Tally()
    for each in tallies:
        tally.latencies.extend(each.latencies)
        tally.errors, tally.error, tally.last = tally.errors + each.errors, tally.error or each.error, max(
            tally.last, each.last)
    return summary(server, tally, client_cpu, before, after, seconds, required)


# The rows.

@dataclass
class Line:
    row: str
    measure: str
    nclab: float | None
    mlflow: float | None = None
    better: str = "lower"  # or "higher": which way nclab's figure is better, for the ratio
    target: str = "-"
    met: bool | None = None
    unit: str = ""
    client: str = RAW  # which client produced the figures: RAW (the load generator) or HTTPX

    def ratio(self) -> str:
        if not self.nclab or not self.mlflow:
            return "-"
        return f"{(self.mlflow / self.nclab if self.better == 'lower' else self.nclab / self.mlflow):.2f}x"


@dataclass
class Context:
    args: argparse.Namespace
    nclab: Server
    mlflow: Server
    ids: list[str]  # nclab ids of finished experiments, shuffled; MLflow's run id is the same without dashes
    history: dict[str, list[str]]  # history run -> its history keys
    lines: list[Line] = field(default_factory=list)
    rates: dict[str, dict[str, float]] = field(default_factory=dict)
    other: dict[str, float] = field(default_factory=dict)  # row -> the most CPU other processes took meanwhile


def run_id(experiment_id: str) -> str:
    return experiment_id.replace("-", "")


def median(values: list[float]) -> float:
    return statistics.median(values)


def alternate(context: Context, label: str, measures: dict[str, Callable[[], Load]]) -> dict[str, Load]:
    """Each measurement in turn (in the order given: nclab's first, then MLflow's, the raw generator's, then
    httpx's), for --rounds rounds; each figure the rounds' median."""
    results: dict[str, list[Load]] = {name: [] for name in measures}
    for round_ in range(context.args.rounds):
        for name, measure in measures.items():
            result = measure()
            results[name].append(result)
            print(f"  {label:<36} round {round_ + 1} {name:<20} {result.rate:9.1f}/s  p50 {result.p50:8.2f} ms  "
                  f"p95 {result.p95:8.2f}  p99 {result.p99:8.2f}  errors {result.errors}  {result.cpu}", flush=True)
    context.other[label] = max([context.other.get(label, 0.0), *(r.other for rs in results.values() for r in rs)])
    return {name: Load(median([r.rate for r in rs]), median([r.p50 for r in rs]), median([r.p95 for r in rs]),
                       median([r.p99 for r in rs]), sum(r.errors for r in rs), rounds=rs)
            for name, rs in results.items()}


def on(context: Context, server: Server, ops: list[tuple[bytes, ...]], clients: int) -> Callable[[], Load]:
    """A measurement of ``clients`` raw generator clients sending ``ops`` to ``server`` for --seconds."""
    return lambda: load(server, ops, clients, context.args.seconds, context.args.loadgen_processes)


def by_httpx(context: Context, server: Server, operation: Callable[[httpx.Client | Client, int], object], count: int,
             clients: int) -> Callable[[], Load]:
    """A measurement of ``clients`` plain-client threads calling ``operation`` on ``server`` for --seconds: with
    service.client.Client on nclab (it makes every request these rows make of nclab), a plain httpx.Client on
    MLflow."""
    if server.name == "nclab":
        def make_client() -> Client:
            api_key = BENCH_KEY if server.headers else None
            return Client(server.url, api_key=api_key, timeout=60, retries=0)  # no retries: a failure is counted
    else:
        def make_client() -> httpx.Client:
            return httpx.Client(base_url=server.url, timeout=60)
    return lambda: httpx_load(server, make_client, operation, count, clients, context.args.seconds)


def fetch(http: httpx.Client, method: str, path: str, **kwargs) -> object:
    """One request by a plain httpx client, as a user's script makes it: an error status raises, the body is parsed."""
    return http.request(method, path, **kwargs).raise_for_status().json()


def warm_up(context: Context) -> None:
    """Unrecorded: 8 clients on each server for 5 s, so that every worker has connected and loaded what it
    loads lazily (MLflow's first requests take seconds)."""
    args = context.args
    for server, path in ((context.nclab, "/experiments/{}"), (context.mlflow, f"{MLFLOW_API}/runs/get?run_id={{}}")):
        ops = [(request(server, "GET", path.format(id_ if server is context.nclab else run_id(id_))),)
               for id_ in context.ids[:1000]]
        result = load(server, ops, 8, 5.0, args.loadgen_processes, required=False)
        print(f"  {'warm-up':<36} {server.name:<18} {result.rate:9.1f}/s  p50 {result.p50:8.2f} ms  {result.cpu}",
              flush=True)


def check_data(context: Context) -> None:
    """One request of each kind to each server: both hold the same experiment, its history, the filter's matches."""
    id_ = next(iter(context.history))
    keys = context.history[id_]
    with httpx.Client(base_url=context.nclab.url, headers=context.nclab.headers, timeout=60) as ours, \
            httpx.Client(base_url=context.mlflow.url, timeout=60) as theirs:
        experiment = ours.get(f"/experiments/{id_}").raise_for_status().json()
        steps = ours.get(f"/experiments/{id_}/metrics").raise_for_status().json()["items"]
        run = theirs.get(f"{MLFLOW_API}/runs/get", params={"run_id": run_id(id_)}).raise_for_status().json()["run"]
        points = theirs.get(f"{MLFLOW_API}/metrics/get-history", params={"run_id": run_id(id_), "metric_key": keys[0]}
                            ).raise_for_status().json()["metrics"]
        where = {"where": "spec.dataset = 'mnist' and spec.normalization = 'normalized'", "limit": 100}
        matches = len(ours.get("/experiments", params=where).raise_for_status().json()["items"])
        search = {"experiment_ids": [context.mlflow.experiment], "max_results": 100,
                  "filter": "params.dataset = 'mnist' and params.normalization = 'normalized'"}
        found = len(theirs.post(f"{MLFLOW_API}/runs/search", json=search).raise_for_status().json().get("runs", []))
    data = run["data"]
    print(f"data: nclab {experiment['status']}, {len(experiment['spec'])} spec fields, "
          f"{len(experiment['result'] or {})} result keys, history {len(steps)} steps x {len(keys)} keys, "
          f"filter top-100 {matches}; MLflow {run['info']['status']}, {len(data.get('params', []))} params, "
          f"{len(data.get('metrics', []))} metrics, {len(data.get('tags', []))} tags, history of {keys[0]} "
          f"{len(points)} steps, filter top-100 {found}", flush=True)


def poll(context: Context, clients: int) -> None:
    row = f"status poll, {clients} client{'s' if clients > 1 else ''}"
    nclab_ops = [(request(context.nclab, "GET", f"/experiments/{id_}"),) for id_ in context.ids]
    mlflow_ops = [(request(context.mlflow, "GET", f"{MLFLOW_API}/runs/get?run_id={run_id(id_)}"),)
                  for id_ in context.ids]
    ids = context.ids
    measured = alternate(context, row, {
        "nclab": on(context, context.nclab, nclab_ops, clients),
        "MLflow": on(context, context.mlflow, mlflow_ops, clients),
        "nclab httpx": by_httpx(context, context.nclab, lambda nclab, i: nclab.get(ids[i]), len(ids), clients),
        "MLflow httpx": by_httpx(context, context.mlflow, lambda http, i: fetch(
            http, "GET", f"{MLFLOW_API}/runs/get", params={"run_id": run_id(ids[i])}), len(ids), clients)})
    targets = {8: (5.0, 25.0), 32: (None, 100.0)}
    for client, suffix in ((RAW, ""), (HTTPX, " httpx")):  # the targets judge the raw generator's figures
        ours, theirs = measured["nclab" + suffix], measured["MLflow" + suffix]
        context.rates[row + suffix] = {"nclab": ours.rate, "MLflow": theirs.rate}
        ratio_target, p99_target = targets.get(clients, (None, None)) if client == RAW else (None, None)
        rate = Line(row, "req/s", ours.rate, theirs.rate, "higher", client=client)
        if ratio_target:
            rate.target, rate.met = f">= {ratio_target:g}x MLflow", ours.rate >= ratio_target * theirs.rate
        context.lines += [rate, Line(row, "p50 ms", ours.p50, theirs.p50, client=client)]
        p99 = Line(row, "p99 ms", ours.p99, theirs.p99, client=client)
        if p99_target:
            p99.target, p99.met = f"<= {p99_target:g} ms", ours.p99 <= p99_target
        context.lines.append(p99)
        eight = context.rates.get("status poll, 8 clients" + suffix)
        if clients == 32 and eight:
            over = Line(row, "req/s over 8 clients'", ours.rate / eight["nclab"], theirs.rate / eight["MLflow"],
                        "higher", unit="x", client=client)
            if client == RAW:
                over.target, over.met = ">= 1 (0.95 for noise)", ours.rate >= 0.95 * eight["nclab"]
            context.lines.append(over)


def filtered(context: Context) -> None:
    row = "filtered top-100, 1 client"
    pairs = [(d, n) for d in DATASETS for n in NORMALIZATIONS]
    nclab_ops = [(request(context.nclab, "GET", "/experiments?" + str(httpx.QueryParams(
        {"where": f"spec.dataset = '{d}' and spec.normalization = '{n}'", "limit": 100}))),) for d, n in pairs]
    mlflow_ops = [(request(context.mlflow, "POST", f"{MLFLOW_API}/runs/search", {
        "experiment_ids": [context.mlflow.experiment], "max_results": 100,
        "filter": f"params.dataset = '{d}' and params.normalization = '{n}'"}),) for d, n in pairs]

    def top100(nclab: Client, i: int) -> list[dict]:  # the client's search, its first page: one request
        d, n = pairs[i]
        return list(islice(nclab.search(f"spec.dataset = '{d}' and spec.normalization = '{n}'", page_size=100), 100))

    def search(http: httpx.Client, i: int) -> object:
        d, n = pairs[i]
        return fetch(http, "POST", f"{MLFLOW_API}/runs/search", json={
            "experiment_ids": [context.mlflow.experiment], "max_results": 100,
            "filter": f"params.dataset = '{d}' and params.normalization = '{n}'"})

    measured = alternate(context, row, {"nclab": on(context, context.nclab, nclab_ops, 1),
                                        "MLflow": on(context, context.mlflow, mlflow_ops, 1),
                                        "nclab httpx": by_httpx(context, context.nclab, top100, len(pairs), 1),
                                        "MLflow httpx": by_httpx(context, context.mlflow, search, len(pairs), 1)})
    for client, suffix in ((RAW, ""), (HTTPX, " httpx")):
        ours, theirs = measured["nclab" + suffix], measured["MLflow" + suffix]
        context.lines += [Line(row, "p50 ms", ours.p50, theirs.p50, client=client),
                          Line(row, "p95 ms", ours.p95, theirs.p95, client=client)]


def history(context: Context) -> None:
    row = "metric history, all keys x 100 steps"
    runs = list(context.history)
    random.Random(1).shuffle(runs)
    nclab_ops = [(request(context.nclab, "GET", f"/experiments/{id_}/metrics"),) for id_ in runs]
    mlflow_all = [tuple(request(context.mlflow, "GET", f"{MLFLOW_API}/metrics/get-history?run_id={run_id(id_)}"
                                                       f"&metric_key={quote(key)}") for key in context.history[id_])
                  for id_ in runs]
    mlflow_one = [(op[i % len(op)],) for i, op in enumerate(mlflow_all)]

    def mlflow_history(http: httpx.Client, i: int, one_key: bool = False) -> list:
        keys = context.history[runs[i]]
        return [fetch(http, "GET", f"{MLFLOW_API}/metrics/get-history", params={"run_id": run_id(runs[i]),
                                                                               "metric_key": key})
                for key in ([keys[i % len(keys)]] if one_key else keys)]

    measured = alternate(context, row, {
        "nclab": on(context, context.nclab, nclab_ops, 1),
        "MLflow": on(context, context.mlflow, mlflow_all, 1),
        "MLflow 1 key": on(context, context.mlflow, mlflow_one, 1),
        "nclab httpx": by_httpx(context, context.nclab, lambda nclab, i: nclab.history(runs[i]), len(runs), 1),
        "MLflow httpx": by_httpx(context, context.mlflow, mlflow_history, len(runs), 1),
        "MLflow 1 key httpx": by_httpx(context, context.mlflow, lambda http, i: mlflow_history(http, i, True),
                                       len(runs), 1)})
    keys = median([len(keys) for keys in context.history.values()])
    for client, suffix in ((RAW, ""), (HTTPX, " httpx")):
        ours, theirs, one = measured["nclab" + suffix], measured["MLflow" + suffix], measured["MLflow 1 key" + suffix]
        p50 = Line(row, f"p50 ms (MLflow: {keys:g} requests)", ours.p50, theirs.p50, client=client)
        if client == RAW:
            p50.target, p50.met = "<= 2 ms", ours.p50 <= 2
        context.lines += [p50, Line(row, "p95 ms", ours.p95, theirs.p95, client=client),
                          Line("metric history, MLflow one key", "p50 ms", ours.p50, one.p50, client=client)]


def scan_csv(client: httpx.Client) -> tuple[float, int]:
    start, rows = time.perf_counter(), -1  # the header is not a row
    with client.stream("GET", "/experiments", params={"format": "csv"}) as answer:
        answer.raise_for_status()
        for chunk in answer.iter_bytes():
            rows += chunk.count(b"\n")
    return time.perf_counter() - start, rows


def scan_pages(client: httpx.Client) -> tuple[float, int]:
    start, rows, cursor = time.perf_counter(), 0, None
    while True:
        answer = client.get("/experiments", params={"limit": 500, **({"cursor": cursor} if cursor else {})})
        answer.raise_for_status()
        page = orjson.loads(answer.content)
        rows += len(page["items"])
        if not (cursor := page.get("next_cursor")):
            return time.perf_counter() - start, rows


def scan_mlflow(client: httpx.Client, experiment: str) -> tuple[float, int]:
    start, rows, token = time.perf_counter(), 0, None
    while True:
        body = {"experiment_ids": [experiment], "max_results": 1000, **({"page_token": token} if token else {})}
        answer = client.post(f"{MLFLOW_API}/runs/search", json=body)
        answer.raise_for_status()
        page = orjson.loads(answer.content)
        rows += len(page.get("runs", []))
        if not (token := page.get("next_page_token")):
            return time.perf_counter() - start, rows


@contextmanager
def watched(context: Context, label: str) -> Iterator[None]:
    """Records how much CPU other processes (not the servers, postgres or the bench) took during the block."""
    before, own, start = cpu_ticks(context.nclab.pid, context.mlflow.pid), time.process_time(), time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    servers, postgres, busy = cpu_spent(before, cpu_ticks(context.nclab.pid, context.mlflow.pid), seconds)
    mine = (time.process_time() - own) / seconds * 100
    context.other[label] = max(0.0, busy - servers - postgres - mine)
    print(f"  {label}: cpu: bench {mine:.0f}%, servers {servers:.0f}%, postgres {postgres:.0f}%, "
          f"other {context.other[label]:.0f}%", flush=True)


def scan(context: Context) -> None:
    row = "full scan of 10k"
    timings: dict[str, list[float]] = {"csv": [], "pages": [], "MLflow": []}
    with httpx.Client(base_url=context.nclab.url, headers=context.nclab.headers, timeout=600) as ours, \
            httpx.Client(base_url=context.mlflow.url, timeout=600) as theirs, watched(context, row):
        for round_ in range(context.args.rounds):
            for name, scanning in (("csv", lambda: scan_csv(ours)), ("pages", lambda: scan_pages(ours)),
                                   ("MLflow", lambda: scan_mlflow(theirs, context.mlflow.experiment))):
                seconds, rows = scanning()
                timings[name].append(seconds)
                warning = "" if rows == SIZE else f"  (expected {SIZE:,} rows!)"
                print(f"  {row:<36} round {round_ + 1} {name:<10} {seconds:9.3f} s  {rows:,} rows{warning}",
                      flush=True)
    mlflow = median(timings["MLflow"])
    for name, measure in (("csv", "s, CSV (streamed) vs MLflow's pages"),
                          ("pages", "s, JSON pages (500) vs MLflow's (1000)")):
        seconds = median(timings[name])
        context.lines.append(Line(row, measure, seconds, mlflow, target="<= 0.5 s", met=seconds <= 0.5,
                                  client=HTTPX))


def submit(context: Context, postgres: str) -> None:
    row, cost_row = "submit, 4 clients", "submit key cost, 4 clients"
    with psycopg.connect(database_url(postgres, NCLAB_DB)) as connection:
        since = connection.execute("SELECT now()").fetchone()[0]
    # As service.client.Client.submit sends it: the body {"spec": ...} and a fresh Idempotency-Key (a uuid4).
    keyed_ops = [(request(context.nclab, "POST", "/experiments", SUBMIT_BODY,
                          {"Idempotency-Key": FRESH_KEY.decode()}),)]
    unkeyed_ops = [(request(context.nclab, "POST", "/experiments", SUBMIT_BODY),)]
    create = {"experiment_id": context.mlflow.submit_experiment, "start_time": int(time.time() * 1000)}
    mlflow_ops = [(request(context.mlflow, "POST", f"{MLFLOW_API}/runs/create", create),)]
    try:
        measured = alternate(context, row, {
            "nclab": on(context, context.nclab, keyed_ops, 4),
            "nclab no key": on(context, context.nclab, unkeyed_ops, 4),
            "MLflow": on(context, context.mlflow, mlflow_ops, 4),
            "nclab httpx": by_httpx(context, context.nclab, lambda nclab, i: nclab.submit(SUBMISSION), 1, 4),
            # the same client's transport without the key (Client.submit always sends one)
            "nclab no key httpx": by_httpx(context, context.nclab,
                                           lambda nclab, i: nclab._post("/experiments", SUBMIT_BODY), 1, 4),
            "MLflow httpx": by_httpx(context, context.mlflow,
                                     lambda http, i: fetch(http, "POST", f"{MLFLOW_API}/runs/create", json=create),
                                     1, 4)})
    finally:
        forget_submissions(postgres, since, context.mlflow.submit_experiment)
    for client, suffix in ((RAW, ""), (HTTPX, " httpx")):
        ours, theirs, bare = measured["nclab" + suffix], measured["MLflow" + suffix], measured["nclab no key" + suffix]
        rate = Line(row, "req/s, with key (MLflow: create_run)", ours.rate, theirs.rate, "higher", client=client)
        if client == RAW:
            rate.target, rate.met = ">= 3x MLflow", ours.rate >= 3 * theirs.rate
        # Time per submit (1/req/s) with a key over without, in each round (the two measured one after the
        # other, so that a round's drift in the machine's load cancels out); the median of the rounds.
        cost = median([b.rate / k.rate if k.rate else math.inf for k, b in zip(ours.rounds, bare.rounds)])
        key_cost = Line(cost_row, "time per submit, key over none", cost, unit="x", client=client)
        if client == RAW:
            key_cost.target, key_cost.met = f"<= {KEY_COST_TARGET:g}x", cost <= KEY_COST_TARGET
        context.lines += [
            rate, Line(row, "p50 ms", ours.p50, theirs.p50, client=client),
            Line(row, "p99 ms", ours.p99, theirs.p99, client=client),
            Line(f"{row}, no key", "req/s (MLflow: create_run)", bare.rate, theirs.rate, "higher", client=client),
            Line(f"{row}, no key", "p50 ms", bare.p50, theirs.p50, client=client),
            key_cost, Line(cost_row, "p50, key over none", median([k.p50 / b.p50 for k, b in zip(
                ours.rounds, bare.rounds)]), unit="x", client=client)]


def forget_submissions(postgres: str, since, submit_experiment: str) -> None:
    """Delete what the submit row created, so that the databases hold the fill again (--keep reuses them)."""
    with psycopg.connect(database_url(postgres, NCLAB_DB)) as connection:
        experiments = connection.execute("DELETE FROM experiments WHERE created_at >= %s", (since,)).rowcount
        keys = connection.execute("DELETE FROM idempotency_keys WHERE created_at >= %s", (since,)).rowcount
        audited = 0
        if connection.execute("SELECT to_regclass('audit')").fetchone()[0] is not None:  # since migration 0006
            audited = connection.execute("DELETE FROM audit WHERE at >= %s", (since,)).rowcount
    print(f"  deleted the {experiments:,} experiments, {keys:,} idempotency keys and {audited:,} audit rows "
          "the submits created", flush=True)
    with psycopg.connect(database_url(postgres, MLFLOW_DB)) as connection:
        runs = "SELECT run_uuid FROM runs WHERE experiment_id = %s"
        for table in ("tags", "params", "latest_metrics", "metrics"):
            connection.execute(f"DELETE FROM {table} WHERE run_uuid IN ({runs})", (int(submit_experiment),))
        connection.execute("DELETE FROM runs WHERE experiment_id = %s", (int(submit_experiment),))


def queries(context: Context) -> None:
    """bench/query.py's 10k cases against this bench's nclab API, with their own targets."""
    with httpx.Client(base_url=context.nclab.url, headers=context.nclab.headers, timeout=120) as client, \
            watched(context, "queries"):
        timings = [time_case(client, case, context.args.repeats) for case in cases("10k")]
    by_label = {t.case.label.split(":")[0]: t for t in timings}
    for t in timings:
        target, base = t.case.target, by_label.get(t.case.compare_with)
        label = t.case.label.split(":")[0]
        print(f"  {'queries: ' + label:<36} p50 {t.p50:8.2f} ms  p95 {t.p95:8.2f}  matches {t.matches:,}", flush=True)
        context.lines += [Line(f"query: {t.case.label}", "p50 ms", t.p50, target=str(target) if target else "-",
                               met=target.met(t.p50, t.p95) if target else None, client=HTTPX),
                          Line(f"query: {label}", "p95 ms", t.p95, client=HTTPX)]
        if base:
            context.lines.append(Line(f"query: {label}", f"p50 over {t.case.compare_with}'s", t.p50 / base.p50,
                                      unit="x", client=HTTPX))


# The table.

def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}" if value < 10 else f"{value:.1f}"


def table(lines: list[Line]) -> None:
    rows, measures = (min(64, max([len(getattr(line, name)) for line in lines] + [5])) for name in ("row", "measure"))
    header = (f"{'row':<{rows}}  {'measure':<{measures}} {'client':<11} {'nclab':>9} {'MLflow':>9} {'ratio':>8}  "
              f"{'target':<22} met")
    print(f"\n{header}\n{'-' * len(header)}")
    for line in lines:
        met = "-" if line.met is None else ("yes" if line.met else "NO")
        ratio = "-" if line.unit == "x" else line.ratio()
        print(f"{line.row[:rows]:<{rows}}  {line.measure[:measures]:<{measures}} {line.client:<11} "
              f"{number(line.nclab, line.unit):>9} "
              f"{number(line.mlflow, line.unit):>9} {ratio:>8}  {line.target:<22} {met}")


def chosen_rows(text: str) -> list[str]:
    rows = []
    for item in (part.strip().lower() for part in text.split(",") if part.strip()):
        name = ROWS[int(item) - 1] if item.isdigit() and 1 <= int(item) <= len(ROWS) else item
        if name not in ROWS:
            raise ValueError(f"unknown row {item!r}: rows are {', '.join(ROWS)} (or 1-{len(ROWS)})")
        rows.append(name)
    return [row for row in ROWS if row in rows]  # in the table's order; submit runs after the reads


def ids_and_history(postgres: str) -> tuple[list[str], dict[str, list[str]]]:
    with psycopg.connect(database_url(postgres, NCLAB_DB)) as connection:
        ids = [row[0] for row in connection.execute("SELECT id FROM experiments WHERE status = 'succeeded'")]
        runs = history_runs(postgres)
        first = connection.execute('SELECT experiment_id, "values" FROM metrics WHERE step = 0'
                                   " AND experiment_id = ANY(%s)", (runs,))
        keys = {experiment_id: sorted(document(values)) for experiment_id, values in first}
    random.Random(0).shuffle(ids)
    return ids, keys


def flush_broker(broker: str) -> None:
    import redis

    redis.Redis.from_url(broker).flushdb()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgres@127.0.0.1:5432", help="user@host:port")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/13",
                        help="the bench's own Redis database (flushed at the end when the submit row ran)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per row; figures are their median")
    parser.add_argument("--seconds", type=float, default=5.0, help="counted seconds of each measurement")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)} or 1-8")
    parser.add_argument("--repeats", type=int, default=50, help="timed requests per case of the queries row")
    parser.add_argument("--loadgen-processes", type=int, default=2, help="processes of the load generator")
    parser.add_argument("--keep", action="store_true", help="reuse filled databases and keep them at the end")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--api-keys", choices=("none", "env", "file"), default="none",
                        help="nclab's keys: none, a lab's in NCLAB_API_KEYS, or the same in NCLAB_API_KEYS_FILE")
    args = parser.parse_args()
    try:
        rows = chosen_rows(args.rows)
    except ValueError as exc:
        parser.error(str(exc))
    if args.rounds < 1 or args.seconds <= 0 or args.repeats < 2 or args.loadgen_processes < 1:
        parser.error("rounds and loadgen processes at least 1, seconds above 0, repeats at least 2")

    started_at = time.perf_counter()
    python = mlflow_python()
    version = subprocess.run([str(python), "-c", "import mlflow; print(mlflow.__version__)"], check=True,
                             capture_output=True, text=True).stdout.strip()
    print(f"MLflow {version} ({python.relative_to(ROOT)}); rows: {', '.join(rows)}; {args.rounds} rounds of "
          f"{args.seconds:g} s; load generator: {args.loadgen_processes} processes", flush=True)
    lines: list[Line] = []
    other: dict[str, float] = {}
    SCRATCH.mkdir(exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="api-", dir=SCRATCH) as directory, ExitStack() as stack:
            scratch = Path(directory)
            prepare(args.postgres, NCLAB_DB, SIZE, args.keep)
            prepare_mlflow(args.postgres, args.keep, scratch)
            nclab = stack.enter_context(nclab_server(args.postgres, args.broker, scratch, args.api_keys))
            mlflow = stack.enter_context(mlflow_server(args.postgres, scratch))
            ids, keys = ids_and_history(args.postgres)
            context = Context(args, nclab, mlflow, ids, keys, lines, other=other)
            print(f"nclab {nclab.url} (pid {nclab.pid}), MLflow {mlflow.url} (pid {mlflow.pid})", flush=True)
            check_data(context)
            warm_up(context)
            for row in rows:
                print(f"{row}:", flush=True)
                if row.startswith("poll"):
                    poll(context, int(row.removeprefix("poll")))
                else:
                    {"filter": filtered, "history": history, "scan": scan, "queries": queries,
                     "submit": lambda c: submit(c, args.postgres)}[row](context)
    finally:
        if "submit" in rows:
            flush_broker(args.broker)
        if not args.keep:
            for name in (NCLAB_DB, MLFLOW_DB):
                drop_database(args.postgres, name)
    table(lines)
    busy = [f"{row} ({cpu:.0f}%)" for row, cpu in other.items() if cpu > OTHER_LOAD]
    if busy:
        print(f"\nother processes took more than {OTHER_LOAD}% of a core during: {', '.join(busy)}; "
              "those figures are unreliable (a quiet machine gives the comparable ones)")
    missed = [line for line in lines if line.met is False]
    print(f"\n{sum(line.met is True for line in lines)} targets met, {len(missed)} missed; "
          f"bench took {time.perf_counter() - started_at:.0f} s")
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
