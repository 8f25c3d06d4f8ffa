"""Checkpoints and outputs of the training engine (worker/nc/checkpoint.py, train()'s
checkpoint_path and outputs): a run interrupted and resumed emits, bit for bit, what an
uninterrupted run emits; the files kept reproduce the run's figures."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from worker.nc.checkpoint import saved_epoch
from worker.nc.data import load_dataset
from worker.nc.metrics import collapse_metrics
from worker.nc.models import build_model
from worker.nc.train import FEATURES_FILE, MODEL_FILE, TrainConfig, batches, evaluate, train
from worker.nc.ufm import Stopped

# Small digits runs (4 classes, ~570 training samples): fast, and long enough for the
# step schedule to change the rate twice.
SMALL = {"dataset": "digits", "architecture": "mlp", "normalization": "normalized", "num_classes": 4,
         "dim": 16, "mlp_width": 64, "epochs": 6, "batch_size": 64, "lr_schedule": "step"}
# ResNet18 with its BatchNorm buffers, narrow enough for a test (digits are 8x8 images).
RESNET = {**SMALL, "architecture": "resnet18", "resnet18_width": 4, "n_per_class": 40, "epochs": 3,
          "batch_size": 32, "test_n_per_class": None}


class Interrupted(Exception):
    """What a test raises from on_epoch to stand for a worker lost mid-run."""


def config_of(**overrides) -> TrainConfig:
    return TrainConfig(**{**SMALL, **overrides})


def run(config: TrainConfig, **kwargs) -> tuple[list[tuple[int, dict]], dict]:
    """The rows train() emits, as (epoch, row), and its result."""
    rows: list[tuple[int, dict]] = []
    result = train(config, "/unused", on_epoch=lambda epoch, row: rows.append((epoch, dict(row))), **kwargs)
    return rows, result


def batches_per_epoch(config: TrainConfig) -> int:
    data = load_dataset(config.dataset, "/unused", config.num_classes, config.n_per_class)
    return len(batches(torch.arange(len(data.train_y)), config.batch_size))


def stop_at_epoch(epoch: int, config: TrainConfig):
    """A should_stop that asks to stop at the first batch of `epoch`."""
    polls = []
    return lambda: polls.append(1) or len(polls) == (epoch - 1) * batches_per_epoch(config) + 1


def interrupt_at(epoch: int):
    """An on_epoch that raises Interrupted once the row of `epoch` is given."""
    def on_epoch(emitted: int, row: dict) -> None:
        if emitted == epoch:
            raise Interrupted

    return on_epoch


# Resume


@pytest.mark.parametrize("optimizer,normalization,lr", [
    ("sgd", "normalized", 0.05), ("sgd", "regularized", 0.05),
    ("adam", "normalized", 0.01), ("adam", "regularized", 0.01),
])
def test_a_stopped_run_resumes_bit_for_bit(tmp_path, optimizer, normalization, lr):
    """Stopped after epoch 2 (in epoch 3), then resumed by a fresh train(): rows 3..6 and
    the result are those of the uninterrupted run, and so is the progress reported."""
    config = config_of(optimizer=optimizer, normalization=normalization, lr=lr, momentum=0.9)
    progress: list[float] = []
    expected_rows, expected = run(config, on_progress=progress.append)
    checkpoint = tmp_path / "checkpoint.safetensors"

    with pytest.raises(Stopped, match="stopped at epoch 3, batch 1"):
        run(config, checkpoint_path=checkpoint, should_stop=stop_at_epoch(3, config))
    assert saved_epoch(checkpoint) == 2
    resumed_progress: list[float] = []
    rows, result = run(config, checkpoint_path=checkpoint, on_progress=resumed_progress.append)

    assert rows == expected_rows[2:]
    assert [epoch for epoch, _ in rows] == [3, 4, 5, 6]
    assert result == expected
    assert resumed_progress == progress[progress.index(2 / 6):]
    assert saved_epoch(checkpoint) == 6  # left for the caller to remove
    # The rate changed twice and the run learned: the rows compared are not all alike.
    assert len({row["lr"] for _, row in expected_rows}) == 3
    assert expected_rows[-1][1]["train_loss"] < expected_rows[0][1]["train_loss"]


def test_resume_goes_back_to_the_last_checkpoint_and_emits_the_epochs_after_it(tmp_path):
    """checkpoint_every 2, interrupted as epoch 5's row is given: epochs 5 and 6 again."""
    config = config_of(checkpoint_every=2, metrics_every=2)
    expected_rows, expected = run(config)
    checkpoint = tmp_path / "checkpoint.safetensors"
    saved = []

    def on_epoch(epoch, row):
        saved.append(saved_epoch(checkpoint))  # before this epoch's checkpoint, if any
        interrupt_at(5)(epoch, row)

    with pytest.raises(Interrupted):
        train(config, "/unused", checkpoint_path=checkpoint, on_epoch=on_epoch)
    assert saved == [None, None, 2, 2, 4]
    assert saved_epoch(checkpoint) == 4
    rows, result = run(config, checkpoint_path=checkpoint)
    assert [epoch for epoch, _ in rows] == [5, 6]
    assert rows == expected_rows[4:]
    assert result == expected


