"""collapse_metrics against a deliberately plain float64 numpy reference (docs/metrics.md)."""

import math

import numpy as np
import pytest
import torch

from worker.nc.metrics import CLASSIFIER_KEYS, MEAN_KEYS, CollapseAccumulator, collapse_metrics

RTOL = 1e-9


def reference_metrics(H, y, W=None, b=None, K=None, scale=1.0):
    """Textbook formulas: explicit d x d scatter matrices, np.linalg.pinv, pair loops."""
    H = np.asarray(H, dtype=np.float64)
    y = np.asarray(y)
    N, d = H.shape
    K = K if K is not None else y.max() + 1
    means = np.stack([H[y == k].mean(axis=0) for k in range(K)])
    mu_G = means.mean(axis=0)
    M = means - mu_G
    Sigma_W = np.zeros((d, d))
    for k in range(K):
        centred = H[y == k] - means[k]
        Sigma_W += centred.T @ centred
    Sigma_W /= N
    Sigma_B = M.T @ M / K
    out = {"nc1": np.trace(Sigma_W @ np.linalg.pinv(Sigma_B, rcond=1e-10)) / K}

    V = [np.mean(np.sum((H[y == k] - means[k]) ** 2, axis=1)) for k in range(K)]
    pairs = []
    for i in range(K):  # one loop level vectorized so that K = 1000 stays fast
        distances = np.sum((means[i + 1 :] - means[i]) ** 2, axis=1)
        pairs.extend((V[i] + np.array(V[i + 1 :])) / (2 * distances))
    out["nc1_cdnv"] = np.mean(pairs)

    E = (np.eye(K) - np.ones((K, K)) / K) / np.sqrt(K - 1)

    def equinorm(A):
        norms = np.linalg.norm(A, axis=1)
        return norms.std() / norms.mean()

    def equiangle(A):
        unit = A / np.linalg.norm(A, axis=1, keepdims=True)
        terms = []
        for i in range(K):
            others = np.delete(unit, i, axis=0)
            terms.extend(np.abs(others @ unit[i] + 1 / (K - 1)))
        return np.mean(terms)

    def etf_distance(G):
        return np.linalg.norm(G / np.linalg.norm(G) - E)

    out.update(
        nc2_equinorm_m=equinorm(M), nc2_equiangle_m=equiangle(M), nc2_etf_m=etf_distance(M @ M.T)
    )
    if W is None:
        return out
    W = np.asarray(W, dtype=np.float64)
    logits = scale * H @ W.T + (0.0 if b is None else np.asarray(b, dtype=np.float64))
    distances_to_means = np.stack([np.sum((H - means[k]) ** 2, axis=1) for k in range(K)], axis=1)
    nearest = np.argmin(distances_to_means, axis=1)
    row_max = logits.max(axis=1, keepdims=True)
    log_partition = row_max[:, 0] + np.log(np.exp(logits - row_max).sum(axis=1))
    out.update(
        nc2_equinorm_w=equinorm(W),
        nc2_equiangle_w=equiangle(W),
        nc2_etf_w=etf_distance(W @ W.T),
        nc3=np.linalg.norm(W / np.linalg.norm(W) - M / np.linalg.norm(M)) ** 2,
        nc3_uncentred=np.linalg.norm(W / np.linalg.norm(W) - means / np.linalg.norm(means)) ** 2,
        nc3_etf=etf_distance(W @ M.T),
        nc4=np.mean(logits.argmax(axis=1) != nearest),
        accuracy=np.mean(logits.argmax(axis=1) == y),
        loss=np.mean(log_partition - logits[np.arange(N), y]),
    )
    return out


def assert_matches_reference(got, want):
    assert set(got) == set(want)
    for key, value in want.items():
        assert isinstance(got[key], float), key
        assert got[key] == pytest.approx(value, rel=RTOL, abs=1e-300), key


def random_problem(rng, counts, d, spread, mean_scale=1.0):
    K = len(counts)
    means = mean_scale * rng.standard_normal((K, d)) + 3.0  # offset: mu_G far from 0
    y = np.repeat(np.arange(K), counts)
    rng.shuffle(y)
    H = means[y] + spread * rng.standard_normal((len(y), d))
    W = means - means.mean(axis=0) + 0.3 * rng.standard_normal((K, d))
    b = 0.1 * rng.standard_normal(K)
    return H, y, W, b


