"""The `kind: "train"` engine: models, data loaders and the training loop (one test on CUDA)."""

import gzip
from dataclasses import replace as dataclass_replace
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.nc import train as train_module
from worker.nc.data import STATISTICS, load_dataset
from worker.nc.models import NCModel, build_model
from worker.nc.train import TrainConfig, learning_rate, make_optimizer, train
from worker.nc.ufm import Diverged, Stopped

CATALOGUE = ("nc1", "nc1_cdnv", "nc2_equinorm_m", "nc2_equinorm_w", "nc2_equiangle_m",
             "nc2_equiangle_w", "nc2_etf_m", "nc2_etf_w", "nc3", "nc3_uncentred", "nc3_etf", "nc4",
             "accuracy", "loss")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# A small, fast digits run; tests override what they exercise.
SMALL = {"dataset": "digits", "architecture": "mlp", "normalization": "normalized",
         "num_classes": 4, "dim": 16, "mlp_width": 64, "epochs": 2, "batch_size": 32}


def small_config(**overrides) -> TrainConfig:
    return TrainConfig(**{**SMALL, **overrides})


def record_models(monkeypatch) -> list[NCModel]:
    """Make train() leave its models in the returned list, to inspect after training."""
    models = []

    def recording_build_model(*args, **kwargs):
        models.append(build_model(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(train_module, "build_model", recording_build_model)
    return models


# Models


@pytest.mark.parametrize("architecture", ["mlp", "resnet18", "vgg11"])
@pytest.mark.parametrize("channels,size", [(1, 8), (1, 28), (3, 32)])
@pytest.mark.parametrize("dim", [512, 24])
@pytest.mark.parametrize("normalization", ["normalized", "none"])
def test_forward_shapes_and_feature_width(architecture, channels, size, dim, normalization):
    torch.manual_seed(0)
    model = build_model(architecture, channels, size, num_classes=5, dim=dim,
                        normalization=normalization, logit_scale=10.0, mlp_depth=2,
                        mlp_width=32)
    x = torch.randn(3, channels, size, size)
    assert model.backbone(x).shape == (3, dim)
    features = model.features(x)
    assert features.shape == (3, dim)
    assert model(x).shape == (3, 5)
    assert model.classifier.in_features == dim and model.classifier.bias is not None
    if normalization == "normalized":
        torch.testing.assert_close(features.norm(dim=1), torch.ones(3))
        weight, bias, scale = model.effective_classifier()
        torch.testing.assert_close(model(x), scale * features @ weight.T + bias)


# Each architecture on both input shapes, with d equal to the backbone's pooled width
# (2048 for resnet50, 8 x 16 for the narrow resnet18: no projection) and different from it.
@pytest.mark.parametrize("architecture,width,dim,channels,size", [
    ("resnet50", 64, 2048, 1, 28), ("resnet50", 64, 24, 3, 32),
    ("resnet18", 16, 128, 3, 32), ("resnet18", 16, 24, 1, 28),
])
@torch.no_grad()
def test_resnet50_and_narrow_resnet18_forward_shapes(architecture, width, dim, channels, size):
    model = build_model(architecture, channels, size, num_classes=5, dim=dim,
                        normalization="normalized", logit_scale=10.0, resnet18_width=width)
    x = torch.randn(2, channels, size, size)
    features = model.features(x)
    assert features.shape == (2, dim)
    assert model.classify(features).shape == (2, 5)
    pooled_width = 2048 if architecture == "resnet50" else 8 * width
    assert isinstance(model.backbone[-1], torch.nn.Linear) == (dim != pooled_width)


# Counted before resnet18_width existed: the default width must still build the standard model.
@pytest.mark.parametrize("channels,size,num_classes,dim,parameters", [(3, 32, 10, 512, 11_173_962),
                                                                      (1, 28, 5, 24, 11_180_117)])
def test_default_resnet18_is_the_standard_one(channels, size, num_classes, dim, parameters):
    model = build_model("resnet18", channels, size, num_classes, dim, "normalized", 10.0)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_normalized_mode_keeps_rows_and_features_on_the_sphere(monkeypatch):
    models = record_models(monkeypatch)
    train(small_config(normalization="normalized", lr=0.5), "/unused")
    model = models[0].eval()
    torch.testing.assert_close(model.classifier.weight.norm(dim=1), torch.ones(4))
    x = load_dataset("digits", "/unused", 4).train_x[:50]
    torch.testing.assert_close(model.features(x).norm(dim=1), torch.ones(50))
    groups = make_optimizer(small_config(), model).param_groups
    assert [group["weight_decay"] for group in groups] == [5e-4, 0.0]  # backbone, classifier


def test_regularized_mode_leaves_classifier_rows_free(monkeypatch):
    models = record_models(monkeypatch)
    renormalized = []
    monkeypatch.setattr(NCModel, "renormalize_classifier", lambda self: renormalized.append(1))
    train(small_config(normalization="regularized"), "/unused")
    norms = models[0].classifier.weight.norm(dim=1)
    assert not renormalized
    assert (norms - 1).abs().max() > 1e-2
    groups = make_optimizer(small_config(normalization="regularized"), models[0]).param_groups
    assert [group["weight_decay"] for group in groups] == [5e-4, 5e-4]
    groups = make_optimizer(small_config(normalization="none"), models[0]).param_groups
    assert [group["weight_decay"] for group in groups] == [0.0, 0.0]


# Training


def test_digits_mlp_collapses_as_it_trains():
    history, progress = [], []
    result = train(
        TrainConfig(dataset="digits", architecture="mlp", normalization="normalized",
                    num_classes=10, dim=64, mlp_width=256, epochs=5, lr_schedule="cosine"),
        "/unused", on_epoch=lambda epoch, row: history.append(dict(row)),
        on_progress=progress.append)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    for row in history:
        # The catalogue on the training set, and again on the test set.
        assert set(CATALOGUE) | {f"test_{key}" for key in CATALOGUE} | {"epoch", "lr", "train_loss",
                                                                          "train_accuracy"} == set(row)
    nc1 = [row["nc1"] for row in history]
    assert nc1[-1] < 0.6 * nc1[0]
    assert history[-1]["train_accuracy"] > history[0]["train_accuracy"]
    assert history[-1]["accuracy"] > 0.97 and history[-1]["test_accuracy"] > 0.9
    assert result == {**history[-1], "epochs": 5,
                      "parameters": sum(p.numel() for p in build_model(
                          "mlp", 1, 8, 10, 64, "normalized", 10.0, 3, 256).parameters())}
    assert progress == sorted(progress) and progress[-1] == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("architecture", ["mlp", "resnet18"])
def test_cuda_training_collapses_and_keeps_rows_on_the_sphere(monkeypatch, architecture):
    models, history = record_models(monkeypatch), []
    config = TrainConfig(dataset="digits", architecture=architecture, normalization="normalized",
                         num_classes=10, dim=64, mlp_width=256, epochs=5, lr_schedule="cosine")
    train(config, "/unused", device="cuda", on_epoch=lambda epoch, row: history.append(row))
    classifier = models[0].classifier.weight
    assert classifier.is_cuda
    row_norms = torch.linalg.vector_norm(classifier.detach().double(), dim=1)
    assert torch.allclose(row_norms, torch.ones_like(row_norms), atol=1e-6)
    assert all(math.isfinite(history[-1][key]) for key in CATALOGUE)
    assert history[-1]["nc1"] < 0.6 * history[0]["nc1"]
    assert history[-1]["accuracy"] > 0.97 and history[-1]["test_accuracy"] > 0.9


def test_metrics_every_and_last_epoch():
    history = []
    train(small_config(epochs=3, metrics_every=2), "/unused",
          on_epoch=lambda epoch, row: history.append(row))
    assert set(history[0]) == {"epoch", "lr", "train_loss", "train_accuracy"}
    assert "nc1" in history[1] and "test_accuracy" in history[2]  # epoch 2, and the last
    history.clear()
    result = train(small_config(), "/unused", compute_metrics=False,
                   on_epoch=lambda epoch, row: history.append(row))
    assert all("nc1" not in row for row in history) and "nc1" not in result


@pytest.mark.parametrize("optimizer,normalization",
                         [("sgd", "regularized"), ("adam", "normalized")])
def test_same_config_gives_identical_history(optimizer, normalization):
    config = small_config(optimizer=optimizer, normalization=normalization, lr=0.01,
                          random_labels=True, lr_schedule="step", epochs=3)
    histories = [[], []]
    for history in histories:
        train(config, "/unused", on_epoch=lambda epoch, row, h=history: h.append(row))
    assert histories[0] == histories[1]
    assert histories[0][0]["train_loss"] != histories[0][-1]["train_loss"]


def test_huge_learning_rate_raises_diverged():
    with pytest.raises(Diverged, match=r"^loss became nan at epoch 1, batch \d+$"):
        train(small_config(normalization="none", lr=1e30), "/unused")


def test_a_run_that_learned_nothing_fails_instead_of_succeeding():
    """Adam at lr = 100 keeps its losses finite but ends far above a uniform guess (ln K)."""
    epochs = []
    learned_nothing = r"^the last epoch's training loss is .*, above 2 x ln K = 2\.77 .*learned nothing"
    with pytest.raises(Diverged, match=learned_nothing):
        train(small_config(optimizer="adam", lr=100, epochs=3, lr_schedule="constant"), "/unused",
              on_epoch=lambda epoch, row: epochs.append(row["train_loss"]))
    assert len(epochs) == 3 and all(math.isfinite(loss) and loss > 2 * math.log(4) for loss in epochs)


def test_should_stop_raises_stopped():
    batches_per_epoch = math.ceil(len(load_dataset("digits", "/unused", 4).train_y) / 32)
    polls, epochs = [], []
    with pytest.raises(Stopped, match="stopped at epoch 2, batch 3"):
        train(small_config(epochs=3), "/unused", on_epoch=lambda epoch, row: epochs.append(epoch),
              should_stop=lambda: polls.append(1) or len(polls) == batches_per_epoch + 3)
    assert epochs == [1]


def test_learning_rate_schedules():
    step = small_config(epochs=9, lr=1.0, lr_schedule="step")
    assert [learning_rate(step, e) for e in range(9)] == pytest.approx(
        [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])
    cosine = small_config(epochs=4, lr=1.0, lr_schedule="cosine")
    assert [learning_rate(cosine, e) for e in range(4)] == pytest.approx(
        [1, 0.5 + 0.5 * 2**-0.5, 0.5, 0.5 - 0.5 * 2**-0.5])


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="mlp"):
        TrainConfig(dataset="gaussian", architecture="resnet18", normalization="none",
                    num_classes=3, dim=8)
    with pytest.raises(ValueError, match="normalization"):
        small_config(normalization="sphere")


def test_gaussian_mixture_trains_an_mlp():
    config = TrainConfig(dataset="gaussian", architecture="mlp", normalization="regularized",
                         num_classes=3, dim=8, mlp_width=32, epochs=3, batch_size=50,
                         gaussian_dim=6, gaussian_train_per_class=40, gaussian_test_per_class=10,
                         lr_schedule="constant")
    data = load_dataset("gaussian", "/unused", 3, gaussian_dim=6, gaussian_train_per_class=40,
                        gaussian_test_per_class=10)
    assert data.train_x.shape == (120, 6) and data.test_x.shape == (30, 6)
    assert (data.channels, data.image_size) == (6, 1)
    assert train(config, "/unused")["accuracy"] > 0.9


# Data


def test_first_classes_and_n_per_class():
    full = load_dataset("digits", "/unused", 3)
    subset = load_dataset("digits", "/unused", 3, n_per_class=7)
    assert torch.bincount(subset.train_y).tolist() == [7, 7, 7]
    assert set(full.test_y.tolist()) == {0, 1, 2}
    for k in range(3):
        torch.testing.assert_close(subset.train_x[subset.train_y == k],
                                   full.train_x[full.train_y == k][:7], rtol=0, atol=0)
    every = load_dataset("digits", "/unused", 10)
    assert torch.bincount(every.train_y).min() == 139 and len(every.test_y) == 1797 - 1433
    assert every.train_x.shape[1:] == (1, 8, 8)
    with pytest.raises(ValueError, match="only"):
        load_dataset("digits", "/unused", 10, n_per_class=140)


def test_random_labels():
    clean = load_dataset("digits", "/unused", 4, n_per_class=50)
    noisy = load_dataset("digits", "/unused", 4, n_per_class=50, random_labels=True, seed=1)
    again = load_dataset("digits", "/unused", 4, n_per_class=50, random_labels=True, seed=1)
    other = load_dataset("digits", "/unused", 4, n_per_class=50, random_labels=True, seed=2)
    assert torch.equal(noisy.train_y, again.train_y)
    assert not torch.equal(noisy.train_y, other.train_y)
    assert torch.equal(noisy.train_x, clean.train_x) and torch.equal(noisy.test_y, clean.test_y)
    assert torch.bincount(noisy.train_y).tolist() == [50] * 4  # a permutation keeps the counts
    assert (noisy.train_y != clean.train_y).float().mean() > 0.5


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def test_idx_loader_on_small_files(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    labels = np.array([3, 0, 1, 0, 2, 1, 0])
    images = rng.integers(0, 256, size=(7, 28, 28))
    write_idx(folder / "train-images-idx3-ubyte.gz", images)
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images[:4])
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[:4])
    data = load_dataset("mnist", tmp_path, num_classes=2)
    assert data.train_y.tolist() == [0, 1, 0, 1, 0] and data.train_y.dtype == torch.int64
    assert data.test_y.tolist() == [0, 1, 0]
    assert data.train_x.shape == (5, 1, 28, 28) and data.train_x.dtype == torch.float32
    assert (data.channels, data.image_size) == (1, 28)
    _, (mean,), (std,) = STATISTICS["mnist"]
    expected = (images[labels < 2] / 255 - mean) / std
    torch.testing.assert_close(data.train_x[:, 0], torch.tensor(expected, dtype=torch.float32))


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_files(tmp_path):
    (tmp_path / "fashion_mnist").symlink_to(FASHION_MNIST)
    data = load_dataset("fashion_mnist", tmp_path, num_classes=3, n_per_class=5)
    assert data.train_x.shape == (15, 1, 28, 28) and len(data.test_y) == 3000


