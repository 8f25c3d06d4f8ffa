"""NCLAB_ARTIFACT_ROOT as an fsspec URL: an S3 bucket on a real S3 endpoint (tests/s3_server.py).

A worker writes a run's files in its scratch directory and copies them to the bucket: each
checkpoint as it is saved, so that a run killed on one host resumes on another from the
bucket, and the artifacts before the job's end is recorded. The API streams them out of the
bucket, whole or a range. The bucket is read here with an s3fs client of the test's own.
"""

import hashlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load

from service.artifacts import CHECKPOINT_NAME, ArtifactStore
from service.lifetime import children
from tests.conftest import fresh_redis_broker, production_stack
from tests.s3_server import S3Store, new_bucket, s3_server
from tests.support import eventually, wait_for_status
from tests.test_resume import RESUMABLE

UFM = {"kind": "ufm", "K": 4, "d": 6, "n_per_class": 3, "seed": 3}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    with s3_server(tmp_path_factory.mktemp("s3")) as endpoint:
        yield endpoint


@pytest.fixture
def s3_store(s3_endpoint) -> S3Store:
    return new_bucket(s3_endpoint)


def _names(bucket, prefix: str) -> list[str]:
    return sorted(path.rsplit("/", 1)[1] for path in bucket.ls(prefix)) if bucket.exists(prefix) else []


def test_a_checkpoint_kept_on_one_host_is_fetched_on_another_and_artifacts_are_published(s3_store, tmp_path):
    here = ArtifactStore(s3_store.url, s3_store.options, tmp_path / "host-a")
    there = ArtifactStore(s3_store.url, s3_store.options, tmp_path / "host-b")
    assert not here.is_local and here.local_file("e1", "model.safetensors") is None
    assert here.working_dir("e1") == tmp_path / "host-a" / "e1"
    bucket, prefix = s3_store.filesystem(), f"{s3_store.url}/e1"

    run_dir = here.working_dir("e1")
    run_dir.mkdir(parents=True)
    checkpoint = run_dir / CHECKPOINT_NAME
    checkpoint.write_bytes(os.urandom(3000))
    here.keep_checkpoint("e1", checkpoint)
    (there.working_dir("e1")).mkdir(parents=True)
    (there.working_dir("e1") / CHECKPOINT_NAME).write_bytes(b"an older attempt's")
    there.fetch_checkpoint("e1")
    assert (there.working_dir("e1") / CHECKPOINT_NAME).read_bytes() == checkpoint.read_bytes()

    model = os.urandom(5 * 2**20 + 7)  # several of the store's read chunks, and a partial one
    (run_dir / "model.safetensors").write_bytes(model)
    here.publish("e1", ["model.safetensors"])
    here.drop_checkpoint("e1")
    assert _names(bucket, prefix) == ["model.safetensors"]
    assert bucket.cat_file(f"{prefix}/model.safetensors") == model
    assert not run_dir.exists()  # the scratch copy goes with the checkpoint

    assert there.size("e1", "model.safetensors") == len(model)
    assert b"".join(there.read_range("e1", "model.safetensors", 1000, len(model) - 3)) == model[1000:-3]
    with pytest.raises(FileNotFoundError):
        there.size("e1", CHECKPOINT_NAME)
    there.discard("e1")
    assert _names(bucket, prefix) == [] and not there.working_dir("e1").exists()


