"""Neural-collapse metrics, as defined in docs/metrics.md (the metric catalogue).

NC1-NC4 follow Papyan, Han & Donoho (2020), "Prevalence of neural collapse during the
terminal phase of deep learning training"; the ETF-distance forms (`nc2_etf_*`,
`nc3_etf`) follow Zhu et al. (NeurIPS 2021), "A geometric analysis of neural collapse
with unconstrained features", as used by Yaras et al. (NeurIPS 2022); `nc1_cdnv` is the
class-distance normalized variance of Galanti, Gyorgy & Hutter (ICLR 2022).
`nc3_uncentred` is `nc3` with the class means not centred on the global mean, the form
of Yaras et al.'s released code: norm_F(W / norm_F(W) - U / norm_F(U))^2, U's rows mu_k.

Two entry points give the same catalogue: `collapse_metrics` for features held in memory,
and `CollapseAccumulator` for features that arrive in batches (an evaluation pass of a
network), in memory independent of the number of samples.

Everything is computed in float64 on the input's device, outside autograd (features
straight from a network in training mode are fine). Collapsed features have a
within-class spread many orders of magnitude below the distance between class means, so
features are centred on a point of their class before any product is taken: a Sigma_W
formed from uncentred second moments would be rounding noise exactly when collapse is
reached.

Degenerate inputs do not raise. A metric that is a ratio 0/0 there is float('nan'):
every metric built from M when all class means coincide (M = 0, or every centred mean
below 1e-12 of the largest class mean, which is rounding error), every metric built from
W when the classifier is zero, and `nc1_cdnv` for a pair of classes with identical means
and no spread (identical means with spread give inf). A class with no samples has no
mean and raises ValueError.
"""

import math
from collections.abc import Iterable

import numpy as np
import torch

# Singular values of Sigma_B below this fraction of the largest are treated as zero in
# its pseudo-inverse (docs/metrics.md): the centred means span at most K-1 dimensions.
PSEUDO_INVERSE_RTOL = 1e-10

# Class means closer than this (relative to their size) are treated as coincident: M is
# then exactly zero, and the metrics that divide by its scale are NaN.
COINCIDENT_MEANS_RTOL = 1e-12

# On a CPU, collapse_metrics works through the samples in blocks of about this many
# float64 entries (4 MiB), small enough for a block and its products to stay in cache.
CPU_BLOCK_ENTRIES = 2**19

MEAN_KEYS = ("nc1", "nc1_cdnv", "nc2_equinorm_m", "nc2_equiangle_m", "nc2_etf_m")


def layer_key(key: str, layer: str) -> str:
    """The name of catalogue key `key` measured at the output of the named `layer`
    (nc1_layer2, nc1_stage3): a deep UFM's hidden layers, a network's `metrics_layers`.
    The plain keys are always the classifier's input."""
    return f"{key}_{layer}"


CLASSIFIER_KEYS = (
    "nc2_equinorm_w",
    "nc2_equiangle_w",
    "nc2_etf_w",
    "nc3",
    "nc3_uncentred",
    "nc3_etf",
    "nc4",
    "accuracy",
    "loss",
)


