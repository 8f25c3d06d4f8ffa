"""UFM solvers reach the closed-form optima of DESIGN.md and collapse onto a simplex ETF."""

import math

import pytest
import torch

from worker.nc import ufm
from worker.nc.metrics import CLASSIFIER_KEYS, MEAN_KEYS
from worker.nc.ufm import Diverged, Stopped, UFMProblem, optimal_loss, solve

COLLAPSE_KEYS = ("nc1", "nc2_etf_w", "nc3_etf")


def assert_reaches_collapsed_optimum(result):
    assert result["converged"] and result["has_closed_form"]
    assert result["grad_norm"] <= 1e-10
    assert abs(result["optimality_gap"]) <= 1e-8
    assert result["optimality_gap"] == result["loss"] - result["optimal_loss"]
    for key in COLLAPSE_KEYS:
        assert result[key] < 1e-6, key
    assert result["accuracy"] == 1.0 and result["nc4"] == 0.0


@pytest.mark.parametrize(
    "K, d, n, scale, bias",
    [
        (4, 3, 5, 5.0, False),  # d = K - 1: the ETF just fits
        (10, 9, 5, 10.0, True),  # d = K - 1, with a free bias
        (5, 16, 4, 0.5, True),  # small scale: the loss stays large
        (10, 32, 5, 30.0, False),  # large scale: L* ~ 3e-14, only log L keeps moving
    ],
)
def test_normalized_reaches_etf(K, d, n, scale, bias):
    result = solve(UFMProblem(K, d, n, "normalized", logit_scale=scale, bias=bias))
    assert_reaches_collapsed_optimum(result)
    assert result["optimal_loss"] == math.log1p((K - 1) * math.exp(-scale * K / (K - 1)))


@pytest.mark.parametrize(
    "K, d, n, lambda_w, lambda_h, bias",
    [
        (4, 3, 5, 5e-4, 5e-4, False),  # d = K - 1
        (10, 16, 5, 1e-3, 1e-3, True),
        (6, 20, 10, 1e-2, 1e-3, False),  # unequal decays: h = c w with c != 1/sqrt(n)
        (2, 1, 1, 0.1, 0.1, False),  # the hand-checked case below
    ],
)
def test_regularized_reaches_etf(K, d, n, lambda_w, lambda_h, bias):
    result = solve(
        UFMProblem(K, d, n, "regularized", lambda_w=lambda_w, lambda_h=lambda_h, bias=bias)
    )
    assert_reaches_collapsed_optimum(result)
    penalty = result["loss"] - result["cross_entropy"]
    assert 0 < penalty < result["loss"]


def test_regularized_collapse_to_zero():
    # K s = 4 sqrt(5) 0.2 > 1: the optimum is W = H = 0 with f* = ln K. Every NC metric
    # is 0/0 there and the direction of approach depends on the start, so the loss, its
    # cross-entropy part and the vanishing penalty are what can be asserted.
    problem = UFMProblem(4, 8, 5, "regularized", lambda_w=0.2, lambda_h=0.2)
    result = solve(problem)
    assert result["converged"] and result["has_closed_form"]
    assert result["optimal_loss"] == math.log(4)
    assert abs(result["optimality_gap"]) <= 1e-8
    assert result["cross_entropy"] == pytest.approx(math.log(4), abs=1e-12)
    assert result["loss"] - result["cross_entropy"] < 1e-15  # ||W||^2, ||H||^2 -> 0


def test_normalized_without_an_etf_finishes_above_the_etf_value():
    K, d, scale = 10, 5, 10.0
    result = solve(UFMProblem(K, d, 5, "normalized", logit_scale=scale))
    assert result["optimal_loss"] is None and result["optimality_gap"] is None
    assert result["has_closed_form"] is False
    etf_value = math.log1p((K - 1) * math.exp(-scale * K / (K - 1)))
    assert result["loss"] > 1.5 * etf_value
    assert result["nc1"] < 1e-6  # features still collapse onto their class means


