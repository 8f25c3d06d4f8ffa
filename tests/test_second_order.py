"""Second order: the closed-form Hessians of the UFM objectives, on their manifolds."""

import dataclasses
import itertools
import math

import pytest
import torch

from worker.nc import curvature
from worker.nc.flat_tangents import FlatTangents, metric_dot
from worker.nc.formulation import class_labels, formulate
from worker.nc.manifolds import RowSphere
from worker.nc.objectives import riemannian_hessian, value_and_riemannian_grad
from worker.nc.ufm_problem import UFMProblem

SMOOTHED = {"loss": "label_smoothing", "label_smoothing": 0.15}
# (problem, merged): every objective the solver handles; merged rows stand for their class's samples.
HESSIAN_CASES = {
    "normalized": (UFMProblem(5, 4, 3, "normalized", logit_scale=7.0), False),
    "normalized, bias": (UFMProblem(5, 4, 3, "normalized", logit_scale=7.0, bias=True), False),
    "normalized, imbalanced": (UFMProblem(4, 3, (1, 2, 5, 3), "normalized", logit_scale=4.0), False),
    "normalized, saturated": (UFMProblem(4, 5, 2, "normalized", logit_scale=30.0), False),
    "normalized, merged rows": (UFMProblem(4, 3, (1, 2, 5, 3), "normalized", logit_scale=4.0, bias=True), True),
    "regularized": (UFMProblem(5, 4, 3, "regularized", lambda_w=0.02, lambda_h=0.01), False),
    "regularized, bias, imbalanced": (
        UFMProblem(4, 3, (1, 2, 5, 3), "regularized", bias=True, lambda_w=0.02, lambda_h=0.01, lambda_b=0.3),
        False,
    ),
    "normalized, mse, bias": (UFMProblem(5, 4, 3, "normalized", logit_scale=3.0, bias=True, loss="mse"), False),
    "normalized, label smoothing, merged rows": (
        UFMProblem(4, 3, (1, 2, 5, 3), "normalized", logit_scale=4.0, bias=True, **SMOOTHED),
        True,
    ),
    "regularized, mse, bias, imbalanced": (
        UFMProblem(4, 3, (1, 2, 5, 3), "regularized", bias=True, lambda_w=0.02, lambda_h=0.01, lambda_b=0.3, loss="mse"),
        False,
    ),
    "regularized, label smoothing, bias": (
        UFMProblem(5, 4, 3, "regularized", bias=True, lambda_w=0.02, lambda_h=0.01, lambda_b=0.3, **SMOOTHED),
        False,
    ),
}


def formulation_and_point(problem: UFMProblem, merged: bool, seed: int = 0):
    labels = class_labels(problem, torch.device("cpu"))
    if merged:
        counts = torch.tensor(problem.class_counts, dtype=torch.float64)
        formulation = formulate(problem, torch.arange(problem.num_classes), row_weights=counts, sample_rows=labels)
        rows = problem.num_classes
    else:
        formulation = formulate(problem, labels)
        rows = problem.num_samples
    generator = torch.Generator().manual_seed(seed)
    shapes = [(problem.num_classes, problem.dim), (rows, problem.dim)] + [(problem.num_classes,)] * problem.bias
    point = [manifold.random(shape, generator) for manifold, shape in zip(formulation.manifolds, shapes)]
    if problem.normalization == "normalized" and problem.logit_scale >= 30:
        # near the optimum, where the losses saturate: each feature close to its class's row
        point[1] = RowSphere().retract(point[0][formulation.labels], 0.05 * point[1])
    return formulation, point


def random_tangent(formulation, point, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        manifold.project(block, torch.randn(block.shape, generator=generator, dtype=torch.float64))
        for manifold, block in zip(formulation.manifolds, point)
    ]


def autograd_objective(problem: UFMProblem, formulation, point) -> torch.Tensor:
    """The objective, written with torch's losses, for autograd: log of the mean
    cross-entropy, or the mean of the other losses, when normalized."""
    classifier, features = point[0], point[1]
    scale = problem.logit_scale if problem.normalization == "normalized" else 1.0
    logits = scale * features @ classifier.T
    if problem.bias:
        logits = logits + point[2]
    if problem.loss == "mse":
        targets = torch.nn.functional.one_hot(formulation.labels, problem.num_classes).to(torch.float64)
        losses = torch.nn.functional.mse_loss(logits, targets, reduction="none").sum(dim=1) / 2
    else:
        losses = torch.nn.functional.cross_entropy(
            logits, formulation.labels, reduction="none", label_smoothing=problem.label_smoothing or 0.0
        )
    weights = formulation.manifolds[1].row_weights if problem.normalization == "normalized" else None
    total = losses.sum() if weights is None else (losses * weights).sum()
    if problem.normalization == "normalized":
        mean = total / problem.num_samples
        return torch.log(mean) if problem.loss == "cross_entropy" else mean
    decays = [problem.lambda_w, problem.lambda_h, problem.lambda_b]
    return total / problem.num_samples + sum(decay / 2 * (block**2).sum() for decay, block in zip(decays, point))


@pytest.mark.parametrize("case", HESSIAN_CASES, ids=list(HESSIAN_CASES))
def test_euclidean_hessian_matches_autograds_double_backward(case):
    problem, merged = HESSIAN_CASES[case]
    formulation, point = formulation_and_point(problem, merged)
    vector = random_tangent(formulation, point)
    products = formulation.hessian(point)(vector)

    leaves = [block.clone().requires_grad_() for block in point]
    grads = torch.autograd.grad(autograd_objective(problem, formulation, leaves), leaves, create_graph=True)
    directional = sum((grad * v).sum() for grad, v in zip(grads, vector))
    references = torch.autograd.grad(directional, leaves)
    for product, reference in zip(products, references):
        assert torch.linalg.vector_norm(product - reference) <= 1e-11 * torch.linalg.vector_norm(reference)