@torch.no_grad()
def collapse_metrics(
    features,
    labels,
    classifier=None,
    bias=None,
    num_classes=None,
    logit_scale=1.0,
) -> dict[str, float]:
    """Neural-collapse metrics of features H (N x d) with labels y (N,).

    Accepts torch tensors or numpy arrays. With a classifier W (K x d) and optional bias
    b (K,), also returns the classifier metrics, computed from the logits
    `logit_scale * H W^T + b`. K is `num_classes`, or `labels.max() + 1`; every class
    must have at least one sample. Returns plain Python floats keyed as in docs/metrics.md.

    Two passes over H: one for the class means, one that centres each sample on its
    class mean and takes, in a single product, its coordinates along the right singular
    vectors of M (all NC1 needs, and the nearest class mean of NC4) and the within-class
    part of its logits. Neither a d x d matrix nor an N x d temporary is formed: at
    K << d the whole catalogue costs less than the one product H^T H (bench/metrics.py).
    """
    features = _as_tensor(features)
    device = features.device
    labels = _as_labels(labels, device)
    num_classes = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    _check_num_classes(num_classes)
    num_samples, dim = features.shape
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    _check_no_empty_class(counts)

    # Both passes convert one block of samples at a time to float64, into a buffer that
    # is reused: on a CPU, an N x d float64 copy, or fresh block-sized temporaries, cost
    # more in memory traffic and page faults than the arithmetic does. When one block
    # holds every sample (on a GPU, or few samples), the second pass reuses the first's
    # conversion.
    block_rows = num_samples if device.type != "cpu" else max(1, CPU_BLOCK_ENTRIES // dim)
    block_rows = min(block_rows, num_samples)
    block_buffer = torch.empty(block_rows, dim, dtype=torch.float64, device=device)
    means_buffer = torch.empty_like(block_buffer)

    def blocks(converted=False):
        for start in range(0, num_samples, block_rows):
            block_labels = labels[start : start + block_rows]
            block = block_buffer[: len(block_labels)]
            if not converted:
                block.copy_(features[start : start + block_rows])
            yield block, block_labels

    class_sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    for block, block_labels in blocks():
        class_sums.index_add_(0, block_labels, block)
    class_means = class_sums / counts[:, None]
    geometry = _ClassGeometry(class_means)

    if classifier is not None:
        classifier = _as_float64(classifier, device)
    second_pass = _SecondPass(geometry, classifier, bias, logit_scale)
    for block, block_labels in blocks(converted=block_rows == num_samples):
        block_means = means_buffer[: len(block_labels)]
        torch.index_select(class_means, 0, block_labels, out=block_means)
        second_pass.add(block_labels, block.sub_(block_means))
    return second_pass.metrics()


class CollapseAccumulator:
    """The metric catalogue of `collapse_metrics`, from features that arrive in batches.

        accumulator = CollapseAccumulator(num_classes, dim, passes=2)
        for features, labels in batches():          # pass 1: the class means
            accumulator.update(features, labels)
        metrics = accumulator.compute(classifier, bias, logit_scale, replay=batches())

    State lives on `device`, or on the device of the first batch, and does not grow with
    N. `update` does a fixed sequence of tensor operations per batch: no host
    synchronization, no Python loop over samples or classes, so batches of a network on
    a GPU queue up behind each other. `compute` synchronizes once at the end.

    nc4 compares each sample's prediction with the nearest of the *final* class means,
    which are unknown until the last batch has been seen: no exact one-pass form exists
    in bounded memory. The whole catalogue therefore takes a second pass, `replay`: an
    iterable of (features, labels) batches holding the same samples again (any batching
    and order; for a network, a second evaluation pass without augmentation, or features
    the caller kept). `compute` runs it with the class means fixed and takes every
    per-sample sum there, centred on those means, exactly as the second pass of
    `collapse_metrics` does. It checks that every class is replayed as often as it was
    updated.

    `passes` says which of two costs to pay:

    - `passes=2`: `update` keeps only n_k and the class sums, O(K d); `compute` needs
      `replay` and returns everything. Two passes of O(N d K) work each: the cheaper
      choice whenever the whole catalogue is wanted and K < d.
    - `passes=1` (the default): `update` also keeps the d x d scatter of each sample
      around a reference point c_k of its class (the class mean of the first batch that
      holds class k) and the per-class sums of h_i - c_k, in float64: the "shifted data"
      method of Chan, Golub & LeVeque (1983), "Algorithms for computing the sample
      variance". At the end
      N Sigma_W = sum_i (h_i - c_{y_i})(h_i - c_{y_i})^T - sum_k n_k (mu_k - c_k)(mu_k - c_k)^T,
      both terms of the size of the spread, not of the means, so Sigma_W stays exact for
      collapsed features; NC1 then needs only v_j^T Sigma_W v_j for the right singular
      vectors v_j of M. So `compute` without `replay` returns the mean keys (nc1,
      nc1_cdnv, nc2_*_m) and, given a classifier, nc2_*_w, nc3 and nc3_etf: all but nc4,
      accuracy and loss, from one pass, at the price of an O(N d^2) scatter, O(d^2)
      state. With `replay` it returns the whole catalogue as `passes=2` does.

    `scatter_dtype` float32 forms each batch's scatter of the (already centred) deviations
    in float32, added to the float64 sum: half the cost of the O(N d^2) product on a CPU
    and far less on a GPU, for ~1e-7 relative error in Sigma_W (the deviations are of
    the size of the spread, so centring keeps collapsed features measurable).
    """

    def __init__(self, num_classes: int, dim: int, device=None, passes: int = 1, scatter_dtype=torch.float64):
        _check_num_classes(num_classes)
        if passes not in (1, 2):
            raise ValueError(f"passes must be 1 or 2, got {passes}")
        self.num_classes = num_classes
        self.dim = dim
        self.passes = passes
        self.scatter_dtype = scatter_dtype
        self.device = None if device is None else torch.device(device)
        # Allocated by the first update, once the device is known (the last two with passes=1 only).
        self._counts: torch.Tensor | None = None  # n_k
        self._references: torch.Tensor | None = None  # c_k; zero with passes=2, where only the sums matter
        self._deviation_sums: torch.Tensor | None = None  # sum_{y_i=k} (h_i - c_k)
        self._squared_deviations: torch.Tensor | None = None  # sum_{y_i=k} ||h_i - c_k||^2, for nc1_cdnv
        self._scatter: torch.Tensor | None = None  # sum_i (h_i - c_{y_i})(h_i - c_{y_i})^T

    @torch.no_grad()
    def update(self, features, labels) -> None:
        """Add a batch: features (B x d, any float dtype) and labels (B,) in 0..K-1."""
        features = _as_tensor(features)
        if self._counts is None:
            self._allocate(features.device if self.device is None else self.device)
        features = features.to(device=self.device, dtype=torch.float64)
        labels = _as_labels(labels, self.device)
        counts, references, deviation_sums = self._counts, self._references, self._deviation_sums
        assert counts is not None and references is not None and deviation_sums is not None  # allocated above

        batch_counts = torch.zeros_like(counts)
        batch_counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        if self.passes == 2:
            deviation_sums.index_add_(0, labels, features)
            counts.add_(batch_counts)  # in place: counts is self._counts
            return

        assert self._squared_deviations is not None and self._scatter is not None  # allocated with passes=1
        batch_sums = torch.zeros_like(references).index_add_(0, labels, features)
        batch_means = batch_sums / batch_counts.clamp(min=1)[:, None]
        first_seen = (batch_counts > 0) & (counts == 0)
        self._references = references = torch.where(first_seen[:, None], batch_means, references)

        # h_i - c_{y_i}, written over the gathered references to save a B x d temporary.
        deviations = references.index_select(0, labels)
        torch.sub(features, deviations, out=deviations)
        deviation_sums.index_add_(0, labels, deviations)
        squared_norms = torch.linalg.vector_norm(deviations, dim=1) ** 2
        self._squared_deviations.index_add_(0, labels, squared_norms)
        if self.scatter_dtype == torch.float64:
            self._scatter.addmm_(deviations.T, deviations)
        else:
            centred = deviations.to(self.scatter_dtype)
            self._scatter.add_(centred.T @ centred)
        counts.add_(batch_counts)

    @torch.no_grad()
    def compute(
        self,
        classifier=None,
        bias=None,
        logit_scale=1.0,
        replay: Iterable | None = None,
    ) -> dict[str, float]:
        """The catalogue of `collapse_metrics(H, y, classifier, bias, K, logit_scale)`.

        nc4, accuracy and loss need a classifier and `replay`; with `passes=2`
        everything needs `replay` (see the class docstring).
        """
        if self._counts is None:
            raise ValueError("no batches were added; the class means are undefined")
        counts, references, deviation_sums = self._counts, self._references, self._deviation_sums
        assert references is not None and deviation_sums is not None  # allocated with counts
        _check_no_empty_class(counts)
        mean_offsets = deviation_sums / counts[:, None]  # mu_k - c_k
        geometry = _ClassGeometry(references + mean_offsets)
        if classifier is not None:
            classifier = _as_float64(classifier, self.device)
        if replay is not None:
            return self._replay(replay, counts, geometry, classifier, bias, logit_scale)
        if self.passes == 2:
            raise ValueError("an accumulator with passes=2 needs the replay pass")
        assert self._scatter is not None and self._squared_deviations is not None  # allocated with passes=1

        # v^T (N Sigma_W) v = v^T scatter v - sum_k n_k ((mu_k - c_k) v)^2 for each v = v_j.
        right_vectors = geometry.right_vectors
        scatter_along = ((right_vectors @ self._scatter) * right_vectors).sum(dim=1)
        offsets_along = mean_offsets @ right_vectors.T
        within_along = scatter_along - (counts[:, None] * offsets_along**2).sum(dim=0)
        squared_spreads = self._squared_deviations - counts * (mean_offsets**2).sum(dim=1)
        metrics = _mean_metrics(geometry, within_along / counts.sum(), squared_spreads / counts)
        if classifier is not None:
            metrics.update(_classifier_geometry_metrics(geometry, classifier))
        return _as_floats(metrics)

    def _allocate(self, device) -> None:
        self.device = torch.device(device)
        shape = (self.num_classes, self.dim)
        self._counts = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        self._references = torch.zeros(shape, dtype=torch.float64, device=device)
        self._deviation_sums = torch.zeros(shape, dtype=torch.float64, device=device)
        if self.passes == 1:
            self._squared_deviations = torch.zeros_like(self._counts)
            self._scatter = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)

    def _replay(self, replay, counts, geometry, classifier, bias, logit_scale) -> dict[str, float]:
        second_pass = _SecondPass(geometry, classifier, bias, logit_scale)
        for features, labels in replay:
            features = _as_tensor(features).to(self.device)
            labels = _as_labels(labels, self.device)
            # h_i - mu_{y_i} in float64, written over the gathered means: one B x d array.
            within = geometry.class_means.index_select(0, labels)
            second_pass.add(labels, torch.sub(features, within, out=within))
        if not torch.equal(second_pass.counts, counts):
            raise ValueError("replay must hold the same samples as the updates")
        return second_pass.metrics()


