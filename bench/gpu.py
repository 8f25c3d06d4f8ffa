"""One-shot GPU check: everything that needs CUDA, in at most 5 minutes on one GPU.

    .venv/bin/python bench/gpu.py [--epochs 3] [--device cuda]

1. The CUDA tests (those the suite skips without a GPU), run by pytest.
2. UFM solves and the metric catalogue on the GPU and on the CPU: equal to 1e-12 (float64).
3. ResNet18 training throughput (images/s): train() without metrics against a plain PyTorch
   loop doing the same work (same model, optimizer and batches) on the same GPU, interleaved.
4. Checkpoint and resume on the GPU: a run stopped as its second epoch ends and resumed from
   its last checkpoint against an uninterrupted one (identical with deterministic algorithms;
   the largest difference is printed either way).

Prints one line per check and exits 1 if one fails. `--device cpu` runs 2-4 on the CPU
(against itself), to check the script where no GPU is.
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch.nn import functional as F

from worker.nc import metrics, ufm
from worker.nc.data import load_dataset
from worker.nc.models import build_model
from worker.nc.train import TrainConfig, batches, make_optimizer, train

REPOSITORY = Path(__file__).resolve().parent.parent
EQUAL_TO = 1e-12
UFM_PROBLEMS = [
    ufm.UFMProblem(num_classes=10, dim=16, n_per_class=20, normalization="normalized", seed=1),
    ufm.UFMProblem(num_classes=5, dim=8, n_per_class=10, normalization="regularized", bias=True, seed=2),
]
failures: list[str] = []


def report(check: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {check}: {detail}", flush=True)
    if not ok:
        failures.append(check)


def cuda_tests() -> None:
    tests = ["tests/test_metrics.py", "tests/test_train_engine.py", "tests/test_ufm.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-k", "cuda", *tests], cwd=REPOSITORY,
                         capture_output=True, text=True)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-300:]
    report("CUDA tests", run.returncode == 0 and "skipped" not in summary, summary)


def largest_difference(a: dict, b: dict) -> float:
    keys = [k for k, v in a.items() if isinstance(v, float) and isinstance(b.get(k), float)]
    return max(abs(a[k] - b[k]) for k in keys)


def same_numbers(device: str) -> None:
    for problem in UFM_PROBLEMS:
        gap = largest_difference(ufm.solve(problem, device=device), ufm.solve(problem, device="cpu"))
        report(f"UFM {problem.normalization} K={problem.num_classes} on {device} vs cpu", gap <= EQUAL_TO,
               f"largest difference {gap:.2e}")
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(600, 32, generator=generator, dtype=torch.float64)
    labels = torch.arange(6).repeat_interleave(100)
    weight, bias = torch.randn(6, 32, generator=generator, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    on_cpu = metrics.collapse_metrics(features, labels, weight, bias, 6)
    on_device = metrics.collapse_metrics(features.to(device), labels.to(device), weight.to(device), bias.to(device), 6)
    gap = largest_difference(on_device, on_cpu)
    report(f"metric catalogue on {device} vs cpu", gap <= EQUAL_TO, f"largest difference {gap:.2e}")


def resnet_config(epochs: int) -> TrainConfig:
    return TrainConfig(dataset="digits", architecture="resnet18", resnet18_width=64, normalization="normalized",
                       num_classes=10, dim=512, epochs=epochs, batch_size=256, lr=0.05, lr_schedule="constant",
                       metrics_every=epochs)


def plain_loop(config: TrainConfig, device: str) -> int:
    """What anyone would write: forward, cross-entropy, backward, step, rows back on the sphere; images seen."""
    data = load_dataset(config.dataset, None, config.num_classes, seed=config.seed)
    torch.manual_seed(config.seed)
    model = build_model(config.architecture, data.channels, data.image_size, config.num_classes, config.dim,
                        config.normalization, config.logit_scale, config.mlp_depth, config.mlp_width,
                        config.resnet18_width).to(device)
    optimizer = make_optimizer(config, model)
    x, y = data.train_x.to(device), data.train_y.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    for _ in range(config.epochs):
        for indices in batches(torch.randperm(len(y), generator=generator).to(device), config.batch_size):
            loss = F.cross_entropy(model(x[indices]), y[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.renormalize_classifier()
    return len(y) * config.epochs


def timed(work) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def throughput(device: str, epochs: int, repeats: int = 3) -> None:
    config = resnet_config(epochs)
    images = len(load_dataset(config.dataset, None, config.num_classes, seed=config.seed).train_y) * epochs
    plain_loop(resnet_config(1), device)  # warm-up: cuDNN's kernels chosen, memory pools filled
    ours, plain = [], []
    for _ in range(repeats):
        ours.append(timed(lambda: train(config, None, device=device, compute_metrics=False)))
        plain.append(timed(lambda: plain_loop(config, device)))
    ours_rate, plain_rate = images / min(ours), images / min(plain)
    report(f"ResNet18 training on {device}", ours_rate >= 0.9 * plain_rate,
           f"ours {ours_rate:,.0f} images/s, plain loop {plain_rate:,.0f} images/s, ratio {ours_rate / plain_rate:.3f}")


class StopAfter(Exception):
    pass


def checkpoint_and_resume(device: str, epochs: int) -> None:
    config = TrainConfig(dataset="digits", architecture="resnet18", resnet18_width=16, normalization="normalized",
                         num_classes=10, dim=64, epochs=max(epochs, 3), batch_size=128, lr=0.05)
    whole: list[dict] = []
    train(config, None, device=device, on_epoch=lambda epoch, row: whole.append(row))
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(scratch) / "checkpoint.safetensors"

        def stop_after_two(epoch: int, row: dict) -> None:
            if epoch == 2:
                raise StopAfter

        try:
            train(config, None, device=device, checkpoint_path=checkpoint, on_epoch=stop_after_two)
        except StopAfter:
            pass
        resumed: list[dict] = []
        train(config, None, device=device, checkpoint_path=checkpoint, on_epoch=lambda epoch, row: resumed.append(row))
    # Stopped as epoch 2 reported its row, before its checkpoint: the run resumes after epoch 1 or 2.
    first = resumed[0]["epoch"] if resumed else None
    later = whole[first - 1:] if first in (2, 3) else []
    if not later or [row["epoch"] for row in resumed] != [row["epoch"] for row in later]:
        report(f"checkpoint and resume on {device}", False, f"resumed epochs {[row['epoch'] for row in resumed]}")
        return
    gap = max(largest_difference(a, b) for a, b in zip(resumed, later))
    report(f"checkpoint and resume on {device}", gap <= 1e-3 or resumed == later,
           f"resumed at epoch {first}; {'identical' if resumed == later else f'largest difference {gap:.2e}'} "
           f"(deterministic algorithms: {torch.are_deterministic_algorithms_enabled()})")


def main(
    epochs: Annotated[int, typer.Option(help="epochs of each timed training run")] = 3,
    device: Annotated[str, typer.Option(help="cuda, or cpu to check the script without a GPU")] = "cuda",
) -> None:
    if device == "cuda":
        if not torch.cuda.is_available():
            raise typer.BadParameter("no CUDA device here: run with --device cpu to check the script")
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
        cuda_tests()
    started = time.perf_counter()
    same_numbers(device)
    throughput(device, epochs)
    checkpoint_and_resume(device, epochs)
    print(f"{len(failures)} failed; {time.perf_counter() - started:.0f} s")
    raise typer.Exit(1 if failures else 0)


if __name__ == "__main__":
    typer.run(main)
