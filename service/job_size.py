"""How much memory a training job will take, estimated at submit time without torch.

The estimate adds four parts, each in bytes:
- data: the training and test inputs as float32 tensors on the device;
- parameters: the exact parameter count of the architecture (worker/nc/models.py, kept
  equal by tests/test_job_size.py) times 16 bytes: weights, gradients and two optimizer
  states (momentum, or Adam's two moments) in float32;
- activations: one batch's layer outputs, kept for the backward pass and matched by as
  many gradients, in float32;
- evaluation: the training set's features and logits, in float32 and again in float64
  for the metrics.
It is an estimate (allocator slack, cuDNN workspaces and the like are not in it), meant
to refuse at submit time a job that cannot fit, not to plan to the last megabyte.
"""

import math
from dataclasses import dataclass

# Input shape (channels, side) per data set; the gaussian mixture is vectors (dim, 1).
IMAGE_SHAPES = {"mnist": (1, 28), "fashion_mnist": (1, 28), "cifar10": (3, 32), "cifar100": (3, 32),
                "digits": (1, 8)}
TEST_SAMPLES = {"mnist": 10_000, "fashion_mnist": 10_000, "cifar10": 10_000, "cifar100": 10_000, "digits": 364}
CONV_WIDTH = 512
VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
RESNET18_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


@dataclass(frozen=True)
class Network:
    parameters: int
    activations_per_sample: int  # layer outputs of one sample in a forward pass


def _conv_bn(c_in: int, c_out: int, kernel: int = 3) -> int:
    return c_in * c_out * kernel * kernel + 2 * c_out  # no conv bias; BatchNorm's weight and bias


def _head(dim: int, num_classes: int) -> tuple[int, int]:
    """Pooled features to d (a linear map when d differs), and the classifier with its bias."""
    projection = 0 if dim == CONV_WIDTH else CONV_WIDTH * dim + dim
    return projection + dim * num_classes + num_classes, CONV_WIDTH + dim + num_classes


def mlp(in_features: int, depth: int, width: int, dim: int, num_classes: int) -> Network:
    widths = [in_features] + [width] * (depth - 1) + [dim]
    parameters = sum(fan_in * fan_out + 2 * fan_out for fan_in, fan_out in zip(widths, widths[1:]))
    activations = in_features + 3 * sum(widths[1:]) + num_classes  # Linear, BatchNorm, ReLU outputs
    return Network(parameters + dim * num_classes + num_classes, activations)


def resnet18(channels: int, side: int, dim: int, num_classes: int) -> Network:
    parameters, activations = _conv_bn(channels, 64), 3 * 64 * side * side
    c_in = 64
    for width, stride in RESNET18_STAGES:
        for block_stride in (stride, 1):
            side = (side - 1) // block_stride + 1
            parameters += _conv_bn(c_in, width) + _conv_bn(width, width)
            activations += 7 * width * side * side  # conv, BN, ReLU, conv, BN, sum, ReLU
            if block_stride != 1 or c_in != width:
                parameters += _conv_bn(c_in, width, kernel=1)
                activations += 2 * width * side * side
            c_in = width
    head_parameters, head_activations = _head(dim, num_classes)
    return Network(parameters + head_parameters, activations + head_activations)


def vgg11(channels: int, side: int, dim: int, num_classes: int) -> Network:
    parameters, activations = 0, 0
    for layer in VGG11_LAYERS:
        if layer == "M":
            if side > 1:
                side //= 2
                activations += channels * side * side
        else:
            parameters += _conv_bn(channels, layer)
            activations += 3 * layer * side * side
            channels = layer
    head_parameters, head_activations = _head(dim, num_classes)
    return Network(parameters + head_parameters, activations + head_activations)


def network(spec: dict) -> Network:
    channels, side = IMAGE_SHAPES.get(spec["dataset"], (spec["gaussian_dim"], 1))
    K, d = spec["K"], spec["d"]
    if spec["architecture"] == "mlp":
        return mlp(channels * side * side, spec["mlp_depth"], spec["mlp_width"], d, K)
    if spec["architecture"] == "resnet18":
        return resnet18(channels, side, d, K)
    return vgg11(channels, side, d, K)


def samples(spec: dict, class_counts: tuple[int, ...] | None) -> tuple[int, int]:
    """Training and test samples the job loads."""
    K = spec["K"]
    if class_counts is None:  # the gaussian mixture
        return K * spec["gaussian_train_per_class"], K * spec["gaussian_test_per_class"]
    train = sum(class_counts[:K]) if spec["n_per_class"] is None else K * spec["n_per_class"]
    test = math.ceil(TEST_SAMPLES[spec["dataset"]] * K / len(class_counts))
    return train, test


def train_bytes(spec: dict, class_counts: tuple[int, ...] | None) -> dict[str, int]:
    """The estimate's parts for a train spec (a dict with every field), and their total."""
    channels, side = IMAGE_SHAPES.get(spec["dataset"], (spec["gaussian_dim"], 1))
    train, test = samples(spec, class_counts)
    net = network(spec)
    parts = {
        "data": 4 * (train + test) * channels * side * side,
        "parameters": 16 * net.parameters,
        "activations": 2 * 4 * spec["batch_size"] * net.activations_per_sample,
        "evaluation": (4 + 8) * train * (spec["d"] + spec["K"]),
    }
    return {**parts, "total": sum(parts.values())}
