"""Networks for `kind: "train"` experiments: a backbone to d-dimensional features and a
linear classifier, with the features and classifier rows optionally on the unit sphere.

Normalized mode follows Yaras et al. (NeurIPS 2022), "Neural collapse with normalized
features: a geometric analysis over the Riemannian manifold": the classifier sees
h / ||h||, its rows w_k are kept at unit norm, and the logits are s <w_k, h> + b_k for a
fixed logit scale s. Otherwise the logits are the plain W h + b of Papyan et al. (2020)
and Zhu et al. (NeurIPS 2021).

The penultimate features are, as in those papers, what the last hidden layer emits: for
`mlp`, and for the conv nets when d equals the backbone's output channels (`resnet18`:
8 x `resnet18_width`, `resnet50`: 2048, `vgg11`: 512), the output of a ReLU (then average
pooled), so they are nonnegative. The metrics centre them on the global mean, so a
collapsed geometry still shows as a simplex ETF.
"""

import itertools

import torch
from torch import nn
from torch.nn import functional as F

ARCHITECTURES = ("mlp", "resnet18", "resnet50", "vgg11")

# Residual blocks per stage; each stage after the first halves the resolution and
# doubles the width.
RESNET18_BLOCKS = (2, 2, 2, 2)
RESNET50_BLOCKS = (3, 4, 6, 3)

VGG11_LAYERS = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def layer_names(architecture: str, mlp_depth: int = 3) -> tuple[str, ...]:
    """The named layers of an architecture, input to output, whose outputs `metrics_layers`
    measures: an MLP's hidden layers (`layer1`, ...), a ResNet's stem and stages (`stem`,
    `stage1` ... `stage4`), VGG-11's blocks between max-pools (`block1` ... `block5`)."""
    if architecture == "mlp":
        return tuple(f"layer{index}" for index in range(1, mlp_depth + 1))
    if architecture in ("resnet18", "resnet50"):
        return ("stem", *(f"stage{index}" for index in range(1, len(RESNET18_BLOCKS) + 1)))
    return tuple(f"block{index}" for index in range(1, VGG11_LAYERS.count("M") + 1))


class NCModel(nn.Module):
    """backbone: input -> features (N x d); classifier: nn.Linear(d, K) with bias.

    `layers` maps each name of `layer_names` to the module whose output is that layer's.
    """

    def __init__(
        self,
        backbone: nn.Module,
        dim: int,
        num_classes: int,
        normalized: bool,
        logit_scale: float,
        layers: dict[str, nn.Module],
    ):
        super().__init__()
        self.backbone = backbone
        self.layers = layers
        self.classifier = nn.Linear(dim, num_classes)
        self.normalized = normalized
        self.logit_scale = logit_scale
        if normalized:
            self.renormalize_classifier()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The features as fed to the classifier: h / ||h|| when normalized."""
        features = self.backbone(x)
        return F.normalize(features, dim=1) if self.normalized else features

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of features from `features`."""
        weight, bias, scale = self.effective_classifier()
        return torch.addmm(bias, features, weight.T, alpha=scale)  # b + s W h: b is not scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def effective_classifier(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(W, b, s) with logits = s W h + b: the classifier that the metrics judge.

        When normalized, W's rows are normalized here too, not only after each step:
        the gradient then has no radial part (it is the Riemannian gradient on the
        sphere), and `renormalize_classifier` after the step is the retraction.
        """
        weight = self.classifier.weight
        if self.normalized:
            return F.normalize(weight, dim=1), self.classifier.bias, self.logit_scale
        return weight, self.classifier.bias, 1.0

    @torch.no_grad()
    def renormalize_classifier(self) -> None:
        """Put the classifier rows back on the unit sphere (after an optimizer step)."""
        weight = self.classifier.weight
        weight.div_(weight.norm(dim=1, keepdim=True))


def build_model(
    architecture: str,
    in_channels: int,
    image_size: int,
    num_classes: int,
    dim: int,
    normalization: str,
    logit_scale: float,
    mlp_depth: int = 3,
    mlp_width: int = 512,
    resnet18_width: int = 64,
) -> NCModel:
    """An NCModel; inputs are N x in_channels x image_size x image_size (an MLP flattens
    them, so vector inputs of width D are in_channels = D, image_size = 1).
    `resnet18_width` is the width of resnet18's stem and first stage (64 is the standard)."""
    if architecture == "mlp":
        backbone = mlp(in_channels * image_size**2, mlp_depth, mlp_width, dim)
    elif architecture == "resnet18":
        backbone = resnet18(in_channels, dim, resnet18_width)
    elif architecture == "resnet50":
        backbone = resnet50(in_channels, dim)
    elif architecture == "vgg11":
        backbone = vgg11(in_channels, image_size, dim)
    else:
        raise ValueError(f"unknown architecture {architecture!r}; expected one of {ARCHITECTURES}")
    layers = dict(zip(layer_names(architecture, mlp_depth), layer_outputs(architecture, backbone), strict=True))
    return NCModel(backbone, dim, num_classes, normalization == "normalized", logit_scale, layers)