@pytest.mark.parametrize("case", HESSIAN_CASES, ids=list(HESSIAN_CASES))
def test_riemannian_hessian_matches_central_differences_of_the_gradient(case):
    """Hess f(x)[v] = P_x(d/dt grad f(c(t))) at t = 0 for a curve c with c'(0) = v: here
    c(t) = x + t v with each sphere row normalized, differenced at t = +-h."""
    problem, merged = HESSIAN_CASES[case]
    formulation, point = formulation_and_point(problem, merged)
    vector = random_tangent(formulation, point)
    product = riemannian_hessian(formulation.objective, formulation.hessian, formulation.manifolds, point)(vector)

    step = 1e-5

    def gradient_along(t: float) -> list[torch.Tensor]:
        moved = [m.retract(block, v, t) for m, block, v in zip(formulation.manifolds, point, vector)]
        return value_and_riemannian_grad(formulation.objective, formulation.manifolds, moved)[1]

    forward, backward = gradient_along(step), gradient_along(-step)
    differences = [
        manifold.project(block, (ahead - behind) / (2 * step))
        for manifold, block, ahead, behind in zip(formulation.manifolds, point, forward, backward)
    ]
    error = math.sqrt(sum(float((p - d).square().sum()) for p, d in zip(product, differences)))
    size = math.sqrt(sum(float(d.square().sum()) for d in differences))
    assert error <= 1e-7 * size
    # the curvature term matters: without it the difference is far off on the spheres
    if problem.normalization == "normalized":
        euclidean_only = formulation.hessian(point)(vector)
        projected = formulation.manifolds[0].project(point[0], euclidean_only[0])
        assert float((projected - differences[0]).norm()) > 1e-3 * size


def simplex_etf(num_classes: int, dim: int) -> torch.Tensor:
    """K unit rows in R^d with pairwise inner products -1/(K-1) (needs K <= d + 1)."""
    centered = torch.eye(num_classes, dtype=torch.float64) - 1 / num_classes
    basis = torch.linalg.svd(centered).Vh[: num_classes - 1]  # the span of the centered rows
    rows = centered @ basis.T
    etf = torch.zeros(num_classes, dim, dtype=torch.float64)
    etf[:, : num_classes - 1] = rows / rows.norm(dim=1, keepdim=True)
    return etf


def dense_restricted_hessian_eigenvalues(problem: UFMProblem, formulation, point) -> torch.Tensor:
    """The Riemannian Hessian, built as a dense matrix from autograd's Hessian of the flat
    (W, H), restricted to the tangent space without the rotations (W A, H A), A skew."""
    shapes = [block.shape for block in point]
    sizes = [block.numel() for block in point]

    def objective_of_flat(flat: torch.Tensor) -> torch.Tensor:
        blocks = [piece.reshape(shape) for piece, shape in zip(torch.split(flat, sizes), shapes)]
        return autograd_objective(problem, formulation, blocks)

    flat = torch.cat([block.reshape(-1) for block in point])
    euclidean = torch.autograd.functional.hessian(objective_of_flat, flat)
    gradient = torch.autograd.functional.jacobian(objective_of_flat, flat)
    rows = torch.cat(point[:2])  # every row is on a sphere
    dim = problem.dim
    projection = torch.block_diag(*[torch.eye(dim, dtype=torch.float64) - torch.outer(x, x) for x in rows])
    normal_parts = (gradient.reshape(-1, dim) * rows).sum(dim=1).repeat_interleave(dim)
    riemannian = projection @ (euclidean - torch.diag(normal_parts)) @ projection
    rotations = []
    for a in range(dim):
        for b in range(a + 1, dim):
            skew = torch.zeros(dim, dim, dtype=torch.float64)
            skew[a, b], skew[b, a] = 1.0, -1.0
            rotations.append(torch.cat([(point[0] @ skew).reshape(-1), (point[1] @ skew).reshape(-1)]))
    tangent_values, tangent_vectors = torch.linalg.eigh(projection)
    tangent = tangent_vectors[:, tangent_values > 0.5]
    modes = tangent.T @ torch.stack(rotations, dim=1)
    left, singular, _ = torch.linalg.svd(modes)
    rank = int((singular > 1e-10).sum())
    complement = tangent @ left[:, rank:]
    return torch.linalg.eigvalsh(complement.T @ riemannian @ complement)


def etf_minimum():
    """(problem, formulation, point, gradient norm) at a simplex ETF with h_i = w_{y_i}: a minimum."""
    problem = UFMProblem(5, 6, 3, "normalized", logit_scale=5.0)
    formulation, _ = formulation_and_point(problem, merged=False)
    classifier = simplex_etf(5, 6)
    point = [classifier, classifier[formulation.labels].clone()]
    return problem, formulation, point, gradient_norm(formulation, point)


def test_an_exact_simplex_etf_with_collapsed_features_is_a_local_minimum():
    problem, formulation, point, grad_norm = etf_minimum()
    assert grad_norm < 1e-12
    certificate = curvature.certify(problem, formulation, point, grad_norm, problem.tol)
    assert certificate.critical_point == curvature.LOCAL_MINIMUM
    assert certificate.curvature.converged and certificate.as_result()["hessian_min_eigenvalue_converged"] is True
    reference = dense_restricted_hessian_eigenvalues(problem, formulation, point)
    assert float(reference[0]) > 1e-3  # no zero mode left but the rotations'
    assert certificate.curvature.smallest == pytest.approx(float(reference[0]), rel=1e-8)
    assert certificate.curvature.largest == pytest.approx(float(reference[-1]), rel=1e-8)


def test_merged_class_means_are_a_strict_saddle_measured_as_the_dense_hessian_says():
    """Classes 0 and 1 share one classifier row and their features sit on it, opposite
    class 2: every row is +-e_1, so every Euclidean gradient is normal to the spheres and
    the point is critical; separating the two merged classes lowers the loss."""
    problem = UFMProblem(3, 3, 2, "normalized", logit_scale=3.0)
    formulation, _ = formulation_and_point(problem, merged=False)
    axis = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    classifier = torch.stack([axis, axis, -axis])
    point = [classifier, classifier[formulation.labels].clone()]
    grad_norm = gradient_norm(formulation, point)
    assert grad_norm < 1e-14
    certificate = curvature.certify(problem, formulation, point, grad_norm, problem.tol)
    assert certificate.critical_point == curvature.STRICT_SADDLE
    reference = dense_restricted_hessian_eigenvalues(problem, formulation, point)
    assert float(reference[0]) < -1e-2
    assert certificate.curvature.smallest == pytest.approx(float(reference[0]), rel=1e-9)


