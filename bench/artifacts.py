"""Downloading a large artifact over HTTP, against reading the same file from disk, in the same run.

    .venv/bin/python bench/artifacts.py                      # 256 MiB, 5 rounds, about a minute
    .venv/bin/python bench/artifacts.py --mib 1024 --rounds 3 --check

Everything lives in a scratch folder (a temporary directory, removed at the end). The bench
writes --mib MiB of random bytes as an experiment's ``model.safetensors``, with its row in
``artifacts``, as the worker does when a job ends, and starts ``nclab api --workers 1`` on
it: SQLite, the embedded queue, no worker (the experiment stays queued). Then each round
times five ways of getting the bytes:

  read             the file read in 1 MiB chunks, here: the baseline
  read + sha256    the same, hashing each chunk: what the client's check costs by itself
  copy + sha256    the same, each chunk also written to a new file: Client.download without HTTP
  httpx stream     GET /experiments/{id}/artifacts/model.safetensors on a plain httpx.Client,
                   each chunk counted and dropped: what the server delivers
  Client.download  service.client.Client.download: streamed to a file beside the target,
                   sha256 checked, renamed into place

each twice: "from the disk", the file's pages first dropped from the page cache
(posix_fadvise DONTNEED, on this file only: a virtual machine's disk may still be cached by
its host), then "from the page cache", as that read left them. The server reads the file as
the read does, so each column compares the same source. Written files are deleted at once.

Each figure is the median of --rounds rounds, in MB/s (10^6 bytes a second), with its ratio
to the read of its column. The target is a download at 50% of the read from the disk or more:
--check exits 1 when the httpx stream or Client.download misses it. The client and the server
share the machine's cores; the bench prints how many there are and the load average, and the
server's peak resident memory, which shows that it streams the file rather than holding it.
"""

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from bench.api import started  # noqa: E402
from bench.query import free_port, wait_ready  # noqa: E402
from service.client import Client  # noqa: E402
from service.db import make_engine  # noqa: E402
from service.models import Artifact  # noqa: E402

NAME = "model.safetensors"
CHUNK = 1 << 20
UFM = {"kind": "ufm", "K": 3, "d": 4, "n_per_class": 2}
SOURCES = ("from the disk", "from the page cache")
DOWNLOADS = ("httpx stream", "Client.download")
TARGET_RATIO = 0.5


def write_random(path: Path, mib: int) -> str:
    """``mib`` MiB of random bytes at ``path``, on the disk; their sha256."""
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True)
    with path.open("wb") as file:
        for _ in range(mib):
            chunk = os.urandom(CHUNK)
            digest.update(chunk)
            file.write(chunk)
        file.flush()
        os.fsync(file.fileno())  # clean pages, which the page cache may drop (evict)
    return digest.hexdigest()


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache: its next read is from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def record(database_url: str, experiment_id: str, size: int, sha256: str) -> None:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            session.add(Artifact(experiment_id=experiment_id, name=NAME, bytes=size, sha256=sha256,
                                 media_type="application/octet-stream", created_at=datetime.now(UTC)))
            session.commit()
    finally:
        engine.dispose()


def read(path: Path, hashed: bool = False, copy_to: Path | None = None) -> int:
    """Read the file in CHUNK-sized pieces, hashing them and writing them to ``copy_to`` if asked; its size."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    with path.open("rb", buffering=0) as file, (copy_to or Path(os.devnull)).open("wb") as copy:
        while count := file.readinto(buffer):
            if hashed:
                digest.update(view[:count])
            if copy_to is not None:
                copy.write(view[:count])
            total += count
    if copy_to is not None:
        copy_to.unlink()
    return total


def stream_httpx(http: httpx.Client, path: str) -> int:
    total = 0
    with http.stream("GET", path) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            total += len(chunk)
    return total


def download_with_client(client: Client, experiment_id: str, folder: Path) -> int:
    written = client.download(experiment_id, NAME, folder)
    size = written.stat().st_size
    written.unlink()
    return size


def peak_resident_mib(pid: int) -> float:
    """The process's peak resident memory so far (Linux's VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="the artifact's size in MiB")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the measurements; figures are medians")
    parser.add_argument("--check", action="store_true", help="exit 1 when a download is under 50%% of the disk read")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="nclab-bench-artifacts-") as scratch_name:
        scratch = Path(scratch_name)
        env = {name: value for name, value in os.environ.items() if not name.startswith("NCLAB_")}
        env.update(NCLAB_DATA_DIR=str(scratch / "data"), NCLAB_ARTIFACT_ROOT=str(scratch / "artifacts"))
        port = free_port()
        argv = [sys.executable, "-m", "service.cli", "api", "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1"]  # one process: the server is the process started
        with started(argv, env, ROOT, scratch / "api.log") as server:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, server)
            with Client(url) as client, httpx.Client(base_url=url, timeout=60) as http:
                experiment_id = client.submit(UFM)["id"]
                stored = scratch / "artifacts" / experiment_id / NAME
                sha256 = write_random(stored, args.mib)
                size = stored.stat().st_size
                record(f"sqlite:///{scratch / 'data' / 'nclab.sqlite'}", experiment_id, size, sha256)
                copies = scratch / "copies"
                copies.mkdir()
                measurements: dict[str, Callable[[], int]] = {
                    "read": lambda: read(stored),
                    "read + sha256": lambda: read(stored, hashed=True),
                    "copy + sha256": lambda: read(stored, hashed=True, copy_to=copies / NAME),
                    "httpx stream": lambda: stream_httpx(http, f"/experiments/{experiment_id}/artifacts/{NAME}"),
                    "Client.download": lambda: download_with_client(client, experiment_id, copies),
                }
                server_before = peak_resident_mib(server.pid)
                for label, measure in measurements.items():  # a warm-up of each, untimed
                    assert measure() == size, label
                seconds: dict[tuple[str, str], list[float]] = {
                    (label, source): [] for label in measurements for source in SOURCES
                }
                for _ in range(args.rounds):
                    for label, measure in measurements.items():
                        evict(stored)
                        for source in SOURCES:  # from the disk, then from the pages that read cached
                            start = time.perf_counter()
                            assert measure() == size, label
                            seconds[label, source].append(time.perf_counter() - start)
                server_after = peak_resident_mib(server.pid)

    rate = {key: size / statistics.median(times) / 1e6 for key, times in seconds.items()}
    print(f"{args.mib} MiB artifact, median of {args.rounds} rounds; client and server on {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'MB/s (of the read)':<20}" + "".join(f"{source:>24}" for source in SOURCES))
    for label in measurements:
        cells = [f"{rate[label, source]:.0f} ({rate[label, source] / rate['read', source]:.0%})" for source in SOURCES]
        print(f"{label:<20}" + "".join(f"{cell:>24}" for cell in cells))
    print(f"server's peak resident memory: {server_before:.0f} MiB before the downloads, {server_after:.0f} MiB after")
    disk = SOURCES[0]
    missed = [label for label in DOWNLOADS if rate[label, disk] / rate["read", disk] < TARGET_RATIO]
    print(f"target: downloads >= {TARGET_RATIO:.0%} of the read {disk}: "
          + (f"missed by {', '.join(missed)}" if missed else "met"))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
