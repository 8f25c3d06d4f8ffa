"""A UFM instance as a lab poses it, and the closed-form optima it is checked against.

The unconstrained feature model treats the last-layer features H (N x d) as free
variables next to the classifier W (K x d) and bias b, with n_k samples of class k (N in
all), and minimizes the mean cross-entropy of the logits; docs/closed-forms.md gives the
two variants ("normalized", Yaras et al. 2022, and "regularized", Zhu et al. 2021) and
their closed forms.
"""

import math
import operator
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import scipy.optimize

NORMALIZATIONS = ("normalized", "regularized")
# The per-sample loss of the logits (docs/closed-forms.md): the cross-entropy, the squared
# error against the one-hot target (Zhou et al. 2022), or the cross-entropy against the
# targets smoothed by `label_smoothing` (Guo et al. 2024).
LOSSES = ("cross_entropy", "mse", "label_smoothing")
# The deep UFM (Sukenik, Mondelli & Lampert 2023): `layers` linear maps from the
# unconstrained features to the logits, the classifier included, with this activation
# after each but the classifier. At most MAX_LAYERS.
LAYER_ACTIVATIONS = ("linear", "relu")
MAX_LAYERS = 6
# The optimizer: "first_order" is the preconditioned Riemannian gradient descent
# (worker.nc.descent), "trust_region" the Riemannian trust-region method
# (worker.nc.trust_region), and "auto" the first where it converges fast and the second
# where it would crawl (the sublinear rule); where no ETF fits, L-BFGS (worker.nc.lbfgs),
# from the start, or, once the features merge, with each class's features tied to its
# classifier row (worker.nc.merging: starting_optimizer, ties). The default stays "first_order", which
# is the fastest where an ETF fits (docs/solver.md, "Second order (issue 25)").
SOLVERS = ("auto", "first_order", "trust_region")


