"""How much memory a training job will take, estimated at submit time without torch.

The estimate adds four parts, each in bytes:
- data: the training and test inputs as float32 tensors on the device;
- parameters: the exact parameter count of the architecture (worker/nc/models.py, kept
  equal by tests/test_job_size.py) times 16 bytes: weights, gradients and two optimizer
  states (momentum, or Adam's two moments) in float32;
- activations: one batch's layer outputs, kept for the backward pass and matched by as
  many gradients, in float32;
- evaluation: the features and logits of the training set, then of the test set, in
  float32 and again in float64 for the metrics.
It is an estimate (allocator slack, cuDNN workspaces and the like are not in it), meant
to refuse at submit time a job that cannot fit, not to plan to the last megabyte.
"""

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

# Input shape (channels, side) per data set; the gaussian mixture is vectors (dim, 1).
IMAGE_SHAPES = {"mnist": (1, 28), "fashion_mnist": (1, 28), "cifar10": (3, 32), "cifar100": (3, 32), "digits": (1, 8)}
TEST_SAMPLES = {"mnist": 10_000, "fashion_mnist": 10_000, "cifar10": 10_000, "cifar100": 10_000, "digits": 364}
VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
RESNET18_BLOCKS = (2, 2, 2, 2)
RESNET50_BLOCKS = (3, 4, 6, 3)
BOTTLENECK_EXPANSION = 4


@dataclass(frozen=True)
class Network:
    parameters: int
    activations_per_sample: int  # layer outputs of one sample in a forward pass


def _conv_bn(c_in: int, c_out: int, kernel: int = 3) -> int:
    return c_in * c_out * kernel * kernel + 2 * c_out  # no conv bias; BatchNorm's weight and bias


def _head(channels: int, dim: int, num_classes: int) -> Network:
    """The backbone's `channels` pooled to features of width d (a linear map when d
    differs), and the classifier with its bias."""
    projection = 0 if dim == channels else channels * dim + dim
    return Network(projection + dim * num_classes + num_classes, channels + dim + num_classes)


def _add(a: Network, b: Network) -> Network:
    return Network(a.parameters + b.parameters, a.activations_per_sample + b.activations_per_sample)


def _shortcut(c_in: int, c_out: int, stride: int, side: int) -> Network:
    """A residual block's skip path, `side` being the block's output side: free when the
    shapes match, else a 1x1 conv and BatchNorm."""
    if stride == 1 and c_in == c_out:
        return Network(0, 0)
    return Network(_conv_bn(c_in, c_out, kernel=1), 2 * c_out * side * side)


def _basic_block(c_in: int, planes: int, stride: int, side: int) -> tuple[Network, int, int]:
    """The block (two 3x3 convs, the first strided) on side x side inputs, and its output
    channels and side."""
    side = (side - 1) // stride + 1
    parameters = _conv_bn(c_in, planes) + _conv_bn(planes, planes)
    activations = 7 * planes * side * side  # conv, BN, ReLU, conv, BN, sum, ReLU
    return _add(Network(parameters, activations), _shortcut(c_in, planes, stride, side)), planes, side


def _bottleneck(c_in: int, planes: int, stride: int, side: int) -> tuple[Network, int, int]:
    """The block (1x1 down to `planes`, strided 3x3, 1x1 up to 4 x `planes`) on side x side
    inputs, and its output channels and side."""
    c_out = BOTTLENECK_EXPANSION * planes
    out_side = (side - 1) // stride + 1
    parameters = _conv_bn(c_in, planes, kernel=1) + _conv_bn(planes, planes) + _conv_bn(planes, c_out, kernel=1)
    activations = (
        3 * planes * side * side  # conv, BN, ReLU before the stride
        + 3 * planes * out_side * out_side  # conv, BN, ReLU
        + 4 * c_out * out_side * out_side
    )  # conv, BN, sum, ReLU
    return _add(Network(parameters, activations), _shortcut(c_in, c_out, stride, out_side)), c_out, out_side


