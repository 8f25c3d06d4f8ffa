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

Both are solved by preconditioned Riemannian gradient descent with Barzilai-Borwein step
sizes (Barzilai & Borwein 1988) and a nonmonotone Armijo line search (Zhang & Hager 2004),
a method that needs no hand-tuned step size across the logit scales and regularization
strengths a lab asks for. The preconditioner scales the feature steps by the class size
and, for the normalized problem with many classes, couples each classifier row with the
features of its class (`_Preconditioner`). All computation is float64 with closed-form
gradients: three matrix products of the N x d features with the K x d classifier per
evaluation, and one reused N x K buffer for the logits and their gradient.

Once the features of every class have collapsed to within MERGE_TOL of their mean
(normalized problems of some size), each class's features are merged into one row that
stands for all of them, with the loss and the metric weighted to match: the descent
then takes the full problem's steps at a cost independent of N, and the full problem
certifies its end point (`_descent`). Results report the step as `features_merged_at`.
"""

import collections
import contextlib
import math
import operator
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worker.nc.manifolds import Euclidean, RowSphere, flat_dot
from worker.nc.metrics import collapse_metrics

NORMALIZATIONS = ("normalized", "regularized")

# A run counts as having found the global optimum when its loss is this close to the
# closed form (`global_optimum_fraction`): far above the rounding of a converged run,
# far below the gap of any spurious critical point we have seen.
GLOBAL_OPTIMUM_GAP = 1e-8
# A normalized run with a closed form is reported converged only once collapsed: nc1,
# nc2_etf_w and nc3_etf at most this, and its loss within GLOBAL_OPTIMUM_GAP of L*.
COLLAPSE_TOL = 1e-6
COLLAPSE_KEYS = ("nc1", "nc2_etf_w", "nc3_etf")


@dataclass(frozen=True)
class UFMProblem:
    """One UFM instance; labels are class k repeated n_k times, k = 0..K-1.

    `n_per_class` is one count for every class, or a sequence of K counts (imbalanced
    classes). A sequence of equal counts is the balanced problem and is stored as that
    one int, so it compares, hashes and solves exactly like it.

    `tol` bounds the norm of the Riemannian gradient at the returned point: of log L for
    "normalized" (whose gradient, unlike that of L, does not vanish as the loss
    saturates at large logit scales) and of the full objective for "regularized". A
    normalized problem with a closed form must also be collapsed to count as converged
    (see `solve`). With the default 1e-10, every closed-form case we ran (K up to 1000,
    logit scales 0.5 to 30, decays 1e-4 to 1e-1) ended with nc1, nc2_etf_w and nc3_etf
    below 1e-6 and the loss within 1e-8 of its closed form; rounding puts the floor of
    the gradient norm near 1e-15, so much smaller values are not reachable.

    `restarts` solves from that many seeded random starts (the first from `seed` itself)
    and keeps the run with the lowest final loss; see `solve`.
    """

    num_classes: int
    dim: int
    n_per_class: int | tuple[int, ...]
    normalization: str
    logit_scale: float = 10.0
    bias: bool = False
    lambda_w: float = 5e-4
    lambda_h: float = 5e-4
    lambda_b: float = 5e-4
    max_iters: int = 10_000
    tol: float = 1e-10
    seed: int = 0
    checkpoint_every: int | None = None
    restarts: int = 1

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.normalization == "normalized" and self.dim < 2:
            # The unit "sphere" of R^1 is the two points +-1: there is nothing to descend on.
            raise ValueError("normalized UFM needs dim >= 2")
        object.__setattr__(self, "n_per_class", self._validated_counts())
        if not 0 < self.logit_scale < math.inf:
            raise ValueError(f"logit_scale must be positive and finite, got {self.logit_scale}")
        if self.normalization == "regularized" and not (
            0 < self.lambda_w < math.inf
            and 0 < self.lambda_h < math.inf
            and 0 <= self.lambda_b < math.inf
        ):
            # Without decay on W and H the regularized objective has no minimizer.
            raise ValueError("lambda_w and lambda_h must be positive and lambda_b >= 0, all finite")
        if self.max_iters < 0:
            raise ValueError(f"max_iters must be >= 0, got {self.max_iters}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {self.checkpoint_every}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {self.restarts}")

    def _validated_counts(self) -> int | tuple[int, ...]:
        if not isinstance(self.n_per_class, Sequence):
            counts = (operator.index(self.n_per_class),)
        else:
            counts = tuple(operator.index(count) for count in self.n_per_class)
            if len(counts) != self.num_classes:
                raise ValueError(
                    f"n_per_class needs one count per class: {len(counts)} given, "
                    f"num_classes = {self.num_classes}"
                )
        if min(counts) < 1:
            raise ValueError(f"n_per_class counts must be >= 1, got {self.n_per_class}")
        return counts[0] if len(set(counts)) == 1 else counts

    @property
    def balanced(self) -> bool:
        return isinstance(self.n_per_class, int)

    @property
    def class_counts(self) -> tuple[int, ...]:
        """n_k for k = 0..K-1."""
        if self.balanced:
            return (self.n_per_class,) * self.num_classes
        return self.n_per_class

    @property
    def num_samples(self) -> int:
        return sum(self.class_counts)


class Stopped(Exception):
    """The caller's should_stop() returned True; the solve was abandoned."""