def test_closed_forms_by_hand():
    # Normalized, K = 4, s = 3: margin s K/(K-1) = 4, L* = ln(1 + 3 e^-4).
    assert optimal_loss(UFMProblem(4, 3, 7, "normalized", logit_scale=3.0)) == pytest.approx(
        0.0534904497059335, rel=1e-14
    )
    # Regularized, K = 2, n = 1, lambda = 0.1: c = 1, s = 0.1, t = (1/2) ln(10 - 1) = ln 3,
    # margin c t K/(K-1) = 2 ln 3, f* = ln(1 + 1/9) + lambda_w K t = ln(10/9) + 0.2 ln 3.
    regularized = UFMProblem(2, 1, 1, "regularized", lambda_w=0.1, lambda_h=0.1)
    assert optimal_loss(regularized) == pytest.approx(
        math.log(10 / 9) + 0.2 * math.log(3), rel=1e-14
    )
    assert optimal_loss(regularized) == pytest.approx(0.3250829733914483, rel=1e-14, abs=0)
    # Where no closed form applies, and where the zero solution makes d irrelevant.
    assert optimal_loss(UFMProblem(5, 3, 2, "normalized")) is None
    assert optimal_loss(UFMProblem(5, 3, 2, "regularized")) is None
    assert optimal_loss(UFMProblem(5, 3, 2, "regularized", lambda_w=1.0, lambda_h=1.0)) == math.log(
        5
    )


