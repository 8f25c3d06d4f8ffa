"""Time the neural-collapse metric catalogue against the one product it cannot beat.

    .venv/bin/python bench/metrics.py --repeats 7 [--threads 1]

For N = 50,000 float32 features of dimension d = 512 (class means plus noise) and K = 10
and 100 classes with a random classifier, times in the same run:

- `gemm`: one float64 H^T H of the same features (converted before timing), the cost of
  a single pass that forms a d x d second moment: the lower bound to compare with;
- `collapse_metrics`: the whole catalogue, with the classifier, from the float32 array;
- `accumulator, 2 passes`: CollapseAccumulator(passes=2) over batches of 512, the
  updates plus `compute` with its replay pass: the whole catalogue, as from a network
  evaluated twice;
- `accumulator, 1 pass`: CollapseAccumulator(passes=1), the updates plus `compute`
  without replay: every key but nc4, accuracy and loss, from a single pass, at the
  price of its d x d scatter (so about one `gemm` by construction).

The four are interleaved within each repeat, so that load from other processes falls
on all of them alike, and each is reported as the median over the repeats after one
warm-up round, in seconds and as a ratio to `gemm`. Also prints the largest relative
difference between each accumulator's values and collapse_metrics's. On a machine shared
with other busy processes, `--threads 1` gives steadier ratios: a multi-threaded
operation waits for its slowest thread, and a descheduled one stalls it.

The process first takes the heap settings of a worker's pool process (worker/memory.py),
where the metrics run; `--no-retain` leaves glibc's defaults, under which the fresh
pages of each call's buffers cost the metrics up to half again as much (measured at
K = 100: collapse_metrics 0.79x to 1.01x of `gemm` between two runs, against 0.65x
with the settings).
"""

import math
import statistics
import time
from typing import Annotated

import torch
import typer

from worker.memory import retain_freed_memory
from worker.nc.metrics import CollapseAccumulator, collapse_metrics

NUM_SAMPLES = 50_000
DIM = 512
BATCH_SIZE = 512


def synthetic_problem(num_classes: int, seed: int):
    """Balanced, shuffled labels; features = class mean + isotropic noise; random W, b."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_SAMPLES) % num_classes
    labels = labels[torch.randperm(NUM_SAMPLES, generator=generator)]
    class_means = 2.0 + torch.randn(num_classes, DIM, generator=generator)  # mu_G away from 0
    noise = torch.randn(NUM_SAMPLES, DIM, generator=generator)
    features = (class_means[labels] + 0.5 * noise).to(torch.float32)
    classifier = torch.randn(num_classes, DIM, generator=generator) / math.sqrt(DIM)
    bias = 0.1 * torch.randn(num_classes, generator=generator)
    return features, labels, classifier, bias


def batches(features, labels):
    for start in range(0, NUM_SAMPLES, BATCH_SIZE):
        yield features[start : start + BATCH_SIZE], labels[start : start + BATCH_SIZE]


def accumulate(features, labels, classifier, bias, num_classes, passes):
    accumulator = CollapseAccumulator(num_classes, DIM, passes=passes)
    for batch_features, batch_labels in batches(features, labels):
        accumulator.update(batch_features, batch_labels)
    replay = batches(features, labels) if passes == 2 else None
    return accumulator.compute(classifier, bias, replay=replay)


def bench(num_classes: int, repeats: int) -> None:
    features, labels, classifier, bias = synthetic_problem(num_classes, seed=num_classes)
    features64 = features.to(torch.float64)
    candidates = {
        "gemm": lambda: features64.T @ features64,
        "collapse_metrics": lambda: collapse_metrics(
            features, labels, classifier, bias, num_classes
        ),
        "accumulator, 2 passes": lambda: accumulate(
            features, labels, classifier, bias, num_classes, passes=2
        ),
        "accumulator, 1 pass": lambda: accumulate(
            features, labels, classifier, bias, num_classes, passes=1
        ),
    }
    times = {name: [] for name in candidates}
    for repeat in range(repeats + 1):
        for name, function in candidates.items():
            start = time.perf_counter()
            function()
            if repeat > 0:  # the first round warms up allocator, threads and caches
                times[name].append(time.perf_counter() - start)

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"K = {num_classes}")
    for name, median in medians.items():
        spread = f"{min(times[name]):.3f}-{max(times[name]):.3f}"
        ratio = median / medians["gemm"]
        print(f"  {name:22s} {median:7.3f} s  (range {spread})  {ratio:5.2f} x gemm")

    one_shot = candidates["collapse_metrics"]()
    for name in ("accumulator, 2 passes", "accumulator, 1 pass"):
        streamed = candidates[name]()
        worst = max(
            abs(value - one_shot[key]) / abs(one_shot[key])
            for key, value in streamed.items()
            if one_shot[key] != 0
        )
        print(f"  {name} vs collapse_metrics: {len(streamed)} keys, "
              f"largest relative difference {worst:.1e}")


def main(
    repeats: Annotated[int, typer.Option(min=1)] = 7,
    threads: Annotated[int, typer.Option(min=0, help="0: torch's default")] = 0,
    retain: Annotated[bool, typer.Option(help="the worker's heap settings")] = True,
) -> None:
    if retain:
        retain_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, N={NUM_SAMPLES}, "
        f"d={DIM}, batches of {BATCH_SIZE}, median of {repeats} after a warm-up round, "
        f"worker heap settings {retain}"
    )
    for num_classes in (10, 100):
        bench(num_classes, repeats)


if __name__ == "__main__":
    typer.run(main)
