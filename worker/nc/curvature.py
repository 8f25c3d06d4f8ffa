"""The second-order certificate of a UFM point: minimum, strict saddle, or not critical.

Yaras et al. (2022) prove that on the product of spheres every critical point of the
normalized UFM other than its global minimizers is a strict saddle: the Riemannian
Hessian has a negative eigenvalue there. `certify` measures this at a point: the
smallest eigenvalue of the Riemannian Hessian on the tangent space, by Lanczos with full
reorthogonalization, with the objective's symmetries projected out.

The symmetries: the objective depends on W and H only through the logits W h_i, so it
is invariant under W -> W Q, H -> H Q for orthogonal Q. At a critical point this gives
the d(d-1)/2 zero-curvature directions (W A, H A), A skew, which would read as a zero
eigenvalue at every minimum; `SymmetryModes` removes them. Without decay on the bias,
softmax's invariance under b -> b + c 1 adds one more (not under the squared error).

At a point whose features are collapsed exactly (each class's rows equal, as a merged
run leaves them), the Hessian splits: the directions that move a class's features
together are the merged problem's (worker.nc.merging, its weighted metric), and those
that split them see only one sample's term, the same d x d block C_k for each of the
class's n_k - 1 differences (the loss is a sum over samples, and the classifier sees
only their sum). `certify` then runs Lanczos on the merged problem, K rows instead of N,
and Lanczos again on the blocks C_k, which one product with the merged problem applies
to every class at once: the same spectrum, a fraction of the work.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker.nc.flat_tangents import FlatTangents
from worker.nc.formulation import Formulation
from worker.nc.manifolds import Point
from worker.nc.objectives import riemannian_hessian
from worker.nc.ufm_problem import UFMProblem

# A point whose smallest curvature is below -NEGATIVE_CURVATURE_TOL times the largest is
# a strict saddle: far above the Lanczos accuracy (LANCZOS_TOL), far below the smallest
# relative curvature of the saddles we measured (-3.9e-6 against 0.34, docs/solver.md).
NEGATIVE_CURVATURE_TOL = 1e-7
# Lanczos stops once the smallest Ritz value's residual r is at most LANCZOS_TOL times
# the largest Ritz value, or LANCZOS_RELATIVE_TOL times the smallest itself (its error
# is then about r^2 / gap, far smaller: Parlett, "The symmetric eigenvalue problem",
# 11.7), or after LANCZOS_MAX_ITERS steps (fewer where the basis would exceed
# LANCZOS_BASIS_BYTES).
LANCZOS_TOL = 1e-9
LANCZOS_RELATIVE_TOL = 1e-3
LANCZOS_MAX_ITERS = 300
LANCZOS_BASIS_BYTES = 2**28
# A Lanczos vector is reorthogonalized a second time where the first pass left less than
# this share of its length (Daniel, Gragg, Kaufman & Stewart 1976: 1/sqrt(2)).
REORTHOGONALIZE_AGAIN = 1 / math.sqrt(2)
# At a point that is not critical the gradient alone decides; its curvature is an estimate
# of this many steps (its residual says how good), not a solve of up to LANCZOS_MAX_ITERS:
# an unconverged generalized-collapse solve spent longer on it than on its descent.
NOT_CRITICAL_LANCZOS_STEPS = 20

LOCAL_MINIMUM, STRICT_SADDLE, NOT_CRITICAL = "local minimum", "strict saddle", "not critical"


class SymmetryModes:
    """Projects tangent vectors at a point onto the complement of the symmetry directions,
    in the manifolds' metric.

    The rotation directions (W A, H A) closest to v solve, for skew A, M A + A M = C - C^T,
    with M = W^T W + H^T diag(m) H and C = W^T v_W + H^T diag(m) v_H (m: the feature rows'
    weights): in M's eigenbasis, A_ij = (C - C^T)_ij / (mu_i + mu_j). Pairs with
    mu_i + mu_j = 0 are directions of R^d that no row spans: they move nothing.
    """

    def __init__(self, formulation: Formulation, point: Point, shifts_bias: bool):
        self.point, self.shifts_bias = point, shifts_bias
        row_weights = getattr(formulation.manifolds[1], "row_weights", None)
        self.weights = None if row_weights is None else row_weights[:, None]
        classifier, features = point[0], point[1]
        gram = classifier.T @ classifier + features.T @ self._weighted(features)
        eigenvalues, self.basis = torch.linalg.eigh(gram)
        spanned = eigenvalues > 1e-12 * eigenvalues[-1].clamp(min=1e-300)
        # The rows lie in the span of M's eigenvectors with mu > 0 (W x = H x = 0 where M x = 0), so
        # only those rows of A's eigenbasis form move them: with d far above K + N the products
        # are r x d instead of d x d (r = rank M <= K + N).
        self.spanning = self.basis[:, spanned]
        sums = eigenvalues[spanned, None] + eigenvalues[None, :]
        self.inverse_sums = torch.where(sums > 1e-12 * eigenvalues[-1].clamp(min=1e-300), 1 / sums, 0.0)

    def _weighted(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.weights is None else features * self.weights

    def project_out(self, vector: list[torch.Tensor]) -> list[torch.Tensor]:
        classifier, features = self.point[0], self.point[1]
        coupling = classifier.T @ vector[0] + features.T @ self._weighted(vector[1])
        rotated = self.spanning.T @ (coupling - coupling.T) @ self.basis
        generator = (rotated * self.inverse_sums) @ self.basis.T  # the spanned rows of A, in that basis
        projected = [
            vector[0] - (classifier @ self.spanning) @ generator,
            vector[1] - (features @ self.spanning) @ generator,
        ]
        if len(vector) > 2:
            projected.append(vector[2] - vector[2].mean() if self.shifts_bias else vector[2].clone())
        return projected


@dataclass(frozen=True)
class Curvature:
    """The extreme eigenvalues of the Riemannian Hessian, symmetries projected out."""

    smallest: float
    largest: float
    residual: float  # of the smallest Ritz pair: the distance to an eigenvalue is at most this
    iterations: int


def hessian_extremes(
    formulation: Formulation,
    point: Point,
    shifts_bias: bool,
    *,
    seed: int = 0,
    max_steps: int = LANCZOS_MAX_ITERS,
    rotates: bool = True,
) -> Curvature:
    """Lanczos on Pi Hess Pi, Pi the projection onto the tangent space without the
    symmetry directions, started from a seeded random tangent vector.

    `rotates`: whether the point is [W, H, (b)] of the one-layer model, whose symmetries
    SymmetryModes knows. A deep UFM's are others (rotations between linear layers), and
    none are projected out: their zero modes stay, so the smallest eigenvalue at one of
    its minima is ~0, which tells a minimum from a strict saddle all the same.
    """
    manifolds = formulation.manifolds
    hessian = riemannian_hessian(formulation.objective, formulation.hessian, manifolds, point)
    modes = SymmetryModes(formulation, point, shifts_bias) if rotates else None
    blocks = FlatTangents(point, manifolds)
    metric = blocks.metric

    def restricted(flat: torch.Tensor) -> torch.Tensor:
        vector = [m.project(x, v.clone()) for m, x, v in zip(manifolds, point, blocks.unflatten(flat))]
        return blocks.flatten(vector if modes is None else modes.project_out(vector))

    def operator(flat: torch.Tensor) -> torch.Tensor:
        return blocks.flatten(hessian(blocks.unflatten(flat)))

    return _lanczos(operator, restricted, metric, blocks.size, seed, max_steps)


def split_extremes(
    merged: Formulation, point: Point, *, seed: int = 0, max_steps: int = LANCZOS_MAX_ITERS
) -> Curvature | None:
    """The extreme curvatures along the directions that split a class's collapsed features (the eigenvalues
    of the blocks C_k on their tangent spaces, over the classes with two samples or more), or None where
    no class has two.

    In the merged problem's metric the Hessian's feature-feature block at row k is C_k (the
    objective weighs the row n_k times, the metric too), and rows do not couple: the
    feature part of one product with (0, U, 0) applies every C_k to its row of U at once,
    an operator that Lanczos takes as it takes the Hessian.
    """
    features, manifold = point[1], merged.manifolds[1]
    counts = getattr(manifold, "row_weights", None)
    if counts is None or not bool((counts > 1).any()):
        return None
    hessian = riemannian_hessian(merged.objective, merged.hessian, merged.manifolds, point)
    splittable = (counts > 1).to(features.dtype)[:, None]

    def restricted(flat: torch.Tensor) -> torch.Tensor:
        return manifold.project(features, flat.reshape(features.shape) * splittable).reshape(-1)

    def operator(flat: torch.Tensor) -> torch.Tensor:
        vector = [torch.zeros_like(point[0]), flat.reshape(features.shape).clone(), *map(torch.zeros_like, point[2:])]
        return hessian(vector)[1].reshape(-1)

    return _lanczos(
        operator,
        restricted,
        torch.ones(features.numel(), dtype=torch.float64, device=features.device),
        features.numel(),
        seed,
        max_steps,
    )


def _lanczos(
    operator: Callable[[torch.Tensor], torch.Tensor],
    restricted: Callable[[torch.Tensor], torch.Tensor],
    metric: torch.Tensor,
    dimension: int,
    seed: int,
    max_steps: int,
) -> Curvature:
    """The extreme Ritz values of the symmetric `operator` on the subspace that `restricted` projects onto
    (`metric`: the inner product's weights), from a seeded random start. The operator's image need not lie in
    the subspace: each new vector is projected after its reorthogonalization, which gives the same vector,
    since the projection is self-adjoint in the metric and leaves the basis as it is.

    Every Lanczos vector is reorthogonalized against all earlier ones in the metric: without it, rounding
    brings back copies of converged Ritz values and loses the smallest one among them. A second pass is
    taken where the first cancelled much of the vector (the criterion of Daniel, Gragg, Kaufman & Stewart
    1976), not at every step: reading the basis is most of a long Lanczos run's time.
    """
    device = metric.device
    generator = torch.Generator(device=device).manual_seed(seed)
    start = restricted(torch.randn(dimension, generator=generator, dtype=torch.float64, device=device))
    max_iters = max(2, min(max_steps, dimension, LANCZOS_BASIS_BYTES // (8 * dimension)))
    basis = torch.empty((max_iters, dimension), dtype=torch.float64, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    vector = start / math.sqrt(float(torch.dot(start, metric * start)))
    smallest = largest = residual = math.nan
    for step in range(max_iters):
        basis[step] = vector
        image = operator(vector)
        alphas.append(float(torch.dot(image, metric * vector)))
        image.add_(vector, alpha=-alphas[-1])  # the three-term recurrence first, leaving rounding to remove
        if step:
            image.add_(basis[step - 1], alpha=-betas[-1])
        length = _metric_norm(image, metric)
        image -= basis[: step + 1].T @ (basis[: step + 1] @ (metric * image))
        if _metric_norm(image, metric) < REORTHOGONALIZE_AGAIN * length:
            image -= basis[: step + 1].T @ (basis[: step + 1] @ (metric * image))
        # Projected again: the reorthogonalization subtracts vectors whose rounding leaves the subspace, and
        # dividing by beta would magnify that part by |image| / beta every step (by 10 a step, measured), until
        # the normal directions of the spheres, or the symmetries', showed as eigenvalues near 0. The projection
        # is self-adjoint in the metric, so the image stays orthogonal to the basis.
        image = restricted(image)
        beta = _metric_norm(image, metric)
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if step:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        ritz_values, ritz_vectors = torch.linalg.eigh(tridiagonal)
        smallest, largest = float(ritz_values[0]), float(ritz_values[-1])
        residual = beta * abs(float(ritz_vectors[-1, 0]))
        scale = max(abs(smallest), abs(largest))
        accurate = residual <= max(LANCZOS_TOL * scale, LANCZOS_RELATIVE_TOL * abs(smallest))
        if accurate or beta <= 1e-14 * max(scale, 1e-300):
            break
        betas.append(beta)
        vector = image / beta
    return Curvature(smallest, largest, residual, len(alphas))


def _metric_norm(vector: torch.Tensor, metric: torch.Tensor) -> float:
    return math.sqrt(max(float(torch.dot(vector, metric * vector)), 0.0))


def collapsed_point(merged: Formulation | None, point: Point) -> Point | None:
    """The merged problem's point where `point`'s features are collapsed exactly (each class's rows equal),
    else None."""
    if merged is None or merged.sample_rows is None:
        return None
    rows = merged.sample_rows
    one_sample_per_row = torch.empty(int(rows.max()) + 1, dtype=torch.long, device=rows.device)
    one_sample_per_row.scatter_(0, rows, torch.arange(rows.numel(), device=rows.device))
    merged_point = [point[0], point[1].index_select(0, one_sample_per_row), *point[2:]]
    return merged_point if torch.equal(merged.expand(merged_point)[1], point[1]) else None


def bias_shift_is_free(problem: UFMProblem) -> bool:
    """Whether b -> b + c 1 leaves the objective unchanged: a bias without decay, under a
    softmax loss (the squared error sees every logit)."""
    return problem.bias and problem.loss != "mse" and (problem.normalization == "normalized" or problem.lambda_b == 0)


@dataclass(frozen=True)
class SecondOrderCertificate:
    """What the point is, and the numbers and tolerances that decided it."""

    critical_point: str  # LOCAL_MINIMUM, STRICT_SADDLE or NOT_CRITICAL
    curvature: Curvature
    grad_tol: float  # the point is critical where its gradient norm is at most this
    curvature_tol: float  # and a strict saddle where its smallest curvature is below minus this

    def as_result(self) -> dict:
        return {
            "critical_point": self.critical_point,
            "hessian_min_eigenvalue": self.curvature.smallest,
            "hessian_max_eigenvalue": self.curvature.largest,
            "hessian_min_eigenvalue_residual": self.curvature.residual,
            "critical_point_grad_tol": self.grad_tol,
            "critical_point_curvature_tol": self.curvature_tol,
        }


def certify(
    problem: UFMProblem,
    formulation: Formulation,
    point: Point,
    grad_norm: float,
    grad_tol: float,
    merged: Formulation | None = None,
) -> SecondOrderCertificate:
    """Classify `point`: not critical where grad_norm > grad_tol; otherwise a strict saddle
    where the smallest curvature is below -NEGATIVE_CURVATURE_TOL times the largest, and
    a local minimum where it is not. With the problem's `merged` formulation, a point whose
    features are collapsed exactly is measured through it (the module's docstring)."""
    critical = grad_norm <= grad_tol
    steps = LANCZOS_MAX_ITERS if critical else NOT_CRITICAL_LANCZOS_STEPS
    shifts_bias = bias_shift_is_free(problem)
    merged_point = collapsed_point(merged, point)
    if merged is None or merged_point is None:
        curvature = hessian_extremes(formulation, point, shifts_bias, max_steps=steps, rotates=problem.layers == 1)
    else:
        curvature = hessian_extremes(merged, merged_point, shifts_bias, max_steps=steps)
        split = split_extremes(merged, merged_point, max_steps=steps)
        if split is not None:
            lowest = min(curvature, split, key=lambda part: part.smallest)
            curvature = Curvature(
                lowest.smallest,
                max(curvature.largest, split.largest),
                lowest.residual,
                curvature.iterations + split.iterations,
            )
    curvature_tol = NEGATIVE_CURVATURE_TOL * abs(curvature.largest)
    if not critical:
        kind = NOT_CRITICAL
    elif curvature.smallest < -curvature_tol:
        kind = STRICT_SADDLE
    else:
        kind = LOCAL_MINIMUM
    return SecondOrderCertificate(kind, curvature, grad_tol, curvature_tol)
