"""kind "analysis" run by the worker's task (issue 26): the catalogue of uploaded features against an independent
float64 reference, a history row per checkpoint, data errors that fail the job naming the tensor and index, the
streaming property (no read is larger than a block), Client.analyze of numpy arrays and torch tensors, and
POST /experiments/{id}/reanalyze of a training run's saved features."""

import contextlib
import io

import numpy as np
import pytest
import torch

from service.client import Client, InvalidRequest
from service.feature_files import inspect
from service.schemas import TRAINING_FEATURES, TRAINING_MODEL
from tests.feature_files import npz_bytes, safetensors_bytes, simplex_collapse
from tests.test_metrics import assert_matches_reference, reference_metrics
from tests.test_uploads import OCTET
from worker.nc import analysis, train
from worker.nc.errors import Stopped
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
    ({"test_features": _with(TEST_FEATURES, (3, 1), -np.inf), "test_labels": TEST_LABELS},
     "test_features[3] holds -inf"),
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


@pytest.fixture
def client(api) -> Client:
    """A Client whose requests the in-process app answers (as tests/test_artifacts_http.py's)."""
    in_process = Client(api.base_url)
    in_process.close()
    in_process._http = api.client
    return in_process


def test_client_analyze_takes_torch_tensors_and_numpy_arrays(api, client):
    features = torch.from_numpy(FEATURES).to(torch.float32).requires_grad_()  # as straight from a network
    queued = client.analyze(features, torch.from_numpy(LABELS), NOISY_CLASSIFIER, name="vit", tags={"lab": "x"},
                            model="vit_b16", dataset="imagenet", logit_scale=0.5)
    assert queued["spec"]["model"] == "vit_b16" and queued["name"] == "vit" and queued["tags"] == {"lab": "x"}
    done = api.run(queued["id"])
    assert done["status"] == "succeeded", done["error"]
    want = reference_metrics(FEATURES.astype(np.float32), LABELS, NOISY_CLASSIFIER, K=K, scale=0.5)
    assert_matches_reference({key: done["result"][key] for key in want}, want)

    with pytest.raises(InvalidRequest) as refused:  # the upload's 422, through the client
        client.analyze(FEATURES, LABELS[:-1])
    assert refused.value.errors[0]["field"] == "labels"


TRAIN = {"kind": "train", "dataset": "gaussian", "K": 3, "d": 8, "architecture": "mlp", "mlp_depth": 1,
         "mlp_width": 16, "gaussian_dim": 6, "gaussian_train_per_class": 40, "gaussian_test_per_class": 20,
         "epochs": 2, "batch_size": 32, "save_features": True, "logit_scale": 4.0, "resources": "cpu"}
# Keys that the classifier does not enter: the same float32 features in, the same float64 arithmetic.
MEAN_KEYS = ("nc1", "nc1_cdnv", "nc2_equinorm_m", "nc2_equiangle_m", "nc2_etf_m")


def test_the_files_a_training_run_keeps_are_the_ones_a_reanalysis_reads():
    assert (TRAINING_FEATURES, TRAINING_MODEL) == (train.FEATURES_FILE, train.MODEL_FILE)


def test_a_reanalysis_of_a_training_run_recomputes_its_last_epochs_catalogue(api):
    submitted = api.client.post("/experiments", json={"spec": TRAIN, "name": "run", "tags": {"fig": "2"}}).json()
    run = api.run(submitted["id"])
    assert run["status"] == "succeeded", run["error"]

    response = api.client.post(f"/experiments/{run['id']}/reanalyze")
    assert response.status_code == 202, response.text
    queued = response.json()
    assert queued["spec"]["source"] == {"experiment": run["id"], "artifact": TRAINING_FEATURES,
                                        "model": TRAINING_MODEL}
    assert queued["name"] == "reanalysis of run" and queued["tags"] == {"fig": "2", "reanalysis_of": run["id"]}
    assert (queued["spec"]["K"], queued["spec"]["d"], queued["spec"]["logit_scale"]) == (3, 8, 4.0)
    done = api.run(queued["id"])
    assert done["status"] == "succeeded", done["error"]
    for key in MEAN_KEYS + tuple(f"test_{key}" for key in MEAN_KEYS):
        assert done["result"][key] == pytest.approx(run["result"][key], rel=1e-12), key
    # The classifier's rows normalized again (in float64, the run's in float32): equal to float32 rounding.
    for key in ("nc2_etf_w", "nc3", "nc3_etf", "loss", "test_loss"):
        assert done["result"][key] == pytest.approx(run["result"][key], rel=1e-5), key
    for key in ("accuracy", "test_accuracy", "nc4"):
        assert done["result"][key] == run["result"][key], key
    found = api.client.get("/experiments", params={"where": f"tags.reanalysis_of = '{run['id']}'"}).json()
    assert [item["id"] for item in found["items"]] == [done["id"]]


