"""Queues by resource and one pool process per GPU (service/fleet.py, service/workers.py).

Jobs go to the queue their spec's `resources` names (UFM solves to cpu, training to gpu by
default); a worker serves the queues its host can; a queued job whose queue no live worker
serves says so; /metrics counts queued jobs and consumers per queue. This machine has no
GPU: the pinning is checked with a device list given by the environment.
"""

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from service import jobs, workers
from service.lifetime import children
from service.models import Experiment, WorkerPresence, utcnow
from service.schemas import QUEUES
from service.settings import Settings
from tests.conftest import fresh_redis_broker
from tests.support import ENDLESS, eventually, free_port, queued_messages, wait_for_status, wait_ready
from service.fleet import FleetError, resolve_gpus, resolve_queues

UFM = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}
TRAIN = {"kind": "train", "dataset": "gaussian", "K": 2, "d": 2, "epochs": 1, "batch_size": 4, "mlp_depth": 1,
         "mlp_width": 4, "gaussian_dim": 2, "gaussian_train_per_class": 4, "gaussian_test_per_class": 2}


def test_a_host_serves_cpu_always_and_gpu_where_cuda_is_visible():
    assert resolve_queues(None, cuda_count=0, gpus=[], allow_cpu=False) == ["cpu"]
    assert resolve_queues(None, cuda_count=2, gpus=[], allow_cpu=False) == ["cpu", "gpu"]
    assert resolve_queues("gpu", cuda_count=4, gpus=["0", "1"], allow_cpu=False) == ["gpu"]
    assert resolve_queues(" gpu , cpu,gpu", cuda_count=1, gpus=[], allow_cpu=False) == ["gpu", "cpu"]
    assert resolve_queues("cpu,gpu", cuda_count=0, gpus=[], allow_cpu=True) == ["cpu", "gpu"]


def test_a_host_without_cuda_refuses_the_gpu_queue_and_pinned_gpus_unless_allowed():
    with pytest.raises(FleetError, match="no CUDA device is visible.*--allow-cpu"):
        resolve_queues("cpu,gpu", cuda_count=0, gpus=[], allow_cpu=False)
    with pytest.raises(FleetError, match="to pin GPUs 0,1"):
        resolve_queues("cpu", cuda_count=0, gpus=["0", "1"], allow_cpu=False)
    with pytest.raises(FleetError, match="name one or more of cpu, gpu"):
        resolve_queues("cpu,tpu", cuda_count=0, gpus=[], allow_cpu=False)