@pytest.mark.parametrize(
    "counts, d, spread",
    [
        ([20] * 5, 16, 0.5),  # d > K - 1: Sigma_B singular
        ([20] * 8, 4, 0.5),  # d < K - 1: Sigma_B full rank
        ([20] * 6, 10, 1e-6),  # collapsed: spread 1e-6 of the mean distance
        ([3, 40, 7, 25, 12], 8, 0.3),  # imbalanced classes
    ],
)
def test_matches_reference_numpy_inputs(counts, d, spread):
    rng = np.random.default_rng(len(counts) * 100 + d)
    H, y, W, b = random_problem(rng, counts, d, spread)
    got = collapse_metrics(H, y, W, b, logit_scale=2.5)
    assert_matches_reference(got, reference_metrics(H, y, W, b, scale=2.5))


def test_collapsed_nc1_is_tiny_but_exact():
    rng = np.random.default_rng(1)
    H, y, W, b = random_problem(rng, [30] * 4, 6, 1e-6)
    got = collapse_metrics(H, y, W, b)
    assert 1e-14 < got["nc1"] < 1e-10
    assert got["nc1"] == pytest.approx(reference_metrics(H, y, W, b)["nc1"], rel=RTOL, abs=0)


def test_matches_reference_torch_inputs_and_mean_keys_only():
    rng = np.random.default_rng(2)
    H, y, W, b = random_problem(rng, [15] * 7, 12, 0.4)
    got = collapse_metrics(torch.from_numpy(H).float(), torch.from_numpy(y))
    want = reference_metrics(H.astype(np.float32), y)
    assert set(got) == set(MEAN_KEYS)
    assert_matches_reference(got, want)

    got = collapse_metrics(
        torch.from_numpy(H), torch.from_numpy(y), torch.from_numpy(W), torch.from_numpy(b)
    )
    assert set(got) == set(MEAN_KEYS) | set(CLASSIFIER_KEYS)
    assert_matches_reference(got, reference_metrics(H, y, W, b))


def test_many_classes():
    rng = np.random.default_rng(3)
    H, y, W, b = random_problem(rng, [3] * 1000, 64, 0.5)
    got = collapse_metrics(H, y, W, b)
    assert_matches_reference(got, reference_metrics(H, y, W, b))


def test_num_classes_argument_and_missing_class():
    rng = np.random.default_rng(4)
    H, y, W, b = random_problem(rng, [5] * 4, 5, 0.5)
    assert collapse_metrics(H, y, W, b, num_classes=4) == collapse_metrics(H, y, W, b)
    with pytest.raises(ValueError, match="no samples"):
        collapse_metrics(H, y, num_classes=5)


def simplex_etf(K, d, rng):
    """K unit rows with pairwise cosine -1/(K-1), randomly rotated into R^d (d >= K-1)."""
    centred = np.sqrt(K / (K - 1)) * (np.eye(K) - 1.0 / K)  # rows span the complement of 1
    _, _, vt = np.linalg.svd(centred)
    coordinates = centred @ vt[: K - 1].T  # the same rows in a (K-1)-dim orthonormal basis
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return coordinates @ rotation[: K - 1]


@pytest.mark.parametrize("K, d", [(4, 3), (10, 9), (10, 32)])
def test_exact_simplex_etf_is_fully_collapsed(K, d):
    rng = np.random.default_rng(K + d)
    W = simplex_etf(K, d, rng)
    y = np.repeat(np.arange(K), 6)
    H = W[y]
    scale = 3.0
    got = collapse_metrics(H, y, W, logit_scale=scale)
    for key in MEAN_KEYS + CLASSIFIER_KEYS:
        if key not in ("accuracy", "loss"):
            assert abs(got[key]) < 1e-10, key
    assert got["accuracy"] == 1.0
    # At the ETF every sample has margin s K/(K-1) over each of the K-1 other classes.
    optimal = math.log1p((K - 1) * math.exp(-scale * K / (K - 1)))
    assert got["loss"] == pytest.approx(optimal, rel=1e-12, abs=0)


def test_degenerate_inputs_give_nan_not_errors():
    # Every class holds the same four samples, so all class means are exactly equal.
    samples = np.random.default_rng(5).standard_normal((4, 5))
    H = np.tile(samples, (3, 1))
    y = np.repeat(np.arange(3), 4)
    got = collapse_metrics(H, y, np.zeros((3, 5)))
    for key in (
        "nc1",
        "nc2_equinorm_m",
        "nc2_equiangle_m",
        "nc2_etf_m",
        "nc2_equinorm_w",
        "nc2_equiangle_w",
        "nc2_etf_w",
        "nc3",
        "nc3_uncentred",
        "nc3_etf",
    ):
        assert math.isnan(got[key]), key
    assert got["nc1_cdnv"] == math.inf  # spread over zero distance
    assert got["loss"] == pytest.approx(math.log(3), rel=1e-15)
    assert got["accuracy"] == pytest.approx(1 / 3)