def cross_entropy_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE_i = softplus(a_i) with a_i = logsumexp_{k != y_i}(z_k - z_{y_i}).

    Equal to logsumexp(z) - z_y, but keeps its relative precision when the loss is far
    below the rounding error of the logits (large logit scales near collapse).
    """
    log_odds = torch.logsumexp(wrong_class_margins(logits, labels), dim=1)
    return torch.nn.functional.softplus(log_odds, threshold=30.0)


def wrong_class_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z_k - z_{y_i} for every k != y_i, and -inf in the label's own entry."""
    margins = logits - logits.gather(1, labels[:, None])
    return margins.scatter(1, labels[:, None], -math.inf)


class _ClassGeometry:
    """What the metrics need of the class means mu_k: M, its Gram M M^T and its SVD."""

    def __init__(self, class_means: torch.Tensor):
        self.class_means = class_means
        centred_means = class_means - class_means.mean(dim=0)  # M
        if centred_means.abs().max() <= COINCIDENT_MEANS_RTOL * class_means.abs().max():
            centred_means.zero_()  # what is left is the rounding error of averaging equal means
        self.centred_means = centred_means
        self.gram = centred_means @ centred_means.T  # centred: no cancellation from a large mu_G
        left, singular_values, self.right_vectors = torch.linalg.svd(centred_means, full_matrices=False)
        self.left_scaled = left * singular_values  # M = left_scaled @ right_vectors
        self.squared_singular_values = singular_values**2


