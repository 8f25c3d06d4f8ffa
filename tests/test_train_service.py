"""`kind: "train"` through the HTTP API with a real worker (PostgreSQL, Redis, Celery); its
validation in-process, on SQLite and on PostgreSQL."""

import pytest

from tests.support import eventually, wait_for_status

DIGITS_MLP = {"kind": "train", "dataset": "digits", "architecture": "mlp", "d": 64, "mlp_width": 128,
              "mlp_depth": 2, "epochs": 6, "batch_size": 64, "lr": 0.05, "lr_schedule": "constant", "seed": 0}
PROBLEM_JSON = "application/problem+json"


def submit(client, spec: dict) -> dict:
    response = client.post("/experiments", json=spec)
    assert response.status_code == 202, response.text
    return response.json()


def test_a_digits_run_succeeds_with_a_per_epoch_history_whose_nc1_decreases(production):
    client = production.client
    created = submit(client, DIGITS_MLP)
    done = wait_for_status(client, created["id"], {"succeeded", "failed"}, timeout=240)
    assert done["status"] == "succeeded", done["error"]

    history = client.get(f"/experiments/{created['id']}/metrics").json()["items"]
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5, 6]
    nc1 = [row["nc1"] for row in history]
    assert nc1[-1] < 0.5 * nc1[0], nc1
    assert history[-1]["train_accuracy"] > 0.9 and history[-1]["test_accuracy"] > 0.8
    for key in ("nc2_etf_m", "nc2_etf_w", "nc3_etf", "nc4", "test_loss", "loss", "accuracy"):
        assert key in history[-1], key
    assert done["result"]["nc1"] == pytest.approx(history[-1]["nc1"])

    listed = client.get("/experiments", params={"kind": "train", "dataset": "digits", "architecture": "mlp"})
    assert created["id"] in [item["id"] for item in listed.json()["items"]]


def test_missing_data_files_are_a_422_naming_them_at_submit_time(api_each_db):
    response = api_each_db.client.post("/experiments", json={"kind": "train", "dataset": "cifar10"})
    assert response.status_code == 422 and response.headers["content-type"] == PROBLEM_JSON
    detail = response.json()["detail"]
    assert detail.startswith("dataset: files missing")
    assert "cifar-10-batches-py/data_batch_1" in detail and "cifar-10-batches-py/test_batch" in detail
    assert "cifar-10-python.tar.gz" in detail


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"dataset": "digits", "K": 11}, "K"),
        ({"dataset": "digits", "n_per_class": 500}, "n_per_class"),
        ({"dataset": "gaussian"}, "K"),
        ({"dataset": "gaussian", "K": 4, "architecture": "resnet18"}, "architecture"),
        ({"dataset": "digits", "normalization": "none", "weight_decay": 1e-3}, "weight_decay"),
        ({"dataset": "digits", "feature_decay": 1e-3}, "feature_decay"),
        ({"dataset": "digits", "optimizer": "adam", "momentum": 0.5}, "momentum"),
        ({"dataset": "digits", "architecture": "vgg11", "mlp_width": 64}, "mlp_width"),
        ({"dataset": "digits", "gaussian_dim": 8}, "gaussian_dim"),
        ({"dataset": "digits", "epochs": 0}, "epochs"),
        ({"dataset": "digits", "lr": 0}, "lr"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"dataset": "digits", "architecture": "resnet34"}, "architecture"),
        ({"dataset": "digits", "lr_schedule": "warmup"}, "lr_schedule"),
        ({"dataset": "digits", "loss": "mse", "label_smoothing": 0.1}, "label_smoothing"),
        ({"dataset": "digits", "loss": "label_smoothing"}, "label_smoothing"),
        ({"dataset": "digits", "metrics_layers": ["layer4"]}, "metrics_layers"),  # mlp_depth 3
        ({"dataset": "digits", "architecture": "vgg11", "metrics_layers": ["stage1"]}, "metrics_layers"),
    ],
)
def test_invalid_train_specs_are_422_naming_the_field(api_each_db, spec, field):
    response = api_each_db.client.post("/experiments", json={"kind": "train", **spec})
    assert response.status_code == 422, response.text
    assert [error["field"] for error in response.json()["errors"]] == [field]


def test_a_diverging_run_fails_with_a_readable_reason(production):
    client = production.client
    # Decay times step size far above 2: the weights oscillate with growing amplitude until NaN.
    spec = {**DIGITS_MLP, "normalization": "regularized", "lr": 100.0, "weight_decay": 1.0, "feature_decay": 10.0,
            "epochs": 3}
    done = wait_for_status(client, submit(client, spec)["id"], {"succeeded", "failed"}, timeout=120)
    assert done["status"] == "failed"
    assert done["error"].startswith("diverged: loss became")


def test_cancel_mid_training(production):
    client = production.client
    spec = {"kind": "train", "dataset": "gaussian", "K": 10, "gaussian_train_per_class": 2000, "d": 256,
            "mlp_width": 256, "epochs": 500, "batch_size": 32}
    created = submit(client, spec)
    wait_for_status(client, created["id"], {"running"}, timeout=60)
    eventually(lambda: client.get(f"/experiments/{created['id']}").json()["progress"] > 0, timeout=60,
               interval=0.2, message="no progress reported")
    assert client.post(f"/experiments/{created['id']}/cancel").status_code == 202
    # Mid-training: 500 epochs would take many minutes; it ends canceled, far short of them.
    done = wait_for_status(client, created["id"], {"canceled", "failed", "succeeded"}, timeout=60)
    assert done["status"] == "canceled" and done["progress"] < 0.5
