"""Embedded mode: `nclab serve` with no PostgreSQL or Redis (SQLite + SQLite-backed queue)."""

from pathlib import Path

import httpx

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
    api = processes.start("api", "--host", "127.0.0.1", "--port", str(port), name="api-only")
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
