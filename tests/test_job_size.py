"""The submit-time estimates and their caps: a train job's memory (exact parameter counts), any job's files."""

import pytest
import torch

from service import job_size
from service.schemas import TrainSpec
from worker.nc.models import build_model


@pytest.mark.parametrize(("architecture", "channels", "side", "K", "d", "depth", "width"), [
    ("mlp", 1, 8, 10, 64, 3, 128),
    ("mlp", 32, 1, 7, 16, 1, 512),
    ("mlp", 3, 32, 100, 512, 4, 256),
    ("resnet18", 3, 32, 10, 512, 0, 0),
    ("resnet18", 1, 28, 10, 64, 0, 0),
    ("resnet18", 1, 8, 5, 1024, 0, 0),
    ("resnet50", 3, 32, 10, 2048, 0, 0),
    ("resnet50", 3, 32, 10, 512, 0, 0),
    ("resnet50", 1, 8, 5, 64, 0, 0),
    ("vgg11", 3, 32, 100, 512, 0, 0),
    ("vgg11", 1, 28, 10, 128, 0, 0),
    ("vgg11", 1, 8, 10, 64, 0, 0),
])
def test_parameter_counts_equal_the_models_the_worker_builds(architecture, channels, side, K, d, depth, width):
    model = build_model(architecture, channels, side, K, d, "normalized", 10.0, mlp_depth=max(depth, 1),
                        mlp_width=max(width, 1))
    if architecture == "mlp":
        estimate = job_size.mlp(channels * side * side, depth, width, d, K)
    else:
        estimate = getattr(job_size, architecture)(channels, side, d, K)
    assert estimate.parameters == sum(p.numel() for p in model.parameters())


# d equal to the pooled width 8 x width (no projection) and different from it.
@pytest.mark.parametrize(("width", "channels", "side", "d"), [
    (16, 3, 32, 128), (16, 1, 28, 24), (64, 3, 32, 512), (64, 1, 8, 100), (8, 1, 28, 64),
])
def test_resnet18_parameter_counts_follow_the_width(width, channels, side, d):
    model = build_model("resnet18", channels, side, 10, d, "normalized", 10.0, resnet18_width=width)
    estimate = job_size.resnet18(channels, side, d, 10, width)
    assert estimate.parameters == sum(p.numel() for p in model.parameters())


def test_network_dispatches_on_the_architecture_and_defaults_the_resnet18_width():
    spec = {"dataset": "cifar10", "gaussian_dim": 32, "K": 10, "d": 512, "architecture": "resnet18"}
    assert job_size.network(spec) == job_size.resnet18(3, 32, 512, 10, 64)  # stored before the width was a field
    assert job_size.network({**spec, "resnet18_width": 16}) == job_size.resnet18(3, 32, 512, 10, 16)
    assert job_size.network({**spec, "architecture": "resnet50"}) == job_size.resnet50(3, 32, 512, 10)


def _activation_elements(model, channels: int, side: int) -> int:
    """Elements of every leaf module's output for one sample, counted with forward hooks."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        total += output[0].numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, channels, side, side))
    for handle in handles:
        handle.remove()
    return total


@pytest.mark.parametrize(("architecture", "channels", "side"), [
    ("resnet18", 3, 32), ("resnet50", 1, 28), ("vgg11", 1, 28), ("mlp", 1, 8),
])
def test_activation_estimate_is_within_a_factor_of_two_of_the_layer_outputs(architecture, channels, side):
    model = build_model(architecture, channels, side, 10, 64, "normalized", 10.0)
    if architecture == "mlp":
        estimate = job_size.mlp(channels * side * side, 3, 512, 64, 10)
    else:
        estimate = getattr(job_size, architecture)(channels, side, 64, 10)
    counted = _activation_elements(model, channels, side)
    assert counted / 2 <= estimate.activations_per_sample <= 2 * counted


def test_oversized_train_jobs_are_refused_with_the_estimate_and_the_cap():
    with pytest.raises(ValueError, match=r"d\n.*must be at most 16384 \(NCLAB_MAX_TRAIN_WIDTH\)"):
        TrainSpec(kind="train", dataset="digits", d=2_000_000_000)
    with pytest.raises(ValueError, match=r"100000010 samples exceeds the cap 2000000 \(NCLAB_MAX_TRAIN_SAMPLES\)"):
        TrainSpec(kind="train", dataset="gaussian", K=10, gaussian_dim=100_000, gaussian_train_per_class=10**7,
                  gaussian_test_per_class=1)
    # 100,000 x 16,384 + 16,384^2 + 16,384 x 512 weights: 1.91e9, 28.5 GiB with gradients and optimizer state.
    with pytest.raises(ValueError, match=r"needs about 29.3 GiB by its estimate \(data .*, parameters 28.5 GiB, .*\); "
                                         r"the cap is 16 GiB \(NCLAB_MAX_JOB_BYTES\)"):
        TrainSpec(kind="train", dataset="gaussian", K=10, gaussian_dim=100_000, mlp_width=16384)
    fine = TrainSpec(kind="train", dataset="digits")
    assert job_size.train_bytes(fine.model_dump(), (142,) * 10)["total"] < 2**30


def test_the_test_subset_bounds_the_test_samples_counted():
    counts = (6000,) * 10  # mnist-like: 10,000 test samples over 10 classes
    spec = {"K": 4, "n_per_class": 30, "dataset": "mnist", "test_n_per_class": None}
    assert job_size.samples(spec, counts) == (120, 4000)
    assert job_size.samples({**spec, "test_n_per_class": 100}, counts) == (120, 400)
    assert job_size.samples({**spec, "test_n_per_class": 5000}, counts) == (120, 4000)  # no more than there are


def test_a_job_whose_files_would_pass_the_artifact_cap_is_refused_at_submit(api_with):
    client = api_with(NCLAB_MAX_ARTIFACT_BYTES=str(2**20)).client
    wide = {"kind": "train", "dataset": "gaussian", "K": 10, "d": 64, "gaussian_dim": 1000, "mlp_width": 256}
    assert client.post("/experiments", json={**wide, "mlp_width": 64}).status_code == 202  # 4 x 77k parameters
    refused = client.post("/experiments", json=wide)  # 4 x 340k parameters: 1.3 MiB of weights
    assert refused.status_code == 422 and "NCLAB_MAX_ARTIFACT_BYTES" in refused.json()["detail"]
    assert "the weights" in refused.json()["detail"]
    small = {**wide, "mlp_width": 64, "gaussian_train_per_class": 2000}
    assert client.post("/experiments", json=small).status_code == 202
    with_features = client.post("/experiments", json={**small, "save_features": True})  # 20k x (64 x 4 + 8) bytes
    assert with_features.status_code == 422 and "NCLAB_MAX_ARTIFACT_BYTES" in with_features.json()["detail"]
    solution = client.post("/experiments", json={"kind": "ufm", "K": 10, "d": 100, "n_per_class": 200})
    assert solution.status_code == 422 and "the solution W, H, b" in solution.json()["detail"]