def test_the_last_epoch_is_always_saved_and_a_finished_run_returns_without_training(tmp_path):
    config = config_of(epochs=5, checkpoint_every=2, metrics_at_start=True)
    expected_rows, expected = run(config)
    checkpoint = tmp_path / "run" / "checkpoint.safetensors"  # its directory is made
    assert run(config, checkpoint_path=checkpoint) == (expected_rows, expected)
    assert saved_epoch(checkpoint) == 5

    def must_not_train():
        raise AssertionError("polled: the run trained again")

    progress: list[float] = []
    rows, result = run(config, checkpoint_path=checkpoint, should_stop=must_not_train, on_progress=progress.append)
    assert rows == []  # no epoch-0 row either
    assert result == expected and progress == [1.0]


def test_resnet18_resumes_bit_for_bit_with_its_batchnorm_buffers(tmp_path):
    config = TrainConfig(**RESNET)
    expected_rows, expected = run(config)
    checkpoint = tmp_path / "checkpoint.safetensors"
    with pytest.raises(Interrupted):
        train(config, "/unused", checkpoint_path=checkpoint, on_epoch=interrupt_at(3))
    tensors = load_file(checkpoint)
    assert tensors["model.backbone.3.bn1.num_batches_tracked"].item() > 0
    assert not torch.equal(tensors["model.backbone.3.bn1.running_var"], torch.ones(4))
    rows, result = run(config, checkpoint_path=checkpoint)
    assert rows == expected_rows[2:] and result == expected


def test_the_checkpoint_file_holds_the_whole_state_and_no_pickle(tmp_path):
    checkpoint = tmp_path / "checkpoint.safetensors"
    config = config_of(optimizer="adam", lr=0.01, epochs=2)
    rows, _ = run(config, checkpoint_path=checkpoint)
    assert checkpoint.read_bytes()[8:9] == b"{"  # an 8-byte header length, then JSON: safetensors
    tensors = load_file(checkpoint)
    model_names = {name for name in tensors if name.startswith("model.")}
    assert "model.classifier.weight" in model_names and "model.backbone.2.running_mean" in model_names
    parameters = len(list(build_model("mlp", 1, 8, 4, 16, "normalized", 10.0, 3, 64).parameters()))
    assert {name.split(".", 2)[2] for name in tensors if name.startswith("optimizer.")} == {
        "step", "exp_avg", "exp_avg_sq"}
    assert len([name for name in tensors if name.endswith(".exp_avg")]) == parameters
    assert tensors["optimizer.0.step"].item() == 2 * batches_per_epoch(config)  # two epochs of Adam steps
    for name in ("rng.data_order", "rng.cpu"):
        assert tensors[name].dtype == torch.uint8
    with safe_open(checkpoint, framework="pt") as file:
        metadata = file.metadata()
    assert metadata["epoch"] == "2"
    assert json.loads(metadata["row"]) == rows[-1][1]
    assert [group["weight_decay"] for group in json.loads(metadata["param_groups"])] == [5e-4, 0.0]
    assert json.loads(metadata["config"])["optimizer"] == "adam"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.safetensors"]  # no temporary left