@dataclass(frozen=True)
class UFMProblem:
    """One UFM instance; labels are class k repeated n_k times, k = 0..K-1.

    `n_per_class` is one count for every class, or a sequence of K counts (imbalanced
    classes). A sequence of equal counts is the balanced problem and is stored as that
    one int, so it compares, hashes and solves exactly like it.

    `tol` bounds the norm of the Riemannian gradient at the returned point: of log L for
    "normalized" under the cross-entropy (whose gradient, unlike that of L, does not
    vanish as the loss saturates at large logit scales), of L under the other losses
    (which do not saturate), and of the full objective for "regularized".

    `loss` picks the per-sample loss of the logits (LOSSES); `label_smoothing` is its
    eps, given with "label_smoothing" only. A
    normalized problem with a closed form must also be collapsed to count as converged
    (see worker.nc.ufm.solve). Rounding puts the floor of the gradient norm near 1e-15,
    so much smaller values are not reachable; docs/solver.md says what the default
    buys. A run that cannot reach tol ends unconverged and says why in `stop_reason`
    (worker.nc.stopping.StopReason).

    `restarts` solves from that many seeded random starts (the first from `seed` itself)
    and keeps the run with the lowest final loss; see worker.nc.ufm.solve.

    `solver` picks the optimizer (SOLVERS); docs/solver.md says when each pays.
    """

    num_classes: int
    dim: int
    n_per_class: int | tuple[int, ...]
    normalization: str = "normalized"
    logit_scale: float = 10.0
    bias: bool = False
    lambda_w: float = 5e-4
    lambda_h: float = 5e-4
    lambda_b: float = 5e-4
    max_iters: int = 10_000
    tol: float = 1e-10
    seed: int = 0
    checkpoint_every: int | None = None
    restarts: int = 1
    solver: str = "first_order"
    loss: str = "cross_entropy"
    label_smoothing: float | None = None
    layers: int = 1
    layer_activation: str = "linear"
    lambda_layers: tuple[float, ...] | None = None  # the hidden layers' decays; None: lambda_w each

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.normalization == "normalized" and self.dim < 2:
            # The unit "sphere" of R^1 is the two points +-1: there is nothing to descend on.
            raise ValueError("normalized UFM needs dim >= 2")
        object.__setattr__(self, "n_per_class", self._validated_counts())
        if not 0 < self.logit_scale < math.inf:
            raise ValueError(f"logit_scale must be positive and finite, got {self.logit_scale}")
        if self.normalization == "regularized" and not (
            0 < self.lambda_w < math.inf and 0 < self.lambda_h < math.inf and 0 <= self.lambda_b < math.inf
        ):
            # Without decay on W and H the regularized objective has no minimizer.
            raise ValueError("lambda_w and lambda_h must be positive and lambda_b >= 0, all finite")
        if self.max_iters < 0:
            raise ValueError(f"max_iters must be >= 0, got {self.max_iters}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {self.checkpoint_every}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {self.restarts}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        check_loss(self.loss, self.label_smoothing)
        self._validate_layers()

    def _validate_layers(self) -> None:
        if not 1 <= self.layers <= MAX_LAYERS:
            raise ValueError(f"layers must lie in 1..{MAX_LAYERS}, got {self.layers}")
        if self.layer_activation not in LAYER_ACTIVATIONS:
            raise ValueError(f"layer_activation must be one of {LAYER_ACTIVATIONS}, got {self.layer_activation!r}")
        if self.layers > 1 and self.normalization != "regularized":
            raise ValueError("layers > 1 needs normalization 'regularized'")
        if self.lambda_layers is not None:
            object.__setattr__(self, "lambda_layers", tuple(self.lambda_layers))
            if len(self.lambda_layers) != self.layers - 1 or not all(
                0 < decay < math.inf for decay in self.lambda_layers
            ):
                raise ValueError(f"lambda_layers needs layers - 1 = {self.layers - 1} positive, finite decays")

    def _validated_counts(self) -> int | tuple[int, ...]:
        if not isinstance(self.n_per_class, Sequence):
            counts: tuple[int, ...] = (operator.index(self.n_per_class),)
        else:
            counts = tuple(operator.index(count) for count in self.n_per_class)
            if len(counts) != self.num_classes:
                raise ValueError(
                    f"n_per_class needs one count per class: {len(counts)} given, num_classes = {self.num_classes}"
                )
        if min(counts) < 1:
            raise ValueError(f"n_per_class counts must be >= 1, got {self.n_per_class}")
        return counts[0] if len(set(counts)) == 1 else counts

    @property
    def balanced(self) -> bool:
        return isinstance(self.n_per_class, int)

    @property
    def class_counts(self) -> tuple[int, ...]:
        """n_k for k = 0..K-1."""
        if isinstance(self.n_per_class, int):  # balanced
            return (self.n_per_class,) * self.num_classes
        return self.n_per_class

    @property
    def num_samples(self) -> int:
        return sum(self.class_counts)

    @property
    def hidden_decays(self) -> tuple[float, ...]:
        """The weight decay of each layer between the features and the classifier."""
        return self.lambda_layers or (self.lambda_w,) * (self.layers - 1)

    @property
    def decays(self) -> list[float]:
        """The weight decay of each block of the point [W, H, (b), V_1, ..., V_{L-1}] (regularized)."""
        return [self.lambda_w, self.lambda_h] + [self.lambda_b] * self.bias + list(self.hidden_decays)


def check_loss(loss: str, label_smoothing: float | None) -> None:
    """Raise ValueError unless `loss` is one of LOSSES, with its eps 0 < eps < 1 given
    exactly when it is "label_smoothing" (for the UFM and for training alike)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if (loss == "label_smoothing") != (label_smoothing is not None):
        raise ValueError("label_smoothing is required with loss 'label_smoothing', and only with it")
    if label_smoothing is not None and not 0 < label_smoothing < 1:
        raise ValueError(f"label_smoothing must lie strictly between 0 and 1, got {label_smoothing}")


def optimal_loss(problem: UFMProblem) -> float | None:
    """The global minimum from the closed forms of docs/closed-forms.md, or None where
    none applies.

    Both closed forms assume balanced classes: with unequal counts there is none.
    Normalized (Yaras et al. 2022): L* = ln(1 + (K-1) exp(-s K/(K-1))) when a simplex ETF
    fits, K <= d + 1; a free bias does not lower it. Regularized (Zhu et al. 2021): with
    c = sqrt(lambda_w / (n lambda_h)) and s = sqrt(n lambda_w lambda_h), the optimum is
    W = H = 0 with f* = ln K when K s >= 1; otherwise, when d >= K - 1, it is an ETF with
    ||w_k||^2 = t = ((K-1)/(K c)) ln(1/s - (K-1)), h = c w_y, b = 0.
    """
    n = problem.n_per_class
    if not isinstance(n, int):  # imbalanced: problem.balanced is False
        return None
    if problem.loss == "mse":
        return _squared_error_optimum(problem, n) if problem.normalization == "regularized" else None
    if problem.loss == "label_smoothing" or problem.layers > 1:
        return None
    K, d = problem.num_classes, problem.dim
    if problem.normalization == "normalized":
        if d + 1 < K:
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


def _squared_error_optimum(problem: UFMProblem, n: int) -> float | None:
    """The global minimum of the regularized UFM under the squared error (Zhou et al.,
    ICML 2022), or None where it needs more dimensions than d; derived in
    docs/closed-forms.md.

    With beta = sqrt(n lambda_w lambda_h) the problem reduces to the logits' class matrix
    Z = W [h_1 .. h_K] + b 1^T and min (1/(2K)) ||Z - I||^2 + beta ||W H||_* (+ the bias'
    decay). Without a bias: f* = (K - r)/(2K) + r beta (1 - K beta / 2), r = min(d, K),
    when K beta < 1, and 1/2 (W = H = 0) otherwise. With a bias: the class-mean part of
    Z goes to the bias while lambda_b (1 - K beta) <= K beta, and the rest is a simplex
    ETF of K - 1 dimensions; beyond that, the shared part splits between W H and b.
    """
    K, d = problem.num_classes, problem.dim
    if problem.layers > 1:
        return _deep_linear_squared_error_optimum(problem, n)
    beta = math.sqrt(n * problem.lambda_w * problem.lambda_h)
    if not problem.bias:
        if K * beta >= 1:
            return 0.5
        rank = min(d, K)
        return (K - rank) / (2 * K) + rank * beta * (1 - K * beta / 2)
    lambda_b = problem.lambda_b
    spread = max(1 - K * beta, 0.0)  # the singular value of Z on the centred directions
    if lambda_b * (1 - K * beta) <= K * beta:
        if spread > 0 and d < K - 1:
            return None
        centred = (K - 1) * ((spread - 1) ** 2 / (2 * K) + beta * spread)
        return centred + lambda_b / (2 * K * (1 + lambda_b))
    if d < K:
        return None
    return K * beta * (1 - K * beta / 2) - K * beta**2 / (2 * lambda_b)


def _deep_linear_squared_error_optimum(problem: UFMProblem, n: int) -> float | None:
    """The global minimum of the deep linear regularized UFM under the squared error
    (Dang et al., ICML 2023), without a bias or with a free one (lambda_b = 0); None
    otherwise, and for ReLU layers. Derived in docs/closed-forms.md.

    With M = L + 1 factors (the L layers and the class means), their decays a_m
    (lambda_w, lambda_layers, n lambda_h) and c = (M/2) (prod a_m)^(1/M), the problem
    reduces to each singular value sigma of the product, which costs
    g(sigma) = (sigma - 1)^2 / (2K) + c sigma^(2/M); r = min(d, K) of them (min(d, K - 1)
    with a free bias, which takes the class mean) are set to g's minimizer if it beats
    g(0) = 1/(2K), and to 0 otherwise.
    """
    if problem.layer_activation != "linear" or (problem.bias and problem.lambda_b != 0):
        return None
    K = problem.num_classes
    decays = [problem.lambda_w, *problem.hidden_decays, n * problem.lambda_h]
    factors = len(decays)
    cost = factors / 2 * math.prod(decays) ** (1 / factors)
    exponent = 2 / factors

    def slope(sigma: float) -> float:  # K g'(sigma)
        return sigma - 1 + K * cost * exponent * sigma ** (exponent - 1)

    # K g' falls and then rises on (0, 1] (exponent < 1): its minimum is at sigma_low, and a
    # positive root above it, if any, is g's local minimum.
    sigma_low = (K * cost * exponent * (1 - exponent)) ** (1 / (2 - exponent))
    best = 1 / (2 * K)
    if sigma_low < 1 and slope(sigma_low) < 0:
        sigma = scipy.optimize.brentq(slope, sigma_low, 1.0, xtol=1e-16, rtol=4 * sys.float_info.epsilon)
        best = min(best, (sigma - 1) ** 2 / (2 * K) + cost * sigma**exponent)
    rank = min(problem.dim, K - 1 if problem.bias else K)
    return (K - (1 if problem.bias else 0) - rank) / (2 * K) + rank * best
