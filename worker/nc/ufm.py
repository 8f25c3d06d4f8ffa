"""Solvers for the unconstrained feature model (UFM).

The UFM treats the last-layer features H (N x d) as free variables next to the classifier
W (K x d) and bias b, with n_k samples of class k (N in all), and minimizes the mean
cross-entropy of the logits. Two variants, as in DESIGN.md:

- "normalized" (Yaras et al., NeurIPS 2022, "Neural collapse with normalized features: a
  geometric analysis over the Riemannian manifold"): every w_k and h_i on the unit sphere,
  logits s <w_k, h_i> (+ b_k). When a simplex ETF fits (K <= d + 1) and the classes are
  balanced, the global minimizers are ETFs with h_i = w_{y_i}, and the paper shows every
  other critical point is a strict saddle, so a first-order Riemannian method from a
  random start reaches the optimum.
- "regularized" (Zhu et al., NeurIPS 2021, "A geometric analysis of neural collapse with
  unconstrained features"): unconstrained W, H, b with weight decay; the paper proves the
  same kind of benign landscape, with the closed-form optimum given in `optimal_loss`.

Regimes that end somewhere other than a collapsed ETF, by the mathematics rather than
the solver:

- K > d + 1: no simplex ETF exists. Features still collapse onto their classifier rows,
  which spread out as far as d dimensions allow ("generalized neural collapse", Jiang et
  al., ICML 2024, "Generalized neural collapse for a large number of classes"); the
  smallest angle between classifier rows, `w_min_angle_deg`, is reported for every
  problem so that this geometry can be studied, and `nc2_etf_w` cannot fall below
  sqrt((K - 1 - d) / (K - 1)), the distance from the ETF Gram to any Gram of rank d.
- Imbalanced classes (a list of counts): no closed form; the minority classifier rows
  crowd together as the imbalance grows (Fang et al., PNAS 2021, "Exploring deep neural
  networks via layer-peeled model: minority collapse in imbalanced training").
- On the circle (normalized, d = 2, K = 3) we observe spurious local minima at large
  logit scales, so some random starts end with a positive optimality gap; we saw none
  for d >= 3. `restarts` runs several seeded starts and reports how many found the
  global optimum, to probe the landscape.
- Regularized with K s >= 1: the optimum is W = H = 0, where every NC metric is 0/0: the
  iterates approach it along the slowest eigenspace of the Hessian at the origin, which
  holds every class-constant H with centred class means proportional to W, not just
  ETFs, so the metrics of the final tiny iterate depend on the start. There the loss
  (-> ln K) is what carries meaning.

Both are solved by preconditioned Riemannian gradient descent, one concept per module:

- worker.nc.ufm_problem: `UFMProblem`, the instance as posed, and `optimal_loss`, the
  closed forms;
- worker.nc.manifolds: the spheres and Euclidean spaces that the blocks W, H, b live on;
- worker.nc.objectives: the objective of each variant, with its closed-form gradient;
- worker.nc.preconditioner: the metric of the steps, which scales the feature steps by
  the class size and, for the normalized problem with many classes, couples each
  classifier row with the features of its class;
- worker.nc.step_rule: Barzilai-Borwein step sizes under a nonmonotone Armijo line
  search, which need no hand-tuned step size across the logit scales and
  regularization strengths a lab asks for;
- worker.nc.descent: the descent loop, which yields its iterates;
- this module: `solve`, which runs the descent from seeded starts (restarts), merges
  collapsed features, certifies the end point and reports the metrics.

Once the features of every class have collapsed to within MERGE_TOL of their mean
(normalized problems of some size), each class's features are merged into one row that
stands for all of them, with the loss and the metric weighted to match: the descent
then takes the full problem's steps at a cost independent of N, and the full problem
certifies its end point (`_descent`). Results report the step as `features_merged_at`.

When a run stops, and what the result says about it (`converged`, `stop_reason`):

- converged: the Riemannian gradient norm is at most `tol` and, for a normalized
  problem with a closed form, the point is the collapsed optimum;
- iteration budget spent: `max_iters` steps taken;
- line search stalled: no step decreases the objective any more, which happens at the
  rounding floor of the gradient, where tol is out of reach;
- gradient norm decreasing sublinearly: from iteration SUBLINEAR_MIN_ITERS (1,500) on,
  the run stops once the smallest gradient norm so far has fallen less than
  SUBLINEAR_FACTOR-fold (3) between iteration k/2 and iteration k, a decay slower than
  k^-1.58 where a converging descent gains far more per doubling of k. It happens on
  the normalized problem with K > d + 1, whose landscape has strict saddles of tiny
  negative curvature that a first-order descent crawls past: at K = 300, d = 128,
  n = 10 a run that takes over 20,000 iterations to reach tol stops at 1,500,
  unconverged, its loss 2e-5 (relative) above where the long run ends.
  worker.nc.descent gives the measurements behind the rule and its thresholds.
"""

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from worker.nc.descent import Iterate, SublinearProgress, minimize
from worker.nc.errors import Diverged, Stopped
from worker.nc.manifolds import Euclidean, RowSphere
from worker.nc.metrics import collapse_metrics
from worker.nc.objectives import normalized_objective, regularized_objective
from worker.nc.preconditioner import Preconditioner, class_coupling, feature_step_scale
from worker.nc.ufm_problem import UFMProblem, optimal_loss

