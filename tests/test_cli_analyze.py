"""`nclab analyze` (issue 26) against the embedded service: .npy arrays written as safetensors, uploaded and
analysed, or a whole file uploaded as it is; the catalogue the worker returns is the float64 reference's."""

import numpy as np
import pytest

from tests.feature_files import safetensors_bytes, simplex_collapse
from tests.test_analysis import NOISY_CLASSIFIER
from tests.test_cli import nclab
from tests.test_metrics import assert_matches_reference, reference_metrics

FEATURES, LABELS, _ = simplex_collapse(num_classes=4, dim=6, per_class=30, noise=0.3)


def test_nclab_analyze_of_npy_arrays_and_of_a_whole_file_waits_for_the_catalogue(embedded, tmp_path):
    paths = {}
    for name, array in {"features": FEATURES, "labels": LABELS, "classifier": NOISY_CLASSIFIER}.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], array)
    done = nclab(embedded, "analyze", str(paths["features"]), "--labels", str(paths["labels"]), "--classifier",
                 str(paths["classifier"]), "--name", "cli", "--tag", "a=1", "--model", "resnet", "--epoch", "7",
                 "--wait")
    assert done.returncode == 0, done.stderr
    experiment_id = done.stdout.split()[0]
    stored = embedded.client.get(f"/experiments/{experiment_id}").json()
    assert stored["name"] == "cli" and stored["tags"] == {"a": "1"} and stored["spec"]["epoch"] == 7
    want = reference_metrics(FEATURES, LABELS, NOISY_CLASSIFIER, K=4)
    assert_matches_reference({key: stored["result"][key] for key in want}, want)

    whole = tmp_path / "whole.safetensors"
    whole.write_bytes(safetensors_bytes(features=FEATURES, labels=LABELS))
    done = nclab(embedded, "analyze", str(whole), "--wait")
    assert done.returncode == 0, done.stderr
    shown = embedded.client.get(f"/experiments/{done.stdout.split()[0]}").json()
    assert shown["result"]["nc1"] == pytest.approx(reference_metrics(FEATURES, LABELS)["nc1"], rel=1e-9)

    upload_id = shown["spec"]["source"]["upload"]
    listed = nclab(embedded, "uploads", "--limit", "1")
    assert listed.returncode == 0, listed.stderr
    assert upload_id in listed.stdout and f"{len(LABELS)} x 6 safetensors" in listed.stdout
    deleted = nclab(embedded, "delete-upload", upload_id)
    assert deleted.returncode == 0 and deleted.stderr.strip() == f"deleted upload {upload_id}", deleted.stderr
    assert embedded.client.get(f"/uploads/{upload_id}").status_code == 404