def collapsed_points():
    """(problem, point) pairs whose features are collapsed exactly: the ETF (imbalanced classes, one of
    them a single sample, so not a minimum of this problem) and the merged-means saddle above."""
    etf_problem = UFMProblem(5, 6, (3, 1, 4, 2, 3), "normalized", logit_scale=5.0)
    classifier = simplex_etf(5, 6)
    yield etf_problem, [classifier, classifier[class_labels(etf_problem, torch.device("cpu"))].clone()]
    saddle_problem = UFMProblem(3, 3, 2, "normalized", logit_scale=3.0)
    axis = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    classifier = torch.stack([axis, axis, -axis])
    yield saddle_problem, [classifier, classifier[class_labels(saddle_problem, torch.device("cpu"))].clone()]


@pytest.mark.parametrize("problem, point", list(collapsed_points()), ids=["etf", "saddle"])
def test_a_collapsed_point_is_certified_through_the_merged_problem_as_the_dense_hessian_says(problem, point):
    full, _ = formulation_and_point(problem, merged=False)
    merged, _ = formulation_and_point(problem, merged=True)
    grad_norm = gradient_norm(full, point)
    assert curvature.collapsed_point(merged, point) is not None
    through_merged = curvature.certify(problem, full, point, grad_norm, problem.tol, merged)
    reference = dense_restricted_hessian_eigenvalues(problem, full, point)
    assert through_merged.critical_point == curvature.certify(problem, full, point, grad_norm, problem.tol).critical_point
    assert through_merged.curvature.smallest == pytest.approx(float(reference[0]), rel=1e-8, abs=1e-12)
    # Lanczos stops on the smallest value's residual; the largest converges first, but to fewer digits.
    assert through_merged.curvature.largest == pytest.approx(float(reference[-1]), rel=1e-6)

    # A feature off its class's by one rounding step: not collapsed exactly, measured on the full problem.
    nudged = [point[0], point[1].clone(), *point[2:]]
    nudged[1][0] = torch.nextafter(nudged[1][0], torch.full_like(nudged[1][0], 2.0))
    assert curvature.collapsed_point(merged, nudged) is None


def basis_budget(steps: int, dimension: int) -> int:
    """The curvature.LANCZOS_BASIS_BYTES that holds Lanczos to `steps` steps on `dimension` dimensions."""
    return 8 * steps * dimension


def test_a_certificate_whose_lanczos_stops_at_its_step_cap_says_so(monkeypatch):
    """At the simplex ETF minimum, Lanczos held to three steps by its basis budget: the classification stands on
    the value it found, a Ritz value above the smallest eigenvalue, and the certificate says it did not
    converge."""
    problem, formulation, point, grad_norm = etf_minimum()
    dimension = FlatTangents(point, formulation.manifolds).size
    monkeypatch.setattr(curvature, "LANCZOS_BASIS_BYTES", basis_budget(3, dimension))
    certificate = curvature.certify(problem, formulation, point, grad_norm, problem.tol)
    reference = dense_restricted_hessian_eigenvalues(problem, formulation, point)
    assert certificate.curvature.iterations == 3
    assert certificate.critical_point == curvature.LOCAL_MINIMUM
    assert certificate.as_result()["hessian_min_eigenvalue_converged"] is False
    assert certificate.curvature.smallest > float(reference[0]) * (1 + 1e-3)


@pytest.mark.parametrize("part", ["hessian_extremes", "split_extremes"])
def test_a_certificate_through_the_merged_problem_converged_only_where_both_parts_did(monkeypatch, part):
    """Either part, the merged problem's Lanczos or the split operator's, could hide a lower eigenvalue."""
    problem, point = next(collapsed_points())
    full, _ = formulation_and_point(problem, merged=False)
    merged, _ = formulation_and_point(problem, merged=True)
    grad_norm = gradient_norm(full, point)
    assert curvature.certify(problem, full, point, grad_norm, problem.tol, merged).curvature.converged

    extremes = getattr(curvature, part)
    monkeypatch.setattr(
        curvature, part, lambda *args, **options: dataclasses.replace(extremes(*args, **options), converged=False)
    )
    assert not curvature.certify(problem, full, point, grad_norm, problem.tol, merged).curvature.converged


@pytest.mark.parametrize(
    "problem",
    [
        UFMProblem(6, 4, (1, 2, 5, 3, 2, 4), "normalized", logit_scale=4.0, bias=True),  # rows span R^d
        UFMProblem(3, 8, 2, "normalized", logit_scale=4.0),  # 6 rows in R^8: two directions no row spans
    ],
    ids=["spanning", "not spanning"],
)
def test_symmetry_modes_project_tangents_at_the_turned_point_off_its_rotations_in_the_metric(problem):
    formulation, point = formulation_and_point(problem, merged=True)
    modes = curvature.SymmetryModes(formulation, point, shifts_bias=problem.bias)
    turned = modes.point
    gram = turned[0].T @ turned[0] + turned[1].T @ (formulation.manifolds[1].row_weights[:, None] * turned[1])
    assert torch.allclose(gram, torch.diag(torch.diagonal(gram)), atol=1e-12)  # M is diagonal there
    row_norms = torch.linalg.vector_norm(turned[1], dim=1)
    assert torch.allclose(row_norms, torch.ones_like(row_norms), atol=1e-15)
    blocks = FlatTangents(turned, formulation.manifolds)

    def dot(first, second):
        return metric_dot(blocks.flatten(first), blocks.flatten(second), blocks.metric)

    generator = torch.Generator().manual_seed(2)
    rotations = []
    for _ in range(4):
        skew = torch.randn(problem.dim, problem.dim, generator=generator, dtype=torch.float64)
        skew = skew - skew.T
        rotations.append([turned[0] @ skew, turned[1] @ skew, *map(torch.zeros_like, turned[2:])])
    first, second = random_tangent(formulation, turned, seed=3), random_tangent(formulation, turned, seed=4)
    if problem.bias:
        rotations.append([torch.zeros_like(turned[0]), torch.zeros_like(turned[1]), torch.ones_like(turned[2])])
    projected = modes.project_out(first)
    for rotation in rotations:
        scale = dot(rotation, rotation) ** 0.5
        assert dot(modes.project_out(rotation), modes.project_out(rotation)) ** 0.5 < 1e-13 * scale
        assert abs(dot(projected, rotation)) < 1e-13 * scale * dot(first, first) ** 0.5
    # Idempotent up to rounding, which 1 / (mu_i + mu_j) magnifies (24 at "not spanning"'s smallest spanned
    # pair): bounded relative to the vector's length, as above, not entry by entry.
    twice = [again - once for again, once in zip(modes.project_out(projected), projected)]
    assert dot(twice, twice) ** 0.5 < 1e-13 * dot(first, first) ** 0.5
    assert dot(projected, second) == pytest.approx(dot(first, modes.project_out(second)), rel=1e-12)
    assert dot(projected, projected) < dot(first, first)