__all__ = ["Diverged", "Stopped", "UFMProblem", "min_angle_degrees", "optimal_loss", "solve"]

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
    device=None,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> dict:
    """Minimize the UFM from `problem.restarts` seeded random starts; return the final metrics.

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
    `optimal_loss`, `optimality_gap`, `has_closed_form`, `iterations` and `converged`:
    True only when grad_norm <= tol was reached and, for a normalized problem with a
    closed form, only at a collapsed optimum (COLLAPSE_KEYS at most COLLAPSE_TOL, the
    loss within GLOBAL_OPTIMUM_GAP of it; see worker.nc.descent.minimize for how the
    descent goes on where the gradient test alone would stop short). `stop_reason` says
    in words why the run ended: converged, iteration budget spent, line search stalled,
    or gradient norm decreasing sublinearly, with the numbers that decided it (module
    docstring). `features_merged_at` is the step at which each class's collapsed
    features were merged into one row, or None (see `_descent`); `grad_norm`,
    `converged` and the metrics are those of the full problem.

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
    """
    device = torch.device("cpu" if device is None else device)
    counts = torch.tensor(problem.class_counts, device=device)
    classes = torch.arange(problem.num_classes, device=device)
    labels = classes.repeat_interleave(counts)
    # Like the objective, the metric of the descent depends on the problem, not the start.
    full = _formulation(problem, labels)
    merged = None
    if (
        problem.normalization == "normalized"
        and problem.num_samples > problem.num_classes
        and _work(problem) >= _SMALL_WORK
    ):
        row_weights = counts.to(torch.float64)
        merged = _formulation(problem, classes, row_weights=row_weights, sample_rows=labels)
    progress = _Progress(on_progress, budget=problem.max_iters * problem.restarts)

    best, best_history, final_losses = None, [], []
    with _threads_for(_work(problem), device):
        for run, seed in enumerate(_restart_seeds(problem)):
            history = []  # this run's rows, held back when there are several runs
            if on_checkpoint is None or problem.restarts == 1:
                record = on_checkpoint
            else:

                def record(step, row, history=history):
                    history.append((step, row))

            outcome = _solve_once(
                problem,
                full,
                merged,
                seed,
                device,
                on_checkpoint=record,
                should_stop=should_stop,
                on_step=lambda step, run=run: progress.update(run * problem.max_iters + step),
                run_label="" if problem.restarts == 1 else f" of restart {run}",
            )
            final_losses.append(outcome.row["loss"])
            if best is None or outcome.row["loss"] < best.row["loss"]:
                best, best_history = outcome, history
    for step, row in best_history:
        on_checkpoint(step, row)
    progress.finish()

    optimum = optimal_loss(problem)
    return {
        **best.row,
        "optimal_loss": optimum,
        "optimality_gap": None if optimum is None else best.row["loss"] - optimum,
        "has_closed_form": optimum is not None,
        "iterations": best.iterations,
        "converged": best.converged,
        "stop_reason": best.stop_reason,
        "features_merged_at": best.merged_at,
        "restarts": problem.restarts,
        "global_optimum_fraction": None
        if optimum is None
        else sum(loss - optimum <= GLOBAL_OPTIMUM_GAP for loss in final_losses) / len(final_losses),
        "final_loss_min": min(final_losses),
        "final_loss_max": max(final_losses),
        "final_loss_std": statistics.pstdev(final_losses),
    }


