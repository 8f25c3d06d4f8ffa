"""Artifacts over HTTP: the listing, downloads with ranges and revalidation, the client's checked
download (in-process, on SQLite and PostgreSQL), and `nclab artifacts` / `nclab download` against
`nclab serve`.

The worker's part, writing an experiment's files and their rows as its job ends, is played by
``keep`` here: no job runs.
"""

import hashlib
import random
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from service.artifacts import NAME_PATTERN
from service.client import ChecksumMismatch, Client, InvalidRequest, NotFound, Unavailable
from service.client.core import ARTIFACT_NAME
from service.db import make_engine
from service.models import Artifact
from tests.support import stored_dir, wait_for_status
from tests.test_cli import nclab

UFM = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}
MIB = 1 << 20
_random = random.Random(0)
# Sizes around the server's 1 MiB read size: several reads and a short last one; exactly one; less than one.
MODEL = _random.randbytes(2 * MIB + 12_345)
FEATURES = _random.randbytes(MIB)
SOLUTION = _random.randbytes(1_000)
FILES = {"solution.safetensors": SOLUTION, "model.safetensors": MODEL, "features.safetensors": FEATURES}
OCTET_STREAM = "application/octet-stream"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def keep(database_url: str, directory: Path, experiment_id: str, files: dict[str, bytes]) -> datetime:
    """What the worker does as a job ends: each file written into ``directory`` and recorded in ``artifacts``.

    Returns the rows' created_at.
    """
    kept_at = datetime.now(UTC)
    directory.mkdir(parents=True, exist_ok=True)
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            for name, data in files.items():
                (directory / name).write_bytes(data)
                session.add(Artifact(experiment_id=experiment_id, name=name, bytes=len(data), sha256=sha256(data),
                                     media_type=OCTET_STREAM, created_at=kept_at))
            session.commit()
    finally:
        engine.dispose()
    return kept_at


@pytest.fixture
def artifact_root(tmp_path) -> Iterator[Path]:
    """NCLAB_ARTIFACT_ROOT, a folder of this test's, under the module's in-process API.

    Settings are read from the environment once and cached (as in tests/conftest.py's
    in_process_api): the cache is emptied on the way in and out. Only the settings':
    the engines that the app holds stay as they are.
    """
    from service.settings import get_settings

    root = tmp_path / "artifacts"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NCLAB_ARTIFACT_ROOT", str(root))
        get_settings.cache_clear()
        assert get_settings().resolved_artifact_root == str(root.resolve())
        yield root
    get_settings.cache_clear()


@pytest.fixture
def experiment(api_each_db, artifact_root) -> str:
    """A new experiment's id (queued: no worker runs it) with FILES kept."""
    experiment_id = api_each_db.client.post("/experiments", json=UFM).raise_for_status().json()["id"]
    keep(api_each_db.database_url, stored_dir(experiment_id), experiment_id, FILES)
    return experiment_id


@pytest.fixture
def downloads(tmp_path) -> Path:
    """A folder for the client to write to (the artifact root is another folder of tmp_path)."""
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


@pytest.fixture
def client(api_each_db) -> Client:
    """service.client.Client, its requests answered by the in-process app (FastAPI's TestClient is an httpx.Client)."""
    in_process = Client(api_each_db.base_url)
    in_process.close()  # its own connections are never used
    in_process._http = api_each_db.client
    return in_process


def url(experiment_id: str, name: str = "model.safetensors") -> str:
    return f"/experiments/{experiment_id}/artifacts/{name}"


def test_the_listing_names_each_file_by_name_with_its_size_and_sha256(api_each_db, artifact_root, client):
    experiment_id = api_each_db.client.post("/experiments", json=UFM).raise_for_status().json()["id"]
    assert api_each_db.client.get(f"/experiments/{experiment_id}/artifacts").json() == {"items": []}

    kept_at = keep(api_each_db.database_url, stored_dir(experiment_id), experiment_id, FILES)
    listed = api_each_db.client.get(f"/experiments/{experiment_id}/artifacts")
    assert listed.status_code == 200
    items = listed.json()["items"]
    assert [item["name"] for item in items] == ["features.safetensors", "model.safetensors", "solution.safetensors"]
    for item in items:
        data = FILES[item["name"]]
        assert item["bytes"] == len(data) and item["sha256"] == sha256(data) and item["media_type"] == OCTET_STREAM
        assert datetime.fromisoformat(item["created_at"]) == kept_at
    assert client.artifacts(experiment_id) == items


