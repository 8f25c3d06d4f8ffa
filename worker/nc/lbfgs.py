"""Riemannian L-BFGS: the optimizer of an "auto" run where no simplex ETF fits, from the
start where the run does not merge, and otherwise once the features merge
(worker.nc.merging: the tied phase, then the merged and full problems).

With more classes than an ETF fits (K > d + 1), once the features have collapsed the merged
problem follows a long, nearly flat and curved valley: its curvatures along the arrangement
of the classes spread from about 6e-3 down to 4e-8 and below, against 0.05 for the features
moving off their classifier rows (docs/solver.md, "Second order (issue 25)"). Trust regions
spend hundreds of CG steps on each step and the region, which the valley's curvature keeps
small, caps how far it goes; first order needs tens of thousands of steps. L-BFGS takes
the valley at the cost of one gradient a step, and its memory of the last steps' curvature
pairs stretches the steps along the soft directions.

The method is Riemannian L-BFGS (Huang, Gallivan & Absil 2015; Manopt's rlbfgs) in its
simplest form: the two-loop recursion in the manifolds' metric, with the initial inverse
Hessian gamma P (P the descent's preconditioner, gamma = <s, y> / <y, P y> from the last
pair), the direction projected onto the tangent space, and an Armijo backtracking line
search from the unit step. The curvature pairs are ambient differences of iterates and
of Riemannian gradients, as the descent's Barzilai-Borwein steps have them (tangent
vectors live in the ambient space, worker.nc.manifolds): at (300, 128, 10), from the
merge, this took 5,544 steps where pairs carried to each new tangent space by projection
took 7,877, at half the cost a step. A pair with <s, y> <= 0 is not kept; where the
direction is not a descent direction, the memory is cleared and the step is -P grad. The
line search is the descent's Armijo test (worker.nc.step_rule), monotone.

The memory keeps each pair as two flat vectors (worker.nc.flat_tangents) scaled by the
square root of the metric's weights, so the recursion's 4 MEMORY inner products and
updates are plain vector operations, in single precision: the recursion reads every pair
twice a step, and that memory traffic, not its arithmetic, is what it costs. Where P is
diagonal (no class coupling, as in the tied phase) it commutes with that scaling and applies
to the whitened vectors as it is, without a round trip through double precision. The
direction's rounding, ~1e-7 of its length, is far below what the memory's model gets
wrong, and the gradient, the steps and the pairs' <s, y> stay in double precision
(docs/solver.md has the measurements).

`minimize_lbfgs` has `minimize`'s signature and result: a step is an accepted step, and
`StoppingRules` decides as it does for the descent.
"""

import math
from collections.abc import Callable

import torch

from worker.nc.descent import Iterate, SolveResult
from worker.nc.flat_tangents import FlatTangents, Weights, metric_dot
from worker.nc.formulation import Formulation
from worker.nc.manifolds import Point
from worker.nc.objectives import value_and_riemannian_grad
from worker.nc.preconditioner import host_floats
from worker.nc.step_rule import ARMIJO, BACKTRACK, MIN_STEP, ROUNDING_SLACK
from worker.nc.stopping import StoppingRules, stalled

# Curvature pairs kept: 30 was no faster at (300, 128, 10) (docs/solver.md).
MEMORY = 10