def test_a_run_without_saved_features_or_no_run_at_all_is_refused(api):
    ufm = api.client.post("/experiments", json={"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}).json()
    refused = api.client.post(f"/experiments/{ufm['id']}/reanalyze")
    assert refused.status_code == 409 and "save_features" in refused.json()["detail"]
    assert api.client.post("/experiments/nope/reanalyze").status_code == 404


def test_progress_runs_to_one_over_both_passes_and_a_stop_request_ends_the_analysis_between_blocks(monkeypatch):
    data = safetensors_bytes(features=FEATURES, labels=LABELS, test_features=TEST_FEATURES, test_labels=TEST_LABELS)
    layout = inspect(io.BytesIO(data), len(data))

    @contextlib.contextmanager
    def opener():
        yield io.BytesIO(data)

    stored = {name: StoredTensor(name, opener, t.offset, t.dtype, t.shape) for name, t in layout.tensors.items()}
    checkpoint = analysis.Checkpoint(**stored)
    monkeypatch.setattr(analysis, "BLOCK_ENTRIES", 16 * D)
    fractions: list[float] = []
    analysis.analyse([checkpoint], K, [0], on_progress=fractions.append)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    blocks_read = 0

    def stop_after_three() -> bool:
        nonlocal blocks_read
        blocks_read += 1
        return blocks_read > 3

    with pytest.raises(Stopped):
        analysis.analyse([checkpoint], K, [0], should_stop=stop_after_three)
    assert blocks_read == 4


def test_a_sweep_of_analyses_resolves_each_members_source_and_runs_each_against_the_reference(api):
    """One member per upload, a grid over the logit scale: each member's K and d come from its own file, a bad
    member's source is a 422 naming it (and nothing of the sweep is kept), and each catalogue is the reference's."""
    noisier, _, _ = simplex_collapse(K, D, PER_CLASS, noise=0.6, seed=3)
    ids = [
        api.client.post("/uploads", content=safetensors_bytes(features=features, labels=LABELS), headers=OCTET)
        .raise_for_status()
        .json()["id"]
        for features in (FEATURES, noisier)
    ]
    base = {"kind": "analysis", "source": {"upload": ids[0]}, "model": "mlp"}
    bad = api.client.post("/sweeps", json={"base": base, "variants": [{}, {"source": {"upload": "nope"}}]})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "members[1].source.upload", bad.text
    assert api.client.get("/sweeps").json()["items"] == []

    variants = [{"source": {"upload": upload_id}} for upload_id in ids]
    sweep = api.client.post("/sweeps", json={"base": base, "variants": variants, "grid": {"logit_scale": [1.0, 2.0]}})
    assert sweep.status_code == 202, sweep.text
    members = sweep.json()["members"]
    assert len(members) == 4
    for member_id in members:
        done = api.run(member_id)
        assert done["status"] == "succeeded", done["error"]
        assert done["spec"]["K"] == K and done["spec"]["d"] == D and done["spec"]["model"] == "mlp"
        features = FEATURES if done["spec"]["source"]["upload"] == ids[0] else noisier
        want = reference_metrics(features, LABELS, None, None, K, done["spec"]["logit_scale"])
        assert_matches_reference({key: done["result"][key] for key in want}, want)
