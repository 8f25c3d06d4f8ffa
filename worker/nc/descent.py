"""Preconditioned Riemannian gradient descent: `minimize`, the optimizer of the UFM solver.

In pymanopt's way, a `Formulation` (objective, manifolds, preconditioner), a start
point, a step rule and stopping rules go in, and a `SolveResult` comes out.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.nc.formulation import Formulation
from worker.nc.manifolds import Point
from worker.nc.objectives import value_and_riemannian_grad
from worker.nc.preconditioner import Terms, host_floats
from worker.nc.step_rule import BarzilaiBorweinSteps, StepRuleFactory
from worker.nc.stopping import StoppingRules, StopReason, stalled


@dataclass(frozen=True)
class Iterate:
    """A point the descent reached, numbered by `step`."""

    step: int
    point: Point
    value: float  # the objective there
    grad_norm: float  # the norm of the Riemannian gradient there


@dataclass(frozen=True)
class SolveResult:
    """Where a descent ended, and why there."""

    last: Iterate  # its step is the number of iterations
    stop_reason: StopReason
    message: str  # the reason in words, with the numbers that decided it

    @property
    def converged(self) -> bool:
        return self.stop_reason is StopReason.CONVERGED


def minimize(
    formulation: Formulation,
    start: Point,
    stopping: StoppingRules,
    *,
    step_rule: StepRuleFactory = BarzilaiBorweinSteps,
    first_step: int = 0,
    on_iterate: Callable[[Iterate], None] | None = None,
) -> SolveResult:
    """Minimize the formulation's objective from `start`.

    Each step goes along -P grad, with P the formulation's preconditioner, projected
    onto the tangent space; `step_rule` says how far, and `stopping` when to stop. The
    default step rule measures its Barzilai-Borwein steps from ambient differences of
    iterates and of Riemannian gradients, in P's metric.

    Steps are numbered from `first_step`, so that a descent that goes on from another's
    last iterate carries on its numbering. `on_iterate(iterate)` is called with every
    iterate but the last, once the step from it has been found (only then is it known
    not to be the last); it may raise to abandon the descent.

    The host reads numbers from the device twice per iteration (three times while
    `stopping.hand_over` reads one): the objective value of each trial step, and then,
    in one transfer, the inner products that give the gradient norm, the slope and the
    Barzilai-Borwein steps of the accepted one.
    """
    manifolds, preconditioner = formulation.manifolds, formulation.preconditioner
    point = start
    value, grads = value_and_riemannian_grad(formulation.objective, manifolds, point)
    # The differences of iterates and of gradients, and the search direction, are
    # written into arrays kept from step to step: on the CPU, fresh arrays this size
    # every iteration cost page faults comparable to the matrix products, which is also
    # why each objective keeps one logits buffer.
    moves, grad_changes, directions = ([torch.empty_like(block) for block in point] for _ in range(3))

    def set_direction(point: Point, grads: list[torch.Tensor]) -> tuple[Terms, Terms]:
        """Write the direction at `point` into `directions`; return ||grad||^2 and the slope."""
        norms_sq = [manifold.inner(grad, grad) for manifold, grad in zip(manifolds, grads)]
        slope = preconditioner.direction(point, grads, norms_sq, out=directions)
        return [(1.0, norm_sq) for norm_sq in norms_sq], slope

    squared_norm, slope = host_floats(*set_direction(point, grads))
    steps = step_rule(formulation, value, slope)
    tol = stopping.tol
    step = first_step
    while True:
        grad_norm = math.sqrt(squared_norm)
        tol = stopping.tol_in_force(point, grad_norm, tol)
        stop = stopping.reason_to_stop(step, point, grad_norm, tol)
        accepted = None
        if stop is None:
            accepted = steps.search(point, directions, slope, iteration=step + 1)
            if accepted is None:
                stop = stalled(grad_norm, tol)
        iterate = Iterate(step, point, value, grad_norm)
        if stop is not None:
            return SolveResult(iterate, *stop)
        if on_iterate is not None:
            on_iterate(iterate)

        step += 1
        assert accepted is not None, "stop is None only where the line search accepted a step"
        candidate, candidate_value, candidate_grads = accepted
        for move, change, new, old, new_grad, old_grad in zip(
            moves, grad_changes, candidate, point, candidate_grads, grads
        ):
            torch.sub(new, old, out=move)
            torch.sub(new_grad, old_grad, out=change)
        squared_norm, slope, s_dot_y, s_norm_sq, y_norm_sq = host_floats(
            *set_direction(candidate, candidate_grads),
            [(1.0, m.inner(move, change)) for m, move, change in zip(manifolds, moves, grad_changes)],
            preconditioner.inverse_norm_sq(moves),
            preconditioner.norm_sq(grad_changes),
        )
        steps.observe(s_dot_y=s_dot_y, s_norm_sq=s_norm_sq, y_norm_sq=y_norm_sq)
        point, value, grads = candidate, candidate_value, candidate_grads
