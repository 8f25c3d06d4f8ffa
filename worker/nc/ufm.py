"""Solving the unconstrained feature model (UFM): seeded restarts, and the report of each run.

`solve` runs the descent from `problem.restarts` seeded random starts and reports the
final metrics of the run with the lowest loss, with a history of metrics rows along the
way. A normalized run with a closed form counts as converged only at its collapsed
optimum (`_CollapseCertificate`).

docs/solver.md describes the solver as a whole: the problem and its two variants
(normalized, Yaras et al. 2022; regularized, Zhu et al. 2021), the modules and how they
fit together, the stop reasons, and the measurements behind its choices.
docs/closed-forms.md gives the closed-form optima and the regimes that end elsewhere than
at a collapsed simplex ETF; docs/metrics.md, the metrics of each row.
"""

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from worker.nc.curvature import LOCAL_MINIMUM, STRICT_SADDLE, SecondOrderCertificate, certify
from worker.nc.deep_ufm import layer_features
from worker.nc.descent import Iterate, SolveResult
from worker.nc.errors import Diverged, Stopped
from worker.nc.formulation import Formulation, class_labels, formulate
from worker.nc.manifolds import Euclidean, Point, RowSphere
from worker.nc.merging import descend, merged_formulation
from worker.nc.metrics import MEAN_KEYS, collapse_metrics, layer_key
from worker.nc.objectives import mean_smooth_loss
from worker.nc.stopping import Certificate
from worker.nc.tensor_files import write_tensors
from worker.nc.ufm_problem import UFMProblem, optimal_loss
from worker.nc.work import threads_for, work_per_product

__all__ = ["SOLUTION_FILE", "Diverged", "Stopped", "UFMProblem", "min_angle_degrees", "optimal_loss", "solve"]

SOLUTION_FILE = "solution.safetensors"

# A run counts as having found the global optimum when its loss is this close to the
# closed form (`global_optimum_fraction`): far above the rounding of a converged run,
# far below the gap of any spurious critical point we have seen.
GLOBAL_OPTIMUM_GAP = 1e-8
# A normalized run with a closed form is reported converged only once collapsed: nc1,
# nc2_etf_w and nc3_etf at most this, and its loss within GLOBAL_OPTIMUM_GAP of L*.
COLLAPSE_TOL = 1e-6
COLLAPSE_KEYS = ("nc1", "nc2_etf_w", "nc3_etf")