class Diverged(Exception):
    """The objective or its gradient became NaN or infinite."""


def optimal_loss(problem: UFMProblem) -> float | None:
    """The global minimum from DESIGN.md's closed forms, or None where none applies.

    Both closed forms assume balanced classes: with unequal counts there is none.
    Normalized (Yaras et al. 2022): L* = ln(1 + (K-1) exp(-s K/(K-1))) when a simplex ETF
    fits, K <= d + 1; a free bias does not lower it. Regularized (Zhu et al. 2021): with
    c = sqrt(lambda_w / (n lambda_h)) and s = sqrt(n lambda_w lambda_h), the optimum is
    W = H = 0 with f* = ln K when K s >= 1; otherwise, when d >= K - 1, it is an ETF with
    ||w_k||^2 = t = ((K-1)/(K c)) ln(1/s - (K-1)), h = c w_y, b = 0.
    """
    if not problem.balanced:
        return None
    K, d, n = problem.num_classes, problem.dim, problem.n_per_class
    if problem.normalization == "normalized":
        if K > d + 1:
            return None
        return math.log1p((K - 1) * math.exp(-problem.logit_scale * K / (K - 1)))
    balance = math.sqrt(problem.lambda_w / (n * problem.lambda_h))
    strength = math.sqrt(n * problem.lambda_w * problem.lambda_h)
    if K * strength >= 1:
        return math.log(K)
    if d < K - 1:
        return None
    squared_norm = (K - 1) / (K * balance) * math.log(1 / strength - (K - 1))
    margin = balance * squared_norm * K / (K - 1)
    return math.log1p((K - 1) * math.exp(-margin)) + problem.lambda_w * K * squared_norm


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
    loss within GLOBAL_OPTIMUM_GAP of it; see `_minimize` for how the descent goes on
    where the gradient test alone would stop short). `features_merged_at` is the step at
    which each class's collapsed features were merged into one row, or None (see
    `_descent`); `grad_norm`, `converged` and the metrics are those of the full problem.

    Restarts: the result's metrics, `iterations`, `converged` and `features_merged_at`
    are those of the run with the lowest final loss (the first such run on a tie), and
    so is the history: a metric history is one trajectory whose last row is the result,
    so with more than one restart every run's rows are held back and only the best
    run's reach on_checkpoint, in step order, once all runs are done (progress keeps
    moving in the meantime through on_progress). With one restart rows stream as they
    are computed.
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
            return _Outcome(row, iterate.step, iterate.converged, record.merged_at)
        if should_stop is not None and should_stop():
            raise Stopped(f"stopped at iteration {iterate.step}{run_label}")