def write_pickle(path: Path, images: np.ndarray, label_key: bytes, labels) -> None:
    with open(path, "wb") as file:
        pickle.dump({b"data": images.reshape(len(images), -1), label_key: list(labels)}, file)


def test_cifar10_loader_on_small_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    # Rows are 1024 red, then 1024 green, then 1024 blue values.
    image = np.concatenate([np.full(1024, 255), np.zeros(1024), np.full(1024, 51)])
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", np.stack([image] * 3).astype(np.uint8),
                     b"labels", [i % 3, 9, 0])
    write_pickle(folder / "test_batch", np.stack([image] * 2).astype(np.uint8), b"labels", [1, 5])
    data = load_dataset("cifar10", tmp_path, num_classes=3)
    assert data.train_x.shape == (10, 3, 32, 32) and (data.channels, data.image_size) == (3, 32)
    assert data.train_y.tolist() == [1, 0, 2, 0, 0, 0, 1, 0, 2, 0] and data.test_y.tolist() == [1]
    _, mean, std = STATISTICS["cifar10"]
    expected = [(value - m) / s for value, m, s in zip((1.0, 0.0, 0.2), mean, std)]
    torch.testing.assert_close(data.train_x[0, :, 5, 7], torch.tensor(expected))


def test_cifar100_loader_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    images = np.arange(4 * 3072).reshape(4, 3072).astype(np.uint8)
    for name in ("train", "test"):
        with open(folder / name, "wb") as file:
            pickle.dump({b"data": images, b"fine_labels": [42, 0, 7, 1],
                         b"coarse_labels": [0, 1, 2, 3]}, file)
    data = load_dataset("cifar100", tmp_path, num_classes=10)
    assert data.train_y.tolist() == [0, 7, 1] and data.train_x.shape == (3, 3, 32, 32)


