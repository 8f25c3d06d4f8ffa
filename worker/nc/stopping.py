"""When a descent stops, and why: the stop reasons and the rules that decide them.

docs/solver.md explains each reason, and the measurements behind `SublinearProgress`.
"""

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass

from worker.nc.manifolds import Point


class StopReason(enum.Enum):
    """Why a descent ended. The value opens the message that states it."""

    CONVERGED = "converged"  # gradient norm <= tol, and the certificate accepts the point
    BUDGET_SPENT = "iteration budget spent"  # max_iters reached
    STALLED = "line search stalled"  # no step size decreases the objective: rounding floor
    SUBLINEAR = "gradient norm decreasing sublinearly"  # crawling across a plateau
    HANDED_OVER = "handed over"  # the caller takes over from this point


# The rule of `SublinearProgress`: from this iteration on, a descent whose smallest
# gradient norm fell less than SUBLINEAR_FACTOR-fold between iteration k/2 and k stops.
SUBLINEAR_MIN_ITERS = 1500
SUBLINEAR_FACTOR = 3.0


class SublinearProgress:
    """Gives up on a descent whose gradient norm decreases sublinearly.

    A linearly converging descent gains, from iteration k/2 to k, a factor that grows
    exponentially with k; a factor that stays bounded is a power law, the signature of a
    descent crawling across a flat region. The normalized UFM with more classes than a
    simplex ETF fits (K > d + 1, generalized neural collapse: Jiang et al., ICML 2024)
    crawls like this past strict saddles whose negative curvature is tiny next to the
    largest curvature, which sizes a gradient step.

    Called with every iterate's step and gradient norm, in order, over one run, across
    the descents that the run chains (a descent that goes on from another's last point
    starts at that point's step, which it reports again). Returns None to go on, or the
    stop message. Once it has fired it keeps returning its message, so that a descent
    chained after it stops at its start.
    """

    def __init__(self, min_iters: int = SUBLINEAR_MIN_ITERS, factor: float = SUBLINEAR_FACTOR):
        self.min_iters, self.factor = min_iters, factor
        self.smallest: list[float] = []  # smallest[k]: the smallest gradient norm up to step k
        self.message: str | None = None

    def __call__(self, step: int, grad_norm: float) -> str | None:
        if self.message is not None:
            return self.message
        while len(self.smallest) <= step:
            self.smallest.append(self.smallest[-1] if self.smallest else math.inf)
        self.smallest[step] = min(self.smallest[step], grad_norm)
        if step >= self.min_iters:
            earlier, now = self.smallest[step // 2], self.smallest[step]
            if now * self.factor > earlier:
                self.message = (
                    f"{StopReason.SUBLINEAR.value}: its smallest value fell only "
                    f"{earlier / now:.3g}-fold from iteration {step // 2} to {step} "
                    f"({earlier:.3g} to {now:.3g}), less than the {self.factor:g}-fold of a "
                    f"k^-{math.log2(self.factor):.2f} decay"
                )
        return self.message


# certify(point, grad_norm): whether a point that passes the gradient test is really
# where the descent should converge.
Certificate = Callable[[Point, float], bool]


@dataclass(frozen=True)
class StoppingRules:
    """What ends a descent, checked at every iterate in this order.

    - `tol`: it converges once the gradient norm is at most tol and `certify` (where
      given) accepts the point. Where it refuses one, the gradient is taken to be small
      only because the objective is flat there: tol drops tenfold below the current norm
      and the descent goes on, to be checked again there. Where the point is no optimum
      at all, the gradient meets its rounding floor and another rule ends the descent.
    - `sublinear_progress`: it gives up once that rule fires.
    - `max_iters`: it stops at this step number (steps count from the run's first).
    - `hand_over(point)`: it ends once this returns True, for the caller to go on from
      the point.
    """

    tol: float
    max_iters: int
    certify: Certificate | None = None
    sublinear_progress: SublinearProgress | None = None
    hand_over: Callable[[Point], bool] | None = None

    def tol_in_force(self, point: Point, grad_norm: float, tol: float) -> float:
        """The bound on the gradient norm from this iterate on: `tol` (self.tol to begin with), or a tenth of
        the norm where the norm passes it and `certify` refuses the point."""
        if grad_norm <= tol and self.certify is not None and not self.certify(point, grad_norm):
            return grad_norm / 10
        return tol

    def reason_to_stop(self, step: int, point: Point, grad_norm: float, tol: float) -> tuple[StopReason, str] | None:
        """Why the descent ends at this iterate, and the message stating it; None to go on.

        `tol` is the bound in force, which `certify` may have lowered below `self.tol`.
        """
        if grad_norm <= tol:
            return StopReason.CONVERGED, (
                f"{StopReason.CONVERGED.value}: gradient norm {grad_norm:.3g} <= tol {tol:.3g}"
            )
        if self.sublinear_progress is not None:
            message = self.sublinear_progress(step, grad_norm)
            if message is not None:
                return StopReason.SUBLINEAR, message
        if step >= self.max_iters:
            return StopReason.BUDGET_SPENT, (
                f"{StopReason.BUDGET_SPENT.value}: gradient norm {grad_norm:.3g} > tol {tol:.3g}"
            )
        if self.hand_over is not None and self.hand_over(point):
            return StopReason.HANDED_OVER, StopReason.HANDED_OVER.value
        return None


def stalled(grad_norm: float, tol: float) -> tuple[StopReason, str]:
    """The reason, and its message, for a descent whose line search found no step."""
    return StopReason.STALLED, (
        f"{StopReason.STALLED.value}: no step decreased the objective, at gradient norm {grad_norm:.3g} (tol {tol:.3g})"
    )
