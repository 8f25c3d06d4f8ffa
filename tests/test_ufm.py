"""UFM solvers reach the closed forms of docs/closed-forms.md and collapse onto a simplex ETF."""

import dataclasses
import math
import re

import pytest
import torch

from worker.nc import merging, objectives, ufm
from worker.nc import formulation as formulation_module
from worker.nc.descent import minimize
from worker.nc.formulation import Formulation, formulate
from worker.nc.manifolds import Euclidean, RowSphere, row_dots
from worker.nc.metrics import CLASSIFIER_KEYS, MEAN_KEYS
from worker.nc.preconditioner import Preconditioner, class_coupling, host_floats
from worker.nc.stopping import (
    SUBLINEAR_FACTOR,
    SUBLINEAR_MIN_ITERS,
    StoppingRules,
    SublinearProgress,
)
from worker.nc.ufm import Diverged, Stopped, UFMProblem, optimal_loss, solve

COLLAPSE_KEYS = ("nc1", "nc2_etf_w", "nc3_etf")
ROW_KEYS = {"grad_norm", "w_min_angle_deg"}  # what the solver adds to collapse_metrics


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_reaches_collapsed_optimum(result):
    assert result["converged"] and result["has_closed_form"]
    assert result["grad_norm"] <= 1e-10
    assert abs(result["optimality_gap"]) <= 1e-8
    assert result["optimality_gap"] == result["loss"] - result["optimal_loss"]
    for key in COLLAPSE_KEYS:
        assert result[key] < 1e-6, key
    assert result["accuracy"] == 1.0 and result["nc4"] == 0.0
    assert result["stop_reason"].startswith(f"converged: gradient norm {result['grad_norm']:.3g} <= tol ")


@pytest.mark.parametrize(
    "K, d, n, scale, bias",
    [
        (4, 3, 5, 5.0, False),  # d = K - 1: the ETF just fits
        (10, 9, 5, 10.0, True),  # d = K - 1, with a free bias
        (5, 16, 4, 0.5, True),  # small scale: the loss stays large
        (10, 32, 5, 30.0, False),  # large scale: L* ~ 3e-14, only log L keeps moving
        (40, 48, 3, 10.0, True),  # enough classes for the class coupling, and a bias
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
    assert result["has_closed_form"] is False and result["global_optimum_fraction"] is None
    assert result["converged"]  # to a critical point, not an ETF
    etf_value = math.log1p((K - 1) * math.exp(-scale * K / (K - 1)))
    assert result["loss"] > 1.5 * etf_value
    assert result["nc1"] < 1e-6  # features still collapse onto their class means
    assert result["w_min_angle_deg"] < etf_angle_degrees(K)  # no ETF fits in R^5


def etf_angle_degrees(K):
    return math.degrees(math.acos(-1 / (K - 1)))


def capture_classifier(monkeypatch):
    """The classifier of the last metrics row, as the solver hands it to collapse_metrics."""
    captured = {}
    original = ufm.collapse_metrics

    def spy(features, labels, classifier, *args):
        captured.update(features=features, labels=labels, classifier=classifier)
        return original(features, labels, classifier, *args)

    monkeypatch.setattr(ufm, "collapse_metrics", spy)
    return captured


def test_min_angle_matches_a_direct_computation(monkeypatch):
    captured = capture_classifier(monkeypatch)
    K = 12
    result = solve(UFMProblem(K, 4, 3, "normalized", logit_scale=8.0))  # K > d + 1
    units = captured["classifier"] / captured["classifier"].norm(dim=1, keepdim=True)
    angles = [
        math.degrees(math.acos(max(-1.0, min(1.0, float(units[i] @ units[j])))))
        for i in range(K)
        for j in range(i + 1, K)
    ]
    assert result["w_min_angle_deg"] == pytest.approx(min(angles), abs=1e-6)
    assert result["w_min_angle_deg"] < etf_angle_degrees(K)


def test_min_angle_of_the_simplex_etf():
    result = solve(UFMProblem(4, 3, 5, "normalized", logit_scale=5.0))  # K = d + 1
    assert_reaches_collapsed_optimum(result)
    assert result["w_min_angle_deg"] == pytest.approx(etf_angle_degrees(4), abs=1e-6)


def test_min_angle_keeps_digits_for_close_rows():
    angle = 1e-9  # radians: the cosine is 1 - 5e-19, which rounds to 1
    rows = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)], [-1.0, 0.0]])
    assert ufm.min_angle_degrees(rows) == pytest.approx(math.degrees(angle), rel=1e-6)
    assert math.isnan(ufm.min_angle_degrees(torch.zeros(3, 2, dtype=torch.float64)))