def _descent(
    problem, full, merged, start, record: _RunRecord
) -> Iterator[tuple["_Iterate", "_Formulation"]]:
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
        """`certify` for _minimize: only the normalized problem with a closed form has a
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
        hand_over=None if merged is None else merge_if_collapsed,
    )
    if merged_start is None:
        yield last, full
        return
    record.merged_at = last.step
    with _threads_for(problem.num_classes**2 * problem.dim, last.point[1].device):
        last = yield from _phase(merged, merged_start, last.step, problem, collapse_check(merged))
    last = yield from _phase(
        full, merged.expand(last.point), last.step, problem, collapse_check(full)
    )
    yield last, full


def _phase(formulation, start, first_step, problem, certify, hand_over=None):
    """Yield _minimize's iterates, with their formulation, numbered from `first_step`;
    return the last one instead of yielding it."""
    iterates = _minimize(
        formulation,
        start,
        problem.tol,
        problem.max_iters - first_step,
        certify=certify,
        hand_over=hand_over,
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
    preconditioner: "_Preconditioner"
    sample_rows: torch.Tensor | None  # merged: the feature row of each sample

    def expand(self, point: list[torch.Tensor]) -> list[torch.Tensor]:
        """The full problem's point: merged feature rows repeated for their samples."""
        if self.sample_rows is None:
            return point
        return [point[0], point[1].index_select(0, self.sample_rows), *point[2:]]


