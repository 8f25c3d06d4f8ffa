"""Submit latency of `nclab serve` (embedded: SQLite, its own worker), this checkout against another.

    git worktree add /tmp/before <commit>
    .venv/bin/python bench/embedded_submit.py --baseline /tmp/before
    .venv/bin/python bench/embedded_submit.py --baseline /tmp/before --rounds 3 --submits 400

Each round starts `nclab serve` from the baseline checkout, then from this one, each on a
fresh data folder and a free port, and submits to it while its worker runs the jobs (tiny
UFM solves, each a scheduling round when it ends). Both checkouts run on this .venv's
packages. Two clients, one after the other:

- "Client": one `service.client.Client` submitting --submits experiments back to back, the
  request our client sends (with its idempotency key);
- "httpx x4": 4 threads, each with a plain httpx.Client, sharing another --submits, 20 ms
  apart within a thread.

Prints each round's p50 and p95 per client and checkout, the ratio of this checkout's p50
to the baseline's, and how many of the jobs succeeded (the stack waits for all of them to
end before it stops).
"""

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script, bench/ is on the path but not the project
    sys.path.insert(0, str(ROOT))

from bench.api import started  # noqa: E402
from bench.query import free_port, wait_ready  # noqa: E402
from service.client import Client  # noqa: E402

TINY = {"kind": "ufm", "K": 4, "d": 8, "n_per_class": 5}
THREADS = 4


@contextmanager
def serve(checkout: Path) -> Iterator[str]:
    """`nclab serve` from ``checkout`` on a fresh data folder; yields its URL once /readyz answers."""
    port = free_port()
    with tempfile.TemporaryDirectory() as data_dir:
        env = {**os.environ, "PYTHONPATH": str(checkout), "NCLAB_DATA_DIR": data_dir, "OMP_NUM_THREADS": "1"}
        argv = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
        with started(argv, env, checkout, Path(data_dir) / "serve.log") as process:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, process)
            yield url


def submit_with_client(url: str, submits: int) -> tuple[list[float], list[str]]:
    latencies, ids = [], []
    with Client(url, retries=0) as client:
        for seed in range(submits):
            start = time.perf_counter()
            ids.append(client.submit({**TINY, "seed": seed})["id"])
            latencies.append(time.perf_counter() - start)
    return latencies, ids


def submit_with_threads(url: str, submits: int) -> tuple[list[float], list[str]]:
    latencies: list[float] = []
    ids: list[str] = []

    def one_thread(first: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for seed in range(first, submits, THREADS):
                start = time.perf_counter()
                response = client.post("/experiments", json={"spec": {**TINY, "seed": seed}}).raise_for_status()
                latencies.append(time.perf_counter() - start)
                ids.append(response.json()["id"])
                time.sleep(0.02)

    threads = [threading.Thread(target=one_thread, args=(first,)) for first in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, ids


CLIENTS = {"Client": submit_with_client, f"httpx x{THREADS}": submit_with_threads}


def measure(checkout: Path, submits: int) -> dict[str, tuple[float, float, int, int]]:
    """Per client: p50 and p95 in ms, jobs succeeded, jobs submitted."""
    figures = {}
    with serve(checkout) as url:
        for name, submit in CLIENTS.items():
            latencies, ids = submit(url, submits)
            with Client(url) as client:
                ended = client.wait(ids, timeout=600)
            succeeded = sum(experiment["status"] == "succeeded" for experiment in ended)
            quantiles = statistics.quantiles(latencies, n=20)
            figures[name] = (statistics.median(latencies) * 1e3, quantiles[18] * 1e3, succeeded, len(ids))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, required=True, help="another checkout of nclab")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--submits", type=int, default=200, help="per client and round")
    args = parser.parse_args()
    checkouts = {"baseline": args.baseline.resolve(), "this": ROOT}
    print(f"{'round':>5} {'client':>9} {'checkout':>8} {'p50 ms':>7} {'p95 ms':>7} {'succeeded':>10}")
    for round_ in range(args.rounds):
        figures = {label: measure(checkout, args.submits) for label, checkout in checkouts.items()}
        for name in CLIENTS:
            for label in checkouts:
                p50, p95, succeeded, submitted = figures[label][name]
                print(f"{round_:>5} {name:>9} {label:>8} {p50:7.2f} {p95:7.2f} {succeeded:>5}/{submitted}")
            ratio = figures["this"][name][0] / figures["baseline"][name][0]
            print(f"{round_:>5} {name:>9} {'ratio':>8} {ratio:7.2f}  (this p50 / baseline p50)")


if __name__ == "__main__":
    main()