@pytest.mark.parametrize("content", [b"", b"not a safetensors file", "truncated"])
def test_an_unreadable_checkpoint_counts_as_none_and_is_removed(tmp_path, content):
    config = config_of(epochs=2)
    expected_rows, expected = run(config)
    checkpoint = tmp_path / "checkpoint.safetensors"
    if content == "truncated":
        run(config, checkpoint_path=checkpoint)
        content = checkpoint.read_bytes()[:-100]
    checkpoint.write_bytes(content)
    assert saved_epoch(checkpoint) is None
    assert not checkpoint.exists()
    assert saved_epoch(tmp_path / "nothing.safetensors") is None

    checkpoint.write_bytes(content)
    assert run(config, checkpoint_path=checkpoint) == (expected_rows, expected)  # afresh


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoint.safetensors"
    with pytest.raises(Interrupted):
        train(config_of(), "/unused", checkpoint_path=checkpoint, on_epoch=interrupt_at(2))
    with pytest.raises(ValueError, match="another configuration"):
        train(config_of(lr=0.1), "/unused", checkpoint_path=checkpoint)
    assert saved_epoch(checkpoint) == 1


def test_checkpoint_every_must_be_positive():
    with pytest.raises(ValueError, match="checkpoint_every"):
        config_of(checkpoint_every=0)


# Outputs


@pytest.mark.parametrize("settings", [SMALL, RESNET], ids=["mlp", "resnet18"])
def test_the_kept_model_and_features_reproduce_the_result(tmp_path, settings):
    config = TrainConfig(**{**settings, "save_features": True})
    result = train(config, "/unused", outputs=tmp_path / "outputs")
    assert sorted(path.name for path in (tmp_path / "outputs").iterdir()) == [FEATURES_FILE, MODEL_FILE]

    # The model, loaded into a freshly built one, gives the result's figures exactly.
    data = load_dataset(config.dataset, "/unused", config.num_classes, config.n_per_class)
    model = build_model(config.architecture, data.channels, data.image_size, config.num_classes, config.dim,
                        config.normalization, config.logit_scale, config.mlp_depth, config.mlp_width,
                        config.resnet18_width)
    model.load_state_dict(load_file(tmp_path / "outputs" / MODEL_FILE))
    row = evaluate(model, data.train_x, data.train_y, data.test_x, data.test_y, config.num_classes)
    assert row["accuracy"] == result["accuracy"] and row["test_accuracy"] == result["test_accuracy"]
    assert row == {key: result[key] for key in row}

    # The features, through collapse_metrics, give the result's catalogue exactly.
    features = load_file(tmp_path / "outputs" / FEATURES_FILE)
    assert features["train_features"].dtype == torch.float32 and features["train_labels"].dtype == torch.int64
    assert torch.equal(features["train_labels"], data.train_y) and torch.equal(features["test_labels"], data.test_y)
    weight, bias, scale = model.effective_classifier()
    train_metrics = collapse_metrics(features["train_features"], features["train_labels"], weight, bias,
                                     config.num_classes, scale)
    test_metrics = collapse_metrics(features["test_features"], features["test_labels"], weight, bias,
                                    config.num_classes, scale)
    assert train_metrics["nc1"] == result["nc1"]
    assert train_metrics == {key: result[key] for key in train_metrics}
    assert test_metrics == {key: result[f"test_{key}"] for key in test_metrics}


def test_outputs_without_metrics_or_after_a_finished_run_are_the_same_files(tmp_path):
    """Features computed for the outputs alone (no metrics; a resume of a finished run)
    are those the metrics of the last epoch see."""
    config = config_of(epochs=2, save_features=True)
    checkpoint = tmp_path / "checkpoint.safetensors"
    train(config, "/unused", checkpoint_path=checkpoint, outputs=tmp_path / "first")
    train(config, "/unused", checkpoint_path=checkpoint, outputs=tmp_path / "resumed")
    train(config, "/unused", compute_metrics=False, outputs=tmp_path / "no-metrics")
    for name in (MODEL_FILE, FEATURES_FILE):
        first = load_file(tmp_path / "first" / name)
        for other in ("resumed", "no-metrics"):
            again = load_file(tmp_path / other / name)
            assert first.keys() == again.keys()
            assert all(torch.equal(first[key], again[key]) for key in first), (name, other)


def test_outputs_keep_the_model_only_without_save_features(tmp_path):
    train(config_of(epochs=1), "/unused", outputs=tmp_path / "outputs")
    assert [path.name for path in (tmp_path / "outputs").iterdir()] == [MODEL_FILE]
