"""Second order: the closed-form Hessians of the UFM objectives, on their manifolds."""

import math

import pytest
import torch

from worker.nc.formulation import class_labels, formulate
from worker.nc.manifolds import RowSphere
from worker.nc.objectives import riemannian_hessian, value_and_riemannian_grad
from worker.nc.ufm_problem import UFMProblem

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
    """The objective, written with torch's cross-entropy, for autograd."""
    classifier, features = point[0], point[1]
    scale = problem.logit_scale if problem.normalization == "normalized" else 1.0
    logits = scale * features @ classifier.T
    if problem.bias:
        logits = logits + point[2]
    losses = torch.nn.functional.cross_entropy(logits, formulation.labels, reduction="none")
    weights = formulation.manifolds[1].row_weights if problem.normalization == "normalized" else None
    total = losses.sum() if weights is None else (losses * weights).sum()
    if problem.normalization == "normalized":
        return torch.log(total / problem.num_samples)
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
