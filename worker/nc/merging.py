"""Merging collapsed features: the phases of one normalized UFM run.

Once the features of every class have collapsed to within MERGE_TOL of their class's
normalized mean, the run merges each class's features into one row that stands for all
of them, with the loss and the metric weighted to match. The descent then takes the full
problem's steps at a cost independent of N, and the full problem certifies its end
point. A run goes through three phases, numbered on from one to the next:

1. The full problem, until every feature lies within MERGE_TOL of its class's mean.
2. The merged problem: each class's features replaced by that mean, one row per class
   standing for its n_k samples. Collapsed features stay collapsed: at such a point
   every sample of a class has the same gradient, the preconditioner moves them alike,
   and the merged formulation's weighted metric makes every step, step size and
   gradient norm exactly those of the full problem. Merging itself is the one step that
   the full problem's descent would not take; it moves each feature by at most
   MERGE_TOL, towards where the descent was taking it anyway.
3. The full problem again, from the merged end point with every row repeated for its
   samples. Its first evaluation is the certificate: `converged` and the gradient norm
   are those of the problem as posed. Where it disagrees (rounding can put the norm a
   hair above tol), the full descent carries on from there.

An "auto" run where no simplex ETF fits (K > d + 1) puts a tied phase before phase 2:
the merged problem with each class's feature row tied to its classifier row
(`tied_formulation`), from the tied point nearest the merged one (`tie`), by L-BFGS,
which then takes phases 2 and 3 too. There the merged problem's minima keep h_k within
1e-5 of w_k, and what takes the time is arranging the classes on the sphere, a long
flat valley (docs/solver.md): tied, each step costs half the vector work and the
stiffest directions, h_k moving off w_k, are gone. The tied phase goes on to tol / sqrt(2)
(TIED_TOL_FRACTION), and phase 2 then starts a few steps from its minimum (2 to 32 L-BFGS
steps at (K, d, n) = (300, 128, 10), seeds 0 to 15 but 12).

Only the normalized problem with more samples than classes and at least SMALL_WORK per
matrix product merges: on smaller ones the merge costs more than it saves
(docs/solver.md gives the timings). Every other run is phase 1 alone.
"""

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.nc.descent import Iterate, SolveResult, minimize
from worker.nc.formulation import Formulation, formulate, untie
from worker.nc.lbfgs import minimize_lbfgs
from worker.nc.manifolds import Point, RowSphere
from worker.nc.objectives import tied_normalized_objective
from worker.nc.preconditioner import Preconditioner
from worker.nc.stopping import Certificate, StoppingRules, StopReason, SublinearProgress
from worker.nc.trust_region import minimize_trust_region
from worker.nc.ufm_problem import UFMProblem
from worker.nc.work import SMALL_WORK, threads_for, work_per_product

# The tied phase stops at this fraction of tol. Untied, the merged gradient adds to the tied one
# what the features' few stiff steps off their rows leave (about 0.4 tol at (300, 128, 10));
# stopped at tol itself, the merged phase then wandered at f's rounding floor, where the line
# search cannot rank steps, until one landed under tol: 6 to 260 steps there, each costing two
# tied ones. 1 / sqrt(2) leaves half of tol squared to that part (docs/solver.md).
TIED_TOL_FRACTION = 1 / math.sqrt(2)

# An optimizer: `minimize`'s signature and result.
Optimizer = Callable[..., SolveResult]

# Features are merged once every one of them lies this close to its class's normalized
# mean (a distance on the unit sphere).
MERGE_TOL = 1e-4


