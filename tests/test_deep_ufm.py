"""The deep UFM (`layers` > 1): the deep linear closed form (docs/closed-forms.md), an
independent float64 reference for ReLU layers, collapse measured at every layer, and its
derivatives."""

import math

import pytest
import torch

from service import schemas
from tests.test_losses import reference_optimum
from worker.nc import curvature
from worker.nc.formulation import class_labels, formulate
from worker.nc.metrics import MEAN_KEYS, collapse_metrics, layer_key
from worker.nc.objectives import riemannian_hessian, value_and_riemannian_grad
from worker.nc.ufm import UFMProblem, initial_point, optimal_loss, solve
from worker.nc.ufm_problem import MAX_LAYERS
from worker.runners import engine_config


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def deep(K, d, n, layers, **options) -> UFMProblem:
    return UFMProblem(K, d, n, "regularized", lambda_w=5e-3, lambda_h=5e-3, layers=layers, tol=1e-11, **options)


# Deep linear layers under the squared error: without a bias (d >= K: an orthogonal frame;
# d < K), with a free bias (a simplex ETF), and with decays that differ by layer.
CLOSED_FORM_CASES = {
    "2 layers, orthogonal frame": (deep(4, 6, 3, 2, loss="mse"), "orthogonal"),
    "3 layers, d < K": (deep(4, 3, 3, 3, loss="mse"), None),
    "3 layers, free bias: simplex ETF": (deep(4, 6, 3, 3, loss="mse", bias=True, lambda_b=0.0), "etf"),
    "4 layers, own decays": (deep(3, 4, 2, 4, loss="mse", lambda_layers=(1e-3, 2e-2, 4e-3)), "orthogonal"),
}


@pytest.mark.parametrize("case", CLOSED_FORM_CASES, ids=list(CLOSED_FORM_CASES))
def test_deep_linear_squared_error_reaches_its_closed_form_collapsed_at_every_layer(case):
    problem, geometry = CLOSED_FORM_CASES[case]
    result = solve(problem)
    assert result["has_closed_form"] and result["converged"]
    assert abs(result["optimality_gap"]) <= 1e-10 * result["optimal_loss"]
    assert result["critical_point"] == curvature.LOCAL_MINIMUM
    for layer in range(1, problem.layers):
        assert result[layer_key("nc1", f"layer{layer}")] < 1e-18
    assert result["nc1"] < 1e-18
    if geometry == "orthogonal":
        assert result["nc2_equiangle_w"] == pytest.approx(1 / (problem.num_classes - 1), rel=1e-8)
    if geometry == "etf":
        assert result["nc2_etf_w"] < 1e-8 and result["nc2_etf_m"] < 1e-8


def test_deep_linear_closed_form_by_hand():
    """Two layers (M = 3 factors), K = 2, n = 1, every decay 1/2: c = (3/2)(1/8)^(1/3) = 3/4,
    g(sigma) = (sigma - 1)^2 / 4 + (3/4) sigma^(2/3), whose slope (sigma - 1)/2 + (1/2) sigma^(-1/3)
    is positive on (0, 1] (its least value, at sigma = 3^(-3/4), is 0.38): the minimum is sigma = 0, f* = 2 g(0) = 1/2; and with decays
    1/1000, c = 3/2000: the minimizer solves K g' = sigma - 1 + 0.002 sigma^(-1/3) = 0."""
    assert optimal_loss(UFMProblem(2, 2, 1, "regularized", lambda_w=0.5, lambda_h=0.5, layers=2, loss="mse")) == 0.5
    small = UFMProblem(2, 2, 1, "regularized", lambda_w=1e-3, lambda_h=1e-3, layers=2, loss="mse")
    sigma = 1.0
    for _ in range(100):  # Newton from 1, where K g' > 0, down to its root near 1
        sigma -= (sigma - 1 + 0.002 * sigma ** (-1 / 3)) / (1 - 0.002 / 3 * sigma ** (-4 / 3))
    assert optimal_loss(small) == pytest.approx(2 * ((sigma - 1) ** 2 / 4 + 0.0015 * sigma ** (2 / 3)), rel=1e-14)
    assert optimal_loss(deep(3, 4, 2, 2, layer_activation="relu", loss="mse")) is None
    assert optimal_loss(deep(3, 4, 2, 2)) is None  # cross-entropy


def test_trust_regions_reach_the_deep_linear_closed_form():
    """Their Hessian-vector products are autograd's, as the first-order descent's gradient is."""
    problem = deep(4, 6, 3, 3, loss="mse", solver="trust_region")
    result = solve(problem)
    assert result["converged"] and result["critical_point"] == curvature.LOCAL_MINIMUM
    assert abs(result["optimality_gap"]) <= 1e-10 * result["optimal_loss"]
    assert result["iterations"] <= 40  # the first-order descent takes ~120 here