@pytest.mark.parametrize("name,folder,files", [
    ("mnist", "mnist", ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
    ("fashion_mnist", "fashion_mnist", ["t10k-labels-idx1-ubyte.gz"]),
    ("cifar10", "cifar-10-batches-py", [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]),
    ("cifar100", "cifar-100-python", ["train", "test"]),
])
def test_missing_files_are_all_named(tmp_path, name, folder, files):
    if name == "fashion_mnist":  # all present but one
        if not FASHION_MNIST.is_dir():
            pytest.skip("dataset-fashion-mnist not installed")
        (tmp_path / folder).mkdir()
        for path in FASHION_MNIST.glob("*-ubyte.gz"):
            if path.name not in files:
                (tmp_path / folder / path.name).symlink_to(path)
    with pytest.raises(FileNotFoundError) as error:
        train(small_config(dataset=name), tmp_path)
    for file in files:
        assert str(tmp_path / folder / file) in str(error.value)
    assert str(error.value).count(str(tmp_path)) == len(files)


def test_batch_loss_of_each_loss_matches_its_definition():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    targets = torch.eye(4, dtype=torch.float64)[labels]
    squared = train_module.batch_loss(small_config(loss="mse"), logits, labels)
    assert float(squared) == pytest.approx(float(((logits - targets) ** 2).sum()) / 12, rel=1e-14)
    eps = 0.3
    smoothed = train_module.batch_loss(small_config(loss="label_smoothing", label_smoothing=eps), logits, labels)
    soft_targets = (1 - eps) * targets + eps / 4
    expected = -(soft_targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    assert float(smoothed) == pytest.approx(float(expected), rel=1e-14)


@pytest.mark.parametrize("loss,smoothing", [("mse", None), ("label_smoothing", 0.1)])
def test_gaussian_mixture_trains_under_each_loss(loss, smoothing):
    """The trained loss is `train_loss` (below zero logits' 1/2 for the squared error, and
    above the smoothed targets' entropy for label smoothing); `loss` stays the cross-entropy."""
    config = TrainConfig(dataset="gaussian", architecture="mlp", normalization="regularized",
                         num_classes=3, dim=8, mlp_width=32, epochs=6, batch_size=50,
                         gaussian_dim=6, gaussian_train_per_class=40, gaussian_test_per_class=10,
                         lr_schedule="constant", loss=loss, label_smoothing=smoothing)
    result = train(config, "/unused")
    assert result["accuracy"] > 0.9
    if loss == "mse":
        assert result["train_loss"] < 0.5
    else:
        targets = torch.tensor([1 - 0.1 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
        assert result["train_loss"] > float(-(targets * targets.log()).sum())
    baseline = train(dataclass_replace(config, loss="cross_entropy", label_smoothing=None), "/unused")
    assert result["loss"] != baseline["loss"]  # the same measure of a differently trained model
