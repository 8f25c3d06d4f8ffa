"""The second-order certificate of a UFM point: minimum, strict saddle, or not critical.

Yaras et al. (2022) prove that on the product of spheres every critical point of the
normalized UFM other than its global minimizers is a strict saddle: the Riemannian
Hessian has a negative eigenvalue there. `certify` measures this at a point: the
smallest eigenvalue of the Riemannian Hessian on the tangent space, by Lanczos with partial
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

import numpy as np
import scipy.linalg
import torch

from worker.nc.flat_tangents import FlatTangents, Weights, metric_dot
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
# 11.7), or where its basis would pass LANCZOS_BASIS_BYTES.
LANCZOS_TOL = 1e-9
LANCZOS_RELATIVE_TOL = 1e-3
# Steps times dimension caps Lanczos, not steps alone: it is what the basis holds and what
# each reorthogonalization reads, and a small problem's steps are cheap. The budget is
# 300 steps of (K, d, n) = (300, 128, 10)'s merged problem (76,800 dimensions), which 436
# steps leave unconverged too; (100, 43, 2) gets 1,786 steps, which proved every minimum
# of its seeds 0 to 31 where 300 proved 11 (docs/solver.md).
LANCZOS_BASIS_BYTES = 300 * 76_800 * 8
# A Lanczos vector is reorthogonalized a second time where the first pass left less than
# this share of its length (Daniel, Gragg, Kaufman & Stewart 1976: 1/sqrt(2)).
REORTHOGONALIZE_AGAIN = 1 / math.sqrt(2)
EPS = float(np.finfo(np.float64).eps)
# Up to this many Lanczos steps the tridiagonal's whole spectrum is computed densely (faster than scipy's
# call for its extremes alone, measured: 10 against 32 us at 6 steps, 95 against 49 us at 32).
DENSE_RITZ_SIZE = 24
# Past DENSE_RITZ_SIZE steps the Ritz values, and with them the convergence test, come every this many steps
# (and at the last): scipy's extremes cost a time that grows with the steps, up to a third of a Lanczos step
# (docs/solver.md). A run stops at the first of these tests that passes, a few steps late, with Ritz values
# that interlacing keeps no higher.
RITZ_EVERY = 10
# At a point that is not critical the gradient alone decides; its curvature is an estimate
# of this many steps (its residual says how good), not a solve to LANCZOS_BASIS_BYTES:
# an unconverged generalized-collapse solve spent longer on it than on its descent.
NOT_CRITICAL_LANCZOS_STEPS = 20

LOCAL_MINIMUM, STRICT_SADDLE, NOT_CRITICAL = "local minimum", "strict saddle", "not critical"


class SymmetryModes:
    """Projects tangent vectors onto the complement of the symmetry directions, in the
    manifolds' metric, at the point turned into the eigenbasis of M (below): `self.point`.

    The rotation directions (W A, H A) closest to v solve, for skew A, M A + A M = C - C^T,
    with M = W^T W + H^T diag(m) H and C = W^T v_W + H^T diag(m) v_H (m: the feature rows'
    weights): in M's eigenbasis, A_ij = (C - C^T)_ij / (mu_i + mu_j). Pairs with
    mu_i + mu_j = 0 are directions of R^d that no row spans: they move nothing. The
    objective's rotation invariance makes the Hessian at the turned point (W Q, H Q), Q
    M's eigenvectors, the same operator in turned coordinates, with the same spectrum; there
    M is diagonal, and a projection takes four products of the rows with d x d matrices,
    none of Q's.
    """

    def __init__(self, formulation: Formulation, point: Point, shifts_bias: bool):
        self.shifts_bias = shifts_bias
        row_weights = getattr(formulation.manifolds[1], "row_weights", None)
        self.weights = None if row_weights is None else row_weights[:, None]
        classifier, features = point[0], point[1]
        gram = classifier.T @ classifier + features.T @ self._weighted(features)
        eigenvalues, self.eigenvectors = torch.linalg.eigh(gram)
        self.point = self.turned(point)
        # The rows lie in the span of M's eigenvectors with mu > 0 (W x = H x = 0 where M x = 0), the last ones
        # in eigh's ascending order: only those rows of A move them, so with d far above K + N the products are
        # r x d instead of d x d (r = rank M <= K + N).
        negligible = 1e-12 * eigenvalues[-1].clamp(min=1e-300)
        self.first_spanned = int((eigenvalues <= negligible).sum())
        sums = eigenvalues[self.first_spanned :, None] + eigenvalues[None, :]
        self.inverse_sums = torch.where(sums > negligible, 1 / sums, 0.0)
        self.spanned_rows = [block[:, self.first_spanned :] for block in self.point[:2]]

    def _weighted(self, features: torch.Tensor) -> torch.Tensor:
        return features if self.weights is None else features * self.weights

    def turned(self, vector: list[torch.Tensor]) -> list[torch.Tensor]:
        """A point, or a vector at it, in the turned coordinates: (W Q, H Q), the rest as it is."""
        return [vector[0] @ self.eigenvectors, vector[1] @ self.eigenvectors, *vector[2:]]

    def project_out(self, vector: list[torch.Tensor]) -> list[torch.Tensor]:
        """`vector`, a tangent vector at `self.point`, less its part along the symmetry directions."""
        classifier_rows, feature_rows = self.spanned_rows
        coupling = torch.addmm(classifier_rows.T @ vector[0], feature_rows.T, self._weighted(vector[1]))
        # C - C^T on the spanned rows: C_ji = 0 where j is not spanned (no row has a part along it)
        coupling[:, self.first_spanned :] -= coupling[:, self.first_spanned :].T.clone()
        generator = coupling.mul_(self.inverse_sums)  # the spanned rows of A
        projected = [torch.addmm(block, rows, generator, alpha=-1) for block, rows in zip(vector, self.spanned_rows)]
        if len(vector) > 2:
            projected.append(vector[2] - vector[2].mean() if self.shifts_bias else vector[2].clone())
        return projected


@dataclass(frozen=True)
class Curvature:
    """The extreme eigenvalues of the Riemannian Hessian, symmetries projected out."""

    smallest: float  # never below the smallest eigenvalue: a Ritz value
    largest: float
    residual: float  # of the smallest Ritz pair: the distance to an eigenvalue is at most this
    iterations: int
    # Whether Lanczos stopped on its tolerance (or found an invariant subspace), so that `smallest` is the
    # smallest eigenvalue to that accuracy, rather than at its step cap, where a lower eigenvalue may remain.
    converged: bool


def hessian_extremes(
    formulation: Formulation,
    point: Point,
    shifts_bias: bool,
    *,
    seed: int = 0,
    max_steps: int | None = None,
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
    modes = SymmetryModes(formulation, point, shifts_bias) if rotates else None
    blocks = FlatTangents(point, manifolds)
    start = turned_start(blocks, seed, modes)
    if modes is not None:
        point = modes.point
    hessian = riemannian_hessian(formulation.objective, formulation.hessian, manifolds, point)
    metric = blocks.metric

    def restricted(flat: torch.Tensor) -> torch.Tensor:
        vector = [m.project(x, v.clone()) for m, x, v in zip(manifolds, point, blocks.unflatten(flat))]
        return blocks.flatten(vector if modes is None else modes.project_out(vector))

    def operator(flat: torch.Tensor) -> torch.Tensor:
        return blocks.flatten(hessian(blocks.unflatten(flat)))

    return _lanczos(operator, restricted, metric, start, max_steps)


def split_extremes(
    merged: Formulation, point: Point, *, seed: int = 0, max_steps: int | None = None
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

    return _lanczos(operator, restricted, 1.0, random_vector(features.numel(), seed, features.device), max_steps)


def random_vector(dimension: int, seed: int, device: torch.device) -> torch.Tensor:
    """Lanczos's start before its projection: standard Gaussian entries from `seed`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(dimension, generator=generator, dtype=torch.float64, device=device)


