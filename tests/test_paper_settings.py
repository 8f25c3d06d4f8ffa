"""The seed paper's training settings (Yaras et al. 2022): decay scopes, the summed feature
decay, milestone learning rates, the epoch-0 row, and the catalogue on the test set."""

import math

import pytest
import torch
from torch.nn import functional as F

from worker.nc.data import load_dataset
from worker.nc.metrics import collapse_metrics
from worker.nc.models import build_model
from worker.nc.train import TrainConfig, evaluate, feature_penalty, learning_rate, make_optimizer, train

DIGITS = dict(dataset="digits", architecture="mlp", num_classes=10, dim=16, mlp_width=32, mlp_depth=2,
              n_per_class=20, batch_size=50)


def _model(config: TrainConfig):
    torch.manual_seed(config.seed)
    return build_model(config.architecture, 1, 8, config.num_classes, config.dim, config.normalization,
                       config.logit_scale, config.mlp_depth, config.mlp_width)


@pytest.mark.parametrize("normalization, scope, decayed", [
    ("regularized", None, {"backbone", "classifier"}),
    ("regularized", "classifier", {"classifier"}),
    ("regularized", "backbone", {"backbone"}),
    ("regularized", "none", set()),
    ("normalized", None, {"backbone"}),
    ("normalized", "none", set()),
    ("normalized", "all", {"backbone", "classifier"}),
    ("none", None, set()),
])
def test_a_decay_scope_decays_exactly_the_parameters_it_names(normalization, scope, decayed):
    """With zero loss gradients one SGD step is the decay alone: p <- (1 - lr * wd) p where decayed."""
    config = TrainConfig(**DIGITS, normalization=normalization, weight_decay_scope=scope, weight_decay=0.1, lr=0.5)
    model = _model(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = make_optimizer(config, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        factor = 1 - 0.5 * 0.1 if part in decayed else 1.0
        torch.testing.assert_close(p.detach(), factor * before[name], rtol=1e-6, atol=0, msg=name)


def test_feature_decay_summed_over_the_batch_is_batch_size_times_the_mean():
    features = torch.randn(32, 5, dtype=torch.float64, requires_grad=True)
    for reduction, scale in (("mean", 1 / 32), ("sum", 1.0)):
        config = TrainConfig(**DIGITS, normalization="regularized", feature_decay=0.3,
                             feature_decay_reduction=reduction)
        (gradient,) = torch.autograd.grad(feature_penalty(config, features), features)
        torch.testing.assert_close(gradient, 0.3 * scale * features.detach(), rtol=1e-14, atol=0)
    assert feature_penalty(TrainConfig(**DIGITS, normalization="normalized"), features) == 0.0


def test_milestones_multiply_the_rate_at_the_start_of_each_named_epoch():
    config = TrainConfig(**DIGITS, normalization="none", lr=0.05, epochs=100, lr_schedule="milestones",
                         lr_milestones=(40, 80), lr_gamma=0.1)
    rates = [learning_rate(config, epoch - 1) for epoch in range(1, 101)]  # 1-based epochs, as in the history
    assert rates[:39] == [0.05] * 39
    assert rates[39:79] == pytest.approx([0.005] * 40, rel=1e-15)
    assert rates[79:] == pytest.approx([0.0005] * 21, rel=1e-15)
    no_milestones = TrainConfig(**DIGITS, normalization="none", lr=0.05, lr_schedule="milestones")
    assert {learning_rate(no_milestones, epoch) for epoch in range(10)} == {0.05}


def test_the_epoch_zero_row_is_an_evaluation_of_the_untouched_model(tmp_path):
    config = TrainConfig(**DIGITS, normalization="normalized", epochs=2, metrics_at_start=True, seed=4)
    rows = {}
    train(config, tmp_path, on_epoch=lambda epoch, row: rows.setdefault(epoch, row))
    assert sorted(rows) == [0, 1, 2]
    assert "train_loss" not in rows[0] and rows[0]["lr"] == config.lr

    data = load_dataset("digits", tmp_path, 10, n_per_class=20, seed=4)
    untouched = _model(config)
    expected = evaluate(untouched, data.train_x, data.train_y, data.test_x, data.test_y, 10)
    assert {key: rows[0][key] for key in expected} == expected
    assert rows[1]["nc1"] != rows[0]["nc1"]  # the first epoch did move the model


@pytest.mark.parametrize("normalization", ["normalized", "regularized"])
def test_the_catalogue_on_the_test_set_is_collapse_metrics_of_the_test_features(normalization, tmp_path):
    config = TrainConfig(**DIGITS, normalization=normalization, test_n_per_class=15)
    data = load_dataset("digits", tmp_path, 10, n_per_class=20, test_n_per_class=15)
    assert torch.bincount(data.test_y).tolist() == [15] * 10
    model = _model(config).eval()
    row = evaluate(model, data.train_x, data.train_y, data.test_x, data.test_y, 10)

    with torch.no_grad():
        features = model.features(data.test_x)
        logits = model(data.test_x).double()
    weight, bias, scale = model.effective_classifier()
    on_test = collapse_metrics(features, data.test_y, weight, bias, 10, scale)
    assert {key: row[f"test_{key}"] for key in on_test} == on_test
    # Independent of collapse_metrics: torch's cross-entropy and argmax on the logits.
    assert row["test_loss"] == pytest.approx(F.cross_entropy(logits, data.test_y).item(), rel=1e-5)
    assert row["test_accuracy"] == (logits.argmax(dim=1) == data.test_y).double().mean().item()
    assert row["test_nc1"] != row["nc1"] and math.isfinite(row["test_nc1"])