def solve(
    problem: UFMProblem,
    *,
    device: str | torch.device | None = None,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[float], None] | None = None,
    outputs: Path | None = None,
) -> dict:
    """Minimize the UFM from `problem.restarts` seeded random starts; return the final metrics.

    With `outputs` (a directory), the best run's solution is kept there as SOLUTION_FILE:
    tensors `W` (K x d), `H` (N x d), `b` (K, with a bias) and `labels` (N), float64 but
    the labels.

    `on_checkpoint(step, row)` receives a flat dict (`loss`, `grad_norm`,
    `w_min_angle_deg` and every collapse_metrics key; `cross_entropy` too for
    "regularized") at steps 0, 1, 2, 5, 10, 20, 50, ... (or every `checkpoint_every`
    steps) and at the last one. `should_stop()` is polled once per iteration; when it
    returns True, Stopped is raised. `on_progress(fraction)` receives the fraction of
    the iteration budget (max_iters per restart) spent so far, at most once per percent
    of it, non-decreasing, and 1.0 once the solve is done. A non-finite objective or
    gradient raises Diverged.

    `loss` is the mean cross-entropy for "normalized" and the full objective
    (cross-entropy plus the three weight-decay terms) for "regularized". `grad_norm` is
    the norm of the Riemannian gradient that `problem.tol` bounds. The result adds
    `optimal_loss`, `optimality_gap`, `has_closed_form`, `iterations`, `converged`
    (True only when the run stopped for worker.nc.stopping.StopReason.CONVERGED),
    `stop_reason` (that reason in words, with the numbers that decided it) and
    `features_merged_at` (the step at which worker.nc.merging merged each class's
    collapsed features into one row, or None; `grad_norm`, `converged` and the metrics
    are those of the full problem even so).

    Restarts: the result's metrics, `iterations`, `converged`, `stop_reason` and
    `features_merged_at` are those of the run with the lowest final loss (the first such
    run on a tie), and so is the history: a metric history is one trajectory whose last
    row is the result, so with more than one restart every run's rows are held back and
    only the best run's reach on_checkpoint, in step order, once all runs are done
    (progress keeps moving in the meantime through on_progress). With one restart rows
    stream as they are computed.
    The result also reports `restarts`, `global_optimum_fraction` (the fraction of runs
    whose loss came within GLOBAL_OPTIMUM_GAP of the closed form; None without one) and
    `final_loss_min`, `final_loss_max` and `final_loss_std` (population standard
    deviation) over the runs' final losses.

    Every run's end point is certified (worker.nc.curvature.certify): the result carries
    the best run's `critical_point` ("local minimum", "strict saddle" or "not critical"),
    `hessian_min_eigenvalue`, `hessian_max_eigenvalue`, `hessian_min_eigenvalue_residual`,
    `hessian_min_eigenvalue_converged` and the tolerances that decided it
    (`critical_point_grad_tol`: problem.tol, `critical_point_curvature_tol`), and over all
    runs `minima_found`, `minima_proven` (those whose Lanczos converged: a strict saddle is
    proven by any Lanczos step that finds it, a minimum only there), `saddles_found` and
    `all_minima_global` (whether every minimum found is within GLOBAL_OPTIMUM_GAP of the
    closed form; None without one).
    """
    device = torch.device("cpu" if device is None else device)
    labels = class_labels(problem, device)
    # Like the objective, the metric of the descent depends on the problem, not the start.
    full = formulate(problem, labels)
    merged = merged_formulation(problem, labels)
    progress = _Progress(on_progress, budget=problem.max_iters * problem.restarts)

    best, best_history, final_losses = None, [], []
    outcomes: list[_Outcome] = []
    with threads_for(work_per_product(problem), device):
        for run, seed in enumerate(_restart_seeds(problem)):
            history: list[tuple[int, dict]] = []  # this run's rows, held back when there are several runs
            if on_checkpoint is None or problem.restarts == 1:
                record = on_checkpoint
            else:

                def record(step, row, history=history):
                    history.append((step, row))

            def on_step(step: int, run: int = run) -> None:
                progress.update(run * problem.max_iters + step)

            outcome = _solve_once(
                problem,
                full,
                merged,
                seed,
                device,
                on_checkpoint=record,
                should_stop=should_stop,
                on_step=on_step,
                run_label="" if problem.restarts == 1 else f" of restart {run}",
            )
            final_losses.append(outcome.row["loss"])
            outcomes.append(outcome)
            if best is None or outcome.row["loss"] < best.row["loss"]:
                best, best_history = outcome, history
    assert best is not None, "problem.restarts >= 1: there was at least one run"
    if on_checkpoint is not None:  # otherwise nothing was recorded: best_history is empty
        for step, row in best_history:
            on_checkpoint(step, row)
    progress.finish()
    if outputs is not None:
        save_solution(problem, outputs / SOLUTION_FILE, best.result.last.point, labels)

    optimum = optimal_loss(problem)
    minima = [outcome for outcome in outcomes if outcome.certificate.critical_point == LOCAL_MINIMUM]
    return {
        **best.row,
        **best.certificate.as_result(),
        "optimal_loss": optimum,
        "optimality_gap": None if optimum is None else best.row["loss"] - optimum,
        "has_closed_form": optimum is not None,
        "iterations": best.result.last.step,
        "converged": best.result.converged,
        "stop_reason": best.result.message,
        "features_merged_at": best.merged_at,
        "restarts": problem.restarts,
        "global_optimum_fraction": None
        if optimum is None
        else sum(loss - optimum <= GLOBAL_OPTIMUM_GAP for loss in final_losses) / len(final_losses),
        "final_loss_min": min(final_losses),
        "final_loss_max": max(final_losses),
        "final_loss_std": statistics.pstdev(final_losses),
        "minima_found": len(minima),
        "minima_proven": sum(outcome.certificate.curvature.converged for outcome in minima),
        "saddles_found": sum(outcome.certificate.critical_point == STRICT_SADDLE for outcome in outcomes),
        "all_minima_global": None
        if optimum is None
        else all(outcome.row["loss"] - optimum <= GLOBAL_OPTIMUM_GAP for outcome in minima),
    }


def save_solution(problem: UFMProblem, path: Path, point: Point, labels: torch.Tensor) -> None:
    """The solution [W, H, (b), (V_1, ..., V_{L-1})] and the class of each feature row, as safetensors."""
    names = ["W", "H"] + ["b"] * problem.bias + [f"V{layer}" for layer in range(1, problem.layers)]
    tensors = dict(zip(names, point)) | {"labels": labels}
    write_tensors(path, tensors)


