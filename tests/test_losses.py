"""The UFM under the squared error and the label-smoothed cross-entropy: the regularized
squared error reaches its closed form (docs/closed-forms.md), the other problems the
optimum of an independent float64 optimization, and both solvers and the certificate
work for each loss."""

import numpy as np
import pytest
import scipy.optimize
import torch

from worker.nc import curvature
from worker.nc.ufm import UFMProblem, initial_point, optimal_loss, solve

SMOOTHED = {"loss": "label_smoothing", "label_smoothing": 0.1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def squared_error(K, d, n, lambda_wh, bias=False, lambda_b=5e-4, **options) -> UFMProblem:
    return UFMProblem(
        K, d, n, "regularized", bias=bias, lambda_w=lambda_wh, lambda_h=lambda_wh, lambda_b=lambda_b, loss="mse", **options
    )


# (problem, the geometry of W W^T at the optimum): regimes of the closed form, K beta = K n lambda
# below and above 1, with and without a bias, and a bias decay on either side of
# lambda_b (1 - K beta) = K beta.
SQUARED_ERROR_CASES = {
    "no bias, d < K": (squared_error(4, 3, 5, 5e-3), None),
    "no bias, d >= K: orthogonal frame": (squared_error(4, 6, 5, 5e-3), "orthogonal"),
    "no bias, K beta >= 1: zero": (squared_error(4, 8, 5, 0.2), "zero"),
    "free bias: simplex ETF": (squared_error(5, 4, 3, 1e-2, bias=True, lambda_b=0.0), "etf"),
    "decayed bias: simplex ETF": (squared_error(5, 4, 3, 1e-2, bias=True, lambda_b=1e-3), "etf"),
    "strongly decayed bias": (squared_error(4, 4, 2, 1e-2, bias=True, lambda_b=5.0), None),
    "bias, K beta >= 1: zero": (squared_error(4, 8, 5, 0.2, bias=True, lambda_b=0.1), "zero"),
}


@pytest.mark.parametrize("case", SQUARED_ERROR_CASES, ids=list(SQUARED_ERROR_CASES))
def test_regularized_squared_error_reaches_its_closed_form(case):
    problem, geometry = SQUARED_ERROR_CASES[case]
    result = solve(problem.__class__(**{**problem.__dict__, "tol": 1e-12}))
    assert result["has_closed_form"] and result["converged"]
    assert abs(result["optimality_gap"]) <= 1e-10 * result["optimal_loss"]
    assert result["critical_point"] == curvature.LOCAL_MINIMUM
    assert result["all_minima_global"] is True
    if geometry == "etf":
        assert result["nc1"] < 1e-20 and result["nc2_etf_w"] < 1e-10 and result["nc3_etf"] < 1e-10
    if geometry == "orthogonal":  # W W^T = c I_K: its centred Gram is 1/sqrt(K - 1) off the ETF's
        assert result["nc1"] < 1e-20 and result["nc2_equinorm_w"] < 1e-10
        assert result["nc2_equiangle_w"] == pytest.approx(1 / (problem.num_classes - 1), rel=1e-9)
    if geometry == "zero":
        assert result["loss"] == pytest.approx(result["optimal_loss"], rel=1e-12)


def test_squared_error_closed_forms_by_hand():
    """beta = sqrt(n lambda_w lambda_h); values worked out on paper."""
    # K = 2, n = 1, lambda = 0.1: beta = 0.1; rank min(d, 2): (2 - r)/4 + r beta (1 - K beta / 2)
    assert optimal_loss(squared_error(2, 1, 1, 0.1)) == pytest.approx(0.25 + 0.09, rel=1e-15)
    assert optimal_loss(squared_error(2, 5, 1, 0.1)) == pytest.approx(0.18, rel=1e-15)
    # a free bias takes the class mean: (K - 1) beta (1 - K beta / 2) = 0.09
    assert optimal_loss(squared_error(2, 1, 1, 0.1, bias=True, lambda_b=0.0)) == pytest.approx(0.09, rel=1e-15)
    # lambda_b (1 - K beta) <= K beta: the bias takes 1/(1 + lambda_b) of the mean, at a cost of
    # lambda_b / (2 K (1 + lambda_b)) = 1/24 for lambda_b = 0.2
    decayed = squared_error(2, 1, 1, 0.1, bias=True, lambda_b=0.2)
    assert optimal_loss(decayed) == pytest.approx(0.09 + 1 / 24, rel=1e-15)
    # beyond it (lambda_b = 1) W H shares the mean, which needs d >= K:
    # K beta (1 - K beta / 2) - K beta^2 / (2 lambda_b) = 0.18 - 0.01
    assert optimal_loss(squared_error(2, 2, 1, 0.1, bias=True, lambda_b=1.0)) == pytest.approx(0.17, rel=1e-15)
    assert optimal_loss(squared_error(2, 1, 1, 0.1, bias=True, lambda_b=1.0)) is None
    assert optimal_loss(squared_error(3, 2, 1, 1.0)) == 0.5  # K beta = 3: W = H = 0
    assert optimal_loss(squared_error(5, 2, 1, 0.01, bias=True)) is None  # an ETF needs d >= K - 1
    assert optimal_loss(squared_error(3, 2, (1, 2, 3), 0.01)) is None  # imbalanced
    assert optimal_loss(UFMProblem(3, 2, 1, "normalized", loss="mse")) is None
    assert optimal_loss(UFMProblem(3, 2, 1, "regularized", **SMOOTHED)) is None


def reference_optimum(problem: UFMProblem, starts: int = 2) -> float:
    """The lowest value scipy's L-BFGS finds from `starts` random starts, on the objective
    written with torch's losses and differentiated by autograd, in float64: normalized
    rows as x / ||x|| of free rows; a deep UFM's hidden layers after the bias."""
    K, d, N = problem.num_classes, problem.dim, problem.num_samples
    labels = torch.arange(K).repeat_interleave(torch.tensor(problem.class_counts))
    sizes = [K * d, N * d] + [K] * problem.bias + [d * d] * (problem.layers - 1)
    activation = torch.relu if problem.layer_activation == "relu" else (lambda x: x)

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        x = torch.tensor(flat, requires_grad=True)
        blocks = torch.split(x, sizes)
        classifier, features = blocks[0].reshape(K, d), blocks[1].reshape(N, d)
        if problem.normalization == "normalized":
            classifier = classifier / classifier.norm(dim=1, keepdim=True)
            features = features / features.norm(dim=1, keepdim=True)
            logits = problem.logit_scale * features @ classifier.T
        else:
            for layer in blocks[2 + problem.bias :]:
                features = activation(features @ layer.reshape(d, d).T)
            logits = features @ classifier.T
        if problem.bias:
            logits = logits + blocks[2]
        if problem.loss == "mse":
            targets = torch.nn.functional.one_hot(labels, K).to(torch.float64)
            value = ((logits - targets) ** 2).sum() / (2 * N)
        else:
            value = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=problem.label_smoothing or 0.0)
        if problem.normalization == "regularized":
            decays = [problem.lambda_w, problem.lambda_h] + [problem.lambda_b] * problem.bias
            decays += [problem.lambda_layers[i] if problem.lambda_layers else problem.lambda_w for i in range(problem.layers - 1)]
            value = value + sum(decay / 2 * (block**2).sum() for decay, block in zip(decays, blocks))
        (grad,) = torch.autograd.grad(value, x)
        return value.item(), grad.numpy()

    values = []
    for start in range(starts):
        spread = 1.0 if problem.normalization == "normalized" else 0.1
        x0 = np.random.default_rng(start).standard_normal(sum(sizes)) * spread
        options = {"maxiter": 20_000, "gtol": 1e-14, "ftol": 0.0, "maxcor": 30}
        values.append(scipy.optimize.minimize(objective, x0, jac=True, method="L-BFGS-B", options=options).fun)
    return min(values)