@pytest.mark.slow  # a training killed on one "host" and resumed on another, then a UFM solve
def test_a_run_killed_on_one_host_resumes_on_another_from_the_bucket_and_is_served_from_it(
    s3_store, pg_database, processes
):
    processes.env.update(s3_store.env)
    bucket = s3_store.filesystem()
    with production_stack(processes, pg_database, fresh_redis_broker()) as stack:
        client = stack.client
        killed = client.post("/experiments", json=RESUMABLE).json()["id"]
        eventually(lambda: bucket.exists(f"{s3_store.url}/{killed}/{CHECKPOINT_NAME}")
                   and len(client.get(f"/experiments/{killed}/metrics").json()["items"]) >= 3,
                   timeout=120, interval=0.05, message="no checkpoint reached the bucket by the third epoch")
        (pool,) = children(stack.worker.pid)
        os.kill(pool, signal.SIGKILL)
        processes.stop(stack.worker, signal.SIGKILL)
        # Another host: a scratch directory without the run's files; only the bucket has its checkpoint.
        first_host_scratch = Path(processes.env["NCLAB_DATA_DIR"]) / "scratch" / killed
        processes.env["NCLAB_DATA_DIR"] = str(Path(processes.env["NCLAB_DATA_DIR"]).parent / "other-host")
        processes.start("worker", name="worker-other-host")

        resumed = wait_for_status(client, killed, {"succeeded", "failed", "canceled"}, timeout=180)
        assert resumed["status"] == "succeeded", resumed["error"]
        assert resumed["attempts"] == 2 and resumed["resumed_from_epoch"] >= 2
        assert [row["step"] for row in client.get(f"/experiments/{killed}/metrics").json()["items"]] == list(
            range(1, RESUMABLE["epochs"] + 1)
        )
        assert first_host_scratch.exists()  # the killed host's copy: nothing on the other host read it
        # The scratch copy goes once the outcome is recorded, just after the status a poll sees.
        eventually(lambda: not (Path(processes.env["NCLAB_DATA_DIR"]) / "scratch" / killed).exists(), timeout=10,
                   message="the other host kept its scratch copy")

        # The bucket holds the final weights and no checkpoint; the listing's sha256 is the object's.
        assert _names(bucket, f"{s3_store.url}/{killed}") == ["model.safetensors"]
        stored = bucket.cat_file(f"{s3_store.url}/{killed}/model.safetensors")
        (listed,) = client.get(f"/experiments/{killed}/artifacts").json()["items"]
        assert (listed["bytes"], listed["sha256"]) == (len(stored), hashlib.sha256(stored).hexdigest())

        # Streamed out of the bucket: whole, a range, a suffix; the weights load.
        whole = client.get(f"/experiments/{killed}/artifacts/model.safetensors")
        assert whole.status_code == 200 and whole.content == stored
        assert whole.headers["etag"] == f'"{listed["sha256"]}"' and whole.headers["accept-ranges"] == "bytes"
        assert sorted(load(whole.content)) == sorted(load(stored))
        part = client.get(f"/experiments/{killed}/artifacts/model.safetensors", headers={"Range": "bytes=100-4195"})
        assert part.status_code == 206 and part.content == stored[100:4196]
        assert part.headers["content-range"] == f"bytes 100-4195/{len(stored)}"
        tail = client.get(f"/experiments/{killed}/artifacts/model.safetensors", headers={"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == stored[-10:]
        past = client.get(f"/experiments/{killed}/artifacts/model.safetensors",
                          headers={"Range": f"bytes={len(stored)}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(stored)}"
        unchanged = client.get(f"/experiments/{killed}/artifacts/model.safetensors",
                               headers={"If-None-Match": whole.headers["etag"]})
        assert unchanged.status_code == 304 and unchanged.content == b""

        solve = client.post("/experiments", json=UFM).json()["id"]
        assert wait_for_status(client, solve, {"succeeded", "failed", "canceled"})["status"] == "succeeded"
        assert _names(bucket, f"{s3_store.url}/{solve}") == ["solution.safetensors"]
        solution = client.get(f"/experiments/{solve}/artifacts/solution.safetensors").content
        assert load(solution)["W"].shape == (4, 6)


def test_an_upload_is_kept_in_the_bucket_and_analysed_from_it_a_block_at_a_time(s3_store, tmp_path, monkeypatch):
    """POST /uploads's store operations and the worker's reads of an upload, on S3 (issue 26)."""
    import numpy as np

    from tests.feature_files import npz_bytes, simplex_collapse
    from tests.test_metrics import assert_matches_reference, reference_metrics
    from worker import sources
    from worker.nc import analysis

    features, labels, _ = simplex_collapse(num_classes=3, dim=5, per_class=40, noise=0.2)
    data = npz_bytes(True, features=features.astype(np.float32), labels=labels)
    store = ArtifactStore(s3_store.url, s3_store.options, tmp_path / "scratch")
    with store.receive_upload("u1") as file:
        file.write(data)
    store.keep_upload("u1")
    with store.open_upload("u1") as file:
        assert file.read() == data
    monkeypatch.setattr(analysis, "BLOCK_ENTRIES", 7 * 5)  # several blocks of the compressed member
    found = sources.checkpoints(store, {"upload": "u1"})
    result = analysis.analyse(found, 3, [0])
    want = reference_metrics(features.astype(np.float32), labels)
    assert_matches_reference({key: result[key] for key in want}, want)
    store.discard_upload("u1")
    assert _names(s3_store.filesystem(), f"{s3_store.url}/uploads") == []
