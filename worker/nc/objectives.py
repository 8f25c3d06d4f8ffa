"""The UFM objectives: value and closed-form gradient, in float64.

Each objective is a function of the point [W, H] or [W, H, b] that returns the value
and the Euclidean gradient of every block; `value_and_riemannian_grad` turns the latter
into the gradient on the blocks' manifolds. Computing the gradient in closed form takes
three matrix products of the N x d features with the K x d classifier per evaluation,
and one reused N x K buffer holds the logits and then their gradient.
"""

import math
from collections.abc import Callable, Sequence

import torch

from worker.nc.manifolds import Manifold, Point
from worker.nc.ufm_problem import UFMProblem

# The objective at a point: its value as a 0-dim tensor, and the Euclidean gradient of
# every block, in fresh arrays that the caller may overwrite.
Objective = Callable[[Point], tuple[torch.Tensor, list[torch.Tensor]]]

# The Euclidean Hessian of an objective at a point: the map v -> D^2 f(x)[v], on blocks
# shaped like the point, into fresh arrays.
HessianAt = Callable[[Point], Callable[[list[torch.Tensor]], list[torch.Tensor]]]

# Below this log-odds, e^a (and with it CE = softplus(a)) would leave the normal range of
# float64; the losses are floored there and their logs continued as a.
_SMALLEST_LOG_ODDS = -700.0


class CrossEntropy:
    """Per-sample losses, their logs, and weighted dCE_i/dz_i = p_i - e_{y_i}, all without
    cancellation.

    With a_i = logsumexp_{k != y_i}(z_k - z_{y_i}): CE_i = softplus(a_i), and for k != y_i
    p_k = exp(z_k - z_{y_i} - CE_i). The label's entry is -(sum_{k != y} p_k) =
    -exp(a_i - CE_i), never 1 - p_y, which would round to zero long before the loss does.
    log CE_i = log softplus(a_i) keeps its digits down to a = -700, and is a_i below, where
    CE_i = e^{a_i} to all digits.

    Works in place: the logits buffer is overwritten, and in the end holds the gradient,
    so that an evaluation allocates no N x K array beyond the one its objective keeps.
    """

    def __init__(self, logits: torch.Tensor, labels: torch.Tensor):
        self.label_index = labels[:, None]
        margins = logits.sub_(logits.gather(1, self.label_index))  # z_k - z_y
        margins.scatter_(1, self.label_index, -math.inf)  # leaves the wrong classes only
        self.top = margins.amax(dim=1)  # finite: K >= 2 leaves a wrong class
        # exp(z_k - z_y - top), 0 in the label's entry
        self.shifted_exps = margins.sub_(self.top[:, None]).exp_()
        self.log_odds = self.top + torch.log(self.shifted_exps.sum(dim=1))
        floored = self.log_odds.clamp(min=_SMALLEST_LOG_ODDS)
        self.losses = torch.nn.functional.softplus(floored, threshold=30.0)
        self.log_losses = torch.log(self.losses).add_(self.log_odds - floored)

    def weighted_gradient(self, log_weight: float | torch.Tensor) -> torch.Tensor:
        """e^log_weight dCE_i/dz_i for every sample (log_weight: one number, or one per
        sample), in the logits buffer.

        The weight goes into the exponents, sparing a pass over the N x K array.
        """
        shift = log_weight - self.losses
        grads = self.shifted_exps.mul_(torch.exp(self.top + shift)[:, None])
        label_entries = torch.exp(self.log_odds + shift).neg_()
        return grads.scatter_(1, self.label_index, label_entries[:, None])