@dataclass(frozen=True)
class _Outcome:
    """How one run ended."""

    row: dict  # the metrics of its last iterate
    result: SolveResult
    merged_at: int | None  # the step at which its features were merged, if they were
    certificate: SecondOrderCertificate  # what its end point is: minimum, strict saddle or not critical


def _solve_once(
    problem: UFMProblem,
    full: Formulation,
    merged: Formulation | None,
    seed: int,
    device: torch.device,
    *,
    on_checkpoint: Callable[[int, dict], None] | None,
    should_stop: Callable[[], bool] | None,
    on_step: Callable[[int], None],
    run_label: str,
) -> _Outcome:
    """One run from the start that `seed` draws, each of its iterates checked for
    divergence, counted, and reported where the checkpoint schedule says so."""
    start = initial_point(problem, seed, device)
    is_checkpoint = _checkpoint_schedule(problem.checkpoint_every)
    certificate = _CollapseCertificate(problem, full)

    def report(iterate: Iterate, formulation: Formulation, last: bool) -> dict | None:
        """The iterate's metrics row, where it is the last or a checkpoint."""
        if not (math.isfinite(iterate.value) and math.isfinite(iterate.grad_norm)):
            raise Diverged(f"objective or gradient is not finite at iteration {iterate.step}{run_label}")
        on_step(iterate.step)
        if not (last or (on_checkpoint is not None and is_checkpoint(iterate.step))):
            return None
        point = formulation.expand(iterate.point)
        row = certificate.row_of(point)
        if row is None:
            row = _metrics_row(problem, full.labels, point, iterate.grad_norm)
        if on_checkpoint is not None:
            on_checkpoint(iterate.step, row)
        return row

    def go_on_from(iterate: Iterate, formulation: Formulation) -> None:
        report(iterate, formulation, last=False)
        if should_stop is not None and should_stop():
            raise Stopped(f"stopped at iteration {iterate.step}{run_label}")

    run = descend(problem, full, merged, start, certificate.for_formulation, go_on_from)
    row = report(run.result.last, full, last=True)
    assert row is not None, "report returns the row of the last iterate"
    last = run.result.last
    certificate_of_last = certify(problem, full, last.point, last.grad_norm, problem.tol, merged)
    return _Outcome(row, run.result, run.merged_at, certificate_of_last)


class _CollapseCertificate:
    """Certifies that a normalized problem with a closed form has reached its collapsed
    optimum: COLLAPSE_KEYS at most COLLAPSE_TOL, the loss within GLOBAL_OPTIMUM_GAP of it.

    The gradient test alone can stop short of it: log L at small logit scales hardly
    depends on how the classifier rows are arranged, so a point can pass the test with
    nc2_etf_w well above COLLAPSE_TOL (docs/solver.md). Other problems have no collapsed
    optimum to check against: the regularized one may collapse to W = H = 0, where the
    metrics are 0/0, and without a closed form there is no optimal loss to compare with.

    Remembers the full problem's point it last checked, with its metrics row, so that
    the run's last row need not be computed twice.
    """

    def __init__(self, problem: UFMProblem, full: Formulation):
        self.problem, self.full = problem, full
        self.optimum = optimal_loss(problem)
        self.checked_point: Point | None = None
        self.checked_row: dict | None = None

    def for_formulation(self, formulation: Formulation) -> Certificate | None:
        """`certify` for a descent on `formulation`, or None where there is nothing to
        check. It computes the metrics on the formulation's own rows: a merged point of
        a balanced problem has the full point's loss and metrics."""
        if self.problem.normalization != "normalized" or self.optimum is None:
            return None

        def is_collapsed(point: Point, grad_norm: float) -> bool:
            row = _metrics_row(self.problem, formulation.labels, point, grad_norm)
            if formulation is self.full:
                self.checked_point, self.checked_row = point, row
            return row["loss"] - self.optimum <= GLOBAL_OPTIMUM_GAP and all(
                row[key] <= COLLAPSE_TOL for key in COLLAPSE_KEYS
            )

        return is_collapsed

    def row_of(self, point: Point) -> dict | None:
        """The metrics row of `point` if it is the full point last checked, else None."""
        return self.checked_row if point is self.checked_point else None


