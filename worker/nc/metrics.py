"""Neural-collapse metrics, as defined in the "Metric catalogue" of DESIGN.md.

NC1-NC4 follow Papyan, Han & Donoho (2020), "Prevalence of neural collapse during the
terminal phase of deep learning training"; the ETF-distance forms (`nc2_etf_*`,
`nc3_etf`) follow Zhu et al. (NeurIPS 2021), "A geometric analysis of neural collapse
with unconstrained features", as used by Yaras et al. (NeurIPS 2022); `nc1_cdnv` is the
class-distance normalized variance of Galanti, Gyorgy & Hutter (ICLR 2022).

Everything is computed in float64 on the input's device. Collapsed features have a
within-class spread many orders of magnitude below the distance between class means, so
features are centred on their class mean before any product is taken: a Sigma_W formed
from uncentred second moments would be rounding noise exactly when collapse is reached.

Degenerate inputs do not raise. A metric that is a ratio 0/0 there is float('nan'):
every metric built from M when all class means coincide (M = 0, or every centred mean
below 1e-12 of the largest class mean, which is rounding error), every metric built from
W when the classifier is zero, and `nc1_cdnv` for a pair of classes with identical means
and no spread (identical means with spread give inf). A class with no samples has no
mean and raises ValueError.
"""

import math

import numpy as np
import torch

# Singular values of Sigma_B below this fraction of the largest are treated as zero in
# its pseudo-inverse (DESIGN.md): the centred means span at most K-1 dimensions.
PSEUDO_INVERSE_RTOL = 1e-10

# Class means closer than this (relative to their size) are treated as coincident: M is
# then exactly zero, and the metrics that divide by its scale are NaN.
COINCIDENT_MEANS_RTOL = 1e-12