def normalized_objective(
    problem: UFMProblem, labels: torch.Tensor, row_weights: torch.Tensor | None = None
) -> Objective:
    """f = log L with L the mean cross-entropy of logits s <w_k, h_i> (+ b_k), the loss
    of Yaras et al. (2022), and its gradient.

    With `row_weights`, feature row j stands for m_j samples: it counts m_j times in L.

    log L has the critical points of L, but its gradient grad L / L stays O(1) while L
    itself saturates towards ~exp(-s K/(K-1)) at large logit scales, and its Hessian at
    the optimum is well scaled. This is what keeps the solver going at logit scale 30,
    where the loss is ~1e-13 and the gradient of L itself falls below any sensible
    tolerance long before the classifier is an ETF.
    """
    scale = problem.logit_scale
    log_loss = _log_mean_cross_entropy(problem, labels, row_weights)
    logits = _logits_buffer(problem, labels)

    def evaluate(point: Point) -> tuple[torch.Tensor, list[torch.Tensor]]:
        classifier, features = point[0], point[1]
        # The scale goes on the smaller operand, here and in the gradient below, sparing
        # passes over the N x K and N x d arrays.
        torch.mm(features, (scale * classifier).T, out=logits)
        if problem.bias:
            logits.add_(point[2])
        value, scaled_grads = log_loss(logits)
        grads = [scaled_grads.T @ features, scaled_grads @ classifier]
        if problem.bias:
            grads.append(scaled_grads.sum(dim=0) / scale)
        return value, grads

    return evaluate


def tied_normalized_objective(problem: UFMProblem, row_weights: torch.Tensor) -> Objective:
    """`normalized_objective` of the merged problem (one feature row per class, row k
    standing for row_weights[k] samples) at points [W, W, (b)], as a function of the
    point [W, (b)]: each class's feature row tied to its classifier row.

    The logits are s W W^T (+ b), and by the chain rule the gradient along W is the sum
    of the merged gradient's two blocks, (G^T + G) W for G = s d log L / dz: two matrix
    products an evaluation, where the merged objective takes three.
    """
    scale = problem.logit_scale
    classes = torch.arange(problem.num_classes, device=row_weights.device)
    log_loss = _log_mean_cross_entropy(problem, classes, row_weights)
    logits = _logits_buffer(problem, classes)
    symmetrized = torch.empty_like(logits)

    def evaluate(point: Point) -> tuple[torch.Tensor, list[torch.Tensor]]:
        classifier = point[0]
        torch.mm(classifier, (scale * classifier).T, out=logits)
        if problem.bias:
            logits.add_(point[1])
        value, scaled_grads = log_loss(logits)
        grads = [torch.mm(torch.add(scaled_grads, scaled_grads.T, out=symmetrized), classifier)]
        if problem.bias:
            grads.append(scaled_grads.sum(dim=0) / scale)
        return value, grads

    return evaluate