@pytest.mark.parametrize("case", ["normalized, bias", "regularized, bias, imbalanced"])
def test_a_random_point_is_not_critical(case):
    problem, _ = HESSIAN_CASES[case]
    formulation, point = formulation_and_point(problem, merged=False)
    grad_norm = gradient_norm(formulation, point)
    certificate = curvature.certify(problem, formulation, point, grad_norm, problem.tol)
    assert certificate.critical_point == curvature.NOT_CRITICAL
    assert certificate.as_result()["critical_point_grad_tol"] == problem.tol


def gradient_norm(formulation, point) -> float:
    _, grads = value_and_riemannian_grad(formulation.objective, formulation.manifolds, [b.clone() for b in point])
    return math.sqrt(sum(float(m.inner(g, g)) for m, g in zip(formulation.manifolds, grads)))


def test_every_result_carries_its_certificate_and_the_landscape_probe_counts_minima():
    from worker.nc.ufm import solve

    result = solve(UFMProblem(4, 5, 3, "normalized", logit_scale=4.0, restarts=3))
    assert result["converged"] is True
    assert result["critical_point"] == curvature.LOCAL_MINIMUM
    assert 0 < result["hessian_min_eigenvalue"] <= result["hessian_max_eigenvalue"]
    assert result["critical_point_curvature_tol"] == pytest.approx(1e-7 * result["hessian_max_eigenvalue"])
    assert result["hessian_min_eigenvalue_converged"] is True
    assert (result["minima_found"], result["saddles_found"], result["all_minima_global"]) == (3, 0, True)
    assert result["minima_proven"] == 3

    stopped_early = solve(UFMProblem(4, 5, 3, "normalized", logit_scale=4.0, max_iters=2))
    assert stopped_early["critical_point"] == curvature.NOT_CRITICAL
    assert stopped_early["minima_found"] == 0 and stopped_early["all_minima_global"] is True


def test_a_minimum_whose_lanczos_stopped_at_its_cap_is_found_but_not_proven(monkeypatch):
    """Lanczos held to three steps at every restart's end point: the verdicts stand, the proofs do not."""
    from worker.nc.ufm import solve

    problem = UFMProblem(4, 5, 3, "normalized", logit_scale=4.0, restarts=3)
    dimension = (problem.num_classes + problem.num_samples) * problem.dim  # W and H: the problem does not merge
    monkeypatch.setattr(curvature, "LANCZOS_BASIS_BYTES", basis_budget(3, dimension))
    result = solve(problem)
    assert (result["minima_found"], result["minima_proven"], result["saddles_found"]) == (3, 0, 0)
    assert result["hessian_min_eigenvalue_converged"] is False


def test_every_key_of_a_ufm_result_is_searchable_with_its_type():
    """The filter language reaches result keys through RESULT_TYPES (service/search/fields.py)."""
    from service.search.fields import RESULT_TYPES
    from worker.nc.ufm import solve

    result = solve(UFMProblem(3, 4, 2, "normalized", bias=True))
    kinds = {str: "string", bool: "bool", int: "number", float: "number"}
    for key, value in result.items():
        assert key in RESULT_TYPES, key
        if value is not None:
            assert RESULT_TYPES[key] == kinds[type(value)], key
    assert result["critical_point"] == curvature.LOCAL_MINIMUM


@pytest.mark.parametrize(
    "problem",
    [
        UFMProblem(10, 32, 5, "normalized", solver="trust_region"),
        UFMProblem(12, 16, 4, "normalized", logit_scale=30.0, bias=True, solver="trust_region", seed=3),
        UFMProblem(6, 8, 5, "regularized", lambda_w=1e-3, lambda_h=1e-3, solver="trust_region"),
    ],
    ids=["normalized", "normalized, saturated, bias", "regularized"],
)
def test_trust_region_reaches_the_closed_form_optimum(problem):
    from worker.nc.ufm import solve

    result = solve(problem)
    assert result["converged"] is True and result["grad_norm"] <= problem.tol
    assert abs(result["optimality_gap"]) <= 1e-10
    assert result["critical_point"] == curvature.LOCAL_MINIMUM


def test_trust_region_leaves_a_saddle_along_negative_curvature():
    """From a hair off the merged-classes saddle, where the gradient is 1e-9 and a
    gradient step would take ~1e9 times longer, the first step already goes along
    negative curvature to the trust region's edge, and the run ends at the optimum."""
    from worker.nc.stopping import StoppingRules
    from worker.nc.trust_region import minimize_trust_region
    from worker.nc.ufm_problem import optimal_loss

    problem = UFMProblem(3, 3, 2, "normalized", logit_scale=3.0)
    formulation, _ = formulation_and_point(problem, merged=False)
    axis = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    classifier = torch.stack([axis, axis, -axis])
    saddle = [classifier, classifier[formulation.labels].clone()]
    nudge = random_tangent(formulation, saddle)
    start = [m.retract(block, v, 1e-9) for m, block, v in zip(formulation.manifolds, saddle, nudge)]
    first_values = []

    result = minimize_trust_region(
        formulation,
        start,
        StoppingRules(1e-10, 100),
        on_iterate=lambda iterate: first_values.append(iterate.value),
    )
    assert result.converged
    assert math.exp(result.last.value) == pytest.approx(optimal_loss(problem), rel=1e-10)
    assert result.last.step <= 30
    # the first step: a gradient step this long would lower f by about ||grad||^2 ~ 1e-18
    assert first_values[0] - first_values[1] > 1e-3