def _mean_metrics(geometry: _ClassGeometry, within_along, class_variances) -> dict:
    """The mean keys, from v_j^T Sigma_W v_j for every right singular vector v_j of M
    (`within_along`) and V_k = (1/n_k) sum_{y_i=k} ||h_i - mu_k||^2 (`class_variances`)."""
    return {
        "nc1": _nc1(geometry.squared_singular_values, within_along),
        "nc1_cdnv": _cdnv(class_variances, geometry.gram),
        "nc2_equinorm_m": _equinorm(geometry.gram),
        "nc2_equiangle_m": _equiangle(geometry.gram),
        "nc2_etf_m": _distance_to_etf(geometry.gram),
    }


def _classifier_geometry_metrics(geometry: _ClassGeometry, classifier: torch.Tensor) -> dict:
    """The classifier keys that need only W and the class means."""
    classifier_gram = classifier @ classifier.T
    return {
        "nc2_equinorm_w": _equinorm(classifier_gram),
        "nc2_equiangle_w": _equiangle(classifier_gram),
        "nc2_etf_w": _distance_to_etf(classifier_gram),
        "nc3": _self_duality(classifier, geometry.centred_means),
        "nc3_uncentred": _self_duality(classifier, geometry.class_means),
        "nc3_etf": _distance_to_etf(classifier @ geometry.centred_means.T),
    }