def test_cross_entropy_parts_keep_digits_of_saturated_losses():
    # Label 0 wins by margins 40 and 45: p_0 rounds to 1 in float64, yet the loss, its
    # log and the label's gradient entry -(p_1 + p_2) must keep full relative precision.
    logits = torch.tensor([[0.0, -40.0, -45.0], [1.0, 3.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    losses, log_losses, logit_grads = ufm._cross_entropy_parts(logits, labels)

    wrong_mass = math.exp(-40) + math.exp(-45)
    p = [1 / (1 + wrong_mass), math.exp(-40) / (1 + wrong_mass), math.exp(-45) / (1 + wrong_mass)]
    assert losses[0].item() == pytest.approx(math.log1p(wrong_mass), rel=1e-14, abs=0)
    log_loss = math.log(math.log1p(wrong_mass))
    assert log_losses[0].item() == pytest.approx(log_loss, rel=1e-14, abs=0)
    expected = [-(p[1] + p[2]), p[1], p[2]]
    assert logit_grads[0].tolist() == pytest.approx(expected, rel=1e-14, abs=0)

    softmax = torch.softmax(logits[1], dim=0).tolist()
    assert losses[1].item() == pytest.approx(-math.log(softmax[2]), rel=1e-14, abs=0)
    expected = [softmax[0], softmax[1], softmax[2] - 1]
    assert logit_grads[1].tolist() == pytest.approx(expected, rel=1e-14, abs=0)


@pytest.mark.parametrize("normalization", ["normalized", "regularized"])
def test_closed_form_gradients_match_autograd(normalization):
    problem = UFMProblem(5, 4, 3, normalization, logit_scale=7.0, bias=True, lambda_b=0.3)
    labels = torch.arange(5).repeat_interleave(3)
    generator = torch.Generator().manual_seed(0)
    point = [
        torch.randn(shape, generator=generator, dtype=torch.float64)
        for shape in [(5, 4), (15, 4), (5,)]
    ]
    if normalization == "normalized":
        objective = ufm._normalized_objective(problem, labels)
    else:
        objective = ufm._regularized_objective(problem, labels)
    value, grads = objective(point)

    leaves = [block.clone().requires_grad_() for block in point]
    classifier, features, bias = leaves
    scale = problem.logit_scale if normalization == "normalized" else 1.0
    logits = scale * features @ classifier.T + bias
    loss = torch.nn.functional.cross_entropy(logits, labels)
    if normalization == "normalized":
        reference = torch.log(loss)
    else:
        reference = loss + sum(
            decay / 2 * (block**2).sum()
            for decay, block in zip([problem.lambda_w, problem.lambda_h, problem.lambda_b], leaves)
        )
    reference.backward()
    assert float(value) == pytest.approx(reference.item(), rel=1e-13, abs=0)
    for grad, leaf in zip(grads, leaves):
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-15)


def test_same_seed_gives_identical_results():
    problem = UFMProblem(5, 6, 3, "normalized", logit_scale=8.0, bias=True, seed=7)
    first, second = solve(problem), solve(problem)
    assert first == second
    other_seed = solve(UFMProblem(5, 6, 3, "normalized", logit_scale=8.0, bias=True, seed=8))
    assert other_seed["iterations"] != first["iterations"] or other_seed["loss"] != first["loss"]


def test_should_stop_is_polled_once_per_iteration():
    polls, steps = [], []

    def should_stop():
        polls.append(None)
        return len(polls) == 4

    with pytest.raises(Stopped):
        solve(
            UFMProblem(4, 3, 5, "normalized", checkpoint_every=1),
            on_checkpoint=lambda step, row: steps.append(step),
            should_stop=should_stop,
        )
    assert steps == [0, 1, 2, 3]


def test_default_checkpoint_schedule_and_row_keys():
    rows = {}
    problem = UFMProblem(4, 3, 5, "regularized", tol=1e-300, max_iters=120)
    result = solve(problem, on_checkpoint=lambda step, row: rows.setdefault(step, row))
    assert list(rows) == [0, 1, 2, 5, 10, 20, 50, 100, 120]
    assert result["iterations"] == 120 and result["converged"] is False
    expected = set(MEAN_KEYS) | set(CLASSIFIER_KEYS) | {"grad_norm", "cross_entropy"}
    assert all(set(row) == expected for row in rows.values())
    assert all(isinstance(value, float) for row in rows.values() for value in row.values())
    final = {key: result[key] for key in expected}
    assert final == rows[120]


def test_fixed_checkpoint_interval_ends_with_the_last_step():
    steps = []
    solve(
        UFMProblem(4, 3, 5, "normalized", tol=1e-300, max_iters=20, checkpoint_every=7),
        on_checkpoint=lambda step, row: steps.append(step),
    )
    assert steps == [0, 7, 14, 20]


def test_normalized_rows_have_no_regularization_keys():
    rows = []
    result = solve(
        UFMProblem(3, 4, 2, "normalized", max_iters=0),
        on_checkpoint=lambda s, row: rows.append(row),
    )
    assert set(rows[0]) == set(MEAN_KEYS) | set(CLASSIFIER_KEYS) | {"grad_norm"}
    assert result["iterations"] == 0 and result["converged"] is False


def test_non_finite_objective_raises_diverged(monkeypatch):
    regularized_objective = ufm._regularized_objective

    def poisoned_after_three_calls(problem, labels):
        evaluate, calls = regularized_objective(problem, labels), []

        def poisoned(point):
            calls.append(None)
            value, grads = evaluate(point)
            return (value * math.nan if len(calls) > 3 else value), grads

        return poisoned

    monkeypatch.setattr(ufm, "_regularized_objective", poisoned_after_three_calls)
    with pytest.raises(Diverged, match="iteration"):
        solve(UFMProblem(4, 3, 5, "regularized"))


def test_invalid_problems_are_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        UFMProblem(1, 3, 5, "normalized")
    with pytest.raises(ValueError, match="dim >= 2"):
        UFMProblem(2, 1, 5, "normalized")
    with pytest.raises(ValueError, match="normalization"):
        UFMProblem(3, 3, 5, "none")
    with pytest.raises(ValueError, match="lambda"):
        UFMProblem(3, 3, 5, "regularized", lambda_h=0.0)
    with pytest.raises(ValueError, match="logit_scale"):
        UFMProblem(3, 3, 5, "normalized", logit_scale=math.inf)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    problem = UFMProblem(10, 16, 5, "normalized", logit_scale=10.0)
    on_gpu, on_cpu = solve(problem, device="cuda"), solve(problem)
    assert_reaches_collapsed_optimum(on_gpu)
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-9, abs=0)