def tied_formulation(problem: UFMProblem, merged: Formulation) -> Formulation:
    """The merged problem with each class's feature row tied to its classifier row:
    points [W, (b)] standing for [W, W, (b)].

    Where no ETF fits, the merged problem's minima keep h_k within 1e-5 of w_k (7e-6 at
    (300, 128, 10)), and what is slow to optimize is the arrangement of the classes, the
    tied motion (docs/solver.md). Tied, the descent pays half the variables for it, and
    drops the stiffest directions, those moving h_k off w_k. The objective is the merged
    one at [W, W] (`tied_normalized_objective`), its gradient and Hessian the sum of the
    two blocks' by the chain rule; the metric is the merged metric on tied motions,
    which weigh 1 + n_k per row.
    """
    samples_per_row = _samples_per_row(merged)
    manifolds = [RowSphere(1 + samples_per_row), *merged.manifolds[2:]]
    objective = tied_normalized_objective(problem, samples_per_row)

    def hessian(point: Point) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
        merged_hvp = merged.hessian(untie(point))

        def hvp(vector: list[torch.Tensor]) -> list[torch.Tensor]:
            products = merged_hvp(untie(vector))
            return [products[0].add_(products[1]), *products[2:]]

        return hvp

    preconditioner = Preconditioner([1.0] * len(manifolds), manifolds, merged.labels, len(merged.labels), 0.0)
    return Formulation(objective, hessian, manifolds, preconditioner, merged.labels, merged.sample_rows, tied=True)


def tie(merged: Formulation, point: Point) -> Point:
    """The tied point nearest to a merged one in the merged metric: row k of W moved to
    (w_k + n_k h_k) / (1 + n_k), back on the sphere."""
    classifier = point[0] + _samples_per_row(merged)[:, None] * point[1]
    return [classifier.div_(torch.linalg.vector_norm(classifier, dim=1, keepdim=True)), *point[2:]]


def _samples_per_row(merged: Formulation) -> torch.Tensor:
    """n_k, the samples each merged feature row stands for: its sphere's row weights."""
    feature_sphere = merged.manifolds[1]
    assert isinstance(feature_sphere, RowSphere) and feature_sphere.row_weights is not None, "merged: rows weighed"
    return feature_sphere.row_weights


def merged_formulation(problem: UFMProblem, labels: torch.Tensor) -> Formulation | None:
    """One feature row per class, standing for its n_k samples (`labels`: the class of
    each sample); None where merging does not pay."""
    if not (
        problem.normalization == "normalized"
        and problem.num_samples > problem.num_classes
        and work_per_product(problem) >= SMALL_WORK
    ):
        return None
    device = labels.device
    classes = torch.arange(problem.num_classes, device=device)
    counts = torch.tensor(problem.class_counts, dtype=torch.float64, device=device)
    return formulate(problem, classes, row_weights=counts, sample_rows=labels)


@dataclass(frozen=True)
class RunResult:
    """How a run ended: its last phase's result, on the full problem."""

    result: SolveResult
    merged_at: int | None  # the step at which the features were merged, if they were