# Below about this much work per matrix product (N d K multiply-adds), what an iteration
# costs is set by the overhead of each call rather than by the products: a second CPU
# thread costs more in synchronization than it saves (`_threads_for`), and merging
# collapsed features more than the smaller products save (`_descent`).
_SMALL_WORK = 2**20


def _work(problem: UFMProblem) -> int:
    """Multiply-adds per matrix product of an evaluation: N d K."""
    return problem.num_samples * problem.dim * problem.num_classes


@contextlib.contextmanager
def _threads_for(work: int, device: torch.device):
    """Run a small problem (`work` multiply-adds per matrix product) on one CPU thread,
    and restore torch's setting afterwards.

    Measured with 2 threads against 1 (normalized, logit scale 10): 0.019 s against
    0.014 s at K = 10, d = 32, n = 50 (N d K = 1.6e5); 0.035 against 0.032 s at K = 20,
    d = 64, n = 50 (1.3e6); 0.044 against 0.046 s at K = 10, d = 64, n = 200 (1.3e6);
    and from 6.4e6 up (K = 50, d = 64, n = 20) two threads win by 25% and more.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or work >= _SMALL_WORK or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class _Outcome:
    row: dict  # metrics of the final iterate
    iterations: int
    converged: bool
    merged_at: int | None  # the step at which the features were merged, if they were
    stop_reason: str


@dataclass
class _RunRecord:
    """What `_descent` reports besides the iterates."""

    checked_point: list | None = None  # the full point last checked for collapse
    checked_row: dict | None = None  # and its metrics row
    merged_at: int | None = None


def _solve_once(
    problem, full, merged, seed, device, *, on_checkpoint, should_stop, on_step, run_label
) -> _Outcome:
    start = _initial_point(problem, seed, device)
    is_checkpoint = _checkpoint_schedule(problem.checkpoint_every)
    record = _RunRecord()

    def row_at(iterate, formulation) -> dict:
        point = formulation.expand(iterate.point)
        if record.checked_point is point:
            return record.checked_row
        return _metrics_row(problem, full.labels, point, iterate.grad_norm)

    for iterate, formulation in _descent(problem, full, merged, start, record):
        if not (math.isfinite(iterate.value) and math.isfinite(iterate.grad_norm)):
            raise Diverged(
                f"objective or gradient is not finite at iteration {iterate.step}{run_label}"
            )
        on_step(iterate.step)
        if iterate.final or (on_checkpoint is not None and is_checkpoint(iterate.step)):
            row = row_at(iterate, formulation)
            if on_checkpoint is not None:
                on_checkpoint(iterate.step, row)
        if iterate.final:
            return _Outcome(
                row, iterate.step, iterate.converged, record.merged_at, iterate.stop_reason
            )
        if should_stop is not None and should_stop():
            raise Stopped(f"stopped at iteration {iterate.step}{run_label}")


def _descent(
    problem, full, merged, start, record: _RunRecord
) -> Iterator[tuple[Iterate, "_Formulation"]]:
    """The iterates of one run from `start`, numbered on from one phase to the next, each
    with the formulation its point belongs to; the last one has `final` set.

    1. The full problem, until every feature lies within MERGE_TOL of its class's
       normalized mean. Only where `merged` is given: the normalized problem, with
       more samples than classes and at least _SMALL_WORK per product. Solve time
       without merging over time with it, logit scale 10, median of 9 solves, one and
       two threads: 0.85 and 0.89 at (K, d, n) = (10, 32, 50) (N d K = 1.6e5), 0.81
       and 1.28 at (10, 32, 200) (6.4e5), 1.12 to 1.69 at 1.3e6, 1.23 to 1.65 at 3e6,
       1.79 and 1.89 at (100, 128, 20) (2.6e7); at K = 1000, d = 1024, n = 10, 58.7 s
       became 21.9 s.
    2. The merged problem: each class's features replaced by that mean, one row per
       class standing for its n_k samples. Collapsed features stay collapsed: at such a
       point every sample of a class has the same gradient, the preconditioner moves
       them alike, and the merged formulation's weighted metric makes every step, step
       size and gradient norm exactly those of the full problem, at a cost that no
       longer grows with N. Merging itself is the one step that the full problem's
       descent would not take; it moves each feature by at most MERGE_TOL, towards
       where the descent was taking it anyway.
    3. The full problem again, from the merged end point with every row repeated for
       its samples. Its first evaluation is the certificate: `converged` and the
       gradient norm are those of the problem as posed. Where it disagrees (rounding
       can put the norm a hair above tol), the full descent carries on from there.

    `record` receives the step of the merge, and the full point last checked for
    collapse with its metrics row, so that the final row need not be computed twice.
    """
    optimum = optimal_loss(problem)

    def collapse_check(formulation):
        """`certify` for `minimize`: only the normalized problem with a closed form has a
        collapsed optimum to check against (the regularized one may collapse to W = H =
        0, where the metrics are 0/0). Its metrics are computed on the formulation's own
        rows: a merged point of a balanced problem has the full point's loss and
        metrics."""
        if problem.normalization != "normalized" or optimum is None:
            return None

        def is_collapsed(point, grad_norm) -> bool:
            row = _metrics_row(problem, formulation.labels, point, grad_norm)
            if formulation is full:
                record.checked_point, record.checked_row = point, row
            return row["loss"] - optimum <= GLOBAL_OPTIMUM_GAP and all(
                row[key] <= COLLAPSE_TOL for key in COLLAPSE_KEYS
            )

        return is_collapsed

    merged_start = None
    give_up = SublinearProgress()  # one per run: its windows span the phases

    def merge_if_collapsed(point) -> bool:
        nonlocal merged_start
        means = _merged_features(point[1], full.labels, problem.num_classes)
        if means is not None:
            merged_start = [point[0], means, *point[2:]]
        return means is not None

    last = yield from _phase(
        full,
        start,
        0,
        problem,
        collapse_check(full),
        give_up,
        hand_over=None if merged is None else merge_if_collapsed,
    )
    if merged_start is None:
        yield last, full
        return
    record.merged_at = last.step
    with _threads_for(problem.num_classes**2 * problem.dim, last.point[1].device):
        last = yield from _phase(
            merged, merged_start, last.step, problem, collapse_check(merged), give_up
        )
    last = yield from _phase(
        full, merged.expand(last.point), last.step, problem, collapse_check(full), give_up
    )
    yield last, full


def _phase(formulation, start, first_step, problem, certify, give_up, hand_over=None):
    """Yield `minimize`'s iterates, with their formulation, numbered from `first_step`;
    return the last one instead of yielding it. `give_up` sees the run's step numbers."""
    iterates = minimize(
        formulation,
        start,
        problem.tol,
        problem.max_iters - first_step,
        certify=certify,
        hand_over=hand_over,
        give_up=lambda step, grad_norm: give_up(first_step + step, grad_norm),
    )
    for iterate in iterates:
        iterate.step += first_step
        if iterate.final:
            return iterate
        yield iterate, formulation


