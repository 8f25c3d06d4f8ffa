"""The step rule of the UFM descent: how far to go along the search direction.

Barzilai-Borwein step sizes (Barzilai & Borwein 1988), chosen between by the adaptive
ABBmin rule, propose a step from the last step's change of iterate and of gradient; a
nonmonotone Armijo line search (Zhang & Hager 2004) accepts it or backtracks. This needs
no hand-tuned step size across the logit scales and regularization strengths a lab asks
for. `StepRule` is what the descent asks of a step rule; `BarzilaiBorweinSteps` is ours.
"""

import collections
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from worker.nc.errors import Diverged
from worker.nc.formulation import Formulation
from worker.nc.manifolds import Manifold, Point
from worker.nc.objectives import Objective, value_and_riemannian_grad

# Line-search constants: sufficient-decrease fraction, backtracking factor, Zhang-Hager
# averaging weight, and the step-size safeguards for the Barzilai-Borwein steps.
ARMIJO = 1e-4
BACKTRACK = 0.5
_NONMONOTONE_WEIGHT = 0.85
MIN_STEP, MAX_STEP = 1e-10, 1e10
# ABBmin: the short step is taken below this ratio of short to long step, as the
# smallest of this many recent short steps (0.9 measured faster than the paper's 0.8;
# docs/solver.md).
_ABB_THRESHOLD = 0.9
_ABB_MEMORY = 3
# Near the optimum, decreases fall below the rounding error of the objective itself (a
# few ulps of |f|); the line search tolerates that much so that it never mistakes
# rounding for an increase, and the Barzilai-Borwein steps can finish the job.
ROUNDING_SLACK = 1e-14

# A step the line search accepted: the new point, the objective there, and its
# Riemannian gradient.
Accepted = tuple[Point, float, list[torch.Tensor]]


class StepRule(Protocol):
    """What the descent asks of its step rule, one per descent."""

    def search(self, point: Point, directions: list[torch.Tensor], slope: float, iteration: int) -> Accepted | None:
        """The step along -directions that the rule accepts, or None where none is found.

        The objective falls along -directions at rate `slope` = <grad, directions>;
        `iteration` is the number of the step searched for, for error messages.
        """

    def observe(self, s_dot_y: float, s_norm_sq: float, y_norm_sq: float) -> None:
        """Learn from the step just taken, s, and the change of the Riemannian gradient
        along it, y: s_dot_y = <s, y>, s_norm_sq = <s, P^-1 s>, y_norm_sq = <y, P y>, with
        P the preconditioner."""


# Makes the step rule of one descent from its formulation, and the objective value and
# slope at its start.
StepRuleFactory = Callable[[Formulation, float, float], StepRule]


class BarzilaiBorweinSteps:
    """Steps proposed by `AdaptiveBarzilaiBorwein` and accepted by `NonmonotoneLineSearch`.

    With no step yet to estimate the curvature from, the first proposal has unit length
    as the Barzilai-Borwein steps measure it: <s, P^-1 s> = 1.
    """

    def __init__(self, formulation: Formulation, start_value: float, start_slope: float):
        self.line_search = NonmonotoneLineSearch(formulation.objective, formulation.manifolds, start_value)
        self.proposals = AdaptiveBarzilaiBorwein()
        # Within the safeguards of every later proposal: a huge start slope (a regularization of
        # 1e308) would otherwise propose a step the line search never tries.
        self.step_size = min(max(1.0 / max(math.sqrt(start_slope), 1e-300), MIN_STEP), MAX_STEP)

    def search(self, point: Point, directions: list[torch.Tensor], slope: float, iteration: int) -> Accepted | None:
        return self.line_search(point, directions, slope, self.step_size, iteration)

    def observe(self, s_dot_y: float, s_norm_sq: float, y_norm_sq: float) -> None:
        self.step_size = self.proposals(s_dot_y=s_dot_y, s_norm_sq=s_norm_sq, y_norm_sq=y_norm_sq)