@pytest.mark.slow
def test_auto_converges_on_the_generalized_collapse_case_first_order_gives_up_on():
    """(K, d, n) = (100, 43, 2), seed 6: the first-order descent stops for sublinear
    progress; auto, by L-BFGS, reaches a certified local minimum."""
    from worker.nc.ufm import solve

    first_order = solve(UFMProblem(100, 43, 2, "normalized", seed=6, solver="first_order"))
    assert first_order["converged"] is False and "sublinearly" in first_order["stop_reason"]
    result = solve(UFMProblem(100, 43, 2, "normalized", seed=6, solver="auto"))
    assert result["converged"] is True and result["grad_norm"] <= 1e-10
    assert result["critical_point"] == curvature.LOCAL_MINIMUM
    assert result["loss"] <= first_order["loss"]


def test_auto_hands_over_to_trust_regions_where_first_order_stops_for_sublinear_progress(monkeypatch):
    """With the sublinear rule made to fire at iteration 4, first order stops there, and
    auto goes on from that point by trust regions to the optimum."""
    import functools

    from worker.nc import merging, stopping
    from worker.nc.ufm import solve

    monkeypatch.setattr(
        merging, "SublinearProgress", functools.partial(stopping.SublinearProgress, min_iters=4, factor=1e9)
    )
    first_order = solve(UFMProblem(6, 8, 3, "normalized", solver="first_order"))
    assert first_order["iterations"] == 4 and "sublinearly" in first_order["stop_reason"]
    result = solve(UFMProblem(6, 8, 3, "normalized", solver="auto"))
    assert result["converged"] is True and result["iterations"] > 4
    assert abs(result["optimality_gap"]) <= 1e-10


@pytest.mark.parametrize(
    "problem",
    [UFMProblem(10, 32, 5, "normalized"), UFMProblem(4, 3, (1, 2, 5, 3), "normalized", logit_scale=4.0, bias=True)],
    ids=["normalized", "imbalanced, bias"],
)
def test_lbfgs_reaches_the_closed_form_optimum(problem):
    """minimize_lbfgs alone, from a random start, to tol and the closed-form loss (where
    there is one), the first iterates descending; a step is counted where accepted."""
    from worker.nc.lbfgs import minimize_lbfgs
    from worker.nc.stopping import StoppingRules
    from worker.nc.ufm import initial_point
    from worker.nc.ufm_problem import optimal_loss

    formulation = formulate(problem, class_labels(problem, torch.device("cpu")))
    values = []
    result = minimize_lbfgs(
        formulation,
        initial_point(problem, 0, torch.device("cpu")),
        StoppingRules(problem.tol, 500),
        on_iterate=lambda iterate: values.append(iterate.value),
    )
    assert result.converged and result.last.grad_norm <= problem.tol
    assert len(values) == result.last.step
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(values))
    optimum = optimal_loss(problem)
    if optimum is not None:
        assert math.exp(result.last.value) == pytest.approx(optimum, rel=1e-9)


def test_lbfgs_applies_a_diagonal_preconditioner_to_whitened_vectors_as_the_general_path_does(monkeypatch):
    """Where P is diagonal (no class coupling; here the feature block's scale N/K = 5 beside the
    classifier's 1, and a bias), L-BFGS multiplies the memory's whitened vectors by P's diagonal
    instead of unwhitening, applying P and whitening again: the same steps, to the recursion's single
    precision. The general path is forced by hiding the diagonal. Both start near the optimum, where
    the steps contract: from a random start the early steps are chaotic, and any rounding apart
    sends the two elsewhere."""
    from worker.nc.lbfgs import minimize_lbfgs
    from worker.nc.preconditioner import Preconditioner
    from worker.nc.stopping import StoppingRules
    from worker.nc.ufm import initial_point

    problem = UFMProblem(6, 8, 5, "normalized", bias=True)
    formulation = formulate(problem, class_labels(problem, torch.device("cpu")))
    assert formulation.preconditioner.block_scales() == [1.0, 5.0, 1.0]
    start = initial_point(problem, 0, torch.device("cpu"))
    near = minimize_lbfgs(formulation, start, StoppingRules(1e-3, 500)).last.point

    def twenty_steps() -> list[torch.Tensor]:
        return minimize_lbfgs(formulation, near, StoppingRules(1e-300, 20)).last.point

    diagonal = twenty_steps()
    monkeypatch.setattr(Preconditioner, "block_scales", lambda self: None)
    general = twenty_steps()
    moved = max(float(torch.linalg.vector_norm(ours - begun)) for ours, begun in zip(diagonal, near))
    assert moved > 1e-4
    assert any(not torch.equal(ours, theirs) for ours, theirs in zip(diagonal, general))  # two paths, not one
    for ours, theirs in zip(diagonal, general):
        assert float(torch.linalg.vector_norm(ours - theirs)) <= 1e-5 * moved