class _Progress:
    """Feeds on_progress the fraction of the iteration budget spent, about once a percent.

    A run that converges early leaves the rest of its max_iters unspent, so the fraction
    jumps when the next restart begins, and to 1.0 at the end.
    """

    def __init__(self, callback: Callable[[float], None] | None, budget: int):
        self.callback, self.budget = callback, budget
        self.stride = max(1, budget // 100)
        self.next_report = 0

    def update(self, spent: int) -> None:
        if self.callback is not None and self.budget > 0 and spent >= self.next_report:
            self.callback(spent / self.budget)
            self.next_report = spent + self.stride

    def finish(self) -> None:
        if self.callback is not None:
            self.callback(1.0)


def _restart_seeds(problem: UFMProblem) -> list[int]:
    """`seed` itself for the first run, so that one restart is the plain seeded solve.

    Run r > 0 draws from numpy's SeedSequence of (seed, r), whose streams are independent
    of each other and of every other seed's: plain seed + r would make restart 1 of seed
    0 the same start as restart 0 of seed 1.
    """
    derived = [
        int(np.random.SeedSequence([problem.seed, run]).generate_state(1, np.uint64)[0])
        for run in range(1, problem.restarts)
    ]
    return [problem.seed, *derived]


def initial_point(problem: UFMProblem, seed: int, device: str | torch.device) -> Point:
    """Seeded start, drawn on the CPU so that the seed fixes it on every device."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(problem.num_classes, problem.dim), (problem.num_samples, problem.dim)]
    if problem.normalization == "normalized":
        start = [RowSphere().random(shape, generator) for shape in shapes]
    else:
        # Small, so that the start sits near the origin's saddle rather than deep in the
        # cross-entropy's saturated region.
        start = [Euclidean().random(shape, generator) * 0.1 / math.sqrt(problem.dim) for shape in shapes]
    if problem.bias:
        start.append(torch.zeros(problem.num_classes, dtype=torch.float64))
    # The hidden layers of a deep UFM at the scale that keeps the features' norms: near 0
    # the origin is a saddle of order L, where every gradient step is ~0.
    start += [
        Euclidean().random((problem.dim, problem.dim), generator) / math.sqrt(problem.dim)
        for _ in range(problem.layers - 1)
    ]
    return [block.to(device) for block in start]


def _metrics_row(problem: UFMProblem, labels: torch.Tensor, point: Point, grad_norm: float) -> dict:
    """The history row of `point`: collapse_metrics, with `loss` the mean of the
    problem's loss (plus the weight decays: the whole objective, for "regularized", whose
    row keeps the logits' cross-entropy as `cross_entropy`), the smallest angle between
    classifier rows and the gradient norm."""
    classifier, bias = point[0], point[2] if problem.bias else None
    *hidden_features, features = layer_features(problem, point)  # features: the classifier's input
    if problem.normalization == "normalized":
        row = collapse_metrics(features, labels, classifier, bias, problem.num_classes, problem.logit_scale)
    else:
        row = collapse_metrics(features, labels, classifier, bias, problem.num_classes)
        row["cross_entropy"] = row["loss"]
    if problem.loss != "cross_entropy":
        row["loss"] = mean_smooth_loss(problem, labels, [classifier, features, *point[2:3]])
    if problem.normalization == "regularized":
        penalty = sum(decay / 2 * float((block**2).sum()) for decay, block in zip(problem.decays, point))
        row["loss"] += penalty
    for layer, layer_input in enumerate(hidden_features, start=1):
        layer_row = collapse_metrics(layer_input, labels, None, None, problem.num_classes)
        row |= {layer_key(key, f"layer{layer}"): layer_row[key] for key in MEAN_KEYS}
    row["w_min_angle_deg"] = min_angle_degrees(classifier)
    row["grad_norm"] = grad_norm
    return row


def min_angle_degrees(rows: torch.Tensor) -> float:
    """The smallest angle between two rows, in degrees; NaN if a row is zero.

    A simplex ETF has arccos(-1/(K-1)) between every pair; with K > d + 1, where none
    exists, this is how far apart the crowded classifier rows stay. Measured as
    2 asin(||u - v|| / 2) between the unit rows u, v of the closest pair, which keeps
    its digits for small angles, where the arccos of a cosine near 1 would not.
    """
    units = rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)
    cosines = units @ units.T
    cosines.fill_diagonal_(-math.inf)
    first, second = divmod(int(cosines.argmax()), rows.shape[0])
    chord = float(torch.linalg.vector_norm(units[first] - units[second]))
    return math.degrees(2 * math.asin(min(chord / 2, 1.0)))


def _checkpoint_schedule(every: int | None) -> Callable[[int], bool]:
    """Steps 0, 1, 2, 5, 10, 20, 50, ... (1-2-5 per decade), or multiples of `every`."""
    if every is not None:
        return lambda step: step % every == 0

    def is_checkpoint(step: int) -> bool:
        if step == 0:
            return True
        decade = 10 ** (len(str(step)) - 1)
        return step % decade == 0 and step // decade in (1, 2, 5)

    return is_checkpoint