class NonmonotoneLineSearch:
    """Backtracking Armijo search against the Zhang-Hager average of past values.

    The reference C_k is a weighted mean of all accepted values, with weights decaying
    by _NONMONOTONE_WEIGHT per step (Zhang & Hager 2004, "A nonmonotone line search
    technique and its application to unconstrained optimization"): it lets the
    Barzilai-Borwein steps go uphill now and then, which is what makes them fast, while
    still forcing descent on average.
    """

    def __init__(self, objective: Objective, manifolds: Sequence[Manifold], start_value: float):
        self.objective, self.manifolds = objective, manifolds
        self.reference_value, self.reference_weight = start_value, 1.0

    def __call__(
        self,
        point: Point,
        directions: list[torch.Tensor],
        slope: float,
        step_size: float,
        iteration: int,
    ) -> Accepted | None:
        """The accepted (point, value, Riemannian gradient), or None if the search stalled.

        The step is -step_size * directions, along which the objective falls at rate
        `slope` = <grad, directions>. Raises Diverged when the objective is NaN or
        infinite at every step size down to the smallest, rather than only at a few
        overlong ones.
        """
        slack = ROUNDING_SLACK * (1.0 + abs(self.reference_value))
        while step_size >= MIN_STEP:
            candidate = [
                manifold.retract(block, direction, -step_size)
                for manifold, block, direction in zip(self.manifolds, point, directions)
            ]
            value, candidate_grads = value_and_riemannian_grad(self.objective, self.manifolds, candidate)
            if value <= self.reference_value - ARMIJO * step_size * slope + slack:
                self._update_reference(value)
                return candidate, value, candidate_grads
            step_size *= BACKTRACK  # a NaN value fails the test above and lands here too
        if not math.isfinite(value):
            raise Diverged(f"objective is not finite at any step size at iteration {iteration}")
        return None

    def _update_reference(self, value: float) -> None:
        previous_weight = self.reference_weight
        self.reference_weight = _NONMONOTONE_WEIGHT * previous_weight + 1
        self.reference_value = (
            _NONMONOTONE_WEIGHT * previous_weight * self.reference_value + value
        ) / self.reference_weight


class AdaptiveBarzilaiBorwein:
    """Step sizes by the ABBmin rule (Frassoldati, Zanghirati & Zanni 2008, "New adaptive
    stepsize selections in gradient methods").

    From the last step's s and y, measured in the preconditioner's metric: the long
    BB1 = <s, P^-1 s> / <s, y> and the short BB2 = <s, y> / <y, P y> (Barzilai & Borwein
    1988). Their ratio BB2 / BB1 is the squared cosine between P^-1/2 s and P^1/2 y, near 1
    when s is close to an eigenvector of the Hessian: then the long step is taken, and
    otherwise the smallest of the recent short steps, which damps the components that a
    long step would overshoot. It took fewer iterations than alternating BB1 and BB2
    where an ETF fits, the common study (docs/solver.md). Where the curvature estimate
    <s, y> is not positive, ||s|| / ||y|| (the geometric mean of the two in magnitude)
    stands in and the memory of short steps is cleared.
    """

    def __init__(self) -> None:
        self.recent_short_steps: collections.deque[float] = collections.deque(maxlen=_ABB_MEMORY)

    def __call__(self, s_dot_y: float, s_norm_sq: float, y_norm_sq: float) -> float:
        if y_norm_sq == 0.0:
            return MAX_STEP
        if s_dot_y <= 0.0:
            self.recent_short_steps.clear()
            step_size = math.sqrt(s_norm_sq / y_norm_sq)
        else:
            long_step, short_step = s_norm_sq / s_dot_y, s_dot_y / y_norm_sq
            self.recent_short_steps.append(short_step)
            step_size = min(self.recent_short_steps) if short_step < _ABB_THRESHOLD * long_step else long_step
        return min(max(step_size, MIN_STEP), MAX_STEP)