@pytest.mark.parametrize("shared", [False, True], ids=["a weight per entry", "one weight for all"])
def test_lbfgs_memory_applies_the_bfgs_inverse_hessian_in_the_metric(shared):
    """The two-loop recursion, in single precision over whitened pairs, against the BFGS inverse Hessian
    built densely, in double precision, from the last MEMORY of the same pairs in the metric's whitened
    coordinates (Nocedal & Wright 2006, (6.17)), from gamma times the identity: to 1e-5. The metric's
    weights are one per entry, or one number for all (a balanced tied point's)."""
    from worker.nc.lbfgs import MEMORY, _Memory

    generator = torch.Generator().manual_seed(0)
    size, gamma = 40, 0.7
    weights = 1 + 9 * torch.rand(size, generator=generator, dtype=torch.float64)
    metric = 11.0 if shared else weights
    root = torch.full((size,), 11.0**0.5, dtype=torch.float64) if shared else weights.sqrt()
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    curvature = basis @ torch.diag(1 + 9 * torch.rand(size, generator=generator, dtype=torch.float64)) @ basis.T
    memory = _Memory(metric)
    pairs = []
    for _ in range(MEMORY + 3):  # the first three are dropped
        move = torch.randn(size, generator=generator, dtype=torch.float64)
        change = (curvature @ move) / metric  # <s, y> = s^T C s > 0 in the metric
        pairs.append((root * move, root * change))
        memory.remember(move.clone(), change.clone(), metric_dot(move, change, metric))
    inverse = gamma * torch.eye(size, dtype=torch.float64)
    for move, change in pairs[-MEMORY:]:
        rho = 1 / float(move @ change)
        update = torch.eye(size, dtype=torch.float64) - rho * torch.outer(change, move)
        inverse = update.T @ inverse @ update + rho * torch.outer(move, move)
    grads = torch.randn(size, generator=generator, dtype=torch.float64)
    expected = (inverse @ (root * grads)) / root
    product = memory.inverse_hessian_times(grads, lambda vector: gamma * vector)
    assert product.dtype == torch.float64
    assert float(torch.linalg.vector_norm(product - expected)) <= 1e-5 * float(torch.linalg.vector_norm(expected))


def test_flat_tangents_weigh_by_one_number_where_every_row_weighs_the_same():
    """A tied point of balanced classes weighs every entry 1 + n: its metric is that one number, and
    its inner product the weighted sum, to rounding; imbalanced classes keep a weight per entry."""
    from worker.nc.manifolds import Euclidean, RowSphere

    generator = torch.Generator().manual_seed(0)
    point = [torch.randn(7, 5, generator=generator, dtype=torch.float64)]
    first, second = (torch.randn(35, generator=generator, dtype=torch.float64) for _ in range(2))
    balanced = FlatTangents(point, [RowSphere(torch.full((7,), 11.0, dtype=torch.float64))])
    assert balanced.metric == 11.0
    weighted_sum = float((first * second).sum()) * 11
    assert balanced.inner(first, second) == pytest.approx(weighted_sum, rel=1e-14)
    row_weights = torch.tensor([2.0, 3, 3, 5, 8, 8, 8], dtype=torch.float64)
    imbalanced = FlatTangents(point, [RowSphere(row_weights)])
    assert isinstance(imbalanced.metric, torch.Tensor)
    expected = float((first.view(7, 5) * second.view(7, 5) * row_weights[:, None]).sum())
    assert metric_dot(first, second, imbalanced.metric) == pytest.approx(expected, rel=1e-14)
    with_bias = FlatTangents(point + [torch.zeros(3, dtype=torch.float64)], [RowSphere(), Euclidean()])
    assert with_bias.metric == 1.0
    assert with_bias.block_constants([2.0, 2.0]) == 2.0
    expected_constants = torch.tensor([1.0] * 35 + [5.0] * 3, dtype=torch.float64)
    assert torch.equal(with_bias.block_constants([1.0, 5.0]), expected_constants)


def recorded_phases(
    monkeypatch, optimizers: dict[str, str], ends: list | None = None
) -> list[tuple[str, str, int, int]]:
    """Wrap the optimizers of worker.nc.merging named in `optimizers` (attribute: label); the list returned
    fills with (label, "full" | "merged" | "tied", first step, last step) for each phase they run, and
    `ends`, where given, with (the phase's StoppingRules, its last iterate)."""
    from worker.nc import merging

    phases = []

    def recorded(optimizer, label):
        def run(formulation, start, stopping, **options):
            result = optimizer(formulation, start, stopping, **options)
            kind = "tied" if formulation.tied else "merged" if formulation.sample_rows is not None else "full"
            phases.append((label, kind, options.get("first_step", 0), result.last.step))
            if ends is not None:
                ends.append((stopping, result.last))
            return result

        return run

    for name, label in optimizers.items():
        monkeypatch.setattr(merging, name, recorded(getattr(merging, name), label))
    return phases


def test_auto_ties_the_merged_classes_where_no_etf_fits(monkeypatch):
    """K > d + 1 on a problem that merges (the merge threshold lowered to let a small one):
    auto runs first order, as first_order does, to the merge; then L-BFGS with each class's
    features tied to its classifier row, from the tied point nearest the merged one; then
    L-BFGS on the merged problem from the tied end point, and on the full problem, whose
    first evaluation certifies a local minimum."""
    from worker.nc import merging
    from worker.nc.ufm import solve

    monkeypatch.setattr(merging, "SMALL_WORK", 0)
    problem = UFMProblem(12, 4, 5, "normalized")  # K = 12 > d + 1 = 5
    merged_at = solve(problem)["features_merged_at"]
    phases = recorded_phases(monkeypatch, {"minimize": "first order", "minimize_lbfgs": "L-BFGS"})
    result = solve(dataclasses.replace(problem, solver="auto"))
    assert result["features_merged_at"] == merged_at
    tied_end, merged_end = phases[1][3], phases[2][3]
    assert phases == [
        ("first order", "full", 0, merged_at),
        ("L-BFGS", "tied", merged_at, tied_end),
        ("L-BFGS", "merged", tied_end, merged_end),
        ("L-BFGS", "full", merged_end, result["iterations"]),
    ]
    assert tied_end > merged_at + 10  # the arrangement of the classes is the tied phase's work
    assert result["converged"] is True and result["grad_norm"] <= problem.tol
    assert result["critical_point"] == curvature.LOCAL_MINIMUM


def test_the_tied_phase_stops_below_tol_so_that_untied_the_merged_phase_ends_at_once(monkeypatch):
    """The tied phase runs to tol / sqrt(2) and the merged phase, to tol, from its untied end point: the
    features' steps off their rows add to the gradient no more than that margin, and the merged phase
    ends within a few steps."""
    from worker.nc import merging
    from worker.nc.ufm import solve

    monkeypatch.setattr(merging, "SMALL_WORK", 0)
    ends: list = []
    phases = recorded_phases(monkeypatch, {"minimize_lbfgs": "L-BFGS"}, ends)
    problem = UFMProblem(12, 4, 5, "normalized", solver="auto")  # K = 12 > d + 1 = 5
    result = solve(problem)
    (_, tied, _, _), (_, untied, merged_from, merged_to) = phases[:2]
    (tied_stopping, tied_end), (merged_stopping, merged_end) = ends[:2]
    assert tied == "tied" and untied == "merged"
    assert tied_stopping.tol == pytest.approx(problem.tol / math.sqrt(2), rel=1e-15)
    assert tied_end.grad_norm <= tied_stopping.tol
    assert merged_stopping.tol == problem.tol and merged_end.grad_norm <= problem.tol
    assert merged_to - merged_from <= 10
    assert result["converged"] is True and result["critical_point"] == curvature.LOCAL_MINIMUM