def test_a_download_is_the_whole_file_with_its_sha256_as_etag(api_each_db, experiment):
    for name, data in FILES.items():
        response = api_each_db.client.get(url(experiment, name))
        assert response.status_code == 200 and response.content == data
        assert response.headers["content-length"] == str(len(data))
        assert response.headers["etag"] == f'"{sha256(data)}"'
        assert response.headers["content-type"] == OCTET_STREAM
        assert response.headers["content-disposition"] == f'attachment; filename="{name}"'
        assert response.headers["accept-ranges"] == "bytes"


SIZE = len(MODEL)


@pytest.mark.parametrize(("header", "first", "end"), [
    ("bytes=0-0", 0, 1),  # the first byte
    (f"bytes={MIB - 10}-{MIB + 9}", MIB - 10, MIB + 10),  # a slice across the server's reads
    ("bytes=-500", SIZE - 500, SIZE),  # a suffix
    (f"bytes={2 * MIB}-", 2 * MIB, SIZE),  # open-ended
    (f"bytes={SIZE - 1}-{SIZE + 1000}", SIZE - 1, SIZE),  # past the end: up to the end
    (f"bytes=-{SIZE + 1}", 0, SIZE),  # a suffix longer than the file: all of it
])
def test_a_range_is_that_slice_of_the_file(api_each_db, experiment, header, first, end):
    response = api_each_db.client.get(url(experiment), headers={"Range": header})
    assert response.status_code == 206
    assert response.content == MODEL[first:end]
    assert response.headers["content-range"] == f"bytes {first}-{end - 1}/{SIZE}"
    assert response.headers["content-length"] == str(end - first)
    assert response.headers["etag"] == f'"{sha256(MODEL)}"'


@pytest.mark.parametrize("header", [f"bytes={SIZE}-", f"bytes={SIZE}-{SIZE + 10}", "bytes=-0"])
def test_a_range_past_the_end_is_416_with_the_size(api_each_db, experiment, header):
    response = api_each_db.client.get(url(experiment), headers={"Range": header})
    assert response.status_code == 416
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["content-range"] == f"bytes */{SIZE}"
    assert f"({SIZE} bytes)" in response.json()["detail"]


@pytest.mark.parametrize(("header", "reason"), [
    ("bytes=20-10", "start must be less than end"),
    ("lines=0-10", "Only support bytes range"),
    ("bytes=x-y", "range must be requested"),
])
def test_a_range_that_is_no_byte_range_is_a_422_naming_the_header(api_each_db, experiment, header, reason):
    response = api_each_db.client.get(url(experiment), headers={"Range": header})
    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert error["field"] == "Range" and reason in error["message"]


def test_if_range_serves_the_range_only_for_this_version_of_the_file(api_each_db, experiment):
    etag = f'"{sha256(MODEL)}"'
    same = api_each_db.client.get(url(experiment), headers={"Range": "bytes=0-9", "If-Range": etag})
    assert same.status_code == 206 and same.content == MODEL[:10]
    # Another version: the range is void, even one past this file's end (a resumed download of a longer file).
    for header in ("bytes=0-9", f"bytes={SIZE}-"):
        other = api_each_db.client.get(url(experiment), headers={"Range": header, "If-Range": f'"{"0" * 64}"'})
        assert other.status_code == 200 and other.content == MODEL


@pytest.mark.parametrize("if_none_match", ["{etag}", 'W/{etag}', '"other", {etag}', "*"])
def test_if_none_match_with_the_etag_is_a_bodiless_304(api_each_db, experiment, if_none_match):
    etag = f'"{sha256(MODEL)}"'
    # Decided before the range (RFC 9110, 13.2.2).
    response = api_each_db.client.get(url(experiment), headers={"If-None-Match": if_none_match.format(etag=etag),
                                                                "Range": "bytes=0-9"})
    assert response.status_code == 304 and response.content == b""
    assert response.headers["etag"] == etag


def test_if_none_match_with_another_etag_is_the_file(api_each_db, experiment):
    response = api_each_db.client.get(url(experiment), headers={"If-None-Match": f'"{sha256(FEATURES)}"'})
    assert response.status_code == 200 and response.content == MODEL


def test_an_unknown_experiment_or_name_or_a_missing_file_is_a_404_saying_which(api_each_db, experiment):
    unknown = "00000000-0000-0000-0000-000000000000"
    for path in (f"/experiments/{unknown}/artifacts", url(unknown)):
        response = api_each_db.client.get(path)
        assert response.status_code == 404 and response.headers["content-type"] == "application/problem+json"
        assert response.json()["detail"] == f"no experiment with id {unknown!r}"

    no_name = api_each_db.client.get(url(experiment, "checkpoint.safetensors"))
    assert no_name.status_code == 404
    assert no_name.json()["detail"] == f"experiment {experiment} has no artifact named 'checkpoint.safetensors'"

    (stored_dir(experiment) / "features.safetensors").unlink()
    missing = api_each_db.client.get(url(experiment, "features.safetensors"))
    assert missing.status_code == 404
    assert missing.json()["detail"] == "the file of artifact 'features.safetensors' is missing from the artifact store"


