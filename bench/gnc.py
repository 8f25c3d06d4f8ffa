"""Generalized neural collapse: the normalized UFM with more classes than an ETF fits.

    .venv/bin/python bench/gnc.py                          # the solver in worker/nc/ufm.py
    .venv/bin/python bench/gnc.py --solver /tmp/ufm_orig.py   # a saved copy of an older one
    .venv/bin/python bench/gnc.py --seeds 32 --largest 0   # (100, 43), n = 2: each optimizer over 32 seeds
    .venv/bin/python bench/gnc.py --largest 0 --largest-seeds 16   # (300, 128), n = 10: "auto" over 16 seeds

With K > d + 1 no simplex ETF exists (Jiang et al., ICML 2024, "Generalized neural
collapse for a large number of classes"): the features still collapse onto their
classifier rows, which spread out as far as d dimensions allow. These problems keep
K / d near 2.3, n_per_class = 10, logit scale 10, seed 0, and the defaults max_iters
10,000 and tol 1e-10, as a lab's spec `{"kind": "ufm", "normalization": "normalized",
"K": K, "d": d, "n_per_class": 10}` would have them.

Printed per problem: iterations, wall seconds of solve(), the final Riemannian gradient
norm (of log L), `converged`, `stop_reason` (a dash where the solver reports none),
the smallest angle between classifier rows (`w_min_angle_deg`; with nc1 ~ 0 the class
means sit on those rows, so it is their smallest angle too), nc1, and the loss.

`--optimizer` sets the spec's `solver` ("auto", the default, "first_order" or
"trust_region"). `--seeds S` adds the issue-25 sweep: (K, d, n) = (100, 43, 2), seeds 0 to
S - 1, with "first_order" and with "auto", side by side: how many converge, the total
and the slowest seconds, and the end points' certificates, with how many of them Lanczos
converged on (a "local minimum" is proven only there).

`--largest-seeds S` adds (K, d, n) = (300, 128, 10) with "auto" over seeds 0 to S - 1: each
seed's iterations and seconds, and the median and slowest. Its runs take from about 3,400
to over 9,000 steps, by which of the flat valley's many local minima each one settles in
(docs/solver.md), so one seed's time says little of the next's.

`--solver FILE` imports solve and UFMProblem from that file instead, for a before/after
comparison; it may import worker.nc's other modules, which it then shares with the
current code.

The first line also times one (300 x 128) by (128 x 300) float64 product, the tied phase's
logits at (300, 128): the machines these runs land on differ by twofold in it, and the
(300, 128) row's seconds scale with it (docs/solver.md), so a row read beside another
machine's wants that number beside it.

The process first takes the heap settings of a worker's pool process (worker/memory.py),
where the solver runs for a lab; `--no-retain` leaves glibc's defaults.
"""

import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from torch.utils.benchmark import Timer

from worker.memory import retain_freed_memory

PROBLEMS = [(30, 12), (60, 26), (100, 43), (300, 128)]
N_PER_CLASS = 10
SWEEP_PROBLEM = (100, 43, 2)


def main(
    solver: Annotated[Path | None, typer.Option(help="a ufm.py to measure instead")] = None,
    largest: Annotated[int, typer.Option(help="skip problems with more classes")] = 300,
    optimizer: Annotated[str, typer.Option(help="the spec's solver")] = "auto",
    seeds: Annotated[int, typer.Option(help="seeds of the (100, 43, 2) sweep; 0 skips it")] = 0,
    largest_seeds: Annotated[int, typer.Option(help="seeds of the (300, 128, 10) sweep; 0 skips it")] = 0,
    retain: Annotated[bool, typer.Option(help="the worker's heap settings")] = True,
) -> None:
    if retain:
        retain_freed_memory()
    module = load_solver(solver)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; solver "
        f"{solver or 'worker/nc/ufm.py'}; n_per_class {N_PER_CLASS}, logit scale 10, seed 0; "
        f"optimizer {optimizer}; worker heap settings {retain}; "
        f"a (300 x 128) by (128 x 300) product {product_milliseconds():.3f} ms"
    )
    header = (
        f"{'K':>4} {'d':>4} {'K/d':>5} {'iters':>6} {'seconds':>8} {'grad_norm':>9} "
        f"{'converged':>9} {'min angle':>9} {'nc1':>8} {'loss':>11}  stop_reason"
    )
    print(header)
    print("-" * len(header))
    for K, d in PROBLEMS:
        if K > largest:
            continue
        problem = module.UFMProblem(K, d, N_PER_CLASS, "normalized", solver=optimizer)
        start = time.perf_counter()
        result = module.solve(problem)
        seconds = time.perf_counter() - start
        print(
            f"{K:4d} {d:4d} {K / d:5.2f} {result['iterations']:6d} {seconds:8.2f} "
            f"{result['grad_norm']:9.2e} {result['converged']!s:>9} "
            f"{result['w_min_angle_deg']:9.4f} {result['nc1']:8.1e} {result['loss']:11.9f}  "
            f"{result.get('stop_reason') or '-'}",
            flush=True,
        )
    if seeds:
        sweep(module, seeds)
    if largest_seeds:
        sweep_largest(module, largest_seeds)