def test_gpus_all_takes_the_environments_list_else_every_device(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert resolve_gpus("all", cuda_count=0) == ["3", "5"]
    assert resolve_gpus("1,0", cuda_count=0) == ["1", "0"]
    assert resolve_gpus(None, cuda_count=2) == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert resolve_gpus("all", cuda_count=2) == ["0", "1"]
    with pytest.raises(FleetError, match="no GPU is visible"):
        resolve_gpus("all", cuda_count=0)
    with pytest.raises(FleetError, match="distinct device ids"):
        resolve_gpus("0,0", cuda_count=2)


def test_the_worker_command_says_why_it_refuses_the_gpu_queue(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NCLAB_", "CUDA_"))}
    env.update(NCLAB_DATA_DIR=str(tmp_path), PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    refused = subprocess.run([sys.executable, "-m", "service.cli", "worker", "--queues", "gpu"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "asked to serve queue gpu, but no CUDA device is visible" in refused.stderr
    assert "--allow-cpu" in refused.stderr


def _metric_samples(client) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(client.get("/metrics").text) for s in family.samples}


def test_jobs_go_to_their_resources_queue_and_say_when_nobody_serves_it(api_each_db):
    client = api_each_db.client
    solve = client.post("/experiments", json=UFM).json()
    training = client.post("/experiments", json=TRAIN).json()
    on_cpu = client.post("/experiments", json={**TRAIN, "resources": "cpu"}).json()
    assert [(item["queue"], item["spec"]["resources"]) for item in (solve, training, on_cpu)] == [
        ("cpu", "cpu"), ("gpu", "gpu"), ("cpu", "cpu")]
    # No worker has announced itself: each says so, from the submit's answer on.
    assert training["waiting"] == "no worker serves queue gpu" and solve["waiting"] == "no worker serves queue cpu"
    bad = client.post("/experiments", json={**UFM, "resources": "tpu"})
    assert bad.status_code == 422 and [error["field"] for error in bad.json()["errors"]] == ["resources"]

    from service.db import get_sessionmaker

    with get_sessionmaker()() as session:
        workers.announce(session, "cpu-box", ["cpu"], processes=3, gpus=None)
        workers.announce(session, "gone", ["gpu"], processes=4, gpus=["0", "1", "2", "3"])
        session.execute(update(WorkerPresence).where(WorkerPresence.name == "gone")
                        .values(seen_at=utcnow() - timedelta(seconds=Settings().heartbeat_timeout + 1)))
        session.commit()
    # An API process reads the workers at most once a second (workers.RECENT_SECONDS).
    eventually(lambda: client.get(f"/experiments/{solve['id']}").json()["waiting"] is None, timeout=5,
               message="cpu-box serves the solve's queue, yet it still says it waits")
    assert client.get(f"/experiments/{training['id']}").json()["waiting"] == "no worker serves queue gpu"
    listed = {item["id"]: item["waiting"] for item in client.get("/experiments", params={"limit": 500}).json()["items"]}
    assert listed[training["id"]] == "no worker serves queue gpu" and listed[solve["id"]] is None

    samples = _metric_samples(client)
    queued = {queue: 0 for queue in QUEUES}
    for item in client.get("/experiments", params={"status": "queued", "limit": 500}).json()["items"]:
        queued[item["queue"]] += 1
    for queue in QUEUES:
        assert samples[("nclab_queue_depth", (("queue", queue),))] == queued[queue]
    # The stale worker's four processes count for nothing.
    assert samples[("nclab_queue_consumers", (("queue", "cpu"),))] == 3
    assert samples[("nclab_queue_consumers", (("queue", "gpu"),))] == 0
    with get_sessionmaker()() as session:
        workers.withdraw(session, "cpu-box")
        workers.withdraw(session, "gone")


def test_the_reconciler_resends_to_the_jobs_queue(api_each_db):
    from service.db import get_sessionmaker

    with get_sessionmaker()() as session:  # a slot of the gpu queue, for the scheduler to send the job to
        workers.announce(session, "gpu-box", ["gpu"], processes=1, gpus=["0"])
    training = api_each_db.client.post("/experiments", json=TRAIN).json()
    sent = []
    with get_sessionmaker()() as session:
        job = session.get(Experiment, training["id"])
        eventually(lambda: session.refresh(job) or job.sent_at, message="the dispatcher never sent it")
        # As if its message had been lost long ago (e.g. with a Redis that restarted).
        session.execute(update(Experiment).where(Experiment.id == job.id).values(
            sent_at=utcnow() - timedelta(seconds=Settings().resend_after + 1)))
        session.commit()
        jobs.reconcile(session, Settings(), lambda experiment_id, queue: sent.append((experiment_id, queue)))
        workers.withdraw(session, "gpu-box")
    assert (training["id"], "gpu") in sent


def test_messages_wait_in_their_own_queue_on_redis(pg_database, processes):
    """No worker: a solve's message waits in Redis's cpu list, a training run's in gpu (FIFO sends every job at its
    submit; the fair scheduler sends none while no worker serves the queue)."""
    broker = fresh_redis_broker()
    processes.env.update(NCLAB_DATABASE_URL=pg_database, NCLAB_BROKER_URL=broker, NCLAB_SCHEDULER="fifo")
    port = free_port()
    api = processes.start_api(port)
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, api)
    with httpx.Client(base_url=base_url, timeout=30) as client:
        solve = client.post("/experiments", json=UFM).json()["id"]
        training = client.post("/experiments", json=TRAIN).json()["id"]
    eventually(lambda: queued_messages(broker, "cpu") and queued_messages(broker, "gpu"), timeout=30,
               message="the messages never reached Redis")
    assert [experiment for _task, experiment in queued_messages(broker, "cpu")] == [solve]
    assert [experiment for _task, experiment in queued_messages(broker, "gpu")] == [training]


def _running_environments(client, ids) -> dict:
    def all_running():
        items = [client.get(f"/experiments/{experiment_id}").json() for experiment_id in ids]
        return items if all(item["status"] == "running" for item in items) else None

    return {item["id"]: item["environment"] for item in eventually(all_running, timeout=90)}


def test_one_pool_process_per_gpu_each_pinned_to_its_own(pg_database, processes):
    """CUDA_VISIBLE_DEVICES=3,5 and --gpus all: two pool processes, one sees 3, the other 5; two jobs at
    once run on different ones; a pool process killed is replaced on the same GPU."""
    processes.env.update(NCLAB_DATABASE_URL=pg_database, NCLAB_BROKER_URL=fresh_redis_broker(),
                         CUDA_VISIBLE_DEVICES="3,5")
    del processes.env["NCLAB_WORKER_QUEUES"]  # the host's defaults: --gpus with --allow-cpu serves both
    port = free_port()
    api = processes.start_api(port)
    worker = processes.start("worker", "--gpus", "all", name="worker")
    base_url = f"http://127.0.0.1:{port}"
    wait_ready(base_url, api)
    log = processes.log_dir / "worker.log"
    with httpx.Client(base_url=base_url, timeout=30) as client:
        ids = [client.post("/experiments", json={**ENDLESS, "seed": seed}).json()["id"] for seed in range(2)]
        environments = _running_environments(client, ids)
        assert sorted(environment["cuda_visible_devices"] for environment in environments.values()) == ["3", "5"]
        pool = children(worker.pid)
        assert len(pool) == 2
        samples = _metric_samples(client)
        assert samples[("nclab_queue_consumers", (("queue", "gpu"),))] == 2
        assert samples[("nclab_queue_consumers", (("queue", "cpu"),))] == 2

        # Kill the process on GPU 3: its replacement takes GPU 3 again, never 5.
        on_three = next(pid for pid in pool if f"pool process {pid} started: it ends with its worker; on GPU 3"
                        in log.read_text())
        os.kill(on_three, signal.SIGKILL)
        replacement = eventually(lambda: next(iter(children(worker.pid) - pool), None), timeout=60)
        eventually(lambda: f"pool process {replacement} started: it ends with its worker; on GPU 3"
                   in log.read_text(), timeout=60, message="the replacement did not say it runs on GPU 3")
        for experiment_id in ids:
            client.post(f"/experiments/{experiment_id}/cancel")
        for experiment_id in ids:
            wait_for_status(client, experiment_id, {"canceled"}, timeout=60)

