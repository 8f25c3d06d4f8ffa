"""POST /uploads (issue 26): a file of features streamed to the artifact store, its header checked without
trusting it; a refused or oversized file is a 4xx naming the tensor and the rule, and leaves nothing behind.
Submitting an analysis checks its source (422 at submit) and fills in K and d; its free fields are searchable."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from service.db import make_engine
from tests.conftest import in_process_api
from tests.feature_files import npz_bytes, safetensors_bytes, simplex_collapse, with_header

FEATURES, LABELS, CLASSIFIER = simplex_collapse(num_classes=3, dim=5, per_class=4, noise=0.1)
GOOD = safetensors_bytes(features=FEATURES.astype(np.float32), labels=LABELS, classifier=CLASSIFIER)
OCTET = {"Content-Type": "application/octet-stream"}
CAP = 2 << 20
# float64 features: 1.5 MiB, over the 1 MiB of other bodies (NCLAB_MAX_BODY_BYTES) and under the cap; and over it.
UNDER = safetensors_bytes(features=np.zeros((24_576, 8)), labels=np.arange(24_576) % 2)
OVER = safetensors_bytes(features=np.zeros((32_768, 8)), labels=np.arange(32_768) % 2)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """The API in-process on SQLite with an upload cap of 2 MiB, shared by the module's tests."""
    with in_process_api(tmp_path_factory.mktemp("api"), NCLAB_MAX_UPLOAD_BYTES=str(CAP)) as app:
        yield app


def uploads_dir(api) -> Path:
    return api.data_dir / "artifacts" / "uploads"


def stored_uploads(api) -> list[str]:
    """Every file in the store's uploads folder, partial ones included, and the rows of the uploads table."""
    folder = uploads_dir(api)
    files = sorted(path.name for path in folder.iterdir()) if folder.exists() else []
    engine = make_engine(api.database_url)
    try:
        with engine.connect() as connection:
            rows = [row[0] for row in connection.exec_driver_sql("SELECT id FROM uploads")]
    finally:
        engine.dispose()
    return files + rows


def upload(api, data: bytes):
    return api.client.post("/uploads", content=data, headers=OCTET)


def test_an_upload_is_stored_whole_with_its_size_sha256_and_layout(api):
    response = upload(api, GOOD)
    assert response.status_code == 201
    body = response.json()
    assert body["bytes"] == len(GOOD) and body["sha256"] == hashlib.sha256(GOOD).hexdigest()
    assert response.headers["location"] == f"/uploads/{body['id']}"
    assert (uploads_dir(api) / body["id"]).read_bytes() == GOOD
    assert body["classes"] == 3
    assert body["layout"] == {
        "format": "safetensors",
        "steps": 1,
        "samples": 12,
        "dim": 5,
        "tensors": {
            "classifier": {"dtype": "float64", "shape": [3, 5]},
            "features": {"dtype": "float32", "shape": [12, 5]},
            "labels": {"dtype": "int64", "shape": [12]},
        },
    }
    assert api.client.get(f"/uploads/{body['id']}").json() == body
    form = api.client.post("/uploads", files={"file": GOOD})
    assert form.status_code == 422 and form.json()["errors"][0]["field"] == "Content-Type"
    [entry] = api.client.get("/audit", params={"where": f"target = '{body['id']}'"}).json()["items"]
    assert entry["action"] == "upload.submit" and entry["status"] == 201


def test_a_file_of_many_pieces_is_hashed_and_written_in_order(api, monkeypatch):
    """More pieces than the pipeline holds at once, each of many chunks: the stored file and its hash are the file."""
    from service.api.routes import uploads

    monkeypatch.setattr(uploads, "WRITE_SIZE", 4096)
    chunks = (UNDER[start : start + 1000] for start in range(0, len(UNDER), 1000))
    response = api.client.post("/uploads", content=chunks, headers=OCTET)
    assert response.status_code == 201
    body = response.json()
    assert body["bytes"] == len(UNDER) and body["sha256"] == hashlib.sha256(UNDER).hexdigest()
    assert (uploads_dir(api) / body["id"]).read_bytes() == UNDER
    assert len(UNDER) // 4096 > 10 * uploads.PIECES_IN_FLIGHT


def test_a_file_over_the_upload_cap_is_a_413_declared_or_streamed_and_nothing_is_kept(api):
    assert len(UNDER) > 1 << 20 and len(OVER) > CAP
    before = stored_uploads(api)
    declared = upload(api, OVER)
    assert declared.status_code == 413 and "NCLAB_MAX_UPLOAD_BYTES" in declared.json()["detail"]
    streamed = api.client.post("/uploads", content=iter([OVER[: 1 << 20], OVER[1 << 20 :]]), headers=OCTET)
    assert streamed.status_code == 413 and "NCLAB_MAX_UPLOAD_BYTES" in streamed.json()["detail"]
    assert stored_uploads(api) == before
    assert upload(api, UNDER).status_code == 201


