"""Collapse layer by layer in training (`metrics_layers`): the catalogue of the class means
at named layers, from forward hooks feeding one streaming accumulator per layer."""

import pytest
import torch

from service.schemas import architecture_layers
from worker.nc import train as train_module
from worker.nc.metrics import MEAN_KEYS, CollapseAccumulator, collapse_metrics, layer_key
from worker.nc.models import build_model, layer_names
from worker.nc.train import TrainConfig, train

SMALL = {"dataset": "digits", "num_classes": 4, "dim": 16, "mlp_width": 32, "epochs": 1, "batch_size": 64}


@pytest.mark.parametrize(
    "architecture, depth", [("mlp", 1), ("mlp", 4), ("resnet18", 3), ("resnet50", 3), ("vgg11", 3)]
)
def test_the_api_and_the_engine_name_the_same_layers(architecture, depth):
    names = layer_names(architecture, depth)
    assert architecture_layers(architecture, depth) == names
    model = build_model(architecture, 1, 8, 4, 16, "normalized", 10.0, depth, 32, 4)
    assert list(model.layers) == list(names)


def trained(monkeypatch, **overrides):
    """The result of a small run, and its final model."""
    models = []

    def recording_build_model(*args, **kwargs):
        models.append(build_model(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(train_module, "build_model", recording_build_model)
    result = train(TrainConfig(**{**SMALL, **overrides}), "/unused")
    return result, models[-1].eval()


def training_set(num_classes: int):
    data = train_module.load_dataset("digits", "/unused", num_classes)
    return data.train_x, data.train_y


def test_mlp_layers_measure_each_hidden_layers_output(monkeypatch):
    """layer l of an MLP is the output of its l-th Linear -> BatchNorm -> ReLU (after the
    Flatten): backbone[: 1 + 3 l], measured on the whole training set at once."""
    result, model = trained(monkeypatch, architecture="mlp", mlp_depth=3, metrics_layers=("layer1", "layer2"))
    x, y = training_set(4)
    with torch.no_grad():
        for layer in (1, 2):
            expected = collapse_metrics(model.backbone[: 1 + 3 * layer](x), y, num_classes=4)
            for key in MEAN_KEYS:  # nc1 from a scatter formed in float32
                assert result[layer_key(key, f"layer{layer}")] == pytest.approx(expected[key], rel=1e-5)
    assert layer_key("nc1", "layer3") not in result  # not asked for


def test_resnet_stages_are_measured_as_their_spatial_means(monkeypatch):
    result, model = trained(monkeypatch, architecture="resnet18", resnet18_width=4, metrics_layers=("all",))
    x, y = training_set(4)
    with torch.no_grad():
        stem = model.backbone[:3](x).mean(dim=(2, 3))
        second_stage = model.backbone[:7](x).mean(dim=(2, 3))  # the stem's 3 modules, then 2 blocks each
    for name, features in (("stem", stem), ("stage2", second_stage)):
        expected = collapse_metrics(features, y, num_classes=4)
        assert result[layer_key("nc1", name)] == pytest.approx(expected["nc1"], rel=1e-5)
        assert result[layer_key("nc2_etf_m", name)] == pytest.approx(expected["nc2_etf_m"], rel=1e-9)
    assert {layer_key("nc1", name) for name in layer_names("resnet18")} <= set(result)


def test_measuring_layers_leaves_the_run_and_its_other_metrics_unchanged(monkeypatch):
    plain, _ = trained(monkeypatch, architecture="mlp")
    measured, _ = trained(monkeypatch, architecture="mlp", metrics_layers=("all",))
    assert {key: value for key, value in measured.items() if key in plain} == plain


def test_layer_keys_are_searchable_and_plottable():
    from service.search.fields import UnknownField, history_key, lookup

    assert lookup("result.nc1_stage3").type == "number"
    assert history_key("nc2_etf_m_layer12") == "nc2_etf_m_layer12"
    with pytest.raises(UnknownField):
        lookup("result.nc1_stage9")
    with pytest.raises(UnknownField):
        history_key("nc4_layer1")  # the classifier's metrics have no layer


def test_unknown_layers_are_refused():
    with pytest.raises(ValueError, match="mlp has no layer stage1"):
        TrainConfig(**SMALL, metrics_layers=("stage1",))


def test_a_float32_scatter_keeps_nc1_of_nearly_collapsed_features():
    """Means of size 1e3, spread 1e-4: an uncentred float32 scatter would be all rounding
    (1e6 squared against 1e-8); the centred deviations keep nc1 to ~1e-6."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat_interleave(40)
    means = 1e3 * torch.randn(5, 64, generator=generator, dtype=torch.float64)
    features = (means[labels] + 1e-4 * torch.randn(200, 64, generator=generator, dtype=torch.float64)).float()
    reference = collapse_metrics(features.double(), labels, num_classes=5)["nc1"]
    accumulator = CollapseAccumulator(5, 64, scatter_dtype=torch.float32)
    for block in range(0, 200, 64):
        accumulator.update(features[block : block + 64], labels[block : block + 64])
    assert accumulator.compute()["nc1"] == pytest.approx(reference, rel=1e-5)