class _Progress:
    """Feeds on_progress the fraction of the iteration budget spent, about once a percent.

    A run that converges early leaves the rest of its max_iters unspent, so the fraction
    jumps when the next restart begins, and to 1.0 at the end.
    """

    def __init__(self, callback: Callable[[float], None] | None, budget: int):
        self.callback, self.budget = callback, budget
        self.stride = max(1, budget // 100)
        self.next_report = 0

    def update(self, spent: int):
        if self.callback is not None and self.budget > 0 and spent >= self.next_report:
            self.callback(spent / self.budget)
            self.next_report = spent + self.stride

    def finish(self):
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


def _initial_point(problem: UFMProblem, seed: int, device) -> list[torch.Tensor]:
    """Seeded start, drawn on the CPU so that the seed fixes it on every device."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(problem.num_classes, problem.dim), (problem.num_samples, problem.dim)]
    if problem.normalization == "normalized":
        start = [RowSphere().random(shape, generator) for shape in shapes]
    else:
        # Small, so that the start sits near the origin's saddle rather than deep in the
        # cross-entropy's saturated region.
        start = [
            Euclidean().random(shape, generator) * 0.1 / math.sqrt(problem.dim) for shape in shapes
        ]
    if problem.bias:
        start.append(torch.zeros(problem.num_classes, dtype=torch.float64))
    return [block.to(device) for block in start]


@dataclass(frozen=True)
class _Formulation:
    """The problem as the descent sees it: objective, manifolds and metric.

    The full formulation has a feature row per sample. The merged one, used once every
    class's features have collapsed (see `_descent`), has one row per class, standing
    for the class's n_k samples: the loss weighs row k n_k times, and so does the
    feature manifold's metric, which makes its descent that of the full problem on
    points whose features are collapsed.
    """

    labels: torch.Tensor  # the class of each feature row
    evaluate: Callable
    manifolds: list
    preconditioner: Preconditioner
    sample_rows: torch.Tensor | None  # merged: the feature row of each sample

    def expand(self, point: list[torch.Tensor]) -> list[torch.Tensor]:
        """The full problem's point: merged feature rows repeated for their samples."""
        if self.sample_rows is None:
            return point
        return [point[0], point[1].index_select(0, self.sample_rows), *point[2:]]


def _formulation(problem, labels, row_weights=None, sample_rows=None) -> _Formulation:
    """`row_weights`: None, or float64 n_k for a merged formulation's rows."""
    if problem.normalization == "normalized":
        evaluate = normalized_objective(problem, labels, row_weights)
        manifolds = [RowSphere(), RowSphere(row_weights)]
    else:
        evaluate = regularized_objective(problem, labels)
        manifolds = [Euclidean(), Euclidean()]
    manifolds += [Euclidean()] * problem.bias
    preconditioner = Preconditioner(
        [1.0, feature_step_scale(problem)] + [1.0] * problem.bias,
        manifolds,
        labels,
        problem.num_classes,
        class_coupling(problem),
        row_weights,
    )
    return _Formulation(labels, evaluate, manifolds, preconditioner, sample_rows)


# Features are merged once every one of them lies this close to its class's normalized
# mean (a distance on the unit sphere); see `_descent`.
MERGE_TOL = 1e-4


def _merged_features(features, labels, num_classes: int) -> torch.Tensor | None:
    """The normalized class means, if every feature lies within MERGE_TOL of its own.

    Asked once per iteration until the merge, at the cost of about four passes over the
    features and one more read from the device.
    """
    sums = features.new_zeros((num_classes, features.shape[1])).index_add_(0, labels, features)
    means = sums.div_(torch.linalg.vector_norm(sums, dim=1, keepdim=True))
    distances = torch.linalg.vector_norm(features - means.index_select(0, labels), dim=1)
    return means if float(distances.max()) <= MERGE_TOL else None



def _metrics_row(problem: UFMProblem, labels: torch.Tensor, point, grad_norm: float) -> dict:
    classifier, features = point[0], point[1]
    bias = point[2] if problem.bias else None
    if problem.normalization == "normalized":
        row = collapse_metrics(
            features, labels, classifier, bias, problem.num_classes, problem.logit_scale
        )
    else:
        row = collapse_metrics(features, labels, classifier, bias, problem.num_classes)
        row["cross_entropy"] = row["loss"]
        decays = [problem.lambda_w, problem.lambda_h] + [problem.lambda_b] * problem.bias
        penalty = sum(decay / 2 * float((block**2).sum()) for decay, block in zip(decays, point))
        row["loss"] = row["cross_entropy"] + penalty
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
