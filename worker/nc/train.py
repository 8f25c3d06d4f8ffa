"""Train a deep network and follow neural collapse epoch by epoch (`kind: "train"`).

Three modes (`normalization`), as in docs/api.md ("Experiment kinds"):

- "normalized" (Yaras et al., NeurIPS 2022): features h / ||h||, classifier rows on the
  unit sphere, logits s <w_k, h> + b_k. The rows are normalized in the forward pass (so
  their gradient is the Riemannian one) and renormalized in place after every optimizer
  step (the retraction). Weight decay applies to the backbone only by default: on unit
  rows it would only fight the retraction.
- "regularized" (Zhu et al., NeurIPS 2021): weight decay on every parameter by default,
  classifier included, plus feature decay: loss += feature_decay / 2 * the batch mean of
  ||h||^2 (or, with feature_decay_reduction "sum", its sum over the batch, as the seed
  paper's code does: batch_size times as strong). The classifier is left free (not
  renormalized).
- "none": plain cross-entropy, no weight decay, no feature decay (Papyan et al. 2020).

`weight_decay_scope` moves the weight decay: "classifier" decays W and b only (the seed
paper's regularized objective, lambda/2 ||W||^2, with no decay on the backbone), "none"
decays nothing (its normalized runs).

Every `metrics_every` epochs and after the last (and, with `metrics_at_start`, once
before the first step, as epoch 0), the metric catalogue is measured in eval mode,
without augmentation, from the features as fed to the classifier and the effective
classifier (unit rows and scale s when normalized): on the training set, and on the test
set as the same keys prefixed `test_` (`test_nc1`, ..., `test_loss`, `test_accuracy`).
The reported `loss` and `accuracy` are the training set's eval-mode cross-entropy and
accuracy, whatever `loss` the run trains with (so that runs of different losses compare),
while `train_loss` / `train_accuracy` are the running figures of the epoch's mini-batches
(the trained loss alone, `batch_loss`, without the decay terms, so that the modes
compare).

With a `checkpoint_path`, the run is saved there every `checkpoint_every` epochs and
after the last, and a run that finds a checkpoint there goes on from it, bit for bit as
if it had not been interrupted (worker/nc/checkpoint.py, docs/checkpoints.md). With an
`outputs` directory, the final model (MODEL_FILE) and, with `save_features`, the last
epoch's features and labels (FEATURES_FILE) are kept there as safetensors files.

    row = train(TrainConfig(dataset="digits", architecture="mlp",
                            normalization="normalized", num_classes=10, dim=64), data_dir)
"""

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from worker.nc.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from worker.nc.data import load_dataset
from worker.nc.metrics import MEAN_KEYS, CollapseAccumulator, collapse_metrics, layer_key
from worker.nc.models import NCModel, build_model, layer_names
from worker.nc.tensor_files import write_tensors
from worker.nc.ufm import Diverged, Stopped
from worker.nc.ufm_problem import check_loss

NORMALIZATIONS = ("normalized", "regularized", "none")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "step", "cosine", "milestones")
WEIGHT_DECAY_SCOPES = ("all", "backbone", "classifier", "none")
# Where weight_decay_scope is not given: unit classifier rows are not decayed (decay would
# only fight the retraction), the regularized objective decays every parameter.
DEFAULT_DECAY_SCOPES = {"normalized": "backbone", "regularized": "all"}

# The loss is checked for NaN/inf once per this many batches (and at the end of each
# epoch): a check makes the host wait for the device, and the batch that failed is still
# found exactly from the per-batch losses kept on the device.
CHECK_EVERY = 16

# Batch size of the evaluation passes: no gradients, so larger batches fit.
EVAL_BATCH_SIZE = 1024

# The files that train() leaves in its `outputs` directory.
MODEL_FILE = "model.safetensors"  # the final model's state_dict
FEATURES_FILE = "features.safetensors"  # the last epoch's features and labels (save_features)


