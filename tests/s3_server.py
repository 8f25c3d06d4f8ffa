"""A real S3 endpoint for the artifact store's tests: moto's standalone server, in a subprocess.

The store talks to it over HTTP with s3fs, as it would to AWS or MinIO; nothing is mocked
in the process under test. Each use gets its own bucket.
"""

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support import eventually, free_port


@dataclass
class S3Store:
    url: str  # NCLAB_ARTIFACT_ROOT
    options: dict  # NCLAB_ARTIFACT_STORAGE_OPTIONS

    @property
    def env(self) -> dict[str, str]:
        return {"NCLAB_ARTIFACT_ROOT": self.url, "NCLAB_ARTIFACT_STORAGE_OPTIONS": json.dumps(self.options)}

    def filesystem(self):
        """An s3fs filesystem of the test's own, to look into the bucket independently of nclab."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False, **self.options)


@contextmanager
def s3_server(log_dir: Path) -> Iterator[str]:
    """moto's server on a free port; its endpoint URL."""
    port = free_port()
    with (log_dir / "moto.log").open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: _answers(endpoint), timeout=30, interval=0.1, message="moto's S3 server never answered")
        yield endpoint
    finally:
        server.terminate()
        server.wait(10)


def _answers(endpoint: str) -> bool:
    try:
        return httpx.get(endpoint, timeout=1).status_code < 500
    except httpx.TransportError:
        return False


def new_bucket(endpoint: str) -> S3Store:
    """A bucket of its own on the server, and the store settings that name a prefix in it."""
    bucket = f"nclab-{uuid.uuid4().hex[:12]}"
    store = S3Store(
        f"s3://{bucket}/artifacts",
        {"endpoint_url": endpoint, "key": "testing", "secret": "testing", "client_kwargs": {"region_name": "eu-west-1"}},
    )
    store.filesystem().mkdir(bucket)
    return store