def _resnet(
    channels: int,
    side: int,
    width: int,
    blocks_per_stage: tuple[int, ...],
    block: Callable[[int, int, int, int], tuple[Network, int, int]],
    dim: int,
    num_classes: int,
) -> Network:
    """The CIFAR-stem ResNet of worker/nc/models.py: a 3x3 stem of `width` channels, then
    stages of width x 2^i planes, each after the first starting with a stride-2 block."""
    net = Network(_conv_bn(channels, width), 3 * width * side * side)  # conv, BN, ReLU
    channels = width
    for stage, blocks in enumerate(blocks_per_stage):
        for index in range(blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            block_net, channels, side = block(channels, width * 2**stage, stride, side)
            net = _add(net, block_net)
    return _add(net, _head(channels, dim, num_classes))


def mlp(in_features: int, depth: int, width: int, dim: int, num_classes: int) -> Network:
    widths = [in_features] + [width] * (depth - 1) + [dim]
    parameters = sum(fan_in * fan_out + 2 * fan_out for fan_in, fan_out in itertools.pairwise(widths))
    activations = in_features + 3 * sum(widths[1:]) + num_classes  # Linear, BatchNorm, ReLU outputs
    return Network(parameters + dim * num_classes + num_classes, activations)


def resnet18(channels: int, side: int, dim: int, num_classes: int, width: int = 64) -> Network:
    return _resnet(channels, side, width, RESNET18_BLOCKS, _basic_block, dim, num_classes)


def resnet50(channels: int, side: int, dim: int, num_classes: int) -> Network:
    return _resnet(channels, side, 64, RESNET50_BLOCKS, _bottleneck, dim, num_classes)


def vgg11(channels: int, side: int, dim: int, num_classes: int) -> Network:
    parameters, activations = 0, 0
    for layer in VGG11_LAYERS:
        if isinstance(layer, str):  # "M": a 2x2 max-pool
            if side > 1:
                side //= 2
                activations += channels * side * side
        else:
            parameters += _conv_bn(channels, layer)
            activations += 3 * layer * side * side
            channels = layer
    return _add(Network(parameters, activations), _head(channels, dim, num_classes))


def network(spec: dict) -> Network:
    channels, side = IMAGE_SHAPES.get(spec["dataset"], (spec["gaussian_dim"], 1))
    K, d = spec["K"], spec["d"]
    if spec["architecture"] == "mlp":
        return mlp(channels * side * side, spec["mlp_depth"], spec["mlp_width"], d, K)
    if spec["architecture"] == "resnet18":
        # Specs stored before the width was a field lack it; they ran the standard 64.
        return resnet18(channels, side, d, K, spec.get("resnet18_width", 64))
    if spec["architecture"] == "resnet50":
        return resnet50(channels, side, d, K)
    return vgg11(channels, side, d, K)


def samples(spec: dict, class_counts: tuple[int, ...] | None) -> tuple[int, int]:
    """Training and test samples the job loads."""
    K = spec["K"]
    if class_counts is None:  # the gaussian mixture
        return K * spec["gaussian_train_per_class"], K * spec["gaussian_test_per_class"]
    train = sum(class_counts[:K]) if spec["n_per_class"] is None else K * spec["n_per_class"]
    test = math.ceil(TEST_SAMPLES[spec["dataset"]] * K / len(class_counts))
    if spec.get("test_n_per_class") is not None:
        test = min(test, K * spec["test_n_per_class"])
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
        # One set's features and logits at a time: the training set's, then the test set's.
        "evaluation": (4 + 8) * max(train, test) * (spec["d"] + spec["K"]),
    }
    return {**parts, "total": sum(parts.values())}


def train_artifact_bytes(spec: dict, class_counts: tuple[int, ...] | None) -> int:
    """What a train job keeps: model.safetensors (float32 parameters; BatchNorm's buffers are a rounding
    error beside them) and, with save_features, features.safetensors (float32 features, int64 labels)."""
    kept = 4 * network(spec).parameters
    if spec["save_features"]:
        train, test = samples(spec, class_counts)
        kept += (4 * spec["d"] + 8) * (train + test)
    return kept


def ufm_artifact_bytes(num_classes: int, dim: int, samples: int, bias: bool, layers: int = 1) -> int:
    """What a UFM solve keeps: solution.safetensors (float64 W, H, b and the deep UFM's
    d x d hidden layers, int64 labels)."""
    hidden = (layers - 1) * dim * dim
    return 8 * (num_classes * dim + samples * dim + num_classes * bias + hidden) + 8 * samples