@dataclass(frozen=True)
class TrainConfig:
    """What to train. The fields and defaults are those of the API's TrainSpec
    (service/schemas.py, with K and d named num_classes and dim), so that a notebook run
    and a job from the same settings are the same run; tests/test_spec_config.py keeps
    them equal."""

    dataset: str
    # Required here: TrainSpec's default for K, all of the data set's classes, is filled
    # in when the spec is validated, so a job always passes a number.
    num_classes: int
    normalization: str = "normalized"  # "normalized" | "regularized" | "none"
    architecture: str = "mlp"
    dim: int = 512
    logit_scale: float = 10.0  # s, normalized mode only
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9  # sgd only
    lr_schedule: str = "step"  # constant | step | cosine | milestones
    # 1-based epochs at whose start lr *= lr_gamma; None: no milestones (the lr stays constant)
    lr_milestones: tuple[int, ...] | None = None
    lr_gamma: float = 0.1
    weight_decay: float = 5e-4
    weight_decay_scope: str | None = None  # None: DEFAULT_DECAY_SCOPES[normalization]
    feature_decay: float = 5e-4  # regularized only
    feature_decay_reduction: str = "mean"  # mean | sum over the batch
    n_per_class: int | None = None  # None: every training sample
    test_n_per_class: int | None = None  # None: every test sample
    random_labels: bool = False
    metrics_every: int = 1
    metrics_at_start: bool = False
    seed: int = 0
    mlp_depth: int = 3  # mlp: hidden layers; the last hidden width is `dim`
    mlp_width: int = 512
    resnet18_width: int = 64
    gaussian_dim: int = 32
    gaussian_train_per_class: int = 100
    gaussian_test_per_class: int = 50
    gaussian_noise: float = 1.0
    checkpoint_every: int = 1  # epochs between checkpoints (with a checkpoint path)
    save_features: bool = False  # keep the penultimate features and labels (with an outputs directory)
    loss: str = "cross_entropy"  # worker.nc.ufm_problem.LOSSES
    label_smoothing: float | None = None  # eps, with loss "label_smoothing" only
    # Names of models.layer_names(architecture) whose outputs are measured too, or ("all",).
    metrics_layers: tuple[str, ...] | None = None

    def __post_init__(self):
        for field, value, allowed in (
            ("normalization", self.normalization, NORMALIZATIONS),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
            ("weight_decay_scope", self.weight_decay_scope, (None, *WEIGHT_DECAY_SCOPES)),
            ("feature_decay_reduction", self.feature_decay_reduction, ("mean", "sum")),
        ):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
        if self.dataset == "gaussian" and self.architecture != "mlp":
            raise ValueError("the gaussian dataset has vector inputs: it needs architecture 'mlp'")
        if self.batch_size < 2:
            raise ValueError("batch_size must be at least 2: BatchNorm needs two samples")
        if self.epochs < 1 or self.metrics_every < 1 or self.checkpoint_every < 1:
            raise ValueError("epochs, metrics_every and checkpoint_every must be at least 1")
        check_loss(self.loss, self.label_smoothing)
        if self.metrics_layers is not None:
            object.__setattr__(self, "metrics_layers", tuple(self.metrics_layers))
            unknown = set(self.metrics_layers) - {"all", *layer_names(self.architecture, self.mlp_depth)}
            if unknown:
                raise ValueError(f"metrics_layers: {self.architecture} has no layer {', '.join(sorted(unknown))}")

    @property
    def measured_layers(self) -> tuple[str, ...]:
        """The layers whose outputs are measured besides the classifier's input, in order."""
        names = layer_names(self.architecture, self.mlp_depth)
        if self.metrics_layers == ("all",):
            return names
        return tuple(name for name in names if name in (self.metrics_layers or ()))

    @property
    def decay_scope(self) -> str:
        """The parameters weight_decay applies to: all, backbone, classifier or none."""
        if self.normalization == "none":
            return "none"
        return self.weight_decay_scope or DEFAULT_DECAY_SCOPES[self.normalization]


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The rate for 0-based `epoch`: constant; step (x0.1 after 1/3 and after 2/3 of the
    epochs, as in Papyan et al. 2020); milestones (x lr_gamma at the start of each
    1-based milestone epoch, as Yaras et al. 2022 do every 40 epochs); or cosine
    annealing per epoch."""
    if config.lr_schedule == "milestones":
        return config.lr * config.lr_gamma ** sum(epoch + 1 >= m for m in config.lr_milestones or ())
    if config.lr_schedule == "step":
        milestones = [m for m in (config.epochs // 3, 2 * config.epochs // 3) if m > 0]
        return config.lr * 0.1 ** sum(epoch >= m for m in milestones)
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * epoch / config.epochs))
    return config.lr


def make_optimizer(config: TrainConfig, model: NCModel) -> torch.optim.Optimizer:
    """SGD with momentum or Adam; decay as an L2 term in the gradient, so that the
    regularized mode minimizes the objective of Zhu et al. (2021) exactly, on the
    parameters that `decay_scope` names (the classifier's are W and b)."""
    scope = config.decay_scope
    backbone_decay = config.weight_decay if scope in ("all", "backbone") else 0.0
    classifier_decay = config.weight_decay if scope in ("all", "classifier") else 0.0
    groups = [
        {"params": model.backbone.parameters(), "weight_decay": backbone_decay},
        {"params": model.classifier.parameters(), "weight_decay": classifier_decay},
    ]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def batch_loss(config: TrainConfig, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over the batch of `config.loss` (docs/closed-forms.md): the cross-entropy,
    half the squared error to the one-hot target (Zhou et al. 2022), or the cross-entropy
    against targets smoothed by `label_smoothing`."""
    if config.loss == "mse":
        targets = F.one_hot(labels, logits.shape[1]).to(logits.dtype)
        return F.mse_loss(logits, targets, reduction="sum") / (2 * len(labels))
    if config.loss == "label_smoothing":
        assert config.label_smoothing is not None, "TrainConfig requires it with loss 'label_smoothing'"
        return F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
    return F.cross_entropy(logits, labels)


def feature_penalty(config: TrainConfig, features: torch.Tensor) -> torch.Tensor | float:
    """The regularized mode's feature decay: feature_decay / 2 * ||h||^2, averaged over the
    batch (ours: independent of the batch size) or summed (the seed paper's code); 0 in
    the other modes."""
    if config.normalization != "regularized" or not config.feature_decay:
        return 0.0
    squared_norms = features.pow(2).sum(dim=1)
    per_batch = squared_norms.sum() if config.feature_decay_reduction == "sum" else squared_norms.mean()
    return config.feature_decay / 2 * per_batch


def batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive index batches of `order`. A trailing batch of one sample joins the
    one before: BatchNorm cannot normalize a single sample in training mode."""
    chunks = list(order.split(batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def train(
    config: TrainConfig,
    data_dir,
    *,
    device=None,
    on_epoch: Callable[[int, dict], None] | None = None,
    on_progress: Callable[[float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    compute_metrics: bool = True,
    checkpoint_path: Path | None = None,
    on_checkpoint_saved: Callable[[Path], None] | None = None,
    outputs: Path | None = None,
) -> dict:
    """Train as `config` says; returns the last epoch's row plus `epochs` (completed) and
    `parameters` (count).

    `on_epoch(epoch, row)` is called as each epoch (1-based) ends, with the flat row
    `epoch, lr, train_loss, train_accuracy` and, on metric epochs, the catalogue keys and
    `test_loss, test_accuracy`. `should_stop()` is polled every batch (raises Stopped);
    `on_progress(fraction)` is told the fraction of all batches done every CHECK_EVERY
    batches and at each epoch's end. A non-finite training loss raises Diverged. On a CPU
    the same config gives the same history, bit for bit.

    With `checkpoint_path`, a checkpoint is saved there after every epoch that is a
    multiple of `checkpoint_every` and after the last, each once on_epoch has had the
    epoch's row (so a row is never lost: an interruption in between makes the resume emit
    it again). A run that finds a checkpoint there resumes from it: it emits the rows of
    the epochs after the checkpoint's only (no epoch-0 row), and its rows and result are
    those of an uninterrupted run, bit for bit on a CPU. `on_checkpoint_saved(path)` is
    called after each save (to copy it elsewhere). The checkpoint is left in place
    at the end: removing it is the caller's business. With `outputs`, a directory, the
    final model is written there (MODEL_FILE) and, with `save_features`, the last epoch's
    features and labels (FEATURES_FILE).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        device = torch.device("cpu")
    data = load_dataset(
        config.dataset,
        data_dir,
        config.num_classes,
        config.n_per_class,
        config.seed,
        config.random_labels,
        config.gaussian_dim,
        config.gaussian_train_per_class,
        config.gaussian_test_per_class,
        config.gaussian_noise,
        config.test_n_per_class,
    )
    # Initialize from the seed without disturbing the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(
            config.architecture,
            data.channels,
            data.image_size,
            config.num_classes,
            config.dim,
            config.normalization,
            config.logit_scale,
            config.mlp_depth,
            config.mlp_width,
            config.resnet18_width,
        )
    model.to(device)
    optimizer = make_optimizer(config, model)
    # The whole data set lives on the device: a batch is one gather, not a DataLoader.
    train_x, train_y = data.train_x.to(device), data.train_y.to(device)
    test_x, test_y = data.test_x.to(device), data.test_y.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    normalized = config.normalization == "normalized"

    num_samples = len(train_y)
    batches_per_epoch = len(batches(torch.arange(num_samples), config.batch_size))
    total_batches = batches_per_epoch * config.epochs
    state = TrainingState(model, optimizer, generator, device)
    run_config = dataclasses.asdict(config)
    resumed = load_checkpoint(checkpoint_path, state, run_config) if checkpoint_path is not None else None
    row: dict = {}
    first_epoch = 1
    if resumed is not None:
        row, first_epoch = resumed.row, resumed.epoch + 1
        if on_progress is not None:
            on_progress(resumed.epoch / config.epochs)
    elif compute_metrics and config.metrics_at_start:
        row = {
            "epoch": 0,
            "lr": learning_rate(config, 0),
            **evaluate(model, train_x, train_y, test_x, test_y, config.num_classes),
        }
        if on_epoch is not None:
            on_epoch(0, row)
    # The last epoch's features, when its metrics computed them: what FEATURES_FILE keeps.
    last_features: tuple[torch.Tensor, torch.Tensor] | None = None
    for epoch in range(first_epoch, config.epochs + 1):
        lr = learning_rate(config, epoch - 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        order = torch.randperm(num_samples, generator=generator).to(device)
        # Per-batch sums, kept on the device so that the loop never waits for it.
        loss_sums = torch.zeros(batches_per_epoch, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        checked = 0
        for batch, indices in enumerate(batches(order, config.batch_size)):
            if should_stop is not None and should_stop():
                raise Stopped(f"stopped at epoch {epoch}, batch {batch + 1}")
            x, y = train_x[indices], train_y[indices]
            features = model.features(x)
            logits = model.classify(features)
            loss = batch_loss(config, logits, y)
            objective = loss + feature_penalty(config, features)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            if normalized:
                model.renormalize_classifier()
            loss_sums[batch] = loss.detach() * len(y)
            correct += (logits.argmax(dim=1) == y).sum()
            if (batch + 1) % CHECK_EVERY == 0 or batch + 1 == batches_per_epoch:
                _check_finite(loss_sums, checked, batch + 1, epoch)
                checked = batch + 1
                if on_progress is not None:
                    on_progress(((epoch - 1) * batches_per_epoch + batch + 1) / total_batches)

        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": loss_sums.sum().item() / num_samples,
            "train_accuracy": correct.item() / num_samples,
        }
        if compute_metrics and (epoch % config.metrics_every == 0 or epoch == config.epochs):
            taps = LayerTaps(model, config.measured_layers, train_y, config.num_classes)
            with taps:
                train_features = penultimate_features(model, train_x, taps)
            last_features = train_features, penultimate_features(model, test_x)
            row.update(measure(model, *last_features, train_y, test_y, config.num_classes))
            row.update(taps.metrics())
            if epoch < config.epochs:
                last_features = None  # not held while the next epoch trains
        if on_epoch is not None:
            on_epoch(epoch, row)
        if checkpoint_path is not None and (epoch % config.checkpoint_every == 0 or epoch == config.epochs):
            save_checkpoint(checkpoint_path, state, epoch, row, run_config)
            if on_checkpoint_saved is not None:
                on_checkpoint_saved(checkpoint_path)
    _check_learned(row["train_loss"], config)
    if outputs is not None:
        if config.save_features and last_features is None:  # no metrics, or resumed after the last epoch
            last_features = penultimate_features(model, train_x), penultimate_features(model, test_x)
        write_outputs(Path(outputs), model, last_features if config.save_features else None, train_y, test_y)
    parameters = sum(p.numel() for p in model.parameters())
    return {**row, "epochs": config.epochs, "parameters": parameters}


def write_outputs(
    outputs: Path,
    model: NCModel,
    features: tuple[torch.Tensor, torch.Tensor] | None,
    train_y: torch.Tensor,
    test_y: torch.Tensor,
) -> None:
    """The final model's state_dict (BatchNorm's buffers included) as MODEL_FILE and, when
    given, the training and test sets' features with their labels as FEATURES_FILE."""
    write_tensors(outputs / MODEL_FILE, model.state_dict())
    if features is not None:
        train_features, test_features = features
        write_tensors(
            outputs / FEATURES_FILE,
            {
                "train_features": train_features,
                "train_labels": train_y,
                "test_features": test_features,
                "test_labels": test_y,
            },
        )


# A run that ends far above a uniform guess's loss did worse than guessing.
LEARNED_NOTHING_FACTOR = 2.0


def _check_learned(final_train_loss: float, config: TrainConfig) -> None:
    """Raise Diverged for a run whose last epoch's training loss is above twice a uniform guess's.

    Such a run (Adam at lr = 100, say) has finite losses but has learned nothing, and its
    metrics would be reported as if it had. Equal logits score ln K under either
    cross-entropy, and zero logits 1/2 under the squared error.
    """
    if config.loss == "mse":
        chance, name, guess = 0.5, "1/2", "zero logits score 1/2"
    else:
        chance, name, guess = math.log(config.num_classes), "ln K", "a uniform guess scores ln K"
    if final_train_loss > LEARNED_NOTHING_FACTOR * chance:
        raise Diverged(
            f"the last epoch's training loss is {final_train_loss:.4g}, above {LEARNED_NOTHING_FACTOR:g} "
            f"x {name} = {LEARNED_NOTHING_FACTOR * chance:.3g} ({guess}): the run learned nothing"
        )


def _check_finite(loss_sums: torch.Tensor, start: int, stop: int, epoch: int) -> None:
    """Raise Diverged naming the first batch in start..stop-1 whose loss is not finite."""
    recent = loss_sums[start:stop]
    if not torch.isfinite(recent.sum()):
        first = int(torch.nonzero(~torch.isfinite(recent))[0])
        value = recent[first].item()
        raise Diverged(f"loss became {value} at epoch {epoch}, batch {start + first + 1}")


@torch.no_grad()
def evaluate(model: NCModel, train_x, train_y, test_x, test_y, num_classes: int) -> dict:
    """The catalogue on the training set, and again on the test set with keys prefixed
    `test_`, in eval mode.

    The features of each whole set are kept (N x d, as large as the data set's inputs at
    most) and handed to collapse_metrics in one piece, which costs less than the two
    passes over the network that CollapseAccumulator's nc4 would need.
    """
    train_features, test_features = penultimate_features(model, train_x), penultimate_features(model, test_x)
    return measure(model, train_features, test_features, train_y, test_y, num_classes)


@torch.no_grad()
def penultimate_features(model: NCModel, x: torch.Tensor, taps: "LayerTaps | None" = None) -> torch.Tensor:
    """The features of `x` as fed to the classifier, in eval mode (BatchNorm's running
    statistics), computed EVAL_BATCH_SIZE samples at a time; `taps` sees every block."""
    model.eval()
    blocks = []
    for start, block in zip(range(0, len(x), EVAL_BATCH_SIZE), x.split(EVAL_BATCH_SIZE)):
        if taps is not None:
            taps.start_block(start, len(block))
        blocks.append(model.features(block))
    return torch.cat(blocks)


class LayerTaps:
    """The class-mean catalogue (MEAN_KEYS) at the outputs of named layers, from forward
    hooks on the evaluation pass over the training set: each layer's output feeds its own
    streaming CollapseAccumulator, so that memory stays O(K d + d^2) per layer whatever N.

    A convolutional output (B x C x H x W) is measured as its global average over space (C
    features), as the penultimate features of the conv nets are; a flat one as it is. The
    accumulators form their scatters in float32 (CollapseAccumulator's scatter_dtype):
    with four wide layers the float64 products made a metric epoch 1.53x as long as the
    penultimate-only one (bench/train.py --layers).
    """

    def __init__(self, model: NCModel, names: tuple[str, ...], labels: torch.Tensor, num_classes: int):
        self.model, self.names, self.labels, self.num_classes = model, names, labels, num_classes
        self.accumulators: dict[str, CollapseAccumulator] = {}
        self.block_labels: torch.Tensor | None = None
        self.handles: list = []

    def __enter__(self) -> "LayerTaps":
        self.handles = [self.model.layers[name].register_forward_hook(self._hook(name)) for name in self.names]
        return self

    def __exit__(self, *_exc) -> None:
        for handle in self.handles:
            handle.remove()

    def start_block(self, start: int, size: int) -> None:
        """The next forward pass holds samples start .. start + size - 1."""
        self.block_labels = self.labels[start : start + size]

    def _hook(self, name: str):
        def record(_module, _inputs, output: torch.Tensor) -> None:
            features = output.mean(dim=(2, 3)) if output.dim() == 4 else output
            if name not in self.accumulators:
                self.accumulators[name] = CollapseAccumulator(
                    self.num_classes, features.shape[1], features.device, scatter_dtype=torch.float32
                )
            self.accumulators[name].update(features, self.block_labels)

        return record

    def metrics(self) -> dict[str, float]:
        """MEAN_KEYS of every measured layer, as `layer_key`s."""
        row: dict[str, float] = {}
        for name, accumulator in self.accumulators.items():
            metrics = accumulator.compute()
            row |= {layer_key(key, name): metrics[key] for key in MEAN_KEYS}
        return row


@torch.no_grad()
def measure(model: NCModel, train_features, test_features, train_y, test_y, num_classes: int) -> dict:
    """The catalogue of the training set's features, and of the test set's with keys
    prefixed `test_`, judged against the model's effective classifier."""
    weight, bias, scale = model.effective_classifier()
    train = collapse_metrics(train_features, train_y, weight, bias, num_classes, scale)
    test = collapse_metrics(test_features, test_y, weight, bias, num_classes, scale)
    return {**train, **{f"test_{key}": value for key, value in test.items()}}
