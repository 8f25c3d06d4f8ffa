"""Riemannian L-BFGS: where no simplex ETF fits, what an "auto" run goes on with once
first order crawls on the merged problem (worker.nc.merging).

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

`minimize_lbfgs` has `minimize`'s signature and result: a step is an accepted step, and
`StoppingRules` decides as it does for the descent.
"""

import functools
import math
from collections.abc import Callable

import torch

from worker.nc.descent import Iterate, SolveResult
from worker.nc.formulation import Formulation
from worker.nc.manifolds import Point
from worker.nc.objectives import value_and_riemannian_grad
from worker.nc.step_rule import ARMIJO, BACKTRACK, MIN_STEP, ROUNDING_SLACK
from worker.nc.stopping import StoppingRules, stalled

# Curvature pairs kept: 30 was no faster at (300, 128, 10) (docs/solver.md).
MEMORY = 10

Tangent = list[torch.Tensor]


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

    def inner(first: Tangent, second: Tangent) -> float:
        return sum(float(m.inner(a, b)) for m, a, b in zip(manifolds, first, second))

    def project(point: Point, vectors: Tangent) -> Tangent:
        return [m.project(block, v.clone()) for m, block, v in zip(manifolds, point, vectors)]

    def precondition(point: Point, vectors: Tangent) -> Tangent:
        out = [torch.empty_like(v) for v in vectors]
        norms_sq = [m.inner(v, v) for m, v in zip(manifolds, vectors)]
        formulation.preconditioner.direction(point, vectors, norms_sq, out=out)
        return out

    point = start
    value, grads = value_and_riemannian_grad(formulation.objective, manifolds, point)
    moves: list[Tangent] = []  # the last MEMORY steps s, as ambient differences of iterates
    changes: list[Tangent] = []  # and their gradient changes y
    gamma = 1.0
    tol = stopping.tol
    step = first_step
    while True:
        grad_norm = math.sqrt(inner(grads, grads))
        if grad_norm <= tol and stopping.certify is not None and not stopping.certify(point, grad_norm):
            tol = grad_norm / 10
        stop = stopping.reason_to_stop(step, point, grad_norm, tol)
        iterate = Iterate(step, point, value, grad_norm)
        if stop is not None:
            return SolveResult(iterate, *stop)

        direction = _two_loop(inner, functools.partial(precondition, point), grads, moves, changes, gamma)
        direction = project(point, [-d for d in direction])
        slope = inner(grads, direction)
        if not slope < 0:  # the memory's model is not convex along it: start afresh
            moves.clear()
            changes.clear()
            direction = [-d for d in precondition(point, grads)]
            slope = inner(grads, direction)
        size = 1.0
        while True:
            candidate = [m.retract(block, d, size) for m, block, d in zip(manifolds, point, direction)]
            candidate_value, candidate_grads = value_and_riemannian_grad(formulation.objective, manifolds, candidate)
            # the descent's sufficient decrease, with its slack for the rounding of f
            if candidate_value <= value + ARMIJO * size * slope + ROUNDING_SLACK * (1 + abs(value)):
                break
            size *= BACKTRACK
            if size < MIN_STEP:
                return SolveResult(iterate, *stalled(grad_norm, tol))
        if on_iterate is not None:
            on_iterate(iterate)
        step += 1

        move = [new - old for new, old in zip(candidate, point)]
        change = [new - old for new, old in zip(candidate_grads, grads)]
        s_dot_y = inner(move, change)
        if s_dot_y > 0:
            moves.append(move)
            changes.append(change)
            del moves[:-MEMORY], changes[:-MEMORY]
            gamma = s_dot_y / inner(change, precondition(candidate, change))
        point, value, grads = candidate, candidate_value, candidate_grads


def _two_loop(
    inner: Callable[[Tangent, Tangent], float],
    precondition: Callable[[Tangent], Tangent],
    grads: Tangent,
    moves: list[Tangent],
    changes: list[Tangent],
    gamma: float,
) -> Tangent:
    """The L-BFGS inverse Hessian, with initial gamma P, applied to the gradient
    (Nocedal & Wright 2006, algorithm 7.4)."""
    vector = [g.clone() for g in grads]
    coefficients = []
    for s, y in zip(reversed(moves), reversed(changes)):
        rho = 1 / inner(y, s)
        alpha = rho * inner(s, vector)
        coefficients.append((rho, alpha))
        vector = [v - alpha * y_block for v, y_block in zip(vector, y)]
    vector = [gamma * v for v in precondition(vector)]
    for (s, y), (rho, alpha) in zip(zip(moves, changes), reversed(coefficients)):
        beta = rho * inner(y, vector)
        vector = [v + (alpha - beta) * s_block for v, s_block in zip(vector, s)]
    return vector