REFERENCE_CASES = {
    "regularized, label smoothing, bias": UFMProblem(
        4, 3, 3, "regularized", bias=True, lambda_w=1e-2, lambda_h=1e-2, lambda_b=1e-3, **SMOOTHED
    ),
    "regularized, label smoothing, K > d + 1": UFMProblem(
        5, 3, 2, "regularized", lambda_w=1e-2, lambda_h=1e-2, loss="label_smoothing", label_smoothing=0.2
    ),
    "normalized, label smoothing": UFMProblem(4, 3, 3, "normalized", logit_scale=5.0, **SMOOTHED),
    "normalized, mse": UFMProblem(4, 3, 3, "normalized", logit_scale=2.0, loss="mse"),
    "normalized, mse, bias": UFMProblem(4, 3, 3, "normalized", logit_scale=0.5, bias=True, loss="mse"),
}


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=list(REFERENCE_CASES))
def test_losses_without_a_closed_form_reach_the_float64_reference(case):
    problem = REFERENCE_CASES[case]
    result = solve(problem.__class__(**{**problem.__dict__, "tol": 1e-12}))
    assert result["converged"] and result["critical_point"] == curvature.LOCAL_MINIMUM
    assert result["has_closed_form"] is False and result["optimal_loss"] is None
    assert result["loss"] == pytest.approx(reference_optimum(problem), rel=1e-10)