class _SecondPass:
    """Sums over samples centred on their final class means, block by block.

    Each block arrives as h_i - mu_{y_i} in float64. One product with the right singular
    vectors of M, and with W when there is a classifier, gives every per-sample quantity
    of the catalogue: the coordinates along v_j that NC1 needs, and the within-class
    part of the logits and of (h_i - mu_G) M^T for nc4, accuracy and loss. Neither a
    d x d matrix nor an N x d temporary is formed.
    """

    def __init__(self, geometry: _ClassGeometry, classifier, bias, logit_scale):
        device = geometry.class_means.device
        num_classes = geometry.class_means.shape[0]
        self.geometry = geometry
        self.classifier = classifier
        self.rank = geometry.right_vectors.shape[0]
        self.columns = geometry.right_vectors
        self.tally: _ClassifierTally | None = None
        if classifier is not None:
            self.tally = _ClassifierTally(geometry, classifier, bias, logit_scale)
            self.columns = torch.cat([self.columns, classifier])
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.squared_projections = torch.zeros(self.rank, dtype=torch.float64, device=device)
        self.squared_spreads = torch.zeros(num_classes, dtype=torch.float64, device=device)

    def add(self, labels, within) -> None:
        products = within @ self.columns.T
        projections = products[:, : self.rank]  # (h_i - mu_{y_i}) v_j for every j
        self.squared_projections += (projections**2).sum(dim=0)
        squared_norms = torch.linalg.vector_norm(within, dim=1) ** 2  # no B x d temporary
        self.squared_spreads.index_add_(0, labels, squared_norms)
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        if self.tally is not None:
            # M = U S V^T, so (h_i - mu_{y_i}) M^T is a K-column product of the projections.
            within_dot_means = projections @ self.geometry.left_scaled.T
            self.tally.add(labels, products[:, self.rank :], within_dot_means)

    def metrics(self) -> dict[str, float]:
        num_samples = self.counts.sum()
        metrics = _mean_metrics(
            self.geometry, self.squared_projections / num_samples, self.squared_spreads / self.counts
        )
        if self.classifier is not None:
            metrics.update(_classifier_geometry_metrics(self.geometry, self.classifier))
        if self.tally is not None:  # made exactly when there is a classifier
            metrics.update(self.tally.metrics(num_samples))
        return _as_floats(metrics)


class _ClassifierTally:
    """Running sums for nc4, accuracy and loss over blocks of samples, on the device.

    Each block arrives centred on its class means, as (h_i - mu_{y_i}) W^T and
    (h_i - mu_{y_i}) M^T: the logits are s (h_i - mu_{y_i}) W^T + (s mu_{y_i} W^T + b),
    whose first term is small near collapse and second a per-class table.
    """

    def __init__(self, geometry: _ClassGeometry, classifier, bias, logit_scale):
        device = classifier.device
        self.logit_scale = logit_scale
        self.class_logits = logit_scale * (geometry.class_means @ classifier.T)
        if bias is not None:
            self.class_logits += _as_float64(bias, device)
        self.gram = geometry.gram
        self.disagreements = torch.zeros((), dtype=torch.int64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, labels, within_logits, within_dot_means) -> None:
        logits = self.logit_scale * within_logits + self.class_logits.index_select(0, labels)
        predicted = logits.argmax(dim=1)
        # argmin_k ||h - mu_k||^2 = argmin_k ||M_k||^2 - 2 (h - mu_G) M_k, and
        # h - mu_G = (h - mu_y) + M_y: centred, so that large means do not swamp it.
        centred_dot_means = within_dot_means + self.gram.index_select(0, labels)
        distances = self.gram.diagonal() - 2 * centred_dot_means
        self.disagreements += (predicted != distances.argmin(dim=1)).sum()
        self.correct += (predicted == labels).sum()
        self.loss_sum += cross_entropy_per_sample(logits, labels).sum()

    def metrics(self, num_samples) -> dict:
        return {
            "nc4": self.disagreements / num_samples,
            "accuracy": self.correct / num_samples,
            "loss": self.loss_sum / num_samples,
        }