def _log_mean_cross_entropy(
    problem: UFMProblem, labels: torch.Tensor, row_weights: torch.Tensor | None
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """log L for the logits s <w_k, h_i> (+ b_k) of feature rows of class labels[i], row i
    standing for row_weights[i] samples, and s d log L / dz, written over the logits."""
    log_scale = math.log(problem.logit_scale)
    log_num_samples = math.log(problem.num_samples)
    log_weights = None if row_weights is None else torch.log(row_weights)

    def log_loss(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cross_entropy = CrossEntropy(logits, labels)
        log_losses = cross_entropy.log_losses  # of each row's share of N L
        if log_weights is not None:
            log_losses = log_losses + log_weights
        log_total = torch.logsumexp(log_losses, dim=0)  # log(N L)
        log_grad_weights = log_scale - log_total
        if log_weights is not None:
            log_grad_weights = log_grad_weights + log_weights
        return log_total - log_num_samples, cross_entropy.weighted_gradient(log_grad_weights)

    return log_loss


def regularized_objective(problem: UFMProblem, labels: torch.Tensor) -> Objective:
    """The mean cross-entropy of logits W h_i (+ b) plus weight decay (lambda / 2) ||.||^2
    on W, H and b, the objective of Zhu et al. (2021), and its gradient."""
    decays = [problem.lambda_w, problem.lambda_h] + [problem.lambda_b] * problem.bias
    log_num_samples = math.log(problem.num_samples)
    logits = _logits_buffer(problem, labels)

    def evaluate(point: Point) -> tuple[torch.Tensor, list[torch.Tensor]]:
        classifier, features = point[0], point[1]
        torch.mm(features, classifier.T, out=logits)
        if problem.bias:
            logits.add_(point[2])
        cross_entropy = CrossEntropy(logits, labels)
        losses = cross_entropy.losses
        logit_grads = cross_entropy.weighted_gradient(-log_num_samples)  # d(mean CE)/dz
        grads = [logit_grads.T @ features, logit_grads @ classifier]
        if problem.bias:
            grads.append(logit_grads.sum(dim=0))
        value = losses.mean()
        for decay, block, grad in zip(decays, point, grads):
            value = value + decay / 2 * torch.vdot(block.reshape(-1), block.reshape(-1))
            grad.add_(block, alpha=decay)
        return value, grads

    return evaluate


def normalized_hessian(problem: UFMProblem, labels: torch.Tensor, row_weights: torch.Tensor | None = None) -> HessianAt:
    """The Hessian of `normalized_objective` (the same `row_weights`), in closed form.

    With Q = d log L / dz (z the logits), the Hessian of log L along a logit direction
    dz is (m_i / T)(diag p_i - p_i p_i^T) dz_i - Q <Q, dz>, T = sum_i m_i CE_i; the
    second term is the curvature of the log.
    """
    return _cross_entropy_hessian(problem, labels, row_weights, scale=problem.logit_scale, of_log=True, decays=None)


def regularized_hessian(problem: UFMProblem, labels: torch.Tensor) -> HessianAt:
    """The Hessian of `regularized_objective`: that of the mean cross-entropy plus lambda I
    on each block."""
    decays = [problem.lambda_w, problem.lambda_h] + [problem.lambda_b] * problem.bias
    return _cross_entropy_hessian(problem, labels, None, scale=1.0, of_log=False, decays=decays)


def _cross_entropy_hessian(
    problem: UFMProblem,
    labels: torch.Tensor,
    row_weights: torch.Tensor | None,
    *,
    scale: float,
    of_log: bool,
    decays: list[float] | None,
) -> HessianAt:
    """The Hessian of the (log of the) weighted mean cross-entropy of logits
    scale <w_k, h_i> (+ b_k), plus decays[b] I on block b where given.

    The softmax Hessian diag(p) - p p^T is applied to margins dz_k - dz_y, which it does
    not tell from dz: the label's entry is then -p_y <p, dz'>, with no 1 - p_y formed, so
    saturated losses keep their digits here as they do in `CrossEntropy`.
    """
    log_num_samples = math.log(problem.num_samples)
    log_weights = None if row_weights is None else torch.log(row_weights)
    label_index = labels[:, None]

    def at(point: Point) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
        classifier, features = point[0], point[1]
        logits = torch.mm(features, (scale * classifier).T)
        if problem.bias:
            logits.add_(point[2])
        cross_entropy = CrossEntropy(logits, labels)
        label_probs = torch.exp(-cross_entropy.losses)
        if of_log:
            log_losses = cross_entropy.log_losses
            if log_weights is not None:
                log_losses = log_losses + log_weights
            log_row_weights = -torch.logsumexp(log_losses, dim=0)  # 1 / T
            if log_weights is not None:
                log_row_weights = log_row_weights + log_weights
        else:
            log_row_weights = torch.full_like(cross_entropy.losses, -log_num_samples)
        # row i of `weighted`: (m_i / T)(p_i - e_{y_i}); `off_label`: its wrong classes only
        weighted = cross_entropy.weighted_gradient(log_row_weights).clone()
        off_label = weighted.scatter(1, label_index, 0.0)
        inverse_row_weights = torch.exp(-log_row_weights)

        def hvp(vector: list[torch.Tensor]) -> list[torch.Tensor]:
            direction_w, direction_h = vector[0], vector[1]
            logit_change = torch.mm(direction_h, classifier.T).add_(torch.mm(features, direction_w.T)).mul_(scale)
            if problem.bias:
                logit_change.add_(vector[2])
            margins = logit_change.sub_(logit_change.gather(1, label_index))  # dz' = dz - dz_y
            weighted_mean = (off_label * margins).sum(dim=1)  # (m_i / T) <p_i, dz'_i>
            mean = weighted_mean * inverse_row_weights
            change = off_label * margins.sub_(mean[:, None])
            change.scatter_(1, label_index, (-label_probs * weighted_mean)[:, None])
            if of_log:  # <Q, dz> = <Q, dz'>: each row of Q sums to zero
                change.sub_(weighted * weighted_mean.sum())
            grads = [
                (change.T @ features).add_(weighted.T @ direction_h).mul_(scale),
                (change @ classifier).add_(weighted @ direction_w).mul_(scale),
            ]
            if problem.bias:
                grads.append(change.sum(dim=0))
            if decays is not None:
                for grad, decay, block in zip(grads, decays, vector):
                    grad.add_(block, alpha=decay)
            return grads

        return hvp

    return at


class SquaredError:
    """l_i = ||z_i - e_{y_i}||^2 / 2, the squared error against the one-hot target (Zhou
    et al., ICML 2022): gradient z_i - e_{y_i}, Hessian the identity."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        self.targets = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)

    def losses(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits - self.targets).square_().sum(dim=1) / 2

    def gradients(self, logits: torch.Tensor) -> torch.Tensor:
        return logits - self.targets

    def curvature(self, logits: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda logit_change: logit_change


class SmoothedCrossEntropy:
    """The cross-entropy against the targets q_i = (1 - eps) e_{y_i} + eps/K, as PyTorch's
    `label_smoothing` (Szegedy et al. 2016; its collapse: Guo et al. 2024):
    l_i = logsumexp(z_i) - <q_i, z_i>, gradient p_i - q_i, Hessian diag(p_i) - p_i p_i^T.

    Its minimum over z_i is the entropy of q_i > 0, at finite logits: it never saturates
    the way the plain cross-entropy does, so it needs none of `CrossEntropy`'s care.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, smoothing: float):
        one_hot = torch.nn.functional.one_hot(labels, num_classes).to(torch.float64)
        self.targets = one_hot * (1 - smoothing) + smoothing / num_classes

    def losses(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logits, dim=1) - (self.targets * logits).sum(dim=1)

    def gradients(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1) - self.targets

    def curvature(self, logits: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        probs = torch.softmax(logits, dim=1)
        return lambda logit_change: probs * (logit_change - (probs * logit_change).sum(dim=1, keepdim=True))


SmoothLoss = SquaredError | SmoothedCrossEntropy


def smooth_loss(problem: UFMProblem, labels: torch.Tensor) -> SmoothLoss:
    """The per-sample loss of `problem.loss`, for every loss but the cross-entropy (`CrossEntropy`)."""
    if problem.loss == "mse":
        return SquaredError(labels, problem.num_classes)
    assert problem.label_smoothing is not None, "UFMProblem requires it with loss 'label_smoothing'"
    return SmoothedCrossEntropy(labels, problem.num_classes, problem.label_smoothing)


def smooth_loss_objective(
    problem: UFMProblem, labels: torch.Tensor, row_weights: torch.Tensor | None = None
) -> tuple[Objective, HessianAt]:
    """The weighted mean of `smooth_loss` over the logits s <w_k, h_i> (+ b_k) (s the
    logit scale when normalized, 1 when regularized), plus the weight decays when
    regularized; its gradient and Hessian in closed form.

    Normalized problems minimize the mean loss L itself, not log L as the cross-entropy
    does: log L is there for a loss that saturates towards 0, and these do not (the
    smoothed one is bounded below by the entropy of its targets), while the squared
    error can reach 0 exactly (d >= K + 1, logit scale >= 1), where log L has no minimum.
    """
    loss = smooth_loss(problem, labels)
    scale = problem.logit_scale if problem.normalization == "normalized" else 1.0
    decays = problem.decays if problem.normalization == "regularized" else [0.0] * (2 + problem.bias)
    sample_weights = torch.full_like(labels, 1.0, dtype=torch.float64) if row_weights is None else row_weights
    sample_weights = (sample_weights / problem.num_samples)[:, None]

    def through_logits(logit_grads: torch.Tensor, point: Point) -> list[torch.Tensor]:
        """The gradient of the blocks from that of the logits."""
        grads = [logit_grads.T @ point[1] * scale, logit_grads @ point[0] * scale]
        if problem.bias:
            grads.append(logit_grads.sum(dim=0))
        return grads

    def evaluate(point: Point) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = _smooth_loss_logits(problem, point)
        value = (loss.losses(logits) * sample_weights[:, 0]).sum()
        grads = through_logits(loss.gradients(logits) * sample_weights, point)
        for decay, block, grad in zip(decays, point, grads):
            value = value + decay / 2 * torch.vdot(block.reshape(-1), block.reshape(-1))
            grad.add_(block, alpha=decay)
        return value, grads

    def hessian_at(point: Point) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
        logits = _smooth_loss_logits(problem, point)
        logit_grads = loss.gradients(logits) * sample_weights
        curvature = loss.curvature(logits)

        def hvp(vector: list[torch.Tensor]) -> list[torch.Tensor]:
            direction_w, direction_h = vector[0], vector[1]
            logit_change = torch.mm(direction_h, point[0].T).add_(torch.mm(point[1], direction_w.T)).mul_(scale)
            if problem.bias:
                logit_change.add_(vector[2])
            grads = through_logits(curvature(logit_change) * sample_weights, point)
            # the logits are bilinear in W and H: their second derivative couples the two blocks
            grads[0].add_(logit_grads.T @ direction_h, alpha=scale)
            grads[1].add_(logit_grads @ direction_w, alpha=scale)
            for grad, decay, block in zip(grads, decays, vector):
                grad.add_(block, alpha=decay)
            return grads

        return hvp

    return evaluate, hessian_at


def mean_smooth_loss(problem: UFMProblem, labels: torch.Tensor, point: Point) -> float:
    """The mean of `smooth_loss` over the samples of `point` (one feature row each)."""
    return float(smooth_loss(problem, labels).losses(_smooth_loss_logits(problem, point)).mean())


def _smooth_loss_logits(problem: UFMProblem, point: Point) -> torch.Tensor:
    """s <w_k, h_i> (+ b_k): s the logit scale when normalized, 1 when regularized."""
    scale = problem.logit_scale if problem.normalization == "normalized" else 1.0
    logits = torch.mm(point[1], (scale * point[0]).T)
    return logits.add_(point[2]) if problem.bias else logits


def _logits_buffer(problem: UFMProblem, labels: torch.Tensor) -> torch.Tensor:
    """The rows x K array that every evaluation overwrites with the logits and their
    gradient.

    Allocated once: on the CPU a fresh array of this size per evaluation costs page
    faults comparable to the matrix products themselves at K = 1000.
    """
    shape = (labels.shape[0], problem.num_classes)
    return torch.empty(shape, dtype=torch.float64, device=labels.device)


def value_and_riemannian_grad(
    objective: Objective, manifolds: Sequence[Manifold], point: Point
) -> tuple[float, list[torch.Tensor]]:
    """The objective at `point` as a host float, and its gradient in the manifolds' metric."""
    value, euclidean_grads = objective(point)
    grads = [
        manifold.euclidean_to_riemannian_gradient(block, grad)
        for manifold, block, grad in zip(manifolds, point, euclidean_grads)
    ]
    return float(value), grads


def riemannian_hessian(
    objective: Objective,
    hessian: HessianAt,
    manifolds: Sequence[Manifold],
    point: Point,
    euclidean_grads: list[torch.Tensor] | None = None,
) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """The Riemannian Hessian at `point`, as the map of tangent vectors v -> Hess f(x)[v].

    `euclidean_grads`: the objective's Euclidean gradient at `point`, where the caller has
    it (the manifolds' curvature terms need it); evaluated otherwise."""
    if euclidean_grads is None:
        _, euclidean_grads = objective(point)
    euclidean_hvp = hessian(point)

    def hvp(vector: list[torch.Tensor]) -> list[torch.Tensor]:
        return [
            manifold.euclidean_to_riemannian_hessian(block, grad, product, tangent)
            for manifold, block, grad, product, tangent in zip(
                manifolds, point, euclidean_grads, euclidean_hvp(vector), vector
            )
        ]

    return hvp