def test_normalized_squared_error_reaches_zero_where_d_leaves_room():
    """d >= K + 1 and logit scale >= 1: orthonormal rows w_k, h = w_y / s + a unit part
    orthogonal to every w_k fit every target exactly (and log L, which the cross-entropy
    minimizes, would have no minimum)."""
    result = solve(UFMProblem(4, 6, 3, "normalized", logit_scale=2.0, loss="mse"))
    assert result["converged"] and result["loss"] < 1e-18 and result["accuracy"] == 1.0


@pytest.mark.parametrize(
    "problem",
    [
        squared_error(5, 4, 3, 1e-2, bias=True, lambda_b=1e-3),
        UFMProblem(4, 3, 3, "normalized", logit_scale=5.0, bias=True, **SMOOTHED),
    ],
    ids=["regularized mse, bias", "normalized label smoothing, bias"],
)
def test_trust_regions_reach_what_first_order_reaches(problem):
    first_order = solve(problem)
    trust_region = solve(problem.__class__(**{**problem.__dict__, "solver": "trust_region"}))
    assert trust_region["converged"] and trust_region["critical_point"] == curvature.LOCAL_MINIMUM
    assert trust_region["loss"] == pytest.approx(first_order["loss"], rel=1e-10)


def test_the_landscape_probe_counts_minima_of_the_squared_error():
    result = solve(squared_error(4, 3, 2, 1e-2, restarts=3))
    assert (result["minima_found"], result["saddles_found"], result["all_minima_global"]) == (3, 0, True)
    assert result["global_optimum_fraction"] == 1.0


def test_a_history_row_reports_the_problems_own_loss():
    """`loss` is the mean squared error plus the decays; `cross_entropy` stays the logits' cross-entropy."""
    rows = []
    problem = squared_error(3, 2, 2, 1e-2, bias=True, lambda_b=0.3, max_iters=0)
    solve(problem, on_checkpoint=lambda step, row: rows.append(row))
    classifier, features, bias = initial_point(problem, problem.seed, "cpu")
    labels = torch.arange(3).repeat_interleave(2)
    logits = features @ classifier.T + bias
    targets = torch.nn.functional.one_hot(labels, 3).to(torch.float64)
    penalty = 1e-2 / 2 * ((classifier**2).sum() + (features**2).sum()) + 0.3 / 2 * (bias**2).sum()
    expected = ((logits - targets) ** 2).sum() / (2 * 6) + penalty
    assert rows[0]["loss"] == pytest.approx(float(expected), rel=1e-13)
    assert rows[0]["cross_entropy"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-13)


def test_label_smoothing_is_required_exactly_with_its_loss():
    with pytest.raises(ValueError, match="label_smoothing is required"):
        UFMProblem(3, 2, 1, loss="label_smoothing")
    with pytest.raises(ValueError, match="label_smoothing is required"):
        UFMProblem(3, 2, 1, loss="mse", label_smoothing=0.1)
    for eps in (0.0, 1.0):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            UFMProblem(3, 2, 1, loss="label_smoothing", label_smoothing=eps)
    with pytest.raises(ValueError, match="loss must be one of"):
        UFMProblem(3, 2, 1, loss="hinge")