def _as_floats(metrics: dict) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items()}


def _as_tensor(array) -> torch.Tensor:
    return array if torch.is_tensor(array) else torch.from_numpy(np.asarray(array))


def _as_float64(array, device) -> torch.Tensor:
    tensor = _as_tensor(array)
    return tensor.to(device=tensor.device if device is None else device, dtype=torch.float64)


def _as_labels(labels, device) -> torch.Tensor:
    return _as_tensor(labels).to(device=device, dtype=torch.long)


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"neural-collapse metrics need at least 2 classes, got {num_classes}")


def _check_no_empty_class(counts: torch.Tensor) -> None:
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f"classes {empty} have no samples; their means are undefined")


def _nc1(squared_singular_values, within_along) -> torch.Tensor:
    """tr(Sigma_W Sigma_B^+) / K, computed in the span of the class means.

    With M = U S V^T and Sigma_B = V S^2 V^T / K, the trace is
    sum_j (K / S_j^2) v_j^T Sigma_W v_j over the kept singular values, which needs
    neither a pseudo-inverse nor, in collapse_metrics, a d x d Sigma_W.
    """
    largest = squared_singular_values.max()
    if float(largest) == 0.0:
        return torch.tensor(math.nan)  # all class means coincide: no between-class scale
    kept = squared_singular_values > PSEUDO_INVERSE_RTOL * largest
    return (within_along[kept] / squared_singular_values[kept]).sum()


def _cdnv(class_variances, gram) -> torch.Tensor:
    """Mean over class pairs i < j of (V_i + V_j) / (2 ||mu_i - mu_j||^2)."""
    num_classes = gram.shape[0]
    squared_norms = gram.diagonal()
    distances = (squared_norms[:, None] + squared_norms[None, :] - 2 * gram).clamp(min=0)
    first, second = torch.triu_indices(num_classes, num_classes, offset=1, device=gram.device)
    ratios = (class_variances[first] + class_variances[second]) / (2 * distances[first, second])
    return ratios.mean()


def _equinorm(gram: torch.Tensor) -> torch.Tensor:
    """std / mean of the row norms, from the Gram matrix of the rows."""
    norms = gram.diagonal().sqrt()
    return norms.std(correction=0) / norms.mean()


def _equiangle(gram: torch.Tensor) -> torch.Tensor:
    """Mean over ordered pairs k != k' of |cos(row_k, row_k') + 1/(K-1)|."""
    num_classes = gram.shape[0]
    norms = gram.diagonal().sqrt()
    cosines = gram / (norms[:, None] * norms[None, :])
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=gram.device)
    return (cosines[off_diagonal] + 1.0 / (num_classes - 1)).abs().mean()


def _simplex_etf_gram(num_classes: int, device) -> torch.Tensor:
    """E = (I - 11^T/K) / sqrt(K-1), the simplex ETF Gram scaled to unit Frobenius norm."""
    identity = torch.eye(num_classes, dtype=torch.float64, device=device)
    return (identity - 1.0 / num_classes) / math.sqrt(num_classes - 1)


def _distance_to_etf(gram: torch.Tensor) -> torch.Tensor:
    etf = _simplex_etf_gram(gram.shape[0], gram.device)
    return (gram / gram.norm() - etf).norm()


def _self_duality(classifier: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    return (classifier / classifier.norm() - means / means.norm()).norm() ** 2
