"""Solvers for the unconstrained feature model (UFM).

The UFM treats the last-layer features H (N x d) as free variables next to the classifier
W (K x d) and bias b, with N = K n samples, n per class, and minimizes the mean
cross-entropy of the logits. Two variants, as in DESIGN.md:

- "normalized" (Yaras et al., NeurIPS 2022, "Neural collapse with normalized features: a
  geometric analysis over the Riemannian manifold"): every w_k and h_i on the unit sphere,
  logits s <w_k, h_i> (+ b_k). When a simplex ETF fits (K <= d + 1) the global minimizers
  are ETFs with h_i = w_{y_i}, and the paper shows every other critical point is a strict
  saddle, so a first-order Riemannian method from a random start reaches the optimum.
- "regularized" (Zhu et al., NeurIPS 2021, "A geometric analysis of neural collapse with
  unconstrained features"): unconstrained W, H, b with weight decay; the paper proves the
  same kind of benign landscape, with the closed-form optimum given in `optimal_loss`.

Two regimes reach a point other than a collapsed ETF, by the mathematics rather than
the solver. On the circle (normalized, d = 2, K = 3) we observe spurious local minima at
large logit scales, so some random starts converge with a positive optimality gap; we
saw none for d >= 3. In the regularized regime K s >= 1 the
optimum is W = H = 0, where every NC metric is 0/0: the iterates approach it along the
slowest eigenspace of the Hessian at the origin, which holds every class-constant H with
centred class means proportional to W, not just ETFs, so the metrics of the final tiny
iterate depend on the start. There the loss (-> ln K) is what carries meaning.

Both are solved by Riemannian gradient descent with Barzilai-Borwein step sizes and a
nonmonotone Armijo line search (Zhang & Hager 2004), a method that needs no hand-tuned
step size across the logit scales and regularization strengths a lab asks for. All
computation is float64 with closed-form gradients.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from worker.nc.manifolds import Euclidean, RowSphere
from worker.nc.metrics import collapse_metrics, wrong_class_margins

NORMALIZATIONS = ("normalized", "regularized")


@dataclass(frozen=True)
class UFMProblem:
    """One UFM instance; labels are class k repeated n_per_class times, k = 0..K-1.

    `tol` bounds the norm of the Riemannian gradient at the returned point: of log L for
    "normalized" (scale-free, so the same tol serves every logit scale) and of the full
    objective for "regularized". With the default 1e-10, every closed-form case we ran
    (K up to 100, logit scales 0.5 to 30, decays 1e-4 to 1e-1) ended with nc1, nc2_etf_w
    and nc3_etf below 1e-6 and the loss within 1e-8 of its closed form; rounding puts the
    floor of the gradient norm near 1e-15, so much smaller values are not reachable.
    """

    num_classes: int
    dim: int
    n_per_class: int
    normalization: str
    logit_scale: float = 10.0
    bias: bool = False
    lambda_w: float = 5e-4
    lambda_h: float = 5e-4
    lambda_b: float = 5e-4
    max_iters: int = 10_000
    tol: float = 1e-10
    seed: int = 0
    checkpoint_every: int | None = None

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.normalization == "normalized" and self.dim < 2:
            # The unit "sphere" of R^1 is the two points +-1: there is nothing to descend on.
            raise ValueError("normalized UFM needs dim >= 2")
        if self.n_per_class < 1:
            raise ValueError(f"n_per_class must be >= 1, got {self.n_per_class}")
        if not 0 < self.logit_scale < math.inf:
            raise ValueError(f"logit_scale must be positive and finite, got {self.logit_scale}")
        if self.normalization == "regularized" and not (
            0 < self.lambda_w < math.inf
            and 0 < self.lambda_h < math.inf
            and 0 <= self.lambda_b < math.inf
        ):
            # Without decay on W and H the regularized objective has no minimizer.
            raise ValueError("lambda_w and lambda_h must be positive and lambda_b >= 0, all finite")
        if self.max_iters < 0:
            raise ValueError(f"max_iters must be >= 0, got {self.max_iters}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {self.checkpoint_every}")

    @property
    def num_samples(self) -> int:
        return self.num_classes * self.n_per_class


class Stopped(Exception):
    """The caller's should_stop() returned True; the solve was abandoned."""