def test_the_client_downloads_to_a_file_or_into_a_folder(api_each_db, experiment, client, downloads):
    target = downloads / "weights.bin"
    target.write_bytes(b"an older download")
    assert client.download(experiment, "model.safetensors", target) == target
    assert target.read_bytes() == MODEL
    assert client.download(experiment, "solution.safetensors", target.parent) == target.parent / "solution.safetensors"
    assert (target.parent / "solution.safetensors").read_bytes() == SOLUTION
    assert sorted(p.name for p in target.parent.iterdir()) == ["solution.safetensors", "weights.bin"]


def test_the_client_refuses_a_file_whose_sha256_is_not_the_recorded_one(api_each_db, experiment, client, downloads):
    stored = stored_dir(experiment) / "model.safetensors"
    tampered = bytearray(MODEL)
    tampered[MIB] ^= 0xFF
    stored.write_bytes(tampered)
    target = downloads / "model.safetensors"
    target.write_bytes(b"kept as it was")
    with pytest.raises(ChecksumMismatch) as refused:
        client.download(experiment, "model.safetensors", target)
    assert f"have sha256 {sha256(bytes(tampered))}, the API states {sha256(MODEL)}" in str(refused.value)
    assert [p.name for p in downloads.iterdir()] == ["model.safetensors"]  # no partial file left
    assert target.read_bytes() == b"kept as it was"


def test_the_client_refuses_an_unknown_artifact_and_a_name_that_is_a_path(api_each_db, experiment, client, downloads):
    with pytest.raises(NotFound, match=r"has no artifact named 'nope\.safetensors'"):
        client.download(experiment, "nope.safetensors", downloads)
    with pytest.raises(InvalidRequest, match="is not an artifact name"):
        client.download(experiment, "../model.safetensors", downloads)
    assert list(downloads.iterdir()) == []


def test_a_download_cut_short_is_unavailable_and_leaves_nothing(downloads):
    class HalfTheFile(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(MODEL)))
            self.send_header("ETag", f'"{sha256(MODEL)}"')
            self.end_headers()
            self.wfile.write(MODEL[:MIB])  # and the connection closes

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), HalfTheFile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Client(f"http://127.0.0.1:{server.server_port}") as client, \
                pytest.raises(Unavailable, match=r"model\.safetensors: the download broke off"):
            client.download("some-id", "model.safetensors", downloads)
    finally:
        server.shutdown()
        server.server_close()
    assert list(downloads.iterdir()) == []


def test_the_client_knows_the_names_the_server_takes():
    assert ARTIFACT_NAME.pattern == NAME_PATTERN.pattern


def test_nclab_artifacts_and_download_against_a_server(embedded, tmp_path):
    # Canceled while queued: no worker touches its folder afterwards.
    experiment_id = embedded.client.post("/experiments", json=UFM).raise_for_status().json()["id"]
    embedded.client.post(f"/experiments/{experiment_id}/cancel")
    wait_for_status(embedded.client, experiment_id, {"canceled"})
    artifact_root = Path(embedded.processes.env["NCLAB_DATA_DIR"]).resolve() / "artifacts"
    keep(embedded.database_url, artifact_root / experiment_id, experiment_id, FILES)

    listed = nclab(embedded, "artifacts", experiment_id)
    assert listed.returncode == 0, listed.stderr
    rows = [[cell.strip() for cell in line.split("│")] for line in listed.stdout.splitlines() if "safetensors" in line]
    assert rows == [[name, str(len(FILES[name])), sha256(FILES[name])[:12], OCTET_STREAM] for name in sorted(FILES)]

    target = tmp_path / "model.bin"
    downloaded = nclab(embedded, "download", experiment_id, "model.safetensors", "-o", str(target))
    assert downloaded.returncode == 0, downloaded.stderr
    assert target.read_bytes() == MODEL and f"wrote {target}" in downloaded.stderr

    unknown = nclab(embedded, "download", experiment_id, "nope.safetensors", "-o", str(tmp_path))
    assert unknown.returncode == 2 and "404: experiment" in unknown.stderr and "nope.safetensors" in unknown.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]
