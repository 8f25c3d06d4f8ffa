"""The Riemannian trust-region method (Absil, Baker & Gallivan 2007), the second-order
optimizer of the UFM solver.

Each iteration minimizes the quadratic model f(x) + <g, eta> + <eta, Hess f(x)[eta]> / 2
over the tangent space within a trust region, approximately, by truncated conjugate
gradients (Steihaug 1983, Toint 1981), preconditioned by the descent's P; the region is
measured in P^-1's norm, as in Manopt. Where tCG meets a direction of nonpositive
curvature it steps along it to the region's edge: this is what leaves a saddle whose
negative curvature is tiny next to the largest, on which a gradient method crawls. The
step is accepted where the objective fell by more than RHO_ACCEPT of the model's
prediction, and the region grows or shrinks with the agreement.

`minimize_trust_region` has `minimize`'s signature and result: a step is an accepted
trust-region step, and `StoppingRules` decides as it does for the descent.
"""

import math
from collections.abc import Callable

import torch

from worker.nc.descent import Iterate, SolveResult
from worker.nc.formulation import Formulation
from worker.nc.manifolds import Point
from worker.nc.objectives import riemannian_hessian
from worker.nc.preconditioner import Terms, host_floats
from worker.nc.stopping import StoppingRules, stalled

# tCG stops once the residual is below ||g|| min(||g||^THETA, KAPPA): linear far from a
# minimizer, quadratic near one (Absil et al.'s defaults, as in Manopt and pymanopt).
KAPPA, THETA = 0.1, 1.0
# A step is accepted where the actual decrease is more than this fraction of the
# predicted one; the region shrinks fourfold below 1/4 and doubles above 3/4 where tCG
# ended on its edge.
RHO_ACCEPT = 0.1
# Near convergence the actual and predicted decreases are both of the order of the
# rounding of f; this much (times eps max(1, |f|)) is added to both (Conn, Gould & Toint
# 2000, 17.4.2), so that their ratio tends to 1 there rather than to noise.
RHO_REGULARIZATION = 1e3
# A region this much smaller than the largest means no step can be trusted: rounding.
SMALLEST_RADIUS_FRACTION = 1e-14


def minimize_trust_region(
    formulation: Formulation,
    start: Point,
    stopping: StoppingRules,
    *,
    first_step: int = 0,
    on_iterate: Callable[[Iterate], None] | None = None,
) -> SolveResult:
    """Minimize the formulation's objective from `start` by Riemannian trust regions.

    Steps are numbered from `first_step`; `on_iterate(iterate)` is called with every
    iterate but the last, once the step from it has been accepted.
    """
    manifolds = formulation.manifolds
    dimension = sum(block.numel() for block in start)
    largest_radius = math.sqrt(dimension)
    radius = largest_radius / 8
    point = start
    value, euclidean_grads, grads = _evaluate(formulation, point)
    (squared_norm,) = host_floats([(1.0, m.inner(g, g)) for m, g in zip(manifolds, grads)])
    tol = stopping.tol
    step = first_step
    while True:
        grad_norm = math.sqrt(squared_norm)
        tol = stopping.tol_in_force(point, grad_norm, tol)
        stop = stopping.reason_to_stop(step, point, grad_norm, tol)
        iterate = Iterate(step, point, value, grad_norm)
        if stop is not None:
            return SolveResult(iterate, *stop)

        hessian = riemannian_hessian(formulation.objective, formulation.hessian, manifolds, point, euclidean_grads)
        while True:  # until a step is accepted
            if radius < SMALLEST_RADIUS_FRACTION * largest_radius:
                return SolveResult(iterate, *stalled(grad_norm, tol))
            move, model_decrease, on_edge = truncated_cg(formulation, point, grads, squared_norm, hessian, radius)
            if not model_decrease > 0:  # not even the first CG step lowers the model: rounding
                return SolveResult(iterate, *stalled(grad_norm, tol))
            candidate = [m.retract(block, tangent) for m, block, tangent in zip(manifolds, point, move)]
            candidate_value, candidate_euclidean, candidate_grads = _evaluate(formulation, candidate)
            regularization = max(1.0, abs(value)) * torch.finfo(torch.float64).eps * RHO_REGULARIZATION
            predicted = model_decrease + regularization
            ratio = (value - candidate_value + regularization) / predicted if predicted > 0 else -math.inf
            if not ratio >= 0.25:  # NaN too
                radius /= 4
            elif ratio > 0.75 and on_edge:
                radius = min(2 * radius, largest_radius)
            if ratio > RHO_ACCEPT:
                break
        if on_iterate is not None:
            on_iterate(iterate)
        step += 1
        point, value, euclidean_grads, grads = candidate, candidate_value, candidate_euclidean, candidate_grads
        (squared_norm,) = host_floats([(1.0, m.inner(g, g)) for m, g in zip(manifolds, grads)])


