"""Preconditioned Riemannian gradient descent, the optimizer of the UFM solver.

It runs on any `formulation` that carries `evaluate` (an objective of
worker.nc.objectives), `manifolds` (one per block of the point) and a `preconditioner`
(worker.nc.preconditioner), and yields its iterates, so that the caller can report,
check and hand over between them.

A descent ends for one of four reasons, which its last iterate states in `stop_reason`:

- converged: the Riemannian gradient norm is at most tol (and `certify` accepts the
  point, where one is given);
- the iteration budget is spent;
- the line search stalled: no step size down to the smallest decreases the objective,
  which happens at the rounding floor of the gradient;
- the gradient norm decreases sublinearly (`SublinearProgress`, where the caller
  passes one as `give_up`): from iteration SUBLINEAR_MIN_ITERS on, the descent stops
  once the smallest gradient norm so far has fallen less than SUBLINEAR_FACTOR-fold
  between iteration k/2 and iteration k.

Why the last rule, and why these numbers. A linearly converging descent gains, from k/2
to k, a factor that grows exponentially with k; a factor that stays bounded is a power
law, the signature of a descent crawling across a flat region, and 3-fold per doubling
of k is a decay like k^-1.58, at which going from 1e-5 to tol 1e-10 takes 1,400 times
the iterations spent so far. The rule also stops a linear decay slower than a decade
per 1,570 iterations (3-fold in 750), which would need some 10,000 iterations for the
seven decades from 1e-3 to tol. The normalized UFM with more classes than a simplex ETF
fits (K > d + 1; here n = 10, logit scale 10) crawls like this. Its Riemannian Hessian
(one feature row per class, rotations deflated) has strict saddles on the descent's
path whose negative curvature is tiny next to the largest curvature: -3.9e-6 against
0.34 at iteration 1,000 for K = 100, d = 43, and three eigenvalues from -3.9e-6 to
-4.9e-6 at iteration 2,000 for K = 300, d = 128; the minimum then reached at K = 100
has a smallest curvature of 1.1e-5 against 0.33. A gradient step is sized by the
largest curvature, so it leaves such a saddle only after on the order of 0.34 / 3.9e-6
~ 1e5 iterations, and no step rule we tried avoided that. At K = 300, d = 128 this
descent (ABBmin) took 28,073 iterations to tol on one thread and 21,171 on two (the
gradient norm fell from 5.6e-6 at iteration 1,000 to 9.8e-8 at 18,000, and then to tol
in 3,000 more); on one thread, alternating long and short Barzilai-Borwein steps took
21,039, long steps alone and ABBmin with threshold 0.5 did not get there in 30,000, and
a memory-10 Riemannian L-BFGS prototype, on the problem with one feature row per class,
took 9,841. The thresholds come from runs without the rule, on one and two threads, of
K = 300 (seeds 0 to 2), K = 100 and K = 60 (seeds 0 to 15) and K = 30 (seeds 0 to 7):
every K = 300 run stops at iteration 1,500 (2.6 s on two cores for seed 0, its loss
2e-5 (relative) above where the long run ends); of the 32 K = 100 runs, the 30 that
converge within 4,300 iterations are untouched (from k = 1,500 on, the smallest norm at
k is at most 0.24 times that at k/2, against 1/3 to fire), and seed 6, which needs
8,360, stops at 1,500; K = 30 and 60 converge within 1,000. The converging closed-form
problems of tests/test_ufm.py take at most 82 iterations, far below where the rule
starts (bench/gnc.py measures the K > d + 1 problems).
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from worker.nc.objectives import value_and_riemannian_grad
from worker.nc.preconditioner import Terms, host_floats
from worker.nc.step_rule import AdaptiveBarzilaiBorwein, NonmonotoneLineSearch

# The rule of `SublinearProgress`: from this iteration on, a descent whose smallest
# gradient norm fell less than SUBLINEAR_FACTOR-fold between iteration k/2 and k stops;
# the module docstring gives the measurements that set both.
SUBLINEAR_MIN_ITERS = 1500
SUBLINEAR_FACTOR = 3.0


@dataclass
class Iterate:
    """One iterate of `minimize`, numbered by `step` from 0 at the start.

    `stop_reason` says why the descent ended there, on the last iterate (`final`), and
    is None on every other.
    """

    step: int
    point: list[torch.Tensor]
    value: float
    grad_norm: float
    converged: bool
    final: bool
    stop_reason: str | None = None


class SublinearProgress:
    """`give_up` for `minimize`: the sublinear-progress rule of the module docstring.

    Called with every iterate's step and gradient norm, in order, over one run, across
    the descents that the run chains (a descent that goes on from another's last point
    starts at that point's step, which it reports again). Once it has fired it keeps
    returning its reason, so that a descent chained after it stops at its start.
    """

    def __init__(self, min_iters: int = SUBLINEAR_MIN_ITERS, factor: float = SUBLINEAR_FACTOR):
        self.min_iters, self.factor = min_iters, factor
        self.smallest: list[float] = []  # smallest[k]: the smallest gradient norm up to step k
        self.reason: str | None = None

    def __call__(self, step: int, grad_norm: float) -> str | None:
        if self.reason is not None:
            return self.reason
        while len(self.smallest) <= step:
            self.smallest.append(self.smallest[-1] if self.smallest else math.inf)
        self.smallest[step] = min(self.smallest[step], grad_norm)
        if step >= self.min_iters:
            earlier, now = self.smallest[step // 2], self.smallest[step]
            if now * self.factor > earlier:
                self.reason = (
                    f"gradient norm decreasing sublinearly: its smallest value fell only "
                    f"{earlier / now:.3g}-fold from iteration {step // 2} to {step} "
                    f"({earlier:.3g} to {now:.3g}), less than the {self.factor:g}-fold of a "
                    f"k^-{math.log2(self.factor):.2f} decay"
                )
        return self.reason


def minimize(
    formulation,
    point,
    tol,
    max_iters,
    certify=None,
    hand_over=None,
    give_up: Callable[[int, float], str | None] | None = None,
) -> Iterator[Iterate]:
    """Preconditioned Riemannian gradient descent with Barzilai-Borwein steps.

    Each step goes along -P grad, with P the `Preconditioner`, projected onto the
    tangent space. Step sizes come from the long (BB1) and short (BB2) Barzilai-Borwein
    formulas in P's metric, chosen between by the adaptive ABBmin rule, from ambient
    differences of iterates s and of Riemannian gradients y; they are accepted by a
    Zhang-Hager nonmonotone Armijo test against a running weighted average of past
    objective values. Yields the start and every accepted step; the last yielded
    iterate has `final` set and says in `stop_reason` why (module docstring). Each step
    is searched for before its predecessor is yielded, so that `final` is known when the
    iterate is reported.

    `certify(point, grad_norm)`, if given, must also accept a point before it counts as
    converged. Where it refuses one, the gradient is only small because the objective
    is flat there (log L at small logit scales hardly depends on how the classifier
    rows are arranged, so a gradient of 1e-10 can leave nc2_etf_w near 3e-6 at scale
    0.3 with K = 100): the bound drops tenfold below the current norm and the descent
    goes on, to be checked again there. Where the point is no optimum at all, the
    gradient meets its rounding floor and the run ends by stalling or by max_iters,
    unconverged.

    `give_up(step, grad_norm)`, if given, is asked at every unconverged iterate before
    the iteration budget is checked; when it returns a reason, the run ends there,
    unconverged, with that reason (`SublinearProgress` is one).

    `hand_over(point)`, if given, is asked before each step is searched for; when it
    returns True, the run ends there, unconverged, for the caller to go on from.

    The host reads numbers from the device twice per iteration (three times while
    `hand_over` reads one): the objective value of each trial step, and then, in one
    transfer, the inner products that give the gradient norm, the slope and the
    Barzilai-Borwein steps of the accepted one.
    """
    manifolds, preconditioner = formulation.manifolds, formulation.preconditioner
    value, grads = value_and_riemannian_grad(formulation.evaluate, manifolds, point)
    # The differences of iterates and of gradients, and the search direction, are
    # written into arrays kept from step to step: on the CPU, fresh arrays this size
    # every iteration cost page faults comparable to the matrix products, which is also
    # why each objective keeps one logits buffer.
    moves, grad_changes, directions = (
        [torch.empty_like(block) for block in point] for _ in range(3)
    )

    def set_direction(point, grads) -> tuple[Terms, Terms]:
        """Write the direction at `point` into `directions`; return ||grad||^2 and the slope."""
        norms_sq = [manifold.inner(grad, grad) for manifold, grad in zip(manifolds, grads)]
        slope = preconditioner.direction(point, grads, norms_sq, out=directions)
        return [(1.0, norm_sq) for norm_sq in norms_sq], slope

    squared_norm, slope = host_floats(*set_direction(point, grads))
    search = NonmonotoneLineSearch(formulation.evaluate, manifolds, value)
    step_size = 1.0 / max(math.sqrt(slope), 1e-300)
    next_step_size = AdaptiveBarzilaiBorwein()
    step = 0
    while True:
        grad_norm = math.sqrt(squared_norm)
        if grad_norm <= tol and certify is not None and not certify(point, grad_norm):
            tol = grad_norm / 10
        converged = grad_norm <= tol
        stop_reason = _reason_to_stop(step, grad_norm, tol, max_iters, give_up)
        if stop_reason is None and hand_over is not None and hand_over(point):
            stop_reason = "handed over"
        accepted = None
        if stop_reason is None:
            accepted = search(point, directions, slope, step_size, iteration=step + 1)
            if accepted is None:
                stop_reason = (
                    f"line search stalled: no step decreased the objective, at gradient norm "
                    f"{grad_norm:.3g} (tol {tol:.3g})"
                )
        final = stop_reason is not None
        yield Iterate(step, point, value, grad_norm, converged, final, stop_reason)
        if final:
            return

        step += 1
        candidate, candidate_value, candidate_grads = accepted
        for move, change, new, old, new_grad, old_grad in zip(
            moves, grad_changes, candidate, point, candidate_grads, grads
        ):
            torch.sub(new, old, out=move)
            torch.sub(new_grad, old_grad, out=change)
        squared_norm, slope, s_dot_y, s_norm_sq, y_norm_sq = host_floats(
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


def _reason_to_stop(step, grad_norm, tol, max_iters, give_up) -> str | None:
    """Why the descent ends at this iterate, before any step is searched for; None to go on."""
    if grad_norm <= tol:
        return f"converged: gradient norm {grad_norm:.3g} <= tol {tol:.3g}"
    if give_up is not None and (reason := give_up(step, grad_norm)) is not None:
        return reason
    if step >= max_iters:
        return f"iteration budget spent: gradient norm {grad_norm:.3g} > tol {tol:.3g}"
    return None