def minimize_lbfgs(
    formulation: Formulation,
    start: Point,
    stopping: StoppingRules,
    *,
    first_step: int = 0,
    on_iterate: Callable[[Iterate], None] | None = None,
) -> SolveResult:
    """Minimize the formulation's objective from `start` by Riemannian L-BFGS.

    Steps are numbered from `first_step`; `on_iterate(iterate)` is called with every
    iterate but the last, once the step from it has been accepted.
    """
    manifolds = formulation.manifolds
    flat = FlatTangents(start, manifolds)
    memory = _Memory(flat.metric)
    # Where P is diagonal (no class coupling: the tied phase), it commutes with the memory's whitening, itself
    # diagonal, and applies to whitened vectors as it is; <u, P v> is then a dot product in the metric times P.
    scales = formulation.preconditioner.block_scales()
    diagonal = None if scales is None else flat.block_constants(scales)
    whitened_diagonal = diagonal.float() if isinstance(diagonal, torch.Tensor) else diagonal
    diagonal_metric = None if diagonal is None else flat.metric * diagonal

    def precondition(point: Point, scale: float, vector: torch.Tensor) -> torch.Tensor:
        """scale P vector (`Preconditioner.apply`)."""
        out = torch.empty_like(vector)
        formulation.preconditioner.apply(point, flat.unflatten(vector), flat.unflatten(out))
        return out.mul_(scale)

    def initial_inverse(point: Point, gamma: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """gamma P on the memory's whitened, single-precision vectors."""
        if whitened_diagonal is None:
            return lambda vector: memory.whiten(precondition(point, gamma, memory.unwhiten(vector)))
        return lambda vector: vector.mul_(whitened_diagonal).mul_(gamma)

    def norm_sq(vector: torch.Tensor) -> float:
        """<vector, P vector>."""
        if diagonal_metric is None:
            (value,) = host_floats(formulation.preconditioner.norm_sq(flat.unflatten(vector)))
            return value
        return metric_dot(vector, vector, diagonal_metric)

    def evaluate(point: Point) -> tuple[float, torch.Tensor]:
        value, grads = value_and_riemannian_grad(formulation.objective, manifolds, point)
        return value, flat.flatten(grads)

    point = start
    position = flat.flatten(point)  # the point as one flat vector, for the curvature pairs' moves
    value, grads = evaluate(point)
    gamma = 1.0
    tol = stopping.tol
    step = first_step
    while True:
        grad_norm = math.sqrt(flat.inner(grads, grads))
        tol = stopping.tol_in_force(point, grad_norm, tol)
        stop = stopping.reason_to_stop(step, point, grad_norm, tol)
        iterate = Iterate(step, point, value, grad_norm)
        if stop is not None:
            return SolveResult(iterate, *stop)

        direction = memory.inverse_hessian_times(grads, initial_inverse(point, gamma)).neg_()
        for m, block, d in zip(manifolds, point, flat.unflatten(direction)):
            m.project(block, d)
        slope = flat.inner(grads, direction)
        if not slope < 0:  # the memory's model is not convex along it: start afresh
            memory.clear()
            direction = precondition(point, 1.0, grads).neg_()
            slope = flat.inner(grads, direction)
        size = 1.0
        while True:
            candidate = [m.retract(block, d, size) for m, block, d in zip(manifolds, point, flat.unflatten(direction))]
            candidate_value, candidate_grads = evaluate(candidate)
            # the descent's sufficient decrease, with its slack for the rounding of f
            if candidate_value <= value + ARMIJO * size * slope + ROUNDING_SLACK * (1 + abs(value)):
                break
            size *= BACKTRACK
            if size < MIN_STEP:
                return SolveResult(iterate, *stalled(grad_norm, tol))
        if on_iterate is not None:
            on_iterate(iterate)
        step += 1

        candidate_position = flat.flatten(candidate)
        move = candidate_position - position
        change = candidate_grads - grads
        s_dot_y = flat.inner(move, change)
        if s_dot_y > 0:
            gamma = s_dot_y / norm_sq(change)
            memory.remember(move, change, s_dot_y)
        point, position, value, grads = candidate, candidate_position, candidate_value, candidate_grads


class _Memory:
    """The last MEMORY curvature pairs (s, y), flat and whitened: multiplied by the square
    root of the metric's weights, so that every inner product of the two-loop recursion is
    a plain dot product and each pair is two vectors, kept in single precision (the
    module's docstring)."""

    def __init__(self, metric: Weights):
        self.root = metric**0.5
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def clear(self) -> None:
        self.pairs.clear()

    def remember(self, move: torch.Tensor, change: torch.Tensor, move_dot_change: float) -> None:
        """Keep the pair (s, y) and 1 / <s, y>; overwrites `move` and `change`."""
        pair = (self.whiten(move, overwrite=True), self.whiten(change, overwrite=True))
        self.pairs.append((*pair, 1 / move_dot_change))
        del self.pairs[:-MEMORY]

    def whiten(self, vector: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
        """A flat tangent vector in the memory's coordinates: scaled by the metric's root, in single precision;
        with `overwrite`, scaled in place, sparing a double-precision array."""
        return (vector.mul_(self.root) if overwrite else vector * self.root).float()

    def unwhiten(self, vector: torch.Tensor) -> torch.Tensor:
        """`whiten` undone, in double precision."""
        return vector.double().div_(self.root)

    def inverse_hessian_times(
        self, grads: torch.Tensor, initial_inverse: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The L-BFGS inverse Hessian, from `initial_inverse` (which takes and gives whitened
        vectors, and may overwrite its argument), applied to `grads` (Nocedal & Wright 2006,
        algorithm 7.4), in double precision; the recursion runs in single."""
        vector = self.whiten(grads)
        alphas = []
        for move, change, rho in reversed(self.pairs):
            alpha = rho * float(torch.dot(move, vector))
            alphas.append(alpha)
            vector.add_(change, alpha=-alpha)
        vector = initial_inverse(vector)
        for (move, change, rho), alpha in zip(self.pairs, reversed(alphas)):
            beta = rho * float(torch.dot(change, vector))
            vector.add_(move, alpha=alpha - beta)
        return self.unwhiten(vector)
