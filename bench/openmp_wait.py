"""How OpenMP's wait setting changes a CPU training epoch, on a quiet machine and a busy one.

    .venv/bin/python bench/openmp_wait.py [--rounds 3] [--epochs 8] [--threads 2]

A worker rarely has its cores to itself: the API, other workers, `nclab serve`'s own
processes share them. PyTorch's OpenMP threads (GNU libgomp) spin while they wait for each
other, up to 300,000 polls by default, and a spinning thread that the scheduler leaves on a
core another process needs stalls the whole parallel region.

Each round trains the same run (a 10-class Gaussian MLP, `--epochs` epochs of 10,000
samples, metrics on, `--threads` torch threads, as a pool process does) in a fresh
subprocess under each setting, once on a quiet machine and once beside competitors,
processes that keep every core busy with single-threaded float64 matrix products:

- `default`: torch's, which the worker keeps (the baseline);
- `PASSIVE`: OMP_WAIT_POLICY=PASSIVE, threads sleep at once (what the worker set before);
- `spin 1e5`: GOMP_SPINCOUNT=100000, a third of the default spin, then sleep.

The setting must be in the environment before torch loads OpenMP, hence the subprocesses.
An epoch's time is the interval between two on_epoch calls; the first epoch (warm-up) is
left out. The settings alternate their order from round to round, so that drift falls on
all.

Printed: the median and the slowest epoch of each, quiet and busy, and each median over the
default's.
"""

import functools
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

ROOT = Path(__file__).resolve().parent.parent
# The environment of each setting.
SETTINGS = {
    "default": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 1e5": {"GOMP_SPINCOUNT": "100000"},
}

EPOCH_TIMES = """
import json, sys, time
import torch
from worker.nc.train import TrainConfig, train
torch.set_num_threads({threads})
marks = []
config = TrainConfig(dataset="gaussian", num_classes=10, dim=64, epochs={epochs},
                     gaussian_train_per_class=1000, lr_schedule="constant")
train(config, None, on_epoch=lambda epoch, row: marks.append(time.perf_counter()))
json.dump([later - earlier for earlier, later in zip(marks, marks[1:])], sys.stdout)
"""

COMPETITOR = """
import torch
torch.set_num_threads(1)
a = torch.randn(512, 512, dtype=torch.float64)
while True:
    a = torch.tanh(a @ a.T / 512)
"""


def epoch_times(setting: str, threads: int, epochs: int) -> list[float]:
    environment = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    environment.update(SETTINGS[setting], OMP_NUM_THREADS=str(threads))
    script = EPOCH_TIMES.format(threads=threads, epochs=epochs)
    output = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(output)


def beside_competitors(run, cores: int):
    """run() while `cores` single-threaded competitors keep every core busy."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    competitors = [subprocess.Popen([sys.executable, "-c", COMPETITOR], env=environment) for _ in range(cores)]
    try:
        return run()
    finally:
        for competitor in competitors:
            competitor.kill()
            competitor.wait()


def main(
    rounds: Annotated[int, typer.Option(help="rounds: each trains under every setting, quiet and busy")] = 3,
    epochs: Annotated[int, typer.Option(help="epochs a run trains (the first is left out)")] = 8,
    threads: Annotated[int, typer.Option(help="torch threads of the training run")] = 2,
) -> None:
    cores = multiprocessing.cpu_count()
    times: dict[tuple[str, str], list[float]] = {(load, name): [] for load in ("quiet", "busy") for name in SETTINGS}
    for round_number in range(rounds):
        order = list(SETTINGS) if round_number % 2 == 0 else list(SETTINGS)[::-1]
        for setting in order:
            times["quiet", setting] += epoch_times(setting, threads, epochs)
            times["busy", setting] += beside_competitors(
                functools.partial(epoch_times, setting, threads, epochs), cores
            )
    print(f"{cores} cores, {threads} torch threads, {rounds} rounds of {epochs - 1} timed epochs each")
    print(f"{'load':6s} {'setting':8s} {'median':>8s} {'slowest':>8s} {'median / default':>17s}")
    for load in ("quiet", "busy"):
        baseline = statistics.median(times[load, "default"])
        for setting in SETTINGS:
            epochs_seen = times[load, setting]
            median = statistics.median(epochs_seen)
            print(f"{load:6s} {setting:8s} {median:7.3f}s {max(epochs_seen):7.3f}s {median / baseline:16.2f}x")


if __name__ == "__main__":
    typer.run(main)