def _lying_offsets(header):
    header["labels"]["data_offsets"][1] += 8  # past the end of the data


def _overlapping(header):
    start, _ = header["features"]["data_offsets"]
    header["labels"]["data_offsets"] = [start, start + 8 * len(LABELS)]  # the labels read from the features


SHORT_LABELS = LABELS[:-1]
REFUSED = {
    "offsets past the end": (with_header(safetensors_bytes(features=FEATURES, labels=LABELS), _lying_offsets),
                             "labels", "data_offsets"),
    "overlapping tensors": (with_header(safetensors_bytes(features=FEATURES, labels=LABELS), _overlapping),
                            "labels", "the data before ends at"),
    "a header longer than the file": (b"\xff" * 8 + b"{}", "body", "header claims"),
    "float labels": (safetensors_bytes(features=FEATURES, labels=LABELS.astype(np.float32)), "labels", "integers"),
    "integer features": (safetensors_bytes(features=LABELS[:, None], labels=LABELS), "features", "float16"),
    "mismatched lengths": (safetensors_bytes(features=FEATURES, labels=SHORT_LABELS), "labels", "samples 11"),
    "a classifier of another d": (safetensors_bytes(features=FEATURES, labels=LABELS, classifier=CLASSIFIER[:, :4]),
                                  "classifier", "the dimension 4"),
    "no labels": (safetensors_bytes(features=FEATURES), "labels", "missing"),
    "test features without labels": (safetensors_bytes(features=FEATURES, labels=LABELS, test_features=FEATURES),
                                      "test_labels", "missing"),
    "an unknown tensor": (safetensors_bytes(features=FEATURES, labels=LABELS, feature=FEATURES), "feature",
                          "unknown tensor"),
    "an npz with a pickle": (npz_bytes(features=FEATURES, labels=np.array([object()] * 12)), "labels", "pickle"),
    "a truncated npz": (npz_bytes(features=FEATURES, labels=LABELS)[:-40], "body", "npz"),
    "neither format": (b"1234", "body", "neither safetensors nor npz"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_file_whose_header_breaks_a_rule_is_a_422_naming_the_tensor_and_nothing_is_kept(api, case):
    data, tensor, rule = REFUSED[case]
    before = stored_uploads(api)
    response = upload(api, data)
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["field"] == (tensor or "body") and rule in error["message"]
    assert stored_uploads(api) == before


def test_an_npz_of_a_checkpoint_sequence_is_taken_compressed_or_not(api):
    sequence = np.stack([FEATURES, 2 * FEATURES]).astype(np.float16)
    for compressed in (False, True):
        body = upload(api, npz_bytes(compressed, features=sequence, labels=LABELS.astype(np.int32))).json()
        assert body["layout"]["format"] == "npz" and body["layout"]["steps"] == 2 and body["classes"] == 3


def test_an_analysis_names_a_missing_or_inconsistent_source_at_submit(api):
    upload_id = upload(api, GOOD).json()["id"]
    cases = [
        ({"source": {"upload": "nope"}}, "source.upload", "no upload with id 'nope'"),
        ({"source": {"experiment": "nope", "artifact": "features.safetensors"}}, "source.artifact", "has no artifact"),
        ({"source": {"upload": upload_id}, "steps": [0, 1]}, "steps", "2 steps given; the source holds 1"),
        ({"source": {"upload": upload_id}, "K": 4}, "K", "the classifier has 3 rows"),
        ({"source": {"upload": upload_id}, "steps": [3, 2]}, "steps", "must increase strictly"),
        ({"source": {"upload": 5}}, "source.upload", "must be an upload's id, or a list of 1 to"),
        ({"source": {"experiment": "x", "bogus": 1}}, "source.bogus", "Extra inputs are not permitted"),
    ]
    for spec, field, message in cases:
        response = api.client.post("/experiments", json={"kind": "analysis", **spec})
        assert response.status_code == 422, response.text
        [error] = response.json()["errors"]
        assert error["field"] == field and message in error["message"], error
    labelled = api.client.post("/experiments", json={"spec": {"kind": "analysis", "source": {"upload": "nope"}}})
    assert labelled.json()["errors"][0]["field"] == "spec.source.upload"


def test_an_analysis_is_stored_with_the_files_k_and_d_and_its_free_fields_are_searchable(api):
    upload_id = upload(api, GOOD).json()["id"]
    spec = {"kind": "analysis", "source": {"upload": upload_id}, "model": "vit_b16", "dataset": "imagenet", "epoch": 90}
    submitted = api.client.post("/experiments", json={"spec": spec, "name": "vit", "tags": {"lab": "x"}}).json()
    assert submitted["spec"]["K"] == 3 and submitted["spec"]["d"] == 5 and submitted["queue"] == "cpu"
    where = "spec.model = 'vit_b16' and spec.dataset = 'imagenet' and spec.epoch >= 90 and kind = 'analysis'"
    found = api.client.get("/experiments", params={"where": where}).json()["items"]
    assert [item["id"] for item in found] == [submitted["id"]]
