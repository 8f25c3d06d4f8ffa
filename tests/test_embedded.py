"""Embedded mode: `nclab serve` with no PostgreSQL or Redis (SQLite + SQLite-backed queue)."""

import multiprocessing
import os
import sqlite3
from pathlib import Path
from queue import Empty

import httpx
import pytest

from tests.support import eventually, free_port, wait_for_status, wait_ready

SPEC = {"kind": "ufm", "K": 10, "d": 16, "n_per_class": 20, "normalization": "normalized", "logit_scale": 10,
        "seed": 0}


def start_serve(processes, port: int, name: str):
    process = processes.start("serve", "--port", str(port), name=name)
    wait_ready(f"http://127.0.0.1:{port}", process)
    return process


def processes_with_data_dir(data_dir: str) -> list[int]:
    """PIDs of live processes whose environment names this NCLAB_DATA_DIR (Linux /proc)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"NCLAB_DATA_DIR={data_dir}".encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


def test_serve_runs_an_experiment_to_a_collapsed_result_and_stops_its_worker(processes):
    port = free_port()
    serve = start_serve(processes, port, "serve")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        created = client.post("/experiments", json=SPEC).json()
        done = wait_for_status(client, created["id"], {"succeeded", "failed"}, timeout=120)
        assert done["status"] == "succeeded", done["error"]
        assert done["result"]["optimality_gap"] < 1e-8
        assert done["result"]["nc2_etf_w"] < 1e-6
        assert len(client.get(f"/experiments/{created['id']}/metrics").json()["items"]) > 2

    data_dir = processes.env["NCLAB_DATA_DIR"]
    assert len(processes_with_data_dir(data_dir)) >= 3  # serve, the Celery worker and its pool process
    processes.stop(serve)  # SIGTERM, as a service manager would
    eventually(lambda: not processes_with_data_dir(data_dir),
               message=lambda: f"left running: {processes_with_data_dir(data_dir)}")
    log = (processes.log_dir / "serve.log").read_text()
    assert "ERROR" not in log and "Traceback" not in log
    # Idle: stopped outright, no warm shutdown to wait for (Celery would say "Warm shutdown").
    assert "shutdown (MainProcess)" not in log, log[-2000:]


def test_a_job_queued_while_no_worker_runs_completes_after_serve_restarts(processes):
    port = free_port()
    # The API alone, on the embedded database and queue: nothing consumes.
    api = processes.start_api(port, "--host", "127.0.0.1", name="api-only")
    wait_ready(f"http://127.0.0.1:{port}", api)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        created = client.post("/experiments", json=SPEC).json()
        # No worker, no slot: the fair scheduler keeps the job in the database, unsent, until one comes.
        assert created["waiting"] == "no worker serves queue cpu"
        assert client.get(f"/experiments/{created['id']}").json()["status"] == "queued"
    processes.stop(api)

    start_serve(processes, port, "serve-after-restart")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        done = wait_for_status(client, created["id"], {"succeeded", "failed"}, timeout=120)
        assert done["status"] == "succeeded", done["error"]


def declare_every_queue(data_dir: str, together, outcomes) -> None:
    """In a process of its own: the first use of the embedded queue in `data_dir`, as the worker's consumer or
    the API's first send makes it, at the moment the other process makes its own."""
    os.environ["NCLAB_DATA_DIR"] = data_dir
    os.environ.pop("NCLAB_BROKER_URL", None)
    from service.queue import make_celery_app
    from service.schemas import QUEUES
    from service.settings import get_settings

    get_settings.cache_clear()
    with make_celery_app().connection_for_write() as connection:
        channel = connection.default_channel
        together.wait()
        try:
            for queue in QUEUES:
                channel.queue_declare(queue=queue)
            outcomes.put("declared")
        except Exception as error:
            outcomes.put(f"{type(error).__name__}: {error}")


@pytest.mark.stack
def test_two_processes_first_using_the_embedded_queue_at_once_both_go_on(tmp_path):
    """The race that once killed `nclab serve`'s worker: the worker starting while the API sends the first
    submit, each creating the queue's tables and rows. Without EmbeddedChannel, 9 of 10 such rounds failed
    ("table kombu_queue already exists"), and where the tables existed, some still did (a UNIQUE constraint
    on kombu_queue.name)."""
    from service.schemas import QUEUES

    context = multiprocessing.get_context("fork")
    for round_ in range(6):
        data_dir = tmp_path / str(round_)
        data_dir.mkdir()
        together, outcomes = context.Barrier(2), context.Queue()
        processes = [
            context.Process(target=declare_every_queue, args=(str(data_dir), together, outcomes)) for _ in range(2)
        ]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=60)
        assert [outcomes.get(timeout=5) for _ in processes] == ["declared", "declared"]
        with sqlite3.connect(data_dir / "queue.sqlite") as queue_file:
            names = sorted(name for (name,) in queue_file.execute("SELECT name FROM kombu_queue"))
        assert names == sorted(QUEUES)


def test_an_idle_queue_is_polled_without_a_query_and_a_message_sent_meanwhile_is_taken_at_once(tmp_path):
    """The worker polls each queue ten times a second: while the file is unchanged, a poll of a queue found
    empty asks SQLite's data_version, not the tables. A message another connection commits is taken by the
    next poll."""
    from kombu import Connection
    from sqlalchemy import event

    from service.queue import EmbeddedQueue

    url = f"sqlite:///{tmp_path / 'queue.sqlite'}"
    with Connection(url, transport=EmbeddedQueue) as worker_side, Connection(url, transport=EmbeddedQueue) as api_side:
        polls, sends = worker_side.default_channel, api_side.default_channel
        for queue in ("cpu", "gpu"):
            polls.queue_declare(queue=queue)  # as the worker does as it starts
        statements = []
        event.listen(polls.session.bind, "before_cursor_execute", lambda *args: statements.append(args[2]))
        with pytest.raises(Empty):
            polls._get("cpu")
        assert any("kombu_message" in statement for statement in statements)  # the first poll looks
        looked = len(statements)
        for _ in range(20):
            with pytest.raises(Empty):
                polls._get("cpu")
        assert len(statements) == looked

        sends._put("cpu", {"body": "the job"})
        assert polls._get("cpu") == {"body": "the job"}
        with pytest.raises(Empty):  # taking it was a commit too: the next poll looks, and finds nothing
            polls._get("cpu")
        with pytest.raises(Empty):
            polls._get("gpu")  # another queue of the same file is looked at on its own
        looked = len(statements)
        with pytest.raises(Empty):
            polls._get("cpu")
        assert len(statements) == looked
