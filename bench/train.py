"""Time `worker.nc.train.train` against a plain PyTorch training loop doing the same work.

    .venv/bin/python bench/train.py [--epochs 40] [--width 512] [--repeats 3] [--threads 2]

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
"""

import statistics
import time
from typing import Annotated

import torch
import typer
from torch.nn import functional as F

from worker.memory import retain_freed_memory
from worker.nc import train as train_module
from worker.nc.data import load_dataset
from worker.nc.train import TrainConfig, batches, make_optimizer, train


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


def main(
    epochs: Annotated[int, typer.Option(help="epochs per run")] = 40,
    width: Annotated[int, typer.Option(help="width of the MLP's first two hidden layers")] = 512,
    repeats: Annotated[int, typer.Option(help="timed rounds after one warm-up")] = 3,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's)")] = None,
    retain: Annotated[bool, typer.Option(help="the worker's heap settings")] = True,
):
    if retain:
        retain_freed_memory()
    if threads is not None:
        torch.set_num_threads(threads)
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