def descend(
    problem: UFMProblem,
    full: Formulation,
    merged: Formulation | None,
    start: Point,
    certificate_for: Callable[[Formulation], Certificate | None],
    on_iterate: Callable[[Iterate, Formulation], None],
) -> RunResult:
    """One run from `start`, through the phases of the module docstring where `merged`
    is given, and on `full` alone otherwise.

    `certificate_for(formulation)` gives each phase its `certify`. `on_iterate(iterate,
    formulation)` is called with every iterate but the run's last, and the formulation
    its point belongs to; the first iterate of a phase has the step number of its
    predecessor's last, which is not reported.
    """
    sublinear_progress = SublinearProgress()  # one per run: its windows span the phases
    optimizer = starting_optimizer(problem, merges=merged is not None)

    def phase(
        formulation: Formulation,
        start: Point,
        first_step: int,
        hand_over: Callable[[Point], bool] | None = None,
        tol: float = problem.tol,
    ) -> SolveResult:
        nonlocal optimizer
        stopping = StoppingRules(
            tol,
            problem.max_iters,
            certify=certificate_for(formulation),
            sublinear_progress=None if optimizer else sublinear_progress,
            hand_over=hand_over,
        )

        def report(iterate: Iterate) -> None:
            on_iterate(iterate, formulation)

        if optimizer is not None:
            return optimizer(formulation, start, stopping, first_step=first_step, on_iterate=report)
        result = minimize(formulation, start, stopping, first_step=first_step, on_iterate=report)
        if result.stop_reason is StopReason.SUBLINEAR and problem.solver == "auto":
            # past the saddles by curvature, for this phase from here and the phases after it
            optimizer = minimize_trust_region
            stopping = dataclasses.replace(stopping, sublinear_progress=None)
            last = result.last
            result = optimizer(formulation, last.point, stopping, first_step=last.step, on_iterate=report)
        return result

    merged_start = None

    def merge_if_collapsed(point: Point) -> bool:
        nonlocal merged_start
        means = collapsed_class_means(point[1], full.labels, problem.num_classes)
        if means is not None:
            merged_start = [point[0], means, *point[2:]]
        return means is not None

    collapsing = phase(full, start, 0, None if merged is None else merge_if_collapsed)
    if merged_start is None:
        return RunResult(collapsing, merged_at=None)
    assert merged is not None, "merged_start is set only by merge_if_collapsed, passed only with `merged`"
    merged_at = collapsing.last.step
    # The merged problem has K feature rows: its products are K d K multiply-adds.
    with threads_for(problem.num_classes**2 * problem.dim, merged_start[1].device):
        merged_from = merged_at
        if ties(problem):
            optimizer = minimize_lbfgs  # for the tied phase and the phases after it
            arranged = phase(
                tied_formulation(problem, merged),
                tie(merged, merged_start),
                merged_at,
                tol=TIED_TOL_FRACTION * problem.tol,
            )
            merged_start, merged_from = untie(arranged.last.point), arranged.last.step
        collapsed = phase(merged, merged_start, merged_from)
    certified = phase(full, merged.expand(collapsed.last.point), collapsed.last.step)
    return RunResult(certified, merged_at)


def starting_optimizer(problem: UFMProblem, *, merges: bool) -> Optimizer | None:
    """The optimizer a run starts with; None for the first-order descent, which an "auto"
    run leaves for trust regions where it stops for sublinear progress.

    "trust_region": trust regions in every phase. "auto": L-BFGS from the start where the
    normalized problem has more classes than a simplex ETF fits (K > d + 1), whose descent
    crawls past strict saddles (docs/solver.md), unless the run `merges`: there first order
    collapses the features in a few steps (9 at (K, d, n) = (300, 128, 10), against 61
    trust-region steps and 95 s), and the tied phase (`ties`) follows. On (100, 43, 2),
    seeds 0 to 31, L-BFGS and trust regions both converged on all 32, to local minima,
    in 43.8 s (the slowest 3.3 s) against 298.8 s (65.2 s), run side by side
    (docs/solver.md).
    """
    if problem.solver == "trust_region":
        return minimize_trust_region
    if problem.solver == "auto" and no_etf_fits(problem) and not merges:
        return minimize_lbfgs
    return None


def ties(problem: UFMProblem) -> bool:
    """Whether a run that merges goes on tied (`tied_formulation`), by L-BFGS, before the
    merged problem: "auto" where no ETF fits. At (K, d, n) = (300, 128, 10), seeds 0 to 2,
    that took 5,400 to 7,200 steps and 22 to 28 s where first order and then L-BFGS on the
    merged problem took 6,600 to 9,800 steps and 33 to 50 s, run side by side
    (docs/solver.md)."""
    return problem.solver == "auto" and no_etf_fits(problem)


def no_etf_fits(problem: UFMProblem) -> bool:
    """The normalized problem with more classes than a simplex ETF fits: K > d + 1."""
    return problem.normalization == "normalized" and problem.num_classes > problem.dim + 1


def collapsed_class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """The normalized class means, if every feature lies within MERGE_TOL of its own.

    Asked once per iteration until the merge, at the cost of about four passes over the
    features and one more read from the device.
    """
    sums = features.new_zeros((num_classes, features.shape[1])).index_add_(0, labels, features)
    means = sums.div_(torch.linalg.vector_norm(sums, dim=1, keepdim=True))
    distances = torch.linalg.vector_norm(features - means.index_select(0, labels), dim=1)
    return means if float(distances.max()) <= MERGE_TOL else None