def test_two_hundred_classes_collapse_where_an_etf_fits():
    result = solve(UFMProblem(200, 256, 2, "normalized", logit_scale=10.0))
    assert result["converged"] and result["nc2_etf_w"] <= 1e-4


def test_two_hundred_classes_in_128_dimensions_reach_a_critical_point():
    # No simplex ETF of 200 vectors fits in R^128: the ETF Gram has rank 199, and its
    # distance to any Gram of rank 128 is at least sqrt(71/199) ~ 0.6 (Eckart-Young),
    # so nc2_etf_w <= 1e-4 is out of reach for any solver.
    K, d = 200, 128
    result = solve(UFMProblem(K, d, 2, "normalized", logit_scale=10.0))
    assert result["converged"] and result["nc1"] < 1e-6
    assert result["nc2_etf_w"] >= math.sqrt((K - 1 - d) / (K - 1))
    assert result["w_min_angle_deg"] < etf_angle_degrees(K)


# Generalized neural collapse (K > d + 1, Jiang et al. 2024): no simplex ETF fits, the
# landscape has strict saddles of tiny negative curvature, and a first-order descent can
# crawl past them for tens of thousands of iterations (docs/solver.md). K/d ~ 2.3 here.
GNC_N, GNC_SCALE = 10, 10.0
SUBLINEAR_REASON = re.compile(
    r"gradient norm decreasing sublinearly: its smallest value fell only (\S+)-fold "
    r"from iteration (\d+) to (\d+) \((\S+) to (\S+)\), less than the 3-fold of a k\^-1\.58 decay"
)


def assert_generalized_collapse(result, K, d):
    """What holds at any point the solver reports for K > d + 1, converged or not."""
    assert result["optimal_loss"] is None and result["has_closed_form"] is False
    assert result["nc1"] < 1e-6  # the features sit on their class means
    # No ETF fits: the loss stays above its value, nc2_etf_w above the rank-d bound...
    assert result["loss"] > math.log1p((K - 1) * math.exp(-GNC_SCALE * K / (K - 1)))
    assert result["nc2_etf_w"] >= math.sqrt((K - 1 - d) / (K - 1))
    # ...and with K > 2d, some pair of classifier rows is at an acute angle (Rankin 1955:
    # at most 2d vectors of R^d are pairwise at 90 degrees or more).
    assert K > 2 * d and result["w_min_angle_deg"] < 90.0


@pytest.mark.parametrize("K, d", [(30, 12), (60, 26), (100, 43)])
def test_generalized_collapse_converges_or_says_why_it_stopped(K, d):
    result = solve(UFMProblem(K, d, GNC_N, "normalized", logit_scale=GNC_SCALE))
    assert_generalized_collapse(result, K, d)
    assert result["iterations"] <= 2 * SUBLINEAR_MIN_ITERS  # 291, 307 and 1945 when measured
    if result["converged"]:
        assert result["grad_norm"] <= 1e-10
        assert result["stop_reason"] == f"converged: gradient norm {result['grad_norm']:.3g} <= tol 1e-10"
    else:
        assert result["grad_norm"] > 1e-10 and SUBLINEAR_REASON.fullmatch(result["stop_reason"])