def _formulation(problem, labels, row_weights=None, sample_rows=None) -> _Formulation:
    """`row_weights`: None, or float64 n_k for a merged formulation's rows."""
    if problem.normalization == "normalized":
        evaluate = _normalized_objective(problem, labels, row_weights)
        manifolds = [RowSphere(), RowSphere(row_weights)]
    else:
        evaluate = _regularized_objective(problem, labels)
        manifolds = [Euclidean(), Euclidean()]
    manifolds += [Euclidean()] * problem.bias
    preconditioner = _Preconditioner(
        [1.0, _feature_step_scale(problem)] + [1.0] * problem.bias,
        manifolds,
        labels,
        problem.num_classes,
        _class_coupling(problem),
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


def _feature_step_scale(problem: UFMProblem) -> float:
    """How much longer a step the feature block H takes than the classifier block W.

    Normalized: each feature row carries 1/N of the loss and each classifier row the
    loss of a whole class, so the curvature along a feature row is about n times
    smaller; scaling its step by n puts the blocks on the same footing (it halves the
    iteration count in practice). With unequal counts the mean count N/K stands in for
    n: a classifier row's curvature sums over the samples of every class, not only its
    own, and on imbalanced problems (counts from 1 to 200) it measured as fast as or
    faster than the median or smallest count, or a step per classifier row scaled by
    its class's count. Regularized: the decay lambda_h, not the 1/N-weighted loss, sets
    the curvature along a feature row, and the unscaled steps measured faster.
    """
    if problem.normalization == "regularized":
        return 1.0
    return problem.num_samples / problem.num_classes


def _class_coupling(problem: UFMProblem) -> float:
    """The weight c of the class coupling in `_Preconditioner`: 0 (off) up to K = 10,
    rising linearly to 0.5 at K = 30 and staying there.

    Normalized only: the regularized problem heads for W = H = 0 or an ETF without
    first settling its features on their class's direction. Mean iterations to tol
    1e-10 over seeded starts (d a little above K, logit scale 10 unless said), for
    c = 0 / 0.5 / 1: K = 20, n = 20: 29.5 / 25 / 28.5; K = 30, n = 20: 30.5 / 24.7 / 28.3;
    K = 50, n = 20: 39 / 28 / 26.7; K = 100, n = 20: 38.5 / 33 / 29.7, at scale 30 55.5 / 38 /
    39.7, at scale 3 48 / 43.2 / 43.5; K = 200, n = 5: 40 / 38.7 / 40; K = 300, n = 5:
    52 / 39.7 / 43; K = 500, n = 4: 80.3 / 60 / 62.3; K = 1000, d = 1024, n = 10 (one
    start): 88 / 64 / 94 (79 at c = 0.7). c = 2 was slower than 1 and c = 5 slower than
    none. At K = 10 every c from 0.05 up cost 5 to 15% more iterations, hence the ramp.
    """
    if problem.normalization == "regularized":
        return 0.0
    return 0.5 * min(max((problem.num_classes - 10) / 20, 0.0), 1.0)


# A sum of coefficients times 0-dim device tensors, to be evaluated on the host.
Terms = list[tuple[float, torch.Tensor]]


class _Preconditioner:
    """The metric of the descent, which steps along -P grad: P = D + c B B^T.

    D multiplies each block's gradient by a constant (`_feature_step_scale` for the
    features, 1 for the classifier and the bias). B B^T couples each classifier row
    with the features of its class: B maps a K x d array U to the blocks (U, rows
    U_{y_i}, no bias), so B^T g = g_W + (sum of g_{h_i} over class k) is the gradient
    along moving classifier row k and its class's features together. Once the features
    have collapsed onto their classifier rows, that joint motion is what is left to
    optimize (arranging the rows into an ETF), and D alone takes it in short steps: the
    classifier row and its features pull against each other. P is symmetric positive
    definite for c >= 0, so -P grad is a descent direction, and B^T D^-1 B is diagonal
    (1/D_W + n_k/D_H for class k), which makes P^-1 cheap by the Woodbury identity.

    Everything is measured in the manifolds' metric, and B^T is the adjoint in it: a
    feature row that stands for m_j samples (`row_weights`) counts m_j times in each
    class sum, and n_k is the sum of its class's weights.

    Every quadratic form comes as `Terms`, a sum of coefficients times 0-dim tensors
    on the blocks' device, so that the caller can read all of an iteration's numbers
    in one transfer and combine them on the host: on small problems each arithmetic
    operation on a 0-dim tensor costs as much as an operation on the whole point.
    """

    def __init__(self, scales, manifolds, labels, num_classes: int, coupling, row_weights=None):
        self.scales, self.manifolds, self.labels = scales, manifolds, labels
        self.coupling = coupling
        counts = torch.bincount(labels, weights=row_weights, minlength=num_classes)
        self.row_weights = None if row_weights is None else row_weights[:, None]
        joint_inverse_scale = 1 / scales[0] + counts.to(torch.float64) / scales[1]
        self.woodbury_weights = (coupling / (1 + coupling * joint_inverse_scale))[:, None]

    def direction(self, point, grads, grad_norms_sq, out) -> Terms:
        """Write P grad, projected onto the tangent space at `point`, into the arrays `out`.

        `grad_norms_sq` are the blocks' <g_b, g_b>. Returns the slope <grad, P grad>,
        which the projection leaves unchanged since grad is tangent already.
        """
        slope = list(zip(self.scales, grad_norms_sq))
        if not self.coupling:
            for direction, grad, scale in zip(out, grads, self.scales):
                torch.mul(grad, scale, out=direction)
            return slope
        joint = self._joint(grads)
        slope.append((self.coupling, flat_dot(joint, joint)))
        joint.mul_(self.coupling)
        torch.add(joint, grads[0], alpha=self.scales[0], out=out[0])
        torch.index_select(joint, 0, self.labels, out=out[1])
        for manifold, block, direction in zip(self.manifolds, point, out[:2]):
            manifold.project(block, direction)
        out[1].add_(grads[1], alpha=self.scales[1])  # tangent already: added after projecting
        for direction, grad, scale in zip(out[2:], grads[2:], self.scales[2:]):
            torch.mul(grad, scale, out=direction)
        return slope

    def norm_sq(self, vectors: list[torch.Tensor]) -> Terms:
        """<v, P v>."""
        terms = [
            (scale, manifold.inner(v, v))
            for manifold, v, scale in zip(self.manifolds, vectors, self.scales)
        ]
        if self.coupling:
            joint = self._joint(vectors)
            terms.append((self.coupling, flat_dot(joint, joint)))
        return terms

    def inverse_norm_sq(self, vectors: list[torch.Tensor]) -> Terms:
        """<v, P^-1 v> = <v, D^-1 v> - <t, (c / (1 + c B^T D^-1 B)) t>, t = B^T D^-1 v."""
        terms = [
            (1 / scale, manifold.inner(v, v))
            for manifold, v, scale in zip(self.manifolds, vectors, self.scales)
        ]
        if self.coupling:
            joint = self._joint(vectors, weights=[1 / scale for scale in self.scales])
            terms.append((-1.0, flat_dot(joint, self.woodbury_weights * joint)))
        return terms

    def _joint(self, blocks: list[torch.Tensor], weights=(1.0, 1.0)) -> torch.Tensor:
        """B^T of (weights[0] blocks[0], weights[1] blocks[1]): a K x d array."""
        joint = torch.mul(blocks[0], weights[0])
        features = blocks[1] if self.row_weights is None else blocks[1] * self.row_weights
        return joint.index_add_(0, self.labels, features, alpha=weights[1])


# Below this log-odds, e^a (and with it CE = softplus(a)) would leave the normal range of
# float64; the losses are floored there and their logs continued as a.
_SMALLEST_LOG_ODDS = -700.0


class _CrossEntropy:
    """Per-sample losses, their logs, and weighted dCE_i/dz_i = p_i - e_{y_i}, all without
    cancellation.

    With a_i = logsumexp_{k != y_i}(z_k - z_{y_i}): CE_i = softplus(a_i), and for k != y_i
    p_k = exp(z_k - z_{y_i} - CE_i). The label's entry is -(sum_{k != y} p_k) =
    -exp(a_i - CE_i), never 1 - p_y, which would round to zero long before the loss does.
    log CE_i = log softplus(a_i) keeps its digits down to a = -700, and is a_i below, where
    CE_i = e^{a_i} to all digits.

    Works in place: the logits buffer is overwritten, and in the end holds the gradient,
    so that an evaluation allocates no N x K array beyond the one its objective keeps.
    """

    def __init__(self, logits: torch.Tensor, labels: torch.Tensor):
        self.label_index = labels[:, None]
        margins = logits.sub_(logits.gather(1, self.label_index))  # z_k - z_y
        margins.scatter_(1, self.label_index, -math.inf)  # leaves the wrong classes only
        self.top = margins.amax(dim=1)  # finite: K >= 2 leaves a wrong class
        # exp(z_k - z_y - top), 0 in the label's entry
        self.shifted_exps = margins.sub_(self.top[:, None]).exp_()
        self.log_odds = self.top + torch.log(self.shifted_exps.sum(dim=1))
        floored = self.log_odds.clamp(min=_SMALLEST_LOG_ODDS)
        self.losses = torch.nn.functional.softplus(floored, threshold=30.0)
        self.log_losses = torch.log(self.losses).add_(self.log_odds - floored)

    def weighted_gradient(self, log_weight) -> torch.Tensor:
        """e^log_weight dCE_i/dz_i for every sample (log_weight: one number, or one per
        sample), in the logits buffer.

        The weight goes into the exponents, sparing a pass over the N x K array.
        """
        shift = log_weight - self.losses
        grads = self.shifted_exps.mul_(torch.exp(self.top + shift)[:, None])
        label_entries = torch.exp(self.log_odds + shift).neg_()
        return grads.scatter_(1, self.label_index, label_entries[:, None])


def _normalized_objective(problem: UFMProblem, labels: torch.Tensor, row_weights=None):
    """f = log L with L the mean cross-entropy of logits s W h_i (+ b), and its gradient.

    With `row_weights`, feature row j stands for m_j samples: it counts m_j times in L.

    log L has the critical points of L, but its gradient grad L / L stays O(1) while L
    itself saturates towards ~exp(-s K/(K-1)) at large logit scales, and its Hessian at
    the optimum is well scaled. This is what keeps the solver going at logit scale 30,
    where the loss is ~1e-13 and the gradient of L itself falls below any sensible
    tolerance long before the classifier is an ETF.
    """
    scale, log_scale = problem.logit_scale, math.log(problem.logit_scale)
    log_num_samples = math.log(problem.num_samples)
    log_weights = None if row_weights is None else torch.log(row_weights)
    logits = _logits_buffer(problem, labels)

    def evaluate(point):
        classifier, features = point[0], point[1]
        # The scale goes on the smaller operand, here and in the gradient below, sparing
        # passes over the N x K and N x d arrays.
        torch.mm(features, (scale * classifier).T, out=logits)
        if problem.bias:
            logits.add_(point[2])
        cross_entropy = _CrossEntropy(logits, labels)
        log_losses = cross_entropy.log_losses  # of each row's share of N L
        if log_weights is not None:
            log_losses = log_losses + log_weights
        log_total = torch.logsumexp(log_losses, dim=0)  # log(N L)
        log_grad_weights = log_scale - log_total
        if log_weights is not None:
            log_grad_weights = log_grad_weights + log_weights
        scaled_grads = cross_entropy.weighted_gradient(log_grad_weights)  # s d log L / dz
        grads = [scaled_grads.T @ features, scaled_grads @ classifier]
        if problem.bias:
            grads.append(scaled_grads.sum(dim=0) / scale)
        return log_total - log_num_samples, grads

    return evaluate


def _regularized_objective(problem: UFMProblem, labels: torch.Tensor):
    """The weight-decayed objective of Zhu et al. (2021) and its gradient."""
    decays = [problem.lambda_w, problem.lambda_h] + [problem.lambda_b] * problem.bias
    log_num_samples = math.log(problem.num_samples)
    logits = _logits_buffer(problem, labels)

    def evaluate(point):
        classifier, features = point[0], point[1]
        torch.mm(features, classifier.T, out=logits)
        if problem.bias:
            logits.add_(point[2])
        cross_entropy = _CrossEntropy(logits, labels)
        losses = cross_entropy.losses
        logit_grads = cross_entropy.weighted_gradient(-log_num_samples)  # d(mean CE)/dz
        grads = [logit_grads.T @ features, logit_grads @ classifier]
        if problem.bias:
            grads.append(logit_grads.sum(dim=0))
        value = losses.mean()
        for decay, block, grad in zip(decays, point, grads):
            value = value + decay / 2 * torch.vdot(block.reshape(-1), block.reshape(-1))
            grad.add_(block, alpha=decay)
        return value, grads

    return evaluate


def _logits_buffer(problem: UFMProblem, labels: torch.Tensor) -> torch.Tensor:
    """The rows x K array that every evaluation overwrites with the logits and their
    gradient.

    Allocated once: on the CPU a fresh array of this size per evaluation costs page
    faults comparable to the matrix products themselves at K = 1000.
    """
    shape = (labels.shape[0], problem.num_classes)
    return torch.empty(shape, dtype=torch.float64, device=labels.device)


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


@dataclass
class _Iterate:
    step: int
    point: list[torch.Tensor]
    value: float
    grad_norm: float
    converged: bool
    final: bool


# Line-search constants: sufficient-decrease fraction, backtracking factor, Zhang-Hager
# averaging weight, and the step-size safeguards for the Barzilai-Borwein steps.
_ARMIJO = 1e-4
_BACKTRACK = 0.5
_NONMONOTONE_WEIGHT = 0.85
_MIN_STEP, _MAX_STEP = 1e-10, 1e10
# ABBmin: the short step is taken below this ratio of short to long step, as the
# smallest of this many recent short steps (a threshold of 0.9 measured slightly faster
# than the paper's 0.8; 0.6 and 0.7 slower).
_ABB_THRESHOLD = 0.9
_ABB_MEMORY = 3
# Near the optimum, decreases fall below the rounding error of the objective itself (a
# few ulps of |f|); the line search tolerates that much so that it never mistakes
# rounding for an increase, and the Barzilai-Borwein steps can finish the job.
_ROUNDING_SLACK = 1e-14


def _minimize(
    formulation, point, tol, max_iters, certify=None, hand_over=None
) -> Iterator[_Iterate]:
    """Preconditioned Riemannian gradient descent with Barzilai-Borwein steps.

    Each step goes along -P grad, with P the `_Preconditioner`, projected onto the
    tangent space. Step sizes come from the long (BB1) and short (BB2) Barzilai-Borwein
    formulas in P's metric, chosen between by the adaptive ABBmin rule, from ambient
    differences of iterates s and of Riemannian gradients y; they are accepted by a
    Zhang-Hager nonmonotone Armijo test against a running weighted average of past
    objective values. Yields the start and every accepted step; the last yielded
    iterate has `final` set, having converged (gradient norm <= tol), run out of
    iterations, or stalled (no step size passes the line search). Each step is searched
    for before its predecessor is yielded, so that `final` is known when the iterate is
    reported.

    `certify(point, grad_norm)`, if given, must also accept a point before it counts as
    converged. Where it refuses one, the gradient is only small because the objective
    is flat there (log L at small logit scales hardly depends on how the classifier
    rows are arranged, so a gradient of 1e-10 can leave nc2_etf_w near 3e-6 at scale
    0.3 with K = 100): the bound drops tenfold below the current norm and the descent
    goes on, to be checked again there. Where the point is no optimum at all, the
    gradient meets its rounding floor and the run ends by stalling or by max_iters,
    unconverged.

    `hand_over(point)`, if given, is asked before each step is searched for; when it
    returns True, the run ends there, unconverged, for the caller to go on from.

    The host reads numbers from the device twice per iteration (three times while
    `hand_over` reads one): the objective value of each trial step, and then, in one
    transfer, the inner products that give the gradient norm, the slope and the
    Barzilai-Borwein steps of the accepted one.
    """
    manifolds, preconditioner = formulation.manifolds, formulation.preconditioner
    value, grads = _value_and_riemannian_grad(formulation.evaluate, manifolds, point)
    # The differences of iterates and of gradients, and the search direction, are
    # written into arrays kept from step to step, for the same reason as the logits
    # buffer.
    moves, grad_changes, directions = (
        [torch.empty_like(block) for block in point] for _ in range(3)
    )

    def set_direction(point, grads) -> tuple[Terms, Terms]:
        """Write the direction at `point` into `directions`; return ||grad||^2 and the slope."""
        norms_sq = [manifold.inner(grad, grad) for manifold, grad in zip(manifolds, grads)]
        slope = preconditioner.direction(point, grads, norms_sq, out=directions)
        return [(1.0, norm_sq) for norm_sq in norms_sq], slope

    squared_norm, slope = _host_floats(*set_direction(point, grads))
    search = _NonmonotoneLineSearch(formulation.evaluate, manifolds, value)
    step_size = 1.0 / max(math.sqrt(slope), 1e-300)
    next_step_size = _AdaptiveBarzilaiBorwein()
    step = 0
    while True:
        grad_norm = math.sqrt(squared_norm)
        if grad_norm <= tol and certify is not None and not certify(point, grad_norm):
            tol = grad_norm / 10
        converged = grad_norm <= tol
        accepted = (
            None
            if converged or step >= max_iters or (hand_over is not None and hand_over(point))
            else search(point, directions, slope, step_size, iteration=step + 1)
        )
        final = accepted is None
        yield _Iterate(step, point, value, grad_norm, converged, final)
        if final:
            return

        step += 1
        candidate, candidate_value, candidate_grads = accepted
        for move, change, new, old, new_grad, old_grad in zip(
            moves, grad_changes, candidate, point, candidate_grads, grads
        ):
            torch.sub(new, old, out=move)
            torch.sub(new_grad, old_grad, out=change)
        squared_norm, slope, s_dot_y, s_norm_sq, y_norm_sq = _host_floats(
            *set_direction(candidate, candidate_grads),
            [
                (1.0, m.inner(move, change))
                for m, move, change in zip(manifolds, moves, grad_changes)
            ],
            preconditioner.inverse_norm_sq(moves),
            preconditioner.norm_sq(grad_changes),
        )
        step_size = next_step_size(s_dot_y=s_dot_y, s_norm_sq=s_norm_sq, y_norm_sq=y_norm_sq)
        point, value, grads = candidate, candidate_value, candidate_grads


class _NonmonotoneLineSearch:
    """Backtracking Armijo search against the Zhang-Hager average of past values.

    The reference C_k is a weighted mean of all accepted values, with weights decaying
    by _NONMONOTONE_WEIGHT per step (Zhang & Hager 2004, "A nonmonotone line search
    technique and its application to unconstrained optimization"): it lets the
    Barzilai-Borwein steps go uphill now and then, which is what makes them fast, while
    still forcing descent on average.
    """

    def __init__(self, evaluate, manifolds, start_value: float):
        self.evaluate, self.manifolds = evaluate, manifolds
        self.reference_value, self.reference_weight = start_value, 1.0

    def __call__(self, point, directions, slope: float, step_size, iteration: int):
        """The accepted (point, value, Riemannian gradient), or None if the search stalled.

        The step is -step_size * directions, along which the objective falls at rate
        `slope` = <grad, directions>. Raises Diverged when the objective is NaN or
        infinite at every step size down to the smallest, rather than only at a few
        overlong ones.
        """
        slack = _ROUNDING_SLACK * (1.0 + abs(self.reference_value))
        while step_size >= _MIN_STEP:
            candidate = [
                manifold.retract(block, direction, -step_size)
                for manifold, block, direction in zip(self.manifolds, point, directions)
            ]
            value, candidate_grads = _value_and_riemannian_grad(
                self.evaluate, self.manifolds, candidate
            )
            if value <= self.reference_value - _ARMIJO * step_size * slope + slack:
                self._update_reference(value)
                return candidate, value, candidate_grads
            step_size *= _BACKTRACK  # a NaN value fails the test above and lands here too
        if not math.isfinite(value):
            raise Diverged(f"objective is not finite at any step size at iteration {iteration}")
        return None

    def _update_reference(self, value: float):
        previous_weight = self.reference_weight
        self.reference_weight = _NONMONOTONE_WEIGHT * previous_weight + 1
        self.reference_value = (
            _NONMONOTONE_WEIGHT * previous_weight * self.reference_value + value
        ) / self.reference_weight


def _value_and_riemannian_grad(evaluate, manifolds, point):
    value, euclidean_grads = evaluate(point)  # fresh arrays, which may be overwritten
    grads = [
        manifold.euclidean_to_riemannian_gradient(block, grad)
        for manifold, block, grad in zip(manifolds, point, euclidean_grads)
    ]
    return float(value), grads


def _host_floats(*sums: Terms) -> list[float]:
    """Each sum as a host float, in one transfer (one synchronization on a GPU)."""
    values = iter(torch.stack([tensor for terms in sums for _, tensor in terms]).tolist())
    return [sum(coefficient * next(values) for coefficient, _ in terms) for terms in sums]


class _AdaptiveBarzilaiBorwein:
    """Step sizes by the ABBmin rule (Frassoldati, Zanghirati & Zanni 2008, "New adaptive
    stepsize selections in gradient methods").

    From the last step's s and y, measured in the preconditioner's metric: the long
    BB1 = <s, P^-1 s> / <s, y> and the short BB2 = <s, y> / <y, P y> (Barzilai & Borwein
    1988). Their ratio BB2 / BB1 is the squared cosine between P^-1/2 s and P^1/2 y, near 1
    when s is close to an eigenvector of the Hessian: then the long step is taken, and
    otherwise the smallest of the recent short steps, which damps the components that a
    long step would overshoot. Against alternating BB1 and BB2 it took 15% fewer
    iterations where an ETF fits (30% at K = 100, d = 128, n = 20) and 20% more where
    none does (K > d + 1), the rarer study. Where the curvature estimate <s, y> is not
    positive, ||s|| / ||y|| (the geometric mean of the two in magnitude) stands in and
    the memory of short steps is cleared.
    """

    def __init__(self):
        self.recent_short_steps = collections.deque(maxlen=_ABB_MEMORY)

    def __call__(self, s_dot_y: float, s_norm_sq: float, y_norm_sq: float) -> float:
        if y_norm_sq == 0.0:
            return _MAX_STEP
        if s_dot_y <= 0.0:
            self.recent_short_steps.clear()
            step_size = math.sqrt(s_norm_sq / y_norm_sq)
        else:
            long_step, short_step = s_norm_sq / s_dot_y, s_dot_y / y_norm_sq
            self.recent_short_steps.append(short_step)
            if short_step < _ABB_THRESHOLD * long_step:
                step_size = min(self.recent_short_steps)
            else:
                step_size = long_step
        return min(max(step_size, _MIN_STEP), _MAX_STEP)