def sweep(module, seeds: int) -> None:
    K, d, n = SWEEP_PROBLEM
    print(f"\n(K, d, n) = {SWEEP_PROBLEM}, seeds 0..{seeds - 1}")
    for optimizer in ("first_order", "auto"):
        outcomes = []
        for seed in range(seeds):
            start = time.perf_counter()
            result = module.solve(module.UFMProblem(K, d, n, "normalized", seed=seed, solver=optimizer))
            outcomes.append((time.perf_counter() - start, result))
        unconverged = [seed for seed, (_, result) in enumerate(outcomes) if not result["converged"]]
        kinds = [str(result.get("critical_point")) for _, result in outcomes]
        print(
            f"  {optimizer:12s} converged {seeds - len(unconverged)}/{seeds} "
            f"(unconverged seeds: {unconverged or '-'}); seconds total {sum(t for t, _ in outcomes):.1f}, "
            f"slowest {max(t for t, _ in outcomes):.1f}; iterations max {max(r['iterations'] for _, r in outcomes)}; "
            f"end points: {', '.join(f'{kinds.count(kind)} {kind}' for kind in sorted(set(kinds)))}; "
            f"Lanczos converged at {sum(bool(r.get('hessian_min_eigenvalue_converged')) for _, r in outcomes)}",
            flush=True,
        )


def sweep_largest(module, seeds: int) -> None:
    K, d = PROBLEMS[-1]
    print(f"\n(K, d, n) = ({K}, {d}, {N_PER_CLASS}), auto, seeds 0..{seeds - 1}")
    times, converged = [], 0
    for seed in range(seeds):
        start = time.perf_counter()
        result = module.solve(module.UFMProblem(K, d, N_PER_CLASS, "normalized", seed=seed, solver="auto"))
        times.append(time.perf_counter() - start)
        converged += bool(result["converged"])
        iterations, kind = result["iterations"], result.get("critical_point")
        proof = "Lanczos converged" if result.get("hessian_min_eigenvalue_converged") else "Lanczos at its step cap"
        print(f"  seed {seed:3d}: {iterations:6d} iterations {times[-1]:7.2f} s  {kind} ({proof})", flush=True)
    print(
        f"  converged {converged}/{seeds}; seconds median {statistics.median(times):.2f}, slowest {max(times):.2f}, "
        f"at most 10 s: {sum(t <= 10 for t in times)}/{seeds}"
    )


def product_milliseconds() -> float:
    """The median time of one (300 x 128) by (128 x 300) float64 product, warm, on the solver's threads."""
    rows = torch.randn(300, 128, dtype=torch.float64)
    out = torch.empty(300, 300, dtype=torch.float64)
    timer = Timer(
        "torch.mm(rows, rows.T, out=out)",
        globals={"torch": torch, "rows": rows, "out": out},
        num_threads=torch.get_num_threads(),
    )
    return timer.blocked_autorange(min_run_time=0.2).median * 1e3


def load_solver(path: Path | None):
    if path is None:
        from worker.nc import ufm

        return ufm
    spec = importlib.util.spec_from_file_location("ufm_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    typer.run(main)
