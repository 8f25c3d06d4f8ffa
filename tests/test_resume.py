"""A training run whose worker is killed mid-way resumes from its last checkpoint, bit for bit.

The run is killed (kill -9 of its pool process, then of its worker, which is started again),
re-queued by the reconciler once its heartbeat is stale, and resumed by the new worker from
the checkpoint in its experiment's directory. On a CPU every history row and the result
equal those of the same spec run without interruption, and so do the final weights.
"""

import os
import signal

import pytest

from service.artifacts import CHECKPOINT_NAME
from service.lifetime import children
from tests.support import eventually, wait_for_status

# About 0.3 s an epoch on this machine: long enough to be killed mid-way, short enough to run twice.
RESUMABLE = {"kind": "train", "dataset": "gaussian", "K": 4, "d": 16, "gaussian_dim": 32,
             "gaussian_train_per_class": 3000, "mlp_width": 128, "epochs": 10, "batch_size": 128,
             "checkpoint_every": 1, "seed": 7}


def _history(client, experiment_id: str) -> list[dict]:
    return client.get(f"/experiments/{experiment_id}/metrics").json()["items"]


@pytest.mark.slow  # two trainings, one killed and resumed after the heartbeat timeout
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(own_production):
    client, processes = own_production.client, own_production.processes
    killed = client.post("/experiments", json={"spec": RESUMABLE, "name": "killed"}).json()["id"]
    eventually(lambda: len(_history(client, killed)) >= 3, timeout=120, interval=0.05,
               message="the run never reached its third epoch")
    (pool,) = children(own_production.worker.pid)
    os.kill(pool, signal.SIGKILL)
    processes.stop(own_production.worker, signal.SIGKILL)
    seen_before_the_kill = len(_history(client, killed))
    processes.start("worker", name="worker-restarted")

    resumed = wait_for_status(client, killed, {"succeeded", "failed", "canceled"}, timeout=180)
    assert resumed["status"] == "succeeded", resumed["error"]
    assert resumed["attempts"] == 2
    # It resumed after the last checkpoint it wrote: at most one epoch (the interval) was lost.
    assert seen_before_the_kill - 1 <= resumed["resumed_from_epoch"] < RESUMABLE["epochs"]

    uninterrupted = client.post("/experiments", json={"spec": RESUMABLE, "name": "uninterrupted"}).json()["id"]
    whole = wait_for_status(client, uninterrupted, {"succeeded", "failed", "canceled"}, timeout=180)
    assert whole["status"] == "succeeded" and whole["attempts"] == 1 and whole["resumed_from_epoch"] is None

    # Every key of every history row, and of the result: equal, not close.
    assert _history(client, killed) == _history(client, uninterrupted)
    assert [row["step"] for row in _history(client, killed)] == list(range(1, RESUMABLE["epochs"] + 1))
    assert resumed["result"] == whole["result"]

    # The same final weights, byte for byte; the checkpoint is gone once the job ended.
    listings = [{a["name"]: a for a in client.get(f"/experiments/{i}/artifacts").json()["items"]}
                for i in (killed, uninterrupted)]
    assert sorted(listings[0]) == ["model.safetensors"]
    assert listings[0]["model.safetensors"]["sha256"] == listings[1]["model.safetensors"]["sha256"]
    artifact_root = processes.env["NCLAB_DATA_DIR"] + "/artifacts"
    assert not os.path.exists(f"{artifact_root}/{killed}/{CHECKPOINT_NAME}")