def test_generalized_collapse_stops_early_once_progress_turns_sublinear():
    # Without the rule this run needs 28,073 iterations (on one thread) to reach tol; it
    # crawls from 6e-6 at iteration 1,000 on. It stops in the merged phase, and the full
    # problem's certificate after it takes no step.
    K, d = 300, 128
    result = solve(UFMProblem(K, d, GNC_N, "normalized", logit_scale=GNC_SCALE))
    assert_generalized_collapse(result, K, d)
    assert result["converged"] is False and result["grad_norm"] > 1e-10
    assert 0 < result["features_merged_at"] < SUBLINEAR_MIN_ITERS
    fold, half, step, earlier, now = SUBLINEAR_REASON.fullmatch(result["stop_reason"]).groups()
    assert int(step) == result["iterations"] and int(half) == int(step) // 2
    assert SUBLINEAR_MIN_ITERS <= result["iterations"] <= 2 * SUBLINEAR_MIN_ITERS
    assert float(fold) < SUBLINEAR_FACTOR
    assert float(fold) == pytest.approx(float(earlier) / float(now), rel=2e-2)  # 3 digits each
    assert float(now) <= result["grad_norm"] * 1.01  # the smallest so far (to 3 digits), not the last


def first_firing(norms):
    """The step at which a fresh SublinearProgress first gives a reason, and the reason."""
    give_up = SublinearProgress()
    for step, norm in enumerate(norms):
        if (reason := give_up(step, norm)) is not None:
            return step, reason
    return None, None


def test_sublinear_progress_fires_on_a_slow_power_law():
    assert (SUBLINEAR_MIN_ITERS, SUBLINEAR_FACTOR) == (1500, 3.0)
    # 1/(k + 1): twice smaller per doubling of k, so it fires at the first step allowed.
    step, reason = first_firing(1 / (k + 1) for k in range(5000))
    assert step == 1500
    assert reason == (
        f"gradient norm decreasing sublinearly: its smallest value fell only {1501 / 751:.3g}-fold "
        f"from iteration 750 to 1500 ({1 / 751:.3g} to {1 / 1501:.3g}), less than the 3-fold of a "
        f"k^-1.58 decay"
    )
    # Halving each step up to step 1000, flat after: it fires at k = 1998, the first k
    # whose second half (from k/2 = 999) gained less than 3-fold (2-fold).
    step, _ = first_firing(0.5 ** min(k, 1000) for k in range(5000))
    assert step == 1998
    # A linear rate too slow to gain 3-fold in 750 steps, a decade per 1,600, fires too.
    step, reason = first_firing(0.999**k for k in range(5000))
    assert step == 1500 and f"fell only {0.999**-750:.3g}-fold" in reason


def test_sublinear_progress_spares_faster_decays_and_nonmonotone_spikes():
    # (k + 1)^-2 gains 4-fold per doubling; a decade per 1,000 steps, 5.6-fold in 750
    # steps and more later. Neither ever fires.
    assert first_firing((k + 1) ** -2.0 for k in range(20_000)) == (None, None)
    assert first_firing(0.1 ** (k / 1000) for k in range(20_000)) == (None, None)
    # The smallest norm so far is what counts: a nonmonotone descent's spikes do not.
    assert first_firing((1.0 if k % 7 == 0 else (k + 1) ** -2.0) for k in range(20_000)) == (None, None)


def test_sublinear_progress_spans_phases_and_keeps_its_verdict():
    give_up = SublinearProgress()
    assert give_up(0, 1.0) is None
    assert give_up(1, 0.5) is None
    assert give_up(1, 0.25) is None  # a phase that goes on from step 1 reports it again
    assert give_up.smallest == [1.0, 0.25]
    for step in range(2, 1501):
        reason = give_up(step, 0.25 if step <= 750 else 0.2)  # 1.25-fold from 750 to 1500
    assert reason is not None and "fell only 1.25-fold from iteration 750 to 1500" in reason
    assert give_up(1501, 1e-20) == reason  # a later phase stops at its start, for the same reason


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


