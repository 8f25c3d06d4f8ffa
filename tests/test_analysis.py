"""kind "analysis" run by the worker's task (issue 26): the catalogue of uploaded features against an independent
float64 reference, a history row per checkpoint, data errors that fail the job naming the tensor and index, and
the streaming property (no read is larger than a block)."""

import contextlib
import io

import numpy as np
import pytest

from service.feature_files import inspect
from tests.feature_files import npz_bytes, safetensors_bytes, simplex_collapse
from tests.test_metrics import assert_matches_reference, reference_metrics
from tests.test_uploads import OCTET
from worker.nc import analysis
from worker.nc.stored_tensors import StoredTensor

K, D, PER_CLASS, SCALE = 4, 6, 30, 2.0
FEATURES, LABELS, CLASSIFIER = simplex_collapse(K, D, PER_CLASS, noise=0.3)
TEST_FEATURES, TEST_LABELS, _ = simplex_collapse(K, D, 10, noise=0.5, seed=1)
BIAS = np.linspace(-0.1, 0.1, K)
# The ETF, perturbed: its own metrics are then not rounding noise (the ETF's are 0 up to 1e-16).
NOISY_CLASSIFIER = CLASSIFIER + 0.05 * np.random.default_rng(2).standard_normal(CLASSIFIER.shape)


def analysed(api, files: list[bytes], **spec) -> dict:
    """Upload the files, submit their analysis and run it here, by the worker's task: the experiment as it ends."""
    ids = [api.client.post("/uploads", content=data, headers=OCTET).raise_for_status().json()["id"] for data in files]
    source = {"upload": ids if len(ids) > 1 else ids[0]}
    experiment = api.client.post("/experiments", json={"kind": "analysis", "source": source, **spec})
    return api.run(experiment.raise_for_status().json()["id"])


def history(api, experiment_id: str) -> list[dict]:
    return api.client.get(f"/experiments/{experiment_id}/metrics").json()["items"]


def test_the_catalogue_of_uploaded_features_matches_a_float64_reference_with_its_test_copy(api):
    data = safetensors_bytes(features=FEATURES, labels=LABELS, classifier=NOISY_CLASSIFIER, bias=BIAS,
                             test_features=TEST_FEATURES, test_labels=TEST_LABELS)
    done = analysed(api, [data], logit_scale=SCALE)
    assert done["status"] == "succeeded", done["error"]
    result = done["result"]
    want = reference_metrics(FEATURES, LABELS, NOISY_CLASSIFIER, BIAS, K, SCALE)
    assert_matches_reference({key: result[key] for key in want}, want)
    want_test = reference_metrics(TEST_FEATURES, TEST_LABELS, NOISY_CLASSIFIER, BIAS, K, SCALE)
    assert_matches_reference({key: result[f"test_{key}"] for key in want_test}, want_test)
    assert 0 < result["accuracy"] <= 1 and result["test_accuracy"] == want_test["accuracy"]
    [row] = history(api, done["id"])
    assert row["step"] == 0 and row["nc1"] == result["nc1"] and result["checkpoints"] == 1


def test_a_checkpoint_sequence_is_one_history_row_per_step_from_a_leading_axis_or_one_file_each(api):
    sequence = np.stack([FEATURES * scale for scale in (1.0, 0.5, 0.25)]).astype(np.float16)
    done = analysed(api, [npz_bytes(True, features=sequence, labels=LABELS.astype(np.int16))], steps=[10, 20, 30])
    assert done["status"] == "succeeded", done["error"]
    rows = history(api, done["id"])
    assert [row["step"] for row in rows] == [10, 20, 30]
    for row, features in zip(rows, sequence, strict=True):
        want = reference_metrics(features, LABELS, K=K)  # the float16 values, in float64
        assert_matches_reference({key: row[key] for key in want}, want)

    files = [safetensors_bytes(features=features.astype(np.float32), labels=LABELS) for features in sequence[:2]]
    rows = history(api, analysed(api, files)["id"])
    assert [row["step"] for row in rows] == [0, 1]
    assert rows[1]["nc1"] == pytest.approx(reference_metrics(sequence[1].astype(np.float32), LABELS)["nc1"], rel=1e-9)


def _with(array, index, value):
    changed = array.copy()
    changed[index] = value
    return changed


@pytest.mark.parametrize(("tensors", "message"), [
    ({"features": _with(FEATURES, (7, 2), np.nan)}, "features[7] holds nan"),
    ({"features": np.stack([FEATURES, _with(FEATURES, (5, 0), np.inf)])}, "features[1][5] holds inf"),
    ({"test_features": _with(TEST_FEATURES, (3, 1), -np.inf), "test_labels": TEST_LABELS}, "test_features[3] holds -inf"),
    ({"labels": _with(LABELS, 13, -1)}, "labels[13] = -1 is outside 0..3"),
    ({"labels": _with(LABELS, 21, 4), "classifier": CLASSIFIER}, "labels[21] = 4 is outside 0..3"),
    ({"labels": np.where(LABELS == 2, 1, LABELS)}, "labels: class 2 of 0..3 has no samples"),
    ({"classifier": _with(CLASSIFIER, (1, 3), np.nan)}, "classifier[1, 3] holds nan"),
])
def test_what_only_the_data_shows_fails_the_job_naming_the_tensor_and_the_first_bad_index(api, tensors, message):
    data = safetensors_bytes(**{"features": FEATURES, "labels": LABELS, **tensors})
    done = analysed(api, [data])
    assert done["status"] == "failed" and done["error"].startswith(f"bad data: {message}"), done


def test_a_reader_never_reads_more_than_a_block_and_the_blocks_give_the_catalogue(monkeypatch):
    features = FEATURES.astype(np.float32)
    data = safetensors_bytes(features=features, labels=LABELS, classifier=NOISY_CLASSIFIER)
    reads: dict[str, list[int]] = {}  # tensor -> the size of each read

    def opener(name):
        class Counted(io.BytesIO):
            def readinto(self, buffer):
                reads.setdefault(name, []).append(len(buffer))
                return super().readinto(buffer)

        @contextlib.contextmanager
        def open_counted():
            yield Counted(data)

        return open_counted

    layout = inspect(io.BytesIO(data), len(data))
    stored = {name: StoredTensor(name, opener(name), t.offset, t.dtype, t.shape) for name, t in layout.tensors.items()}
    monkeypatch.setattr(analysis, "BLOCK_ENTRIES", 7 * D)  # 7 rows a block: 18 blocks of the 120 samples
    got = analysis.catalogue(stored["features"], stored["labels"], K, stored["classifier"].load(), None, 1.0)
    # Two passes, each 18 reads of at most a block: never the whole tensor.
    assert len(reads["features"]) == 2 * 18 and max(reads["features"]) == 7 * D * 4
    assert sum(reads["features"]) == 2 * features.nbytes
    assert len(reads["labels"]) == 2 * 18 and max(reads["labels"]) == 7 * 8
    want = reference_metrics(features, LABELS, NOISY_CLASSIFIER, K=K)
    assert_matches_reference({key: got[key] for key in want}, want)