class Diverged(Exception):
    """The objective or its gradient became NaN or infinite."""


def optimal_loss(problem: UFMProblem) -> float | None:
    """The global minimum from DESIGN.md's closed forms, or None where none applies.

    Normalized (Yaras et al. 2022): L* = ln(1 + (K-1) exp(-s K/(K-1))) when a simplex ETF
    fits, K <= d + 1; a free bias does not lower it. Regularized (Zhu et al. 2021): with
    c = sqrt(lambda_w / (n lambda_h)) and s = sqrt(n lambda_w lambda_h), the optimum is
    W = H = 0 with f* = ln K when K s >= 1; otherwise, when d >= K - 1, it is an ETF with
    ||w_k||^2 = t = ((K-1)/(K c)) ln(1/s - (K-1)), h = c w_y, b = 0.
    """
    K, d, n = problem.num_classes, problem.dim, problem.n_per_class
    if problem.normalization == "normalized":
        if K > d + 1:
            return None
        return math.log1p((K - 1) * math.exp(-problem.logit_scale * K / (K - 1)))
    balance = math.sqrt(problem.lambda_w / (n * problem.lambda_h))
    strength = math.sqrt(n * problem.lambda_w * problem.lambda_h)
    if K * strength >= 1:
        return math.log(K)
    if d < K - 1:
        return None
    squared_norm = (K - 1) / (K * balance) * math.log(1 / strength - (K - 1))
    margin = balance * squared_norm * K / (K - 1)
    return math.log1p((K - 1) * math.exp(-margin)) + problem.lambda_w * K * squared_norm