def test_nc3_uncentred_equals_nc3_at_a_zero_global_mean_and_sees_a_shift_that_nc3_ignores():
    K, d = 4, 6
    rng = np.random.default_rng(3)
    etf = np.sqrt(K / (K - 1)) * (np.eye(K) - np.ones((K, K)) / K)  # rows sum to zero
    means = np.hstack([etf, np.zeros((K, d - K))])
    y = np.repeat(np.arange(K), 5)
    noise = 1e-3 * rng.standard_normal((len(y), d))
    noise -= np.stack([noise[y == k].mean(axis=0) for k in range(K)])[y]  # class means exactly `means`
    W = means + 0.1 * rng.standard_normal((K, d))

    centred = collapse_metrics(means[y] + noise, y, W)
    assert centred["nc3_uncentred"] == pytest.approx(centred["nc3"], rel=1e-12)

    shift = np.full(d, 2.0)
    shifted = collapse_metrics(means[y] + noise + shift, y, W)
    assert shifted["nc3"] == pytest.approx(centred["nc3"], rel=1e-12)  # nc3 centres the means
    uncentred = means + shift
    expected = np.linalg.norm(W / np.linalg.norm(W) - uncentred / np.linalg.norm(uncentred)) ** 2
    assert shifted["nc3_uncentred"] == pytest.approx(expected, rel=1e-12)
    assert shifted["nc3_uncentred"] > centred["nc3_uncentred"] + 0.1


# CollapseAccumulator: the same catalogue from batches, against the one-shot result.


def uneven_batches(H, y, rng):
    """Batches of random sizes, the first of size 1. The first half of the samples is
    sorted by class, so that its batches hold only some of the classes."""
    order = rng.permutation(len(y))
    half = len(y) // 2
    order[:half] = order[:half][np.argsort(y[order[:half]], kind="stable")]
    cuts = [1]
    while cuts[-1] < len(y):
        cuts.append(cuts[-1] + int(rng.integers(1, 40)))
    return [(H[rows], y[rows]) for rows in np.split(order, cuts[:-1])]


def accumulate(batches, K, d, W=None, b=None, scale=1.0, replay=None, passes=1):
    accumulator = CollapseAccumulator(K, d, passes=passes)
    for features, labels in batches:
        accumulator.update(features, labels)
    return accumulator.compute(W, b, scale, replay=replay)


@pytest.mark.parametrize(
    "counts, d, spread",
    [
        ([40] * 5, 16, 0.5),  # d > K - 1: Sigma_B singular
        ([40] * 8, 4, 0.5),  # d < K - 1: Sigma_B full rank
        ([40] * 6, 10, 1e-6),  # collapsed: spread 1e-6 of the mean distance
        ([3, 80, 7, 50, 12], 8, 0.3),  # imbalanced classes
        ([6] * 200, 32, 0.5),  # many classes, each missing from most batches
    ],
)
@pytest.mark.parametrize("passes", [1, 2])
def test_accumulator_matches_one_shot(counts, d, spread, passes):
    rng = np.random.default_rng(len(counts) * 100 + d + 7)
    H, y, W, b = random_problem(rng, counts, d, spread)
    K = len(counts)
    batches = uneven_batches(H, y, rng)
    assert len(batches[0][1]) == 1
    assert any(len(np.unique(labels)) < K for _, labels in batches[1:])
    # The replay pass may batch and order the samples differently.
    replay = uneven_batches(H, y, rng)[::-1]
    got = accumulate(batches, K, d, W, b, 2.5, replay=replay, passes=passes)
    assert_matches_reference(got, collapse_metrics(H, y, W, b, logit_scale=2.5))
    mean_keys = accumulate(batches, K, d, replay=replay if passes == 2 else None, passes=passes)
    assert_matches_reference(mean_keys, collapse_metrics(H, y))