def test_auto_runs_lbfgs_from_the_start_where_no_etf_fits_and_the_run_does_not_merge(monkeypatch):
    """K > d + 1 on a problem too small to merge: one phase, L-BFGS on the full problem from step 0, to a
    certified local minimum."""
    from worker.nc import merging
    from worker.nc.ufm import solve

    problem = UFMProblem(12, 4, 2, "normalized", solver="auto")  # K = 12 > d + 1 = 5
    assert merging.merged_formulation(problem, class_labels(problem, torch.device("cpu"))) is None
    phases = recorded_phases(monkeypatch, {"minimize_lbfgs": "L-BFGS"})
    result = solve(problem)
    assert phases == [("L-BFGS", "full", 0, result["iterations"])]
    assert result["converged"] is True and result["grad_norm"] <= problem.tol
    assert result["critical_point"] == curvature.LOCAL_MINIMUM and result["hessian_min_eigenvalue_converged"] is True


TIED_CASES = {
    "balanced": UFMProblem(5, 3, 4, "normalized", logit_scale=6.0),
    "imbalanced, bias": UFMProblem(4, 3, (1, 2, 5, 3), "normalized", logit_scale=4.0, bias=True),
}


@pytest.mark.parametrize("problem", TIED_CASES.values(), ids=list(TIED_CASES))
def test_the_tied_problem_is_the_merged_one_at_tied_points(problem):
    """The tied formulation's value is the merged one at [W, W, (b)], its Euclidean gradient the sum of the
    merged one's two blocks (to rounding), its expansion the full point; its Riemannian gradient, in its
    metric (1 + n_k per row), matches central differences of the value, and its Riemannian Hessian those of
    the gradient (1e-7)."""
    from worker.nc.formulation import untie
    from worker.nc.merging import tied_formulation

    merged, merged_point = formulation_and_point(problem, merged=True)
    tied = tied_formulation(problem, merged)
    point = [merged_point[0], *merged_point[2:]]
    tied_value, tied_grads = tied.objective(point)
    merged_value, merged_grads = merged.objective(untie(point))
    assert float(tied_value) == float(merged_value)
    chain_rule = [merged_grads[0] + merged_grads[1], *merged_grads[2:]]
    for tied_grad, summed in zip(tied_grads, chain_rule, strict=True):
        torch.testing.assert_close(tied_grad, summed, rtol=1e-13, atol=1e-15)
    _, grads = value_and_riemannian_grad(tied.objective, tied.manifolds, point)
    expanded = tied.expand(point)
    assert torch.equal(expanded[1], point[0][class_labels(problem, torch.device("cpu"))])
    assert torch.equal(expanded[0], point[0]) and len(expanded) == 2 + problem.bias

    vector = random_tangent(tied, point)
    step = 1e-5

    def along(t: float):
        moved = [m.retract(block, v, t) for m, block, v in zip(tied.manifolds, point, vector)]
        return value_and_riemannian_grad(tied.objective, tied.manifolds, moved)

    (ahead, grads_ahead), (behind, grads_behind) = along(step), along(-step)
    slope = sum(float(m.inner(g, v)) for m, g, v in zip(tied.manifolds, grads, vector))
    assert slope == pytest.approx((ahead - behind) / (2 * step), rel=1e-7)

    product = riemannian_hessian(tied.objective, tied.hessian, tied.manifolds, point)(vector)
    differences = [
        m.project(block, (a - b) / (2 * step)) for m, block, a, b in zip(tied.manifolds, point, grads_ahead, grads_behind)
    ]
    error = math.sqrt(sum(float((p - d).square().sum()) for p, d in zip(product, differences)))
    assert error <= 1e-7 * math.sqrt(sum(float(d.square().sum()) for d in differences))


def test_tie_moves_each_row_to_the_metrics_nearest_tied_point():
    """Row k of the tied start is (w_k + n_k h_k) / |w_k + n_k h_k|; a tied point ties to itself."""
    from worker.nc.formulation import untie
    from worker.nc.merging import tie

    problem = UFMProblem(4, 3, (1, 2, 5, 3), "normalized", bias=True)
    merged, point = formulation_and_point(problem, merged=True)
    counts = torch.tensor([1.0, 2.0, 5.0, 3.0], dtype=torch.float64)[:, None]
    tied = tie(merged, point)
    expected = point[0] + counts * point[1]
    assert torch.allclose(tied[0], expected / expected.norm(dim=1, keepdim=True), rtol=0, atol=1e-15)
    assert torch.equal(tied[1], point[2])
    again = tie(merged, untie(tied))
    assert torch.allclose(again[0], tied[0], rtol=0, atol=1e-15)


def full_reorthogonalization_ritz_values(diagonal: torch.Tensor, start: torch.Tensor, steps: int) -> torch.Tensor:
    """Lanczos on diag(diagonal) from `start`, every vector reorthogonalized twice against all: the reference."""
    vectors = [start / start.norm()]
    alphas, betas = [], []
    for step in range(steps):
        image = diagonal * vectors[-1]
        alphas.append(float(image @ vectors[-1]))
        basis = torch.stack(vectors)
        for _ in range(2):
            image = image - basis.T @ (basis @ image)
        if step + 1 < steps:
            betas.append(float(image.norm()))
            vectors.append(image / betas[-1])
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas, dtype=torch.float64)
    return torch.linalg.eigvalsh(tridiagonal + torch.diag(off, 1) + torch.diag(off, -1))