def turned_start(blocks: FlatTangents, seed: int, modes: SymmetryModes | None) -> torch.Tensor:
    """The seeded start of Lanczos at a point, turned with it where `modes` turn the point: the same Krylov
    spaces, turned, and the same Ritz values as from the point itself."""
    start = random_vector(blocks.size, seed, blocks.device)
    return start if modes is None else blocks.flatten(modes.turned(blocks.unflatten(start)))


def _lanczos(
    operator: Callable[[torch.Tensor], torch.Tensor],
    restricted: Callable[[torch.Tensor], torch.Tensor],
    metric: Weights,
    start: torch.Tensor,
    max_steps: int | None,
) -> Curvature:
    """The extreme Ritz values of the symmetric `operator` on the subspace that `restricted` projects onto
    (`metric`: the inner product's weights), from `start` projected, after at most `max_steps` steps where
    given and never past LANCZOS_BASIS_BYTES. The operator's image need not lie in
    the subspace: each new vector is projected after its reorthogonalization, which gives the same vector,
    since the projection is self-adjoint in the metric and leaves the basis as it is.

    The basis is kept semi-orthogonal in the metric by partial reorthogonalization (Simon 1984): a recurrence
    estimates how far rounding has taken each new vector off the earlier ones, and where the estimate passes
    sqrt(eps) the vector is reorthogonalized against the whole basis, and the last vector with it, in the same
    pass over the basis (Simon's scheme: left as it was, the last vector would hand its loss of orthogonality
    on to the next through the three-term recurrence). Without it, rounding brings back copies of converged
    Ritz values and loses the smallest one among them; reorthogonalizing at every step reads the whole basis at
    every step, most of a long run's time. A reorthogonalization takes a second pass where the first cancelled
    much of the vector (Daniel, Gragg, Kaufman & Stewart 1976).
    """
    dimension, device = start.numel(), start.device
    start = restricted(start)
    max_iters = max(2, min(dimension, LANCZOS_BASIS_BYTES // (8 * dimension), max_steps or dimension))
    basis = torch.empty((max_iters, dimension), dtype=torch.float64, device=device)
    alphas = np.zeros(max_iters)  # the tridiagonal's diagonal
    betas = np.zeros(max_iters)  # and beside it: betas[k] couples v_k and v_{k+1}
    torch.div(start, math.sqrt(metric_dot(start, start, metric)), out=basis[0])
    smallest = largest = residual = math.nan
    converged = False
    orthogonality = _Orthogonality(max_iters, dimension)
    for step in range(max_iters):
        vector = basis[step]
        image = operator(vector)
        alphas[step] = metric_dot(image, vector, metric)
        image.add_(vector, alpha=-alphas[step])  # the three-term recurrence
        if step:
            image.add_(basis[step - 1], alpha=-betas[step - 1])
        length = _metric_norm(image, metric)
        if orthogonality.lost(alphas[: step + 1], betas[:step], length):
            _orthogonalize_with_last(image, basis[: step + 1], metric)
            if _metric_norm(image, metric) < REORTHOGONALIZE_AGAIN * length:
                _orthogonalize(image, basis[: step + 1], metric)
        # Projected: the operator's image, and the rounding of what the reorthogonalization subtracts, may leave
        # the subspace, and dividing by beta would magnify that part by |image| / beta every step (by 10 a step,
        # measured), until the normal directions of the spheres, or the symmetries', showed as eigenvalues near
        # 0. The projection is self-adjoint in the metric, so the image stays orthogonal to the basis.
        image = restricted(image)
        beta = _metric_norm(image, metric)
        # No Ritz value passes the running bound on the operator's norm (Gershgorin's, `_Orthogonality.scale`):
        # beta against it flags, at any step, every breakdown that the test below would find.
        breaking_down = beta <= 1e-14 * max(orthogonality.scale, 1e-300)
        if step < DENSE_RITZ_SIZE or (step + 1) % RITZ_EVERY == 0 or step + 1 == max_iters or breaking_down:
            smallest, largest, last_entry = _extreme_ritz_values(alphas[: step + 1], betas[:step])
            residual = beta * abs(last_entry)
            scale = max(abs(smallest), abs(largest))
            accurate = residual <= max(LANCZOS_TOL * scale, LANCZOS_RELATIVE_TOL * abs(smallest))
            converged = accurate or beta <= 1e-14 * max(scale, 1e-300)
            if converged:
                break
        betas[step] = beta
        if step + 1 < max_iters:
            torch.div(image, beta, out=basis[step + 1])
    return Curvature(smallest, largest, residual, step + 1, converged)


class _Orthogonality:
    """Simon's (1984) estimates w_k of <v_{j+1}, v_k> for the Lanczos vector being formed, from the
    tridiagonal's entries alone, and when they call for a full reorthogonalization: where the largest passes
    sqrt(eps), of that vector and the last one (the estimates of both then restart at eps)."""

    def __init__(self, size: int, dimension: int):
        # Rounding adds about eps sqrt(dimension) |A| to each inner product a step (Larsen's PROPACK).
        self.rounding_per_norm = EPS * math.sqrt(dimension)
        self.current = np.zeros(size + 1)  # w_{j,k}, k = 0..j (w_{j,j} = 1)
        self.previous = np.zeros(size + 1)  # w_{j-1,k}
        self.current[0] = 1.0
        self.scale = 0.0  # a running estimate of the operator's norm, for the rounding term

    def lost(self, alphas: np.ndarray, betas: np.ndarray, beta: float) -> bool:
        """Whether the vector beta v_{j+1} (j = len(alphas) - 1, betas the earlier couplings; beta its length
        before the projection, which removes little more than rounding) needs a full reorthogonalization;
        updates the estimates for it, and for v_j where the two are reorthogonalized."""
        j = len(alphas) - 1
        self.scale = max(self.scale, abs(alphas[-1]) + (betas[-1] if j else 0.0) + beta)
        rounding = self.rounding_per_norm * self.scale
        new = np.zeros_like(self.current)
        if j:
            w, k = self.current, np.arange(j)
            new[:j] = betas[k] * w[k + 1] + (alphas[:j] - alphas[j]) * w[:j] - betas[j - 1] * self.previous[:j]
            new[1:j] += betas[: j - 1] * w[: j - 1]
            new[:j] = (new[:j] + np.copysign(rounding, new[:j])) / max(beta, 1e-300)
        new[j] = rounding / max(beta, 1e-300)
        reorthogonalize = bool(np.abs(new[: j + 1]).max() > math.sqrt(EPS))
        if reorthogonalize:
            new[: j + 1] = EPS
            self.current[:j] = EPS
        new[j + 1] = 1.0
        self.previous, self.current = self.current, new
        return reorthogonalize


def _extreme_ritz_values(diagonal: np.ndarray, off_diagonal: np.ndarray) -> tuple[float, float, float]:
    """The smallest and largest eigenvalues of the symmetric tridiagonal matrix with this diagonal and
    off-diagonal, and the last entry of the smallest one's unit eigenvector. Past DENSE_RITZ_SIZE steps, the two
    extremes alone by bisection and inverse iteration (LAPACK's stebz and stein), not the whole spectrum at
    every Lanczos step; below it the dense solve costs less than scipy's call."""
    last = len(diagonal) - 1
    if len(diagonal) <= DENSE_RITZ_SIZE:
        values, vectors = np.linalg.eigh(np.diag(diagonal) + np.diag(off_diagonal, 1) + np.diag(off_diagonal, -1))
        return float(values[0]), float(values[-1]), float(vectors[-1, 0])
    (smallest,), vectors = scipy.linalg.eigh_tridiagonal(diagonal, off_diagonal, select="i", select_range=(0, 0))
    (largest,) = scipy.linalg.eigh_tridiagonal(
        diagonal, off_diagonal, eigvals_only=True, select="i", select_range=(last, last)
    )
    return float(smallest), float(largest), float(vectors[-1, 0])


def _orthogonalize_with_last(vector: torch.Tensor, basis: torch.Tensor, metric: Weights) -> None:
    """Subtract from `vector` its components along the rows of `basis`, and from the basis's last row its
    components along the rows before it, in place: the two share each read of the basis, which costs little
    more than a single vector's (docs/solver.md)."""
    pair = torch.stack([basis[-1], vector])
    coefficients = (metric * pair) @ basis.T
    coefficients[0, -1] = 0.0  # the last row keeps its own direction
    update = coefficients @ basis
    basis[-1] -= update[0]
    vector -= update[1]


def _orthogonalize(vector: torch.Tensor, basis: torch.Tensor, metric: Weights) -> None:
    """Subtract from `vector`, in place, its components along the rows of `basis` (orthonormal in the metric)."""
    vector -= basis.T @ (basis @ (metric * vector))


def _metric_norm(vector: torch.Tensor, metric: Weights) -> float:
    return math.sqrt(max(metric_dot(vector, vector, metric), 0.0))


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
            "hessian_min_eigenvalue_converged": self.curvature.converged,
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
    features are collapsed exactly is measured through it (the module's docstring).

    A strict saddle is proven whatever Lanczos reached: a Ritz value is never below the
    smallest eigenvalue. A local minimum is proven where `curvature.converged`; where
    Lanczos stopped at its step cap, it is a point where none of its steps found curvature
    below the tolerance."""
    critical = grad_norm <= grad_tol
    steps = None if critical else NOT_CRITICAL_LANCZOS_STEPS
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
                curvature.converged and split.converged,  # either part could hide a lower eigenvalue
            )
    curvature_tol = NEGATIVE_CURVATURE_TOL * abs(curvature.largest)
    if not critical:
        kind = NOT_CRITICAL
    elif curvature.smallest < -curvature_tol:
        kind = STRICT_SADDLE
    else:
        kind = LOCAL_MINIMUM
    return SecondOrderCertificate(kind, curvature, grad_tol, curvature_tol)