def test_accumulator_float32_near_collapse_keeps_nc1_exact():
    """Float32 batches with a within-class spread about 1e-6 of the distance between
    class means (float32 rounding included) and means far from the origin: here a
    Sigma_W from raw second moments gets even the sign of nc1 wrong."""
    rng = np.random.default_rng(8)
    H, y, _, _ = random_problem(rng, [50] * 6, 24, 1e-6)
    H = (H + 40.0).astype(np.float32)
    exact = collapse_metrics(H.astype(np.float64), y)
    assert 0 < exact["nc1"] < 1e-9
    assert exact["nc1"] == pytest.approx(reference_metrics(H, y)["nc1"], rel=RTOL, abs=0)
    batches = [(torch.from_numpy(f), torch.from_numpy(labels)) for f, labels in uneven_batches(H, y, rng)]
    assert batches[0][0].dtype == torch.float32
    assert accumulate(batches, 6, 24)["nc1"] == pytest.approx(exact["nc1"], rel=RTOL, abs=0)
    two_pass = accumulate(batches, 6, 24, replay=batches, passes=2)
    assert two_pass["nc1"] == pytest.approx(exact["nc1"], rel=RTOL, abs=0)
    assert collapse_metrics(H, y)["nc1"] == pytest.approx(exact["nc1"], rel=RTOL, abs=0)


def state_size(accumulator):
    return sum(value.numel() for value in vars(accumulator).values() if torch.is_tensor(value))


@pytest.mark.parametrize("passes, bound", [(1, 2 * 7 * 12 + 12 * 12 + 2 * 7), (2, 2 * 7 * 12 + 7)])
def test_accumulator_memory_does_not_grow_with_samples(passes, bound):
    K, d = 7, 12
    rng = np.random.default_rng(9)
    H, y, _, _ = random_problem(rng, [10] * K, d, 0.5)
    accumulator = CollapseAccumulator(K, d, passes=passes)
    accumulator.update(H, y)
    size = state_size(accumulator)
    assert 0 < size <= bound
    for _ in range(50):
        accumulator.update(H, y)
    assert state_size(accumulator) == size
    accumulator.compute(replay=[(H, y)] * 51)
    assert state_size(accumulator) == size


def test_accumulator_replay_and_empty_classes():
    rng = np.random.default_rng(10)
    H, y, W, b = random_problem(rng, [10] * 4, 6, 0.5)
    batches = uneven_batches(H, y, rng)
    # Without a replay, the keys that apply W to every sample are absent.
    got = accumulate(batches, 4, 6, W, b)
    assert set(got) == set(MEAN_KEYS) | set(CLASSIFIER_KEYS) - {"nc4", "accuracy", "loss"}
    one_shot = collapse_metrics(H, y, W, b)
    assert_matches_reference(got, {key: one_shot[key] for key in got})
    with pytest.raises(ValueError, match="same samples"):
        accumulate(batches, 4, 6, W, b, replay=batches[1:])
    with pytest.raises(ValueError, match="no samples"):
        accumulate(batches, 5, 6)
    with pytest.raises(ValueError, match="no batches"):
        accumulate([], 4, 6)
    with pytest.raises(ValueError, match="needs the replay pass"):
        accumulate(batches, 4, 6, W, b, passes=2)
    with pytest.raises(ValueError, match="passes must be 1 or 2"):
        CollapseAccumulator(4, 6, passes=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("passes", [1, 2])
def test_accumulator_on_cuda_never_synchronizes_per_batch(passes):
    rng = np.random.default_rng(11)
    H, y, W, b = random_problem(rng, [30] * 10, 64, 1e-6)
    batches = [
        (torch.from_numpy(f).float().cuda(), torch.from_numpy(batch_labels).cuda())
        for f, batch_labels in uneven_batches(H, y, rng)
    ]

    def without_syncs(batches):
        # Everything done with a batch between two next() calls runs in "error" mode.
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield from batches
        finally:
            torch.cuda.set_sync_debug_mode("default")

    accumulator = CollapseAccumulator(10, 64, passes=passes)
    for features, labels in without_syncs(batches):
        accumulator.update(features, labels)
    state = [value for value in vars(accumulator).values() if torch.is_tensor(value)]
    assert state and all(tensor.is_cuda for tensor in state)
    got = accumulator.compute(W, b, replay=without_syncs(batches))
    H32 = np.concatenate([f.cpu().numpy() for f, _ in batches])
    y32 = np.concatenate([batch_labels.cpu().numpy() for _, batch_labels in batches])
    assert_matches_reference(got, collapse_metrics(H32.astype(np.float64), y32, W, b))


def test_the_search_language_knows_exactly_the_catalogue_the_engine_writes():
    """service/search/fields.py declares the catalogue again (the service never imports the engine): the two agree."""
    from service.search.fields import CATALOGUE_METRICS

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    classifier = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    written = collapse_metrics(features, torch.arange(3).repeat_interleave(10), classifier, None, 3)
    assert sorted(written) == sorted(CATALOGUE_METRICS) == sorted(MEAN_KEYS + CLASSIFIER_KEYS)