def layer_outputs(architecture: str, backbone: nn.Sequential) -> list[nn.Module]:
    """The modules whose outputs are the layers of `layer_names`, in order: an MLP's ReLUs;
    a ResNet's stem ReLU and the last block of each stage; the last ReLU before each of
    VGG-11's max-pools (in its configuration, whether or not a small input skips the pool)."""
    relus: list[nn.Module] = [module for module in backbone if isinstance(module, nn.ReLU)]
    if architecture == "mlp":
        return relus
    if architecture in ("resnet18", "resnet50"):
        blocks = [module for module in backbone if isinstance(module, BasicBlock | Bottleneck)]
        per_stage = RESNET18_BLOCKS if architecture == "resnet18" else RESNET50_BLOCKS
        return [relus[0]] + [blocks[end - 1] for end in itertools.accumulate(per_stage)]
    convolutions_before_pools = list(itertools.accumulate(layer != "M" for layer in VGG11_LAYERS))
    return [relus[convolutions_before_pools[index] - 1] for index, layer in enumerate(VGG11_LAYERS) if layer == "M"]


def mlp(in_features: int, depth: int, width: int, dim: int) -> nn.Sequential:
    """`depth` hidden layers Linear -> BatchNorm1d -> ReLU, of width `width` except the
    last, of width d."""
    if depth < 1:
        raise ValueError(f"mlp_depth must be at least 1, got {depth}")
    layers: list[nn.Module] = [nn.Flatten()]
    widths = [in_features] + [width] * (depth - 1) + [dim]
    for fan_in, fan_out in itertools.pairwise(widths):
        # No bias before BatchNorm: its shift would be subtracted right away.
        layers += [nn.Linear(fan_in, fan_out, bias=False), nn.BatchNorm1d(fan_out), nn.ReLU()]
    return nn.Sequential(*layers)


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


def pooled_head(channels: int, dim: int) -> list[nn.Module]:
    """Global average pool of a backbone's `channels` feature maps, and a linear map to d
    when d differs."""
    head: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dim != channels:
        head.append(nn.Linear(channels, dim))
    return head


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """A residual block's skip path: the identity when the shapes match, else a 1x1
    projection that matches both the channel count and the resolution."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """He et al. (2016): two 3x3 convolutions and a shortcut; emits `planes` channels."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut(in_channels, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """He et al. (2016): a 1x1 convolution down to `planes` channels, a 3x3 at that width,
    and a 1x1 up to 4 x `planes`, plus a shortcut. The stride is on the 3x3 convolution,
    as in the seed paper's code (and torchvision), not on the first 1x1."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def resnet(
    in_channels: int,
    width: int,
    blocks_per_stage: tuple[int, ...],
    block: type[BasicBlock] | type[Bottleneck],
    dim: int,
) -> nn.Sequential:
    """A ResNet with the CIFAR stem (3x3 conv, stride 1, no max-pool): small images keep
    their resolution into the first stage. Three stride-2 stages take 8x8 inputs to 1x1.
    Stage i's blocks work at width x 2^i planes and emit block.expansion times that."""
    layers = conv_bn_relu(in_channels, width)
    channels = width
    for stage, blocks in enumerate(blocks_per_stage):
        planes = width * 2**stage
        for index in range(blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            layers.append(block(channels, planes, stride))
            channels = planes * block.expansion
    return nn.Sequential(*layers, *pooled_head(channels, dim))


def resnet18(in_channels: int, dim: int, width: int = 64) -> nn.Sequential:
    """ResNet-18 with stages of width, 2 width, 4 width and 8 width channels (64 is the
    standard), so the pooled features are 8 x width wide."""
    return resnet(in_channels, width, RESNET18_BLOCKS, BasicBlock, dim)


def resnet50(in_channels: int, dim: int) -> nn.Sequential:
    """ResNet-50: bottleneck stages of 64 to 512 planes, so the pooled features are 2048 wide."""
    return resnet(in_channels, 64, RESNET50_BLOCKS, Bottleneck, dim)


def vgg11(in_channels: int, image_size: int, dim: int) -> nn.Sequential:
    """VGG-11 with batch norm (Simonyan & Zisserman 2015, configuration A). A max-pool is
    skipped once the feature map is 1x1, so that inputs as small as 8x8 work."""
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for layer in VGG11_LAYERS:
        if isinstance(layer, str):  # "M": a 2x2 max-pool
            if size > 1:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        else:
            layers += conv_bn_relu(channels, layer)
            channels = layer
    return nn.Sequential(*layers, *pooled_head(channels, dim))
