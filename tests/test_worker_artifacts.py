"""The worker's part of artifacts: what a job keeps as it ends, recorded with its size and sha256.

A job runs here by the worker's own task body (InProcessApi.run); its files land under
NCLAB_ARTIFACT_ROOT (the data directory's artifacts/ by default) and the listing names them.
"""

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from service.artifacts import CHECKPOINT_NAME
from tests.support import stored_dir
from worker.nc.metrics import collapse_metrics

UFM = {"kind": "ufm", "K": 4, "d": 6, "n_per_class": 3, "seed": 3}
TRAIN = {"kind": "train", "dataset": "gaussian", "K": 3, "d": 8, "epochs": 2, "batch_size": 16, "mlp_depth": 1,
         "mlp_width": 16, "gaussian_dim": 4, "gaussian_train_per_class": 40, "gaussian_test_per_class": 10,
         "save_features": True}


def _listing(client, experiment_id: str) -> dict:
    return {item["name"]: item for item in client.get(f"/experiments/{experiment_id}/artifacts").json()["items"]}


def _on_disk(experiment_id: str, name: str) -> bytes:
    return (stored_dir(experiment_id) / name).read_bytes()


def test_a_ufm_solve_keeps_its_solution_which_gives_its_metrics(api):
    client = api.client
    experiment = api.run(client.post("/experiments", json=UFM).json()["id"])
    assert experiment["status"] == "succeeded"
    listing = _listing(client, experiment["id"])
    assert list(listing) == ["solution.safetensors"]
    stored = _on_disk(experiment["id"], "solution.safetensors")
    assert listing["solution.safetensors"]["bytes"] == len(stored)
    assert listing["solution.safetensors"]["sha256"] == hashlib.sha256(stored).hexdigest()

    solution = load_file(stored_dir(experiment["id"]) / "solution.safetensors")
    assert sorted(solution) == ["H", "W", "labels"]  # no bias asked for
    assert solution["W"].shape == (4, 6) and solution["H"].shape == (12, 6) and solution["W"].dtype == torch.float64
    assert solution["labels"].tolist() == [k for k in range(4) for _ in range(3)]
    metrics = collapse_metrics(solution["H"], solution["labels"], solution["W"], None, 4, 10.0)
    assert metrics["loss"] == pytest.approx(experiment["result"]["loss"], rel=1e-12)
    assert metrics["nc1"] == pytest.approx(experiment["result"]["nc1"], abs=1e-12)


def test_a_training_run_keeps_its_weights_and_features_but_not_its_checkpoint(api):
    client = api.client
    experiment = api.run(client.post("/experiments", json=TRAIN).json()["id"])
    assert experiment["status"] == "succeeded" and experiment["resumed_from_epoch"] is None
    listing = _listing(client, experiment["id"])
    assert list(listing) == ["features.safetensors", "model.safetensors"]
    for name, item in listing.items():
        assert item["sha256"] == hashlib.sha256(_on_disk(experiment["id"], name)).hexdigest()
    assert not (stored_dir(experiment["id"]) / CHECKPOINT_NAME).exists()
    features = load_file(stored_dir(experiment["id"]) / "features.safetensors")
    assert features["train_features"].shape == (120, 8) and features["test_labels"].shape == (30,)


def test_a_failed_run_keeps_no_files(api):
    client = api.client
    hopeless = {**TRAIN, "optimizer": "adam", "lr": 100.0, "epochs": 3}  # learns nothing: Diverged
    experiment = api.run(client.post("/experiments", json=hopeless).json()["id"])
    assert experiment["status"] == "failed"
    assert _listing(client, experiment["id"]) == {}
    assert not stored_dir(experiment["id"]).exists()