def test_cross_entropy_keeps_digits_of_saturated_losses():
    # Label 0 wins by margins 40 and 45: p_0 rounds to 1 in float64, yet the loss, its
    # log and the label's gradient entry -(p_1 + p_2) must keep full relative precision.
    logits = torch.tensor([[0.0, -40.0, -45.0], [1.0, 3.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    # It works in place (the logits become the gradient), so it gets a copy.
    cross_entropy = objectives.CrossEntropy(logits.clone(), labels)
    losses, log_losses = cross_entropy.losses, cross_entropy.log_losses
    logit_grads = cross_entropy.weighted_gradient(0.0)

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


def test_cross_entropy_keeps_digits_below_the_float64_range():
    # Label 0 wins by margins 800 and 900 (logit scale 1000 allows them): the loss, about
    # e^-800, is below the smallest float64, yet its log, which the normalized objective
    # sums, and the gradient divided by the loss, which that objective takes, keep every
    # digit.
    logits = torch.tensor([[0.0, -800.0, -900.0]], dtype=torch.float64)
    cross_entropy = objectives.CrossEntropy(logits.clone(), torch.tensor([0]))
    log_odds = -800 + math.log1p(math.exp(-100))
    assert cross_entropy.log_losses[0].item() == pytest.approx(log_odds, rel=1e-15, abs=0)
    grads = cross_entropy.weighted_gradient(-cross_entropy.log_losses)
    odds = [1 / (1 + math.exp(-100)), math.exp(-100) / (1 + math.exp(-100))]
    assert grads[0].tolist() == pytest.approx([-1.0, *odds], rel=1e-14, abs=0)


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
        objective = objectives.normalized_objective(problem, labels)
    else:
        objective = objectives.regularized_objective(problem, labels)
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


def test_preconditioner_matches_its_dense_matrix():
    # P = D + c B B^T on the blocks (W, H, b), built densely, against the solver's
    # products with it; uneven classes exercise the n_k of its Woodbury inverse.
    K, d, labels = 3, 4, torch.tensor([0, 0, 1, 1, 1, 2])
    scales, coupling = [1.0, 2.5, 1.0], 0.7
    preconditioner = Preconditioner(scales, [Euclidean()] * 3, labels, K, coupling)
    shapes = [(K, d), (len(labels), d), (K,)]
    sizes = [math.prod(shape) for shape in shapes]
    diagonal = torch.cat(
        [torch.full((size,), scale, dtype=torch.float64) for scale, size in zip(scales, sizes)]
    )
    joint_to_blocks = torch.zeros(sum(sizes), K * d, dtype=torch.float64)  # B
    for k in range(K):
        for j in range(d):
            joint_to_blocks[k * d + j, k * d + j] = 1.0
            for i in torch.nonzero(labels == k).flatten().tolist():
                joint_to_blocks[sizes[0] + i * d + j, k * d + j] = 1.0
    dense = torch.diag(diagonal) + coupling * joint_to_blocks @ joint_to_blocks.T

    generator = torch.Generator().manual_seed(0)
    vector = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]
    flat = torch.cat([block.reshape(-1) for block in vector])
    quadratic_form = float(flat @ dense @ flat)
    [norm_sq] = host_floats(preconditioner.norm_sq(vector))
    assert norm_sq == pytest.approx(quadratic_form, rel=1e-13)
    inverse = float(flat @ torch.linalg.solve(dense, flat))
    [inverse_norm_sq] = host_floats(preconditioner.inverse_norm_sq(vector))
    assert inverse_norm_sq == pytest.approx(inverse, rel=1e-13)

    # Euclidean blocks, whose projection is the identity, give P g itself.
    directions = [torch.empty_like(block) for block in vector]
    dots = [torch.vdot(block.reshape(-1), block.reshape(-1)) for block in vector]
    slope = preconditioner.direction(vector, vector, dots, out=directions)
    torch.testing.assert_close(
        torch.cat([block.reshape(-1) for block in directions]), dense @ flat, rtol=1e-14, atol=0
    )
    assert host_floats(slope)[0] == pytest.approx(quadratic_form, rel=1e-13)
    # `apply`, the product alone (L-BFGS's initial inverse Hessian), is the same P g.
    applied = [torch.empty_like(block) for block in vector]
    preconditioner.apply(vector, vector, applied)
    torch.testing.assert_close(torch.cat([block.reshape(-1) for block in applied]), dense @ flat, rtol=1e-14, atol=0)

    # On spheres the direction is projected onto the tangent space; the slope stays.
    spheres = [RowSphere(), RowSphere(), Euclidean()]
    preconditioner = Preconditioner(scales, spheres, labels, K, coupling)
    point = [spheres[b].random(shapes[b], generator) for b in range(2)] + [vector[2]]
    grads = [spheres[b].project(point[b], vector[b].clone()) for b in range(3)]
    dots = [torch.vdot(grad.reshape(-1), grad.reshape(-1)) for grad in grads]
    slope = preconditioner.direction(point, grads, dots, out=directions)
    for block, direction in zip(point[:2], directions[:2]):
        assert row_dots(block, direction).abs().max() < 1e-14
    flat_grads = torch.cat([grad.reshape(-1) for grad in grads])
    assert host_floats(slope)[0] == pytest.approx(
        float(flat_grads @ dense @ flat_grads), rel=1e-13
    )


def test_small_problems_run_on_one_thread_and_restore_the_setting():
    seen = []
    torch.set_num_threads(2)
    record = lambda step, row: seen.append(torch.get_num_threads())  # noqa: E731
    solve(UFMProblem(10, 32, 5, "normalized", max_iters=2), on_checkpoint=record)
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    # From N d K = 2^20 multiply-adds per product on, torch's setting stands.
    seen.clear()
    solve(UFMProblem(64, 64, 4, "normalized", max_iters=2), on_checkpoint=record)
    assert seen and set(seen) == {2} and torch.get_num_threads() == 2


def test_saturated_scale_goes_on_after_the_gradient_of_the_loss_vanishes():
    # At logit scale 30 the loss saturates near 1e-13: the gradient of L itself,
    # L ||grad log L||, drops below 1e-10 while the classifier is still far from an ETF,
    # which is where a solver on L stops (pymanopt does; bench/ufm.py). Ours goes on.
    rows = {}
    problem = UFMProblem(10, 32, 5, "normalized", logit_scale=30.0, checkpoint_every=1)
    result = solve(problem, on_checkpoint=rows.__setitem__)
    vanished = next(step for step, row in rows.items() if row["loss"] * row["grad_norm"] <= 1e-10)
    assert rows[vanished]["nc2_etf_w"] > 1e-3
    assert_reaches_collapsed_optimum(result)
    assert result["nc2_etf_w"] <= 1e-6


def test_small_scale_goes_on_until_collapsed():
    # At small logit scales, log L hardly depends on how the classifier rows are arranged:
    # this run passes the gradient test with nc2_etf_w ~8e-6, so the solver demands a
    # smaller gradient there and reports convergence only once the metrics are collapsed.
    rows = {}
    problem = UFMProblem(100, 128, 20, "normalized", logit_scale=0.2, seed=3, checkpoint_every=1)
    result = solve(problem, on_checkpoint=rows.__setitem__)
    assert any(row["grad_norm"] <= 1e-10 and row["nc2_etf_w"] > 1e-6 for row in rows.values())
    assert_reaches_collapsed_optimum(result)


def test_converged_only_when_collapsed():
    # Cut off early at a saturating scale: not converged, and the metrics agree.
    result = solve(UFMProblem(10, 32, 5, "normalized", logit_scale=30.0, max_iters=15))
    assert result["converged"] is False and result["nc2_etf_w"] > 1e-6
    assert result["iterations"] == 15
    assert result["stop_reason"] == f"iteration budget spent: gradient norm {result['grad_norm']:.3g} > tol 1e-10"


def test_restarts_on_a_benign_landscape_all_find_the_optimum():
    problem = UFMProblem(6, 8, 3, "normalized", logit_scale=10.0, restarts=4, seed=3)
    result = solve(problem)
    assert_reaches_collapsed_optimum(result)
    assert result["restarts"] == 4 and result["global_optimum_fraction"] == 1.0
    assert result["final_loss_min"] == result["loss"] <= result["final_loss_max"]
    assert result["final_loss_max"] - result["final_loss_min"] <= 1e-8
    assert 0 <= result["final_loss_std"] <= 1e-8
    assert solve(problem) == result  # restart seeds derive deterministically from `seed`


def test_one_restart_is_the_plain_seeded_solve():
    result = solve(UFMProblem(5, 6, 3, "normalized", seed=7))
    assert result["restarts"] == 1 and result["global_optimum_fraction"] == 1.0
    assert result["final_loss_min"] == result["final_loss_max"] == result["loss"]
    assert result["final_loss_std"] == 0.0
    restarted = solve(UFMProblem(5, 6, 3, "normalized", seed=7, restarts=3))
    assert restarted["final_loss_min"] <= result["loss"]  # the first restart is this run


SPURIOUS = UFMProblem(3, 2, 5, "normalized", logit_scale=20.0, restarts=8, max_iters=400)


def test_restarts_find_spurious_minima_on_the_circle():
    # K = 3 on the circle at a large logit scale: some starts end in a spurious local
    # minimum (docs/solver.md); the probe reports how many, and keeps the best run.
    result = solve(SPURIOUS)
    assert 0 < result["global_optimum_fraction"] < 1
    assert result["final_loss_max"] - result["final_loss_min"] > 0.1
    assert result["final_loss_std"] > 0.01
    assert abs(result["optimality_gap"]) <= 1e-8 and result["converged"]
    assert result["final_loss_min"] == result["loss"]


def test_restart_history_is_the_best_runs_trajectory():
    rows = []
    problem = dataclasses.replace(SPURIOUS, checkpoint_every=10)
    result = solve(problem, on_checkpoint=lambda step, row: rows.append((step, row)))
    steps = [step for step, _ in rows]
    # The spurious runs used all 400 iterations; the best converged sooner, and only its
    # rows arrive, in order, ending with the result.
    assert steps == sorted(set(steps)) and steps[0] == 0
    assert steps[-1] == result["iterations"] < problem.max_iters
    assert rows[-1][1] == {key: result[key] for key in rows[-1][1]}


def test_should_stop_is_polled_every_iteration_of_every_restart():
    first_run = solve(UFMProblem(4, 3, 5, "normalized"))["iterations"]
    polls = []

    def should_stop():
        polls.append(None)
        return len(polls) == first_run + 2  # the second iteration of the second run

    with pytest.raises(Stopped, match="iteration 1 of restart 1"):
        solve(UFMProblem(4, 3, 5, "normalized", restarts=3), should_stop=should_stop)


@pytest.mark.parametrize("tol", [1e-10, 1e-300])  # runs that converge early, or use it all
def test_progress_is_monotone_cheap_and_ends_at_one(tol):
    fractions = []
    problem = UFMProblem(4, 3, 5, "normalized", restarts=3, max_iters=400, tol=tol)
    solve(problem, on_progress=fractions.append)
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert len(fractions) <= 102  # about once per percent of the 1200-iteration budget
    assert any(1 / 3 <= fraction < 2 / 3 for fraction in fractions)  # counts across restarts


@pytest.mark.parametrize("normalization", ["normalized", "regularized"])
def test_imbalanced_classes_use_the_mean_of_class_means(monkeypatch, normalization):
    captured = capture_classifier(monkeypatch)
    counts = [8, 4, 2, 1, 1]
    result = solve(UFMProblem(5, 8, counts, normalization, logit_scale=10.0))
    assert result["optimal_loss"] is None and result["optimality_gap"] is None
    assert result["global_optimum_fraction"] is None and result["has_closed_form"] is False
    assert result["converged"] and result["nc1"] < 1e-6

    features, labels = captured["features"], captured["labels"]
    assert torch.bincount(labels).tolist() == counts
    means = torch.stack([features[labels == k].mean(dim=0) for k in range(5)])
    etf = (torch.eye(5, dtype=torch.float64) - 1 / 5) / 2  # E with sqrt(K - 1) = 2

    def etf_distance(centre):
        gram = (means - centre) @ (means - centre).T
        return float((gram / gram.norm() - etf).norm())

    # docs/metrics.md: mu_G is the mean of the class means, not of the samples, which the
    # majority class would pull towards itself.
    assert result["nc2_etf_m"] == pytest.approx(etf_distance(means.mean(dim=0)), rel=1e-9)
    assert abs(result["nc2_etf_m"] - etf_distance(features.mean(dim=0))) > 1e-2


def test_class_coupling_changes_the_path_not_the_answer(monkeypatch):
    # Imbalanced counts (1 to 30) over 40 classes, where the preconditioner couples each
    # classifier row with its class's features: the same collapsed critical point as
    # without the coupling, in fewer iterations (44 against 57 when measured).
    counts = [1 + (7 * k) % 30 for k in range(40)]
    problem = UFMProblem(40, 64, counts, "normalized", logit_scale=10.0)
    assert class_coupling(problem) == 0.5
    coupled = solve(problem)
    monkeypatch.setattr(formulation_module, "class_coupling", lambda problem: 0.0)
    uncoupled = solve(problem)
    for result in (coupled, uncoupled):
        assert result["converged"] and result["grad_norm"] <= 1e-10 and result["nc1"] <= 1e-12
    assert coupled["iterations"] < uncoupled["iterations"]
    assert coupled["features_merged_at"] is not None  # N d K = 1.6e6: the merged path too
    assert coupled["loss"] == pytest.approx(uncoupled["loss"], rel=1e-12, abs=0)
    assert coupled["w_min_angle_deg"] == pytest.approx(uncoupled["w_min_angle_deg"], abs=1e-6)


def iterates(formulation, start, stopping):
    """Every iterate of a descent, the last one included."""
    reported = []
    result = minimize(formulation, start, stopping, on_iterate=reported.append)
    return [*reported, result.last]


def test_merged_descent_takes_the_full_descents_steps_from_a_collapsed_point():
    # Imbalanced counts, a bias and the class coupling (K = 30): from a point whose
    # features sit on one row per class, the merged formulation (one weighted row per
    # class) yields the full formulation's iterates, values and gradient norms.
    K, d, counts = 30, 12, [1 + (7 * k) % 5 for k in range(30)]
    problem = UFMProblem(K, d, counts, "normalized", logit_scale=10.0, bias=True)
    assert class_coupling(problem) == 0.5
    counts = torch.tensor(counts)
    classes = torch.arange(K)
    labels = classes.repeat_interleave(counts)
    full = formulate(problem, labels)
    merged = formulate(problem, classes, row_weights=counts.double(), sample_rows=labels)
    generator = torch.Generator().manual_seed(0)
    classifier, rows = (RowSphere().random((K, d), generator) for _ in range(2))
    bias = 0.1 * torch.randn(K, generator=generator, dtype=torch.float64)

    full_run = iterates(full, [classifier, rows[labels], bias], StoppingRules(1e-10, max_iters=12))
    merged_run = iterates(merged, [classifier, rows, bias], StoppingRules(1e-10, max_iters=12))
    steps = 0
    for ours, theirs in zip(full_run, merged_run, strict=True):
        assert ours.step == theirs.step
        assert ours.value == pytest.approx(theirs.value, rel=1e-12, abs=0)
        assert ours.grad_norm == pytest.approx(theirs.grad_norm, rel=1e-9)
        for block, merged_block in zip(ours.point, merged.expand(theirs.point)):
            torch.testing.assert_close(block, merged_block, rtol=0, atol=1e-11)
        steps += 1
    assert steps == 13  # the start and 12 steps, none of them backtracked to a stall


@pytest.mark.parametrize("bias", [False, True])
def test_features_merge_once_collapsed_and_the_answer_is_certified_on_the_full_problem(
    monkeypatch, bias
):
    # N d K = 1000 * 64 * 50 = 3.2e6 multiply-adds per product: enough to merge.
    rows = {}
    problem = UFMProblem(50, 64, 20, "normalized", logit_scale=10.0, bias=bias, checkpoint_every=1)
    merged = solve(problem, on_checkpoint=rows.__setitem__)
    assert_reaches_collapsed_optimum(merged)
    step = merged["features_merged_at"]
    assert 0 < step < merged["iterations"]
    # Before the merge, the descent's own collapse; from it on, copies of one row per class.
    assert rows[step - 1]["nc1"] > 1e-20
    assert all(rows[later]["nc1"] < 1e-28 for later in range(step, merged["iterations"] + 1))

    monkeypatch.setattr(merging, "SMALL_WORK", math.inf)  # never merge
    plain = solve(problem)
    assert plain["features_merged_at"] is None
    assert_reaches_collapsed_optimum(plain)
    assert merged["loss"] == pytest.approx(plain["loss"], rel=1e-13, abs=0)


def test_full_descent_goes_on_where_the_merged_end_point_fails_its_certificate(monkeypatch):
    # Spread the features again as the merged end point is expanded (without checkpoints,
    # the only expansion of a merged point): the full problem's first evaluation then
    # refuses it, and the full descent carries on to the optimum.
    expand = Formulation.expand

    def spread_out(self, point):
        if self.sample_rows is None:
            return point
        point = expand(self, point)
        noise = 1e-3 * torch.randn(point[1].shape, generator=torch.Generator().manual_seed(0))
        features = point[1] + noise.to(torch.float64)
        return [point[0], features / features.norm(dim=1, keepdim=True), *point[2:]]

    phases = []

    def counting_minimize(formulation, *args, on_iterate, **kwargs):
        phases.append([formulation.sample_rows is not None, 0])

        def count(iterate):
            phases[-1][1] += 1
            on_iterate(iterate)

        result = minimize(formulation, *args, on_iterate=count, **kwargs)
        phases[-1][1] += 1  # the last iterate
        return result

    monkeypatch.setattr(Formulation, "expand", spread_out)
    monkeypatch.setattr(merging, "minimize", counting_minimize)
    result = solve(UFMProblem(50, 64, 20, "normalized", logit_scale=10.0))
    assert_reaches_collapsed_optimum(result)
    assert [merged for merged, _ in phases] == [False, True, False]
    assert phases[2][1] > 5  # more than the start: the descent went on
    assert result["iterations"] == sum(count - 1 for _, count in phases)


def test_equal_counts_in_a_list_are_the_balanced_problem():
    listed = UFMProblem(4, 3, [5, 5, 5, 5], "normalized", logit_scale=5.0)
    plain = UFMProblem(4, 3, 5, "normalized", logit_scale=5.0)
    assert listed == plain and listed.n_per_class == 5
    assert solve(listed) == solve(plain)
    assert optimal_loss(listed) == optimal_loss(plain)


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
    assert result["stop_reason"].startswith("iteration budget spent: gradient norm ")
    expected = set(MEAN_KEYS) | set(CLASSIFIER_KEYS) | ROW_KEYS | {"cross_entropy"}
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
    assert set(rows[0]) == set(MEAN_KEYS) | set(CLASSIFIER_KEYS) | ROW_KEYS
    assert result["iterations"] == 0 and result["converged"] is False


def test_non_finite_objective_raises_diverged(monkeypatch):
    regularized_objective = objectives.regularized_objective

    def poisoned_after_three_calls(problem, labels):
        evaluate, calls = regularized_objective(problem, labels), []

        def poisoned(point):
            calls.append(None)
            value, grads = evaluate(point)
            return (value * math.nan if len(calls) > 3 else value), grads

        return poisoned

    monkeypatch.setattr(formulation_module, "regularized_objective", poisoned_after_three_calls)
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
    with pytest.raises(ValueError, match="one count per class"):
        UFMProblem(3, 3, [5, 5], "normalized")
    with pytest.raises(ValueError, match="counts must be >= 1"):
        UFMProblem(3, 3, [5, 0, 5], "normalized")
    with pytest.raises(TypeError):
        UFMProblem(3, 3, [5, 2.5, 5], "normalized")
    with pytest.raises(ValueError, match="restarts"):
        UFMProblem(3, 3, 5, "normalized", restarts=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("K, d, n", [(10, 16, 5), (32, 64, 16)])  # the second one merges
def test_cuda_matches_cpu(K, d, n):
    problem = UFMProblem(K, d, n, "normalized", logit_scale=10.0)
    on_gpu, on_cpu = solve(problem, device="cuda"), solve(problem)
    assert_reaches_collapsed_optimum(on_gpu)
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], rel=1e-9, abs=0)
    assert (on_gpu["features_merged_at"] is None) == (on_cpu["features_merged_at"] is None)


def test_a_decay_beyond_float_range_fails_as_diverged_not_as_a_crash():
    """A start slope so steep that 1/sqrt(slope) is below every step the line search tries
    (lambda_w = 1e308, more than the API takes): the search still tries its smallest step,
    and the run fails saying why."""
    problem = UFMProblem(num_classes=2, dim=2, n_per_class=1, max_iters=5, normalization="regularized",
                         lambda_w=1e308)
    with pytest.raises(Diverged, match="objective is not finite at any step size at iteration 1"):
        ufm.solve(problem)
