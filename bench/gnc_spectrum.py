"""Where generalized collapse crawls, and why: the merged phase of (K, d, n) = (300, 128, 10).

    OMP_NUM_THREADS=1 .venv/bin/python bench/gnc_spectrum.py                 # ~2.5 min on a quiet core
    OMP_NUM_THREADS=1 .venv/bin/python bench/gnc_spectrum.py --steps 1000,12000   # the saddle at 12,000

From seed 0's start (logit scale 10, as a lab's spec has it), the first-order descent runs on
the full problem until the features merge (worker.nc.merging), then on the merged problem
(one row per class), as `solve` with solver "first_order" and no sublinear-progress rule
would. At each of --steps merged-phase steps it prints the Riemannian gradient norm (of
log L), log L, the largest distance |h_k - w_k| between a class's feature and its
classifier row, and the distance ||W - W_last|| (Frobenius) still to travel to the last
point: the length of the path left.

At the last point it prints the extreme curvatures of the merged problem's Riemannian
Hessian (rotations projected out, worker.nc.curvature) on two complementary subspaces:
"tied", w_k and h_k moving together (the arrangement of the classes on the sphere), and
"apart", moving against each other. Lanczos's smallest Ritz value is an upper bound on
the smallest eigenvalue; its residual says how far below the eigenvalue may be. Last, the
spectrum of W^T W, which is (K/d) I for a tight frame. docs/solver.md, "Second order
(issue 25)", reads these numbers.
"""

import time
from typing import Annotated

import torch
import typer

from worker.nc.curvature import SymmetryModes, _lanczos, turned_start
from worker.nc.flat_tangents import FlatTangents
from worker.nc.descent import minimize
from worker.nc.formulation import class_labels, formulate
from worker.nc.merging import collapsed_class_means, merged_formulation
from worker.nc.objectives import riemannian_hessian
from worker.nc.stopping import StoppingRules
from worker.nc.ufm import initial_point
from worker.nc.ufm_problem import UFMProblem

PROBLEM = UFMProblem(300, 128, 10, "normalized")


def main(
    steps: Annotated[str, typer.Option(help="merged-phase steps to report, comma-separated")] = "1000,4000,12000,28000",
    lanczos: Annotated[int, typer.Option(help="Lanczos steps on each subspace")] = 300,
) -> None:
    torch.set_num_threads(1)
    reported = sorted(int(step) for step in steps.split(","))
    labels = class_labels(PROBLEM, torch.device("cpu"))
    full, merged = formulate(PROBLEM, labels), merged_formulation(PROBLEM, labels)
    assert merged is not None, "the problem is large enough to merge"

    merged_start = []

    def merge_if_collapsed(point):
        means = collapsed_class_means(point[1], labels, PROBLEM.num_classes)
        if means is not None:
            merged_start[:] = [point[0], means]
        return means is not None

    began = time.perf_counter()
    collapsing = minimize(
        full, initial_point(PROBLEM, 0, torch.device("cpu")), StoppingRules(0.0, 10**6, hand_over=merge_if_collapsed)
    )
    print(f"features merged at step {collapsing.last.step}, {time.perf_counter() - began:.2f} s")

    rows = []

    def record(iterate):
        if iterate.step in reported:
            classifier, features = iterate.point
            gap = float(torch.linalg.vector_norm(features - classifier, dim=1).max())
            rows.append((iterate.step, iterate.grad_norm, iterate.value, gap, iterate.point))

    began = time.perf_counter()
    minimize(merged, merged_start, StoppingRules(0.0, reported[-1] + 1), on_iterate=record)
    print(f"{reported[-1]} merged steps, {time.perf_counter() - began:.1f} s")
    last = rows[-1][4]
    print(f"{'step':>6} {'grad_norm':>9} {'log L':>14} {'max|h-w|':>9} {'||W-W_last||':>12}")
    for step, grad_norm, value, gap, point in rows:
        print(f"{step:6d} {grad_norm:9.2e} {value:14.10f} {gap:9.2e} {float((point[0] - last[0]).norm()):12.4f}")

    for name, curvature in subspace_curvatures(merged, last, lanczos).items():
        print(
            f"{name:5s} curvatures: smallest Ritz value {curvature.smallest:.3g} (residual {curvature.residual:.2g}), "
            f"largest {curvature.largest:.3g}, {curvature.iterations} Lanczos steps"
        )
    frame = torch.linalg.eigvalsh(last[0].T @ last[0])
    print(
        f"W^T W eigenvalues {float(frame[0]):.3f} to {float(frame[-1]):.3f} (tight frame: K/d = "
        f"{PROBLEM.num_classes / PROBLEM.dim:.3f}); |sum_k w_k| {float(last[0].sum(dim=0).norm()):.3g}"
    )


def subspace_curvatures(merged, point, steps: int) -> dict:
    """Lanczos on the merged Riemannian Hessian restricted to the tied and to the apart
    directions, rotations projected out. In the merged metric (feature row k weighs n),
    the tied direction nearest to (a, b) is (u, u) with u = (a + n b) / (1 + n), and the
    apart directions, its complement, are (u, -u / n)."""
    manifolds, n = merged.manifolds, PROBLEM.num_samples / PROBLEM.num_classes
    modes = SymmetryModes(merged, point, shifts_bias=False)
    point = modes.point  # the same spectrum, in the coordinates where the projection is cheapest
    hessian = riemannian_hessian(merged.objective, merged.hessian, manifolds, point)
    blocks = FlatTangents(point, manifolds)
    start = turned_start(blocks, 0, modes)

    def operator(flat):
        return blocks.flatten(hessian(blocks.unflatten(flat)))

    def restricted_to(part):
        def restricted(flat):
            vector = modes.project_out(
                [m.project(x, v.clone()) for m, x, v in zip(manifolds, point, blocks.unflatten(flat))]
            )
            classifier, features = vector
            if part == "tied":
                tied = (classifier + n * features) / (1 + n)
                vector = [tied, tied.clone()]
            else:
                apart = (classifier - features) * (n / (1 + n))
                vector = [apart, -apart / n]
            return blocks.flatten([m.project(x, v) for m, x, v in zip(manifolds, point, vector)])

        return restricted

    return {part: _lanczos(operator, restricted_to(part), blocks.metric, start, steps) for part in ("tied", "apart")}


if __name__ == "__main__":
    typer.run(main)