def clustered_diagonal(dimension: int) -> torch.Tensor:
    """A diagonal operator's eigenvalues: 3 and 2.5, which Lanczos finds early, and the rest in (1e-6, 1 + 1e-6),
    a cluster at whose bottom the smallest does not converge for hundreds of steps."""
    generator = torch.Generator().manual_seed(0)
    rest = torch.rand(dimension - 3, generator=generator, dtype=torch.float64) + 1e-6
    return torch.cat([torch.tensor([3.0, 2.5, 1e-6]), rest])


@pytest.mark.parametrize("dimension", [1000, 2000])
def test_lanczos_takes_as_many_steps_as_its_basis_budget_holds(monkeypatch, dimension):
    """The step cap is the budget over the dimension: twice the dimension, half the steps; `max_steps` caps
    it lower, never higher."""
    diagonal = clustered_diagonal(dimension)
    metric = torch.ones(dimension, dtype=torch.float64)
    monkeypatch.setattr(curvature, "LANCZOS_BASIS_BYTES", basis_budget(100, 1000))

    def lanczos(max_steps):
        start = curvature.random_vector(dimension, 0, metric.device)
        return curvature._lanczos(lambda v: diagonal * v, torch.clone, metric, start, max_steps)

    budgeted = lanczos(None)
    assert budgeted.iterations == 100 * 1000 // dimension
    assert not budgeted.converged
    assert lanczos(20).iterations == 20
    assert lanczos(10 * dimension).iterations == budgeted.iterations


def test_lanczos_tests_convergence_every_ritz_every_steps_and_stops_at_a_breakdown_between_tests(monkeypatch):
    """Past DENSE_RITZ_SIZE steps the tridiagonal's extremes, and the convergence test, come every RITZ_EVERY
    steps: a run that passes the test at step s, tested at every step, stops here at the first multiple of
    RITZ_EVERY from s on (the test keeps passing), with the same smallest eigenvalue and a Ritz value no
    higher, having computed the extremes about RITZ_EVERY times less often. A breakdown (the Krylov space
    invariant, beta ~ 0) between two tests still ends the run at once."""
    dimension = 2000
    rest = torch.rand(dimension - 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.01
    diagonal = torch.cat([torch.tensor([0.005], dtype=torch.float64), rest])  # 0.005 below a cluster in (0.01, 1.01)
    metric = torch.ones(dimension, dtype=torch.float64)
    extremes = curvature._extreme_ritz_values
    calls = []

    def counted(*args):
        calls.append(len(args[0]))
        return extremes(*args)

    monkeypatch.setattr(curvature, "_extreme_ritz_values", counted)

    def lanczos(every):
        monkeypatch.setattr(curvature, "RITZ_EVERY", every)
        calls.clear()
        start = curvature.random_vector(dimension, 0, metric.device)
        result = curvature._lanczos(lambda v: diagonal * v, torch.clone, metric, start, None)
        return result, len(calls)

    every_step, every_step_calls = lanczos(1)
    tested, tested_calls = lanczos(10)
    assert every_step.converged and tested.converged
    assert every_step.iterations > curvature.DENSE_RITZ_SIZE + 10
    assert every_step_calls == every_step.iterations
    assert tested.iterations == 10 * math.ceil(every_step.iterations / 10)
    assert tested_calls == curvature.DENSE_RITZ_SIZE + tested.iterations // 10 - curvature.DENSE_RITZ_SIZE // 10
    assert every_step.smallest == pytest.approx(0.005, rel=1e-6) and tested.smallest == pytest.approx(0.005, rel=1e-6)
    assert tested.smallest <= every_step.smallest + 1e-15  # more steps: by interlacing, a Ritz value no higher

    # Three distinct eigenvalues: the Krylov space is invariant after 3 steps, none of them a test's.
    monkeypatch.setattr(curvature, "DENSE_RITZ_SIZE", 0)
    three = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).repeat_interleave(4)
    ones = torch.ones(12, dtype=torch.float64)
    start = curvature.random_vector(12, 0, ones.device)
    broken = curvature._lanczos(lambda v: three * v, torch.clone, ones, start, None)
    assert (broken.iterations, broken.converged) == (3, True)
    assert broken.smallest == pytest.approx(1.0, abs=1e-12) and broken.largest == pytest.approx(4.0, abs=1e-12)


def test_lanczos_keeps_its_basis_semi_orthogonal_reorthogonalizing_only_where_the_estimates_say(monkeypatch):
    """Partial reorthogonalization on a diagonal operator whose largest eigenvalues converge early (what
    makes plain Lanczos lose orthogonality) while the smallest, in a cluster near 0, does not: over 250
    steps the basis stays orthogonal to 1e-7, the extreme Ritz values are those of Lanczos with full
    reorthogonalization to 1e-10, and fewer than half of the steps read the whole basis. A step that does
    cleans the last vector in the same pass, so that the next step need not: no two steps in a row read it."""
    from worker.nc import curvature

    dimension, steps = 3000, 250
    diagonal = clustered_diagonal(dimension)
    basis = []

    def operator(vector):
        basis.append(vector.clone())
        return diagonal * vector

    decisions = []
    lost = curvature._Orthogonality.lost

    def recorded(self, *args):
        decisions.append(lost(self, *args))
        return decisions[-1]

    monkeypatch.setattr(curvature._Orthogonality, "lost", recorded)
    metric = torch.ones(dimension, dtype=torch.float64)
    start = curvature.random_vector(dimension, 0, metric.device)
    result = curvature._lanczos(operator, lambda v: v.clone(), metric, start, steps)

    assert result.iterations == steps  # the smallest, in its cluster, does not converge to LANCZOS_TOL
    assert not result.converged
    vectors = torch.stack(basis)
    assert float((vectors @ vectors.T - torch.eye(steps, dtype=torch.float64)).abs().max()) <= 1e-7
    start = torch.randn(dimension, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = full_reorthogonalization_ritz_values(diagonal, start, steps)
    assert result.smallest == pytest.approx(float(reference[0]), rel=1e-10)
    assert result.largest == pytest.approx(3.0, abs=1e-12)
    assert 0 < sum(decisions) < steps / 2
    assert not any(first and second for first, second in zip(decisions, decisions[1:]))