@pytest.mark.parametrize(
    "problem",
    [deep(3, 4, 2, 2), deep(3, 6, 2, 2, layer_activation="relu", restarts=3)],
    ids=["linear, cross-entropy", "relu, cross-entropy"],
)
def test_deep_ufm_without_a_closed_form_reaches_the_float64_reference(problem):
    result = solve(problem)
    assert result["converged"] and result["critical_point"] == curvature.LOCAL_MINIMUM
    assert result["loss"] == pytest.approx(reference_optimum(problem, starts=3), rel=1e-10)


def test_the_layers_catalogue_is_measured_on_each_layers_features():
    problem = deep(3, 4, 2, 3, layer_activation="relu", max_iters=5)
    rows = []
    solve(problem, on_checkpoint=lambda step, row: rows.append(row))
    classifier, features, first, second = initial_point(problem, problem.seed, "cpu")
    labels = class_labels(problem, torch.device("cpu"))
    by_layer = {1: features, 2: torch.relu(features @ first.T)}
    for layer, layer_input in by_layer.items():
        expected = collapse_metrics(layer_input, labels, None, None, 3)
        for key in MEAN_KEYS:
            assert rows[0][layer_key(key, f"layer{layer}")] == pytest.approx(expected[key], rel=1e-12)
    classifier_input = torch.relu(by_layer[2] @ second.T)
    assert rows[0]["nc1"] == pytest.approx(collapse_metrics(classifier_input, labels, None, None, 3)["nc1"], rel=1e-12)
    assert layer_key("nc1", "layer3") not in rows[0]  # the classifier's input has the plain keys


@pytest.mark.parametrize(
    "problem",
    [deep(3, 4, 2, 3, bias=True, lambda_b=0.1), deep(3, 4, 2, 2, layer_activation="relu", loss="mse")],
    ids=["linear, bias", "relu, mse"],
)
def test_deep_hessian_matches_central_differences_of_the_gradient(problem):
    labels = class_labels(problem, torch.device("cpu"))
    formulation = formulate(problem, labels)
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (problem.num_samples, 4)] + [(3,)] * problem.bias + [(4, 4)] * (problem.layers - 1)
    point = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    vector = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    product = riemannian_hessian(formulation.objective, formulation.hessian, formulation.manifolds, point)(vector)
    step = 1e-5

    def gradient_at(t):
        moved = [block + t * v for block, v in zip(point, vector)]
        return value_and_riemannian_grad(formulation.objective, formulation.manifolds, moved)[1]

    differences = [(a - b) / (2 * step) for a, b in zip(gradient_at(step), gradient_at(-step))]
    error = math.sqrt(sum(float((p - q).square().sum()) for p, q in zip(product, differences)))
    size = math.sqrt(sum(float(q.square().sum()) for q in differences))
    assert error <= 1e-7 * size


def test_every_key_of_a_deep_result_is_searchable():
    from service.search.fields import history_key, lookup

    result = solve(deep(3, 4, 2, 6, max_iters=3))
    for key, value in result.items():
        field = lookup(f"result.{key}")
        assert value is None or field.type == {str: "string", bool: "bool"}.get(type(value), "number"), key
    assert history_key(layer_key("nc1", "layer5")) == "nc1_layer5"
    assert layer_key("nc2_etf_m", "layer5") in result


def test_deep_problems_are_refused_where_they_are_not_posed():
    with pytest.raises(ValueError, match="normalization 'regularized'"):
        UFMProblem(3, 4, 2, "normalized", layers=2)
    with pytest.raises(ValueError, match="lambda_layers needs layers - 1 = 2"):
        deep(3, 4, 2, 3, lambda_layers=(1e-3,))
    with pytest.raises(ValueError, match=f"layers must lie in 1..{MAX_LAYERS}"):
        deep(3, 4, 2, MAX_LAYERS + 1)
    assert MAX_LAYERS == schemas.MAX_LAYERS  # the engine's and the API's limit


def test_a_deep_spec_runs_as_its_problem():
    spec = schemas.UFMSpec(
        kind="ufm", K=3, d=4, n_per_class=2, normalization="regularized", layers=3, lambda_layers=[1e-3, 2e-3]
    )
    problem = engine_config(UFMProblem, spec.model_dump())
    assert problem.hidden_decays == (1e-3, 2e-3) and problem.decays[2:] == [1e-3, 2e-3]