MEAN_KEYS = ("nc1", "nc1_cdnv", "nc2_equinorm_m", "nc2_equiangle_m", "nc2_etf_m")
CLASSIFIER_KEYS = (
    "nc2_equinorm_w",
    "nc2_equiangle_w",
    "nc2_etf_w",
    "nc3",
    "nc3_etf",
    "nc4",
    "accuracy",
    "loss",
)


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
    must have at least one sample. Returns plain Python floats keyed as in DESIGN.md.
    """
    features = _as_float64(features, device=None)
    device = features.device
    labels = labels if torch.is_tensor(labels) else torch.from_numpy(np.asarray(labels))
    labels = labels.to(device=device, dtype=torch.long)
    num_classes = int(num_classes) if num_classes is not None else int(labels.max()) + 1
    if num_classes < 2:
        raise ValueError(f"neural-collapse metrics need at least 2 classes, got {num_classes}")

    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {empty} have no samples; their means are undefined")
    class_means = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=device)
    class_means.index_add_(0, labels, features)
    class_means /= counts[:, None]
    global_mean = class_means.mean(dim=0)
    centred_means = class_means - global_mean  # M
    if centred_means.abs().max() <= COINCIDENT_MEANS_RTOL * class_means.abs().max():
        centred_means.zero_()  # what is left is the rounding error of averaging equal means
    within = features - class_means[labels]  # h_i - mu_{y_i}

    metrics = {
        "nc1": _nc1(within, centred_means),
        "nc1_cdnv": _cdnv(within, labels, counts, centred_means),
        "nc2_equinorm_m": _equinorm(centred_means),
        "nc2_equiangle_m": _equiangle(centred_means),
        "nc2_etf_m": _distance_to_etf(centred_means @ centred_means.T),
    }
    if classifier is None:
        return {key: float(value) for key, value in metrics.items()}

    classifier = _as_float64(classifier, device)
    logits = logit_scale * (features @ classifier.T)
    if bias is not None:
        logits = logits + _as_float64(bias, device)
    predicted = logits.argmax(dim=1)
    metrics.update(
        nc2_equinorm_w=_equinorm(classifier),
        nc2_equiangle_w=_equiangle(classifier),
        nc2_etf_w=_distance_to_etf(classifier @ classifier.T),
        nc3=_self_duality(classifier, centred_means),
        nc3_etf=_distance_to_etf(classifier @ centred_means.T),
        nc4=(predicted != _nearest_class_mean(features - global_mean, centred_means))
        .to(torch.float64)
        .mean(),
        accuracy=(predicted == labels).to(torch.float64).mean(),
        loss=cross_entropy_per_sample(logits, labels).mean(),
    )
    return {key: float(value) for key, value in metrics.items()}


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


def _as_float64(array, device) -> torch.Tensor:
    tensor = array if torch.is_tensor(array) else torch.from_numpy(np.asarray(array))
    return tensor.to(device=tensor.device if device is None else device, dtype=torch.float64)


def _nc1(within: torch.Tensor, centred_means: torch.Tensor) -> torch.Tensor:
    """tr(Sigma_W Sigma_B^+) / K, computed in the span of the class means.

    With M = U S V^T and Sigma_B = V S^2 V^T / K, the trace is
    sum_j (K / S_j^2) v_j^T Sigma_W v_j = sum_j (K / S_j^2) ||Hc v_j||^2 / N, which
    needs neither a d x d Sigma_W nor its pseudo-inverse.
    """
    _, singular_values, right_vectors_t = torch.linalg.svd(centred_means, full_matrices=False)
    squared = singular_values**2
    if float(squared.max()) == 0.0:
        return torch.tensor(math.nan)  # all class means coincide: no between-class scale
    kept = squared > PSEUDO_INVERSE_RTOL * squared.max()
    projected = within @ right_vectors_t[kept].T  # N x rank
    return ((projected**2).sum(dim=0) / squared[kept]).sum() / within.shape[0]


def _cdnv(within, labels, counts, centred_means) -> torch.Tensor:
    """Mean over class pairs i < j of (V_i + V_j) / (2 ||mu_i - mu_j||^2)."""
    num_classes = counts.shape[0]
    variances = torch.zeros(num_classes, dtype=torch.float64, device=within.device)
    variances.index_add_(0, labels, (within**2).sum(dim=1))
    variances /= counts
    gram = centred_means @ centred_means.T  # centred: no cancellation from a large mu_G
    squared_norms = gram.diagonal()
    distances = (squared_norms[:, None] + squared_norms[None, :] - 2 * gram).clamp(min=0)
    first, second = torch.triu_indices(num_classes, num_classes, offset=1, device=within.device)
    ratios = (variances[first] + variances[second]) / (2 * distances[first, second])
    return ratios.mean()


def _equinorm(rows: torch.Tensor) -> torch.Tensor:
    norms = rows.norm(dim=1)
    return norms.std(correction=0) / norms.mean()


def _equiangle(rows: torch.Tensor) -> torch.Tensor:
    """Mean over ordered pairs k != k' of |cos(row_k, row_k') + 1/(K-1)|."""
    num_classes = rows.shape[0]
    norms = rows.norm(dim=1)
    cosines = (rows @ rows.T) / (norms[:, None] * norms[None, :])
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool, device=rows.device)
    return (cosines[off_diagonal] + 1.0 / (num_classes - 1)).abs().mean()


def _simplex_etf_gram(num_classes: int, device) -> torch.Tensor:
    """E = (I - 11^T/K) / sqrt(K-1), the simplex ETF Gram scaled to unit Frobenius norm."""
    identity = torch.eye(num_classes, dtype=torch.float64, device=device)
    return (identity - 1.0 / num_classes) / math.sqrt(num_classes - 1)


def _distance_to_etf(gram: torch.Tensor) -> torch.Tensor:
    etf = _simplex_etf_gram(gram.shape[0], gram.device)
    return (gram / gram.norm() - etf).norm()


def _self_duality(classifier: torch.Tensor, centred_means: torch.Tensor) -> torch.Tensor:
    return (classifier / classifier.norm() - centred_means / centred_means.norm()).norm() ** 2


def _nearest_class_mean(centred_features, centred_means) -> torch.Tensor:
    # argmin_k ||h - mu_k||^2 = argmin_k (||mu_k||^2 - 2 <h, mu_k>); both sides centred on
    # mu_G so that large means do not swamp the comparison.
    squared_norms = (centred_means**2).sum(dim=1)
    return (squared_norms[None, :] - 2 * centred_features @ centred_means.T).argmin(dim=1)