def solve(
    problem: UFMProblem,
    *,
    device=None,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Minimize the UFM from a seeded random start; return the final metrics.

    `on_checkpoint(step, row)` receives a flat dict (`loss`, `grad_norm` and every
    collapse_metrics key; `cross_entropy` too for "regularized") at steps 0, 1, 2, 5, 10,
    20, 50, ... (or every `checkpoint_every` steps) and at the last one. `should_stop()`
    is polled once per iteration; when it returns True, Stopped is raised. A non-finite
    objective or gradient raises Diverged.

    `loss` is the mean cross-entropy for "normalized" and the full objective
    (cross-entropy plus the three weight-decay terms) for "regularized". `grad_norm` is
    the norm of the Riemannian gradient that `problem.tol` bounds. The result adds
    `optimal_loss`, `optimality_gap`, `has_closed_form`, `iterations` and `converged`
    (True only when grad_norm <= tol was reached).
    """
    device = torch.device("cpu" if device is None else device)
    labels = torch.arange(problem.num_classes, device=device).repeat_interleave(problem.n_per_class)
    if problem.normalization == "normalized":
        evaluate = _normalized_objective(problem, labels)
    else:
        evaluate = _regularized_objective(problem, labels)
    manifolds, start = _initial_point(problem, device)
    preconditioner = [1.0, _feature_step_scale(problem)] + [1.0] * problem.bias
    is_checkpoint = _checkpoint_schedule(problem.checkpoint_every)

    iterates = _minimize(evaluate, manifolds, start, preconditioner, problem.tol, problem.max_iters)
    for iterate in iterates:
        if not (math.isfinite(iterate.value) and math.isfinite(iterate.grad_norm)):
            raise Diverged(f"objective or gradient is not finite at iteration {iterate.step}")
        if iterate.final or (on_checkpoint is not None and is_checkpoint(iterate.step)):
            row = _metrics_row(problem, labels, iterate)
            if on_checkpoint is not None:
                on_checkpoint(iterate.step, row)
        if iterate.final:
            break
        if should_stop is not None and should_stop():
            raise Stopped(f"stopped at iteration {iterate.step}")

    optimum = optimal_loss(problem)
    return {
        **row,
        "optimal_loss": optimum,
        "optimality_gap": None if optimum is None else row["loss"] - optimum,
        "has_closed_form": optimum is not None,
        "iterations": iterate.step,
        "converged": iterate.converged,
    }


def _initial_point(problem: UFMProblem, device) -> tuple[list, list[torch.Tensor]]:
    """Seeded start, drawn on the CPU so that the seed fixes it on every device."""
    generator = torch.Generator().manual_seed(problem.seed)
    shapes = [(problem.num_classes, problem.dim), (problem.num_samples, problem.dim)]
    if problem.normalization == "normalized":
        manifolds = [RowSphere(), RowSphere()]
        start = [manifold.random(shape, generator) for manifold, shape in zip(manifolds, shapes)]
    else:
        # Small, so that the start sits near the origin's saddle rather than deep in the
        # cross-entropy's saturated region.
        manifolds = [Euclidean(), Euclidean()]
        start = [
            manifold.random(shape, generator) * 0.1 / math.sqrt(problem.dim)
            for manifold, shape in zip(manifolds, shapes)
        ]
    if problem.bias:
        manifolds.append(Euclidean())
        start.append(torch.zeros(problem.num_classes, dtype=torch.float64))
    return manifolds, [block.to(device) for block in start]


def _feature_step_scale(problem: UFMProblem) -> float:
    """How much longer a step the feature block H takes than the classifier block W.

    Normalized: each feature row carries 1/N of the loss and each classifier row the
    loss of a whole class, so the curvature along a feature row is about n times
    smaller; scaling its step by n puts the blocks on the same footing (it halves the
    iteration count in practice). Regularized: the decay lambda_h, not the 1/N-weighted
    loss, sets the curvature along a feature row, and the unscaled steps measured faster.
    """
    return float(problem.n_per_class) if problem.normalization == "normalized" else 1.0


def _cross_entropy_parts(logits: torch.Tensor, labels: torch.Tensor):
    """Per-sample losses, their logs, and dCE_i/dz_i = p_i - e_{y_i}, all without cancellation.

    With a_i = logsumexp_{k != y_i}(z_k - z_{y_i}): CE_i = softplus(a_i), and for k != y_i
    p_k = exp(z_k - z_{y_i} - CE_i). The label's entry is -(sum_{k != y} p_k) =
    -exp(a_i - CE_i), never 1 - p_y, which would round to zero long before the loss does.
    """
    margins = wrong_class_margins(logits, labels)
    log_odds = torch.logsumexp(margins, dim=1)
    losses = torch.nn.functional.softplus(log_odds, threshold=30.0)
    log_losses = torch.where(
        log_odds < -30.0,
        # log softplus(a) = a + log(1 - e^a/2 + ...): log(softplus(a)) would lose all
        # digits once e^a underflows.
        log_odds + torch.log1p(-torch.exp(log_odds) / 2),
        torch.log(losses),
    )
    logit_grads = torch.exp(margins - losses[:, None])  # the label's entry is exp(-inf) = 0
    logit_grads.scatter_(1, labels[:, None], -torch.exp(log_odds - losses)[:, None])
    return losses, log_losses, logit_grads


def _normalized_objective(problem: UFMProblem, labels: torch.Tensor):
    """f = log L with L the mean cross-entropy of logits s W h_i (+ b), and its gradient.

    log L has the critical points of L, but its gradient grad L / L stays O(1) while L
    itself saturates towards ~exp(-s K/(K-1)) at large logit scales, and its Hessian at
    the optimum is well scaled.
    """
    scale = problem.logit_scale
    log_num_samples = math.log(problem.num_samples)

    def evaluate(point):
        classifier, features = point[0], point[1]
        logits = scale * (features @ classifier.T)
        if problem.bias:
            logits = logits + point[2]
        _, log_losses, logit_grads = _cross_entropy_parts(logits, labels)
        log_total = torch.logsumexp(log_losses, dim=0)  # log(N L)
        logit_grads = logit_grads * torch.exp(-log_total)  # d log L / dz
        grads = [scale * (logit_grads.T @ features), scale * (logit_grads @ classifier)]
        if problem.bias:
            grads.append(logit_grads.sum(dim=0))
        return log_total - log_num_samples, grads

    return evaluate


def _regularized_objective(problem: UFMProblem, labels: torch.Tensor):
    """The weight-decayed objective of Zhu et al. (2021) and its gradient."""
    decays = [problem.lambda_w, problem.lambda_h] + [problem.lambda_b] * problem.bias

    def evaluate(point):
        classifier, features = point[0], point[1]
        logits = features @ classifier.T
        if problem.bias:
            logits = logits + point[2]
        losses, _, logit_grads = _cross_entropy_parts(logits, labels)
        logit_grads = logit_grads / problem.num_samples
        grads = [logit_grads.T @ features, logit_grads @ classifier]
        if problem.bias:
            grads.append(logit_grads.sum(dim=0))
        value = losses.mean()
        for decay, block, grad in zip(decays, point, grads):
            value = value + decay / 2 * (block**2).sum()
            grad.add_(block, alpha=decay)
        return value, grads

    return evaluate


def _metrics_row(problem: UFMProblem, labels: torch.Tensor, iterate) -> dict:
    classifier, features = iterate.point[0], iterate.point[1]
    bias = iterate.point[2] if problem.bias else None
    if problem.normalization == "normalized":
        row = collapse_metrics(
            features, labels, classifier, bias, problem.num_classes, problem.logit_scale
        )
    else:
        row = collapse_metrics(features, labels, classifier, bias, problem.num_classes)
        row["cross_entropy"] = row["loss"]
        decays = [problem.lambda_w, problem.lambda_h] + [problem.lambda_b] * problem.bias
        penalty = sum(
            decay / 2 * float((block**2).sum()) for decay, block in zip(decays, iterate.point)
        )
        row["loss"] = row["cross_entropy"] + penalty
    row["grad_norm"] = iterate.grad_norm
    return row


def _checkpoint_schedule(every: int | None) -> Callable[[int], bool]:
    """Steps 0, 1, 2, 5, 10, 20, 50, ... (1-2-5 per decade), or multiples of `every`."""
    if every is not None:
        return lambda step: step % every == 0

    def is_checkpoint(step: int) -> bool:
        if step == 0:
            return True
        decade = 10 ** (len(str(step)) - 1)
        return step % decade == 0 and step // decade in (1, 2, 5)

    return is_checkpoint


@dataclass
class _Iterate:
    step: int
    point: list[torch.Tensor]
    value: float
    grad_norm: float
    converged: bool
    final: bool


# Line-search constants: sufficient-decrease fraction, backtracking factor, Zhang-Hager
# averaging weight, and the step-size safeguards for the Barzilai-Borwein steps.
_ARMIJO = 1e-4
_BACKTRACK = 0.5
_NONMONOTONE_WEIGHT = 0.85
_MIN_STEP, _MAX_STEP = 1e-10, 1e10
# Near the optimum, decreases fall below the rounding error of the objective itself (a
# few ulps of |f|); the line search tolerates that much so that it never mistakes
# rounding for an increase, and the Barzilai-Borwein steps can finish the job.
_ROUNDING_SLACK = 1e-14


def _minimize(evaluate, manifolds, point, preconditioner, tol, max_iters) -> Iterator[_Iterate]:
    """Preconditioned Riemannian gradient descent with Barzilai-Borwein steps.

    Step sizes alternate between the long (BB1) and short (BB2) Barzilai-Borwein formulas,
    from ambient differences of iterates s and of Riemannian gradients y, measured in the
    preconditioner's metric; they are accepted by a Zhang-Hager nonmonotone Armijo test
    against a running weighted average of past objective values. Yields the start and
    every accepted step; the last yielded iterate has `final` set, having converged
    (gradient norm <= tol), run out of iterations, or stalled (no step size passes the
    line search). Each step is searched for before its predecessor is yielded, so that
    `final` is known when the iterate is reported.
    """
    value, grads = _value_and_riemannian_grad(evaluate, manifolds, point)
    search = _NonmonotoneLineSearch(evaluate, manifolds, preconditioner, value)
    step_size = 1.0 / max(_weighted_norm(grads, preconditioner), 1e-300)
    step = 0
    while True:
        grad_norm = _weighted_norm(grads, [1.0] * len(grads))
        converged = grad_norm <= tol
        accepted = (
            None
            if converged or step >= max_iters
            else search(point, grads, step_size, iteration=step + 1)
        )
        final = accepted is None
        yield _Iterate(step, point, value, grad_norm, converged, final)
        if final:
            return

        step += 1
        candidate, candidate_value, candidate_grads = accepted
        moves = [new - old for new, old in zip(candidate, point)]
        grad_changes = [new - old for new, old in zip(candidate_grads, grads)]
        step_size = _barzilai_borwein(moves, grad_changes, preconditioner, long_step=step % 2 == 1)
        point, value, grads = candidate, candidate_value, candidate_grads


class _NonmonotoneLineSearch:
    """Backtracking Armijo search against the Zhang-Hager average of past values.

    The reference C_k is a weighted mean of all accepted values, with weights decaying
    by _NONMONOTONE_WEIGHT per step (Zhang & Hager 2004): it lets the Barzilai-Borwein
    steps go uphill now and then, which is what makes them fast, while still forcing
    descent on average.
    """

    def __init__(self, evaluate, manifolds, preconditioner, start_value: float):
        self.evaluate, self.manifolds, self.preconditioner = evaluate, manifolds, preconditioner
        self.reference_value, self.reference_weight = start_value, 1.0

    def __call__(self, point, grads, step_size, iteration: int):
        """The accepted (point, value, Riemannian gradient), or None if the search stalled.

        Raises Diverged when the objective is NaN or infinite at every step size down to
        the smallest, rather than only at a few overlong ones.
        """
        directions = [-weight * grad for weight, grad in zip(self.preconditioner, grads)]
        slope = -(_weighted_norm(grads, self.preconditioner) ** 2)
        slack = _ROUNDING_SLACK * (1.0 + abs(self.reference_value))
        while step_size >= _MIN_STEP:
            candidate = [
                m.retract(x, step_size * v) for m, x, v in zip(self.manifolds, point, directions)
            ]
            value, candidate_grads = _value_and_riemannian_grad(
                self.evaluate, self.manifolds, candidate
            )
            if value <= self.reference_value + _ARMIJO * step_size * slope + slack:
                self._update_reference(value)
                return candidate, value, candidate_grads
            step_size *= _BACKTRACK  # a NaN value fails the test above and lands here too
        if not math.isfinite(value):
            raise Diverged(f"objective is not finite at any step size at iteration {iteration}")
        return None

    def _update_reference(self, value: float):
        previous_weight = self.reference_weight
        self.reference_weight = _NONMONOTONE_WEIGHT * previous_weight + 1
        self.reference_value = (
            _NONMONOTONE_WEIGHT * previous_weight * self.reference_value + value
        ) / self.reference_weight


def _value_and_riemannian_grad(evaluate, manifolds, point):
    value, euclidean_grads = evaluate(point)
    grads = [m.project(x, g) for m, x, g in zip(manifolds, point, euclidean_grads)]
    return float(value), grads


def _weighted_norm(blocks, weights) -> float:
    return math.sqrt(
        sum(weight * float((block**2).sum()) for weight, block in zip(weights, blocks))
    )


def _barzilai_borwein(moves, grad_changes, preconditioner, long_step: bool) -> float:
    """BB1 = <s, P^-1 s> / <s, y> (long) or BB2 = <s, y> / <y, P y> (short), safeguarded.

    Where the curvature estimate <s, y> is not positive the ratio ||s|| / ||y|| (their
    geometric mean in magnitude) stands in.
    """
    s_dot_y = sum(float((s * y).sum()) for s, y in zip(moves, grad_changes))
    s_norm = _weighted_norm(moves, [1.0 / weight for weight in preconditioner])
    y_norm = _weighted_norm(grad_changes, preconditioner)
    if y_norm == 0.0:
        return _MAX_STEP
    if s_dot_y <= 0.0:
        step_size = s_norm / y_norm
    elif long_step:
        step_size = s_norm**2 / s_dot_y
    else:
        step_size = s_dot_y / y_norm**2
    return min(max(step_size, _MIN_STEP), _MAX_STEP)