def _evaluate(formulation: Formulation, point: Point) -> tuple[float, list[torch.Tensor], list[torch.Tensor]]:
    """The objective, its Euclidean gradient (which the Hessian's curvature term needs),
    and its Riemannian gradient."""
    value, euclidean_grads = formulation.objective(point)
    grads = [
        manifold.euclidean_to_riemannian_gradient(block, grad.clone())
        for manifold, block, grad in zip(formulation.manifolds, point, euclidean_grads)
    ]
    return float(value), euclidean_grads, grads


def truncated_cg(
    formulation: Formulation,
    point: Point,
    grads: list[torch.Tensor],
    grad_norm_sq: float,
    hessian: Callable[[list[torch.Tensor]], list[torch.Tensor]],
    radius: float,
) -> tuple[list[torch.Tensor], float, bool]:
    """Steihaug-Toint truncated CG on the trust-region subproblem, preconditioned by P.

    Returns the step eta, the model's decrease -<g, eta> - <eta, H eta>/2, and whether
    the step ends on the region's edge (there, the region may grow). The P^-1 norms of
    the iterates are updated by recurrences (Conn, Gould & Toint 2000, 7.5.6-7), so P^-1
    is never applied.
    """
    manifolds, preconditioner = formulation.manifolds, formulation.preconditioner

    def inner(first: list[torch.Tensor], second: list[torch.Tensor]) -> Terms:
        return [(1.0, m.inner(a, b)) for m, a, b in zip(manifolds, first, second)]

    def precondition(residual: list[torch.Tensor], residual_norms: Terms) -> tuple[list[torch.Tensor], Terms]:
        out = [torch.empty_like(block) for block in residual]
        slope = preconditioner.direction(point, residual, [norm for _, norm in residual_norms], out=out)
        return out, slope

    move = [torch.zeros_like(block) for block in point]
    hessian_move = [torch.zeros_like(block) for block in point]
    residual = [grad.clone() for grad in grads]
    target = math.sqrt(grad_norm_sq) * min(math.sqrt(grad_norm_sq) ** THETA, KAPPA)
    preconditioned, z_dot_r_terms = precondition(residual, inner(residual, residual))
    (z_dot_r,) = host_floats(z_dot_r_terms)
    direction = [-z for z in preconditioned]
    move_norm_sq = move_dot_direction = 0.0  # in P^-1's norm
    direction_norm_sq = z_dot_r
    model = 0.0
    max_inner = sum(block.numel() for block in point)
    for _ in range(max_inner):
        hessian_direction = hessian(direction)
        (curvature,) = host_floats(inner(direction, hessian_direction))
        alpha = z_dot_r / curvature if curvature != 0 else 0.0
        new_move_norm_sq = move_norm_sq + 2 * alpha * move_dot_direction + alpha**2 * direction_norm_sq
        if curvature <= 0 or new_move_norm_sq >= radius**2:
            # to the edge along `direction`: a descent direction, of negative curvature or
            # leading out of the region
            tau = (
                -move_dot_direction + math.sqrt(move_dot_direction**2 + direction_norm_sq * (radius**2 - move_norm_sq))
            ) / direction_norm_sq
            for eta, h_eta, d, h_d in zip(move, hessian_move, direction, hessian_direction):
                eta.add_(d, alpha=tau)
                h_eta.add_(h_d, alpha=tau)
            return move, _model_decrease(inner, grads, move, hessian_move), True
        new_move = [eta + alpha * d for eta, d in zip(move, direction)]
        new_hessian_move = [h_eta + alpha * h_d for h_eta, h_d in zip(hessian_move, hessian_direction)]
        new_model = -_model_decrease(inner, grads, new_move, new_hessian_move)
        if new_model >= model:  # rounding: the model no longer decreases
            break
        move, hessian_move, model, move_norm_sq = new_move, new_hessian_move, new_model, new_move_norm_sq
        for r, h_d in zip(residual, hessian_direction):
            r.add_(h_d, alpha=alpha)
        residual_norms = inner(residual, residual)
        (residual_norm_sq,) = host_floats(residual_norms)
        if math.sqrt(residual_norm_sq) <= target:
            break
        preconditioned, z_dot_r_terms = precondition(residual, residual_norms)
        previous_z_dot_r = z_dot_r
        (z_dot_r,) = host_floats(z_dot_r_terms)
        beta = z_dot_r / previous_z_dot_r
        direction = [-z + beta * d for z, d in zip(preconditioned, direction)]
        direction = [m.project(x, d) for m, x, d in zip(manifolds, point, direction)]
        move_dot_direction = beta * (move_dot_direction + alpha * direction_norm_sq)
        direction_norm_sq = z_dot_r + beta**2 * direction_norm_sq
    return move, -model, False


def _model_decrease(
    inner: Callable[[list[torch.Tensor], list[torch.Tensor]], Terms],
    grads: list[torch.Tensor],
    move: list[torch.Tensor],
    hessian_move: list[torch.Tensor],
) -> float:
    """-<g, eta> - <eta, H eta> / 2."""
    slope, curvature = host_floats(inner(grads, move), inner(move, hessian_move))
    return -slope - curvature / 2
