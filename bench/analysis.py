"""Analyses of uploaded features (issue 26): their throughput, the upload's rate and the analysis's memory, each
against a baseline timed in the same run.

    .venv/bin/python bench/analysis.py                  # about two minutes on 2 cores
    .venv/bin/python bench/analysis.py --samples 200000 --upload-mib 1024 --rss-samples 600000

Three parts, everything in a scratch folder (removed at the end):

1. Throughput. N x d float32 features (class means plus noise), their labels and a K x d
   classifier, stored as an upload in a local artifact store. Timed, interleaved over
   --repeats rounds (medians):
     analysis   worker/sources.py + worker/nc/analysis.py: the file's header checked, the features read
                from the store a block at a time, the whole catalogue with the classifier (the runner's work)
     gemm       one float64 H^T H over the same features, converted to float64 before timing
   The target: the analysis within 1.5x of the gemm.
2. Upload. A --upload-mib MiB features file (float16) POSTed to /uploads of ``nclab api`` (SQLite, one
   process) by two clients, against the loopback copy of the same bytes, all timed in turn:
     loopback copy   the file sent over a 127.0.0.1 TCP socket by one thread and written to a new file
                     by another, 1 MiB at a time: what any upload must do, without HTTP
     HTTP ceiling    plain httpx posting the file to a uvicorn app that only counts the body's bytes
                     (``discard_body``, uvicorn's defaults as ``nclab api``'s): what the HTTP stack allows
     Client.upload   service.client.Client.upload (httpx, streaming the file)
     plain httpx     httpx.Client.post(content=file)
   An upload's time runs until its 201: the server has stored, hashed and checked the file. The target:
   an upload at >= 50% of the loopback copy's rate.
3. Memory. A --rss-samples x --rss-dim float16 file with --rss-classes classes, analysed in a child
   process (worker/sources.py + worker/nc/analysis.py on the stored upload), which reports its peak
   resident memory (VmHWM) after its imports and after the analysis. The claim: the analysis's memory is
   bounded by its block and the accumulator's O(K d) state, whatever N is; the full-size case (1.3M x 2048,
   5.3 GB) is the same code at more rows.

The heap settings of a worker's pool process (worker/memory.py) are taken first, as in bench/metrics.py.
"""

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.api import started  # noqa: E402
from bench.artifacts import peak_resident_mib  # noqa: E402
from bench.query import free_port, wait_ready  # noqa: E402
from service.artifacts import UPLOADS, ArtifactStore  # noqa: E402
from service.client import Client  # noqa: E402
from worker import sources  # noqa: E402
from worker.memory import retain_freed_memory  # noqa: E402
from worker.nc import analysis  # noqa: E402

CHUNK = 1 << 20
THROUGHPUT_TARGET = 1.5
UPLOAD_TARGET = 0.5


def write_features(path: Path, samples: int, dim: int, classes: int, dtype: str, classifier: bool) -> None:
    """A safetensors file of class means plus noise, written a block of rows at a time (never whole in memory).

    The safetensors library writes arrays it holds; a file larger than memory is laid out here instead, as the
    format defines it: an 8-byte header length, the JSON header, then each tensor's bytes in order."""
    rng = np.random.default_rng(0)
    means = 3.0 * rng.standard_normal((classes, dim))
    labels = np.arange(samples, dtype=np.int64) % classes
    feature_bytes = samples * dim * np.dtype(dtype).itemsize
    tensors = {"features": ({"float16": "F16", "float32": "F32"}[dtype], [samples, dim], feature_bytes),
               "labels": ("I64", [samples], labels.nbytes)}
    weights = rng.standard_normal((classes, dim)) / np.sqrt(dim)
    if classifier:
        tensors["classifier"] = ("F64", [classes, dim], weights.nbytes)
    header, offset = {}, 0
    for name, (code, shape, size) in tensors.items():
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the data aligned to 8 bytes, as the library writes it
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
        block = max(1, (64 << 20) // (dim * 8))
        for start in range(0, samples, block):
            rows = labels[start : start + block]
            noise = rng.standard_normal((len(rows), dim), dtype=np.float32)
            file.write((means[rows] + noise).astype(dtype).tobytes())
        file.write(labels.tobytes())
        if classifier:
            file.write(weights.tobytes())


def stored_upload(root: Path, path: Path) -> str:
    """Put the file in the store as an upload (what POST /uploads keeps); its id."""
    upload_id = str(uuid.uuid4())
    (root / UPLOADS).mkdir(parents=True, exist_ok=True)
    path.rename(root / UPLOADS / upload_id)
    return upload_id


def analyse(store: ArtifactStore, upload_id: str, classes: int) -> dict:
    """What the runner does (worker/runners.py run_analysis), without the database."""
    found = sources.checkpoints(store, {"upload": upload_id})
    return analysis.analyse(found, classes, list(range(len(found))))


def throughput(scratch: Path, args) -> None:
    path = scratch / "features.safetensors"
    write_features(path, args.samples, args.dim, args.classes, "float32", classifier=True)
    store = ArtifactStore(str(scratch / "store"), {}, scratch / "scratch")
    upload_id = stored_upload(scratch / "store", path)
    with store.open_upload(upload_id) as file:
        file.seek(8 + struct.unpack("<Q", file.read(8))[0])
        features = np.frombuffer(file.read(args.samples * args.dim * 4), dtype=np.float32)
    features64 = torch.from_numpy(features.reshape(args.samples, args.dim).astype(np.float64))
    del features
    runs = {"analysis": lambda: analyse(store, upload_id, args.classes), "gemm": lambda: features64.T @ features64}
    for run in runs.values():  # a warm-up of each, untimed
        run()
    seconds: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[label].append(time.perf_counter() - start)
    median = {label: statistics.median(times) for label, times in seconds.items()}
    ratio = median["analysis"] / median["gemm"]
    print(f"1. throughput: N = {args.samples}, d = {args.dim}, K = {args.classes}, float32 features with a "
          f"classifier; {torch.get_num_threads()} threads, median of {args.repeats}")
    verdict = "met" if ratio <= THROUGHPUT_TARGET else "missed"
    print(f"   analysis (store read + catalogue) {median['analysis']:.3f} s, float64 gemm {median['gemm']:.3f} s: "
          f"{ratio:.2f}x the gemm (target <= {THROUGHPUT_TARGET}x: {verdict})")


def loopback_copy(source: Path, target: Path) -> None:
    """The file over a loopback TCP socket: sent by this thread, received and written to ``target`` by another."""
    with socket.create_server(("127.0.0.1", 0)) as server:

        def receive() -> None:
            connection, _ = server.accept()
            with connection, target.open("wb") as out:
                while chunk := connection.recv(CHUNK):
                    out.write(chunk)

        receiver = threading.Thread(target=receive)
        receiver.start()
        with socket.create_connection(server.getsockname()) as sender, source.open("rb") as file:
            while chunk := file.read(CHUNK):
                sender.sendall(chunk)
        receiver.join()
    target.unlink()


async def discard_body(scope, receive, send) -> None:
    """An ASGI app that reads a request's body, keeps none of it, and answers its size."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


def http_ceiling(url: str, path: Path) -> None:
    with path.open("rb") as file:
        httpx.post(url, content=file, timeout=600).raise_for_status()


def upload_rate(scratch: Path, args) -> None:
    path = scratch / "upload.safetensors"
    dim = 2048
    samples = max(1, (args.upload_mib << 20) // (dim * 2))
    write_features(path, samples, dim, 1000, "float16", classifier=False)
    size = path.stat().st_size
    env = {name: value for name, value in os.environ.items() if not name.startswith("NCLAB_")}
    env.update(NCLAB_DATA_DIR=str(scratch / "data"), NCLAB_ARTIFACT_ROOT=str(scratch / "artifacts"),
               NCLAB_MAX_UPLOAD_BYTES=str(size))
    port, sink_port = free_port(), free_port()
    argv = [sys.executable, "-m", "service.cli", "api", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    sink_argv = [sys.executable, "-m", "uvicorn", "bench.analysis:discard_body", "--port", str(sink_port),
                 "--log-level", "warning"]
    with started(argv, env, ROOT, scratch / "api.log") as server, \
            started(sink_argv, env, ROOT, scratch / "sink.log"):
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, server)
        sink_url = f"http://127.0.0.1:{sink_port}/"
        for _ in range(100):  # until the sink listens
            try:
                httpx.post(sink_url, content=b"")
                break
            except httpx.TransportError:
                time.sleep(0.2)
        with Client(url, timeout=600) as client, httpx.Client(base_url=url, timeout=600) as http:

            def plain_httpx() -> None:
                with path.open("rb") as file:
                    headers = {"Content-Type": "application/octet-stream"}
                    http.post("/uploads", content=file, headers=headers).raise_for_status()

            runs = {
                "loopback copy": lambda: loopback_copy(path, scratch / "copy"),
                "HTTP ceiling": lambda: http_ceiling(sink_url, path),
                "Client.upload": lambda: client.upload(path),
                "plain httpx": plain_httpx,
            }
            seconds: dict[str, list[float]] = {label: [] for label in runs}
            for _ in range(args.upload_rounds):
                for label, run in runs.items():
                    start = time.perf_counter()
                    run()
                    seconds[label].append(time.perf_counter() - start)
                for stored in (scratch / "artifacts" / UPLOADS).iterdir():  # the disk is not the bench's to fill
                    stored.unlink()
            server_peak = peak_resident_mib(server.pid)
    rate = {label: size / statistics.median(times) / 1e6 for label, times in seconds.items()}
    print(f"2. upload of {size / 2**20:.0f} MiB (float16 features), median of {args.upload_rounds} rounds; client and "
          f"server on {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for label in runs:
        share = rate[label] / rate["loopback copy"]
        verdict = "" if label in ("loopback copy", "HTTP ceiling") else (
            f" (target >= {UPLOAD_TARGET:.0%}: {'met' if share >= UPLOAD_TARGET else 'missed'})")
        print(f"   {label:<14} {rate[label]:7.0f} MB/s  {share:5.0%} of the loopback copy{verdict}")
    print(f"   server's peak resident memory {server_peak:.0f} MiB")


def memory(scratch: Path, args) -> None:
    path = scratch / "large.safetensors"
    write_features(path, args.rss_samples, args.rss_dim, args.rss_classes, "float16", classifier=False)
    size = path.stat().st_size
    upload_id = stored_upload(scratch / "store", path)
    child = subprocess.run([sys.executable, __file__, "--rss-child", str(scratch), upload_id, str(args.rss_classes)],
                           capture_output=True, text=True, check=True)
    before, after, seconds = (float(value) for value in child.stdout.split())
    print(f"3. memory: {args.rss_samples} x {args.rss_dim} float16 ({size / 2**30:.2f} GiB), K = {args.rss_classes}, "
          f"analysed in {seconds:.0f} s by a child process")
    print(f"   peak resident memory {before:.0f} MiB after the imports, {after:.0f} MiB after the analysis: "
          f"{after - before:.0f} MiB for the analysis ({(after - before) / (size / 2**20):.1%} of the file; "
          f"a block is {analysis.BLOCK_ENTRIES * 8 / 2**20:.0f} MiB in float64)")


def rss_child(scratch: str, upload_id: str, classes: int) -> None:
    retain_freed_memory()
    store = ArtifactStore(str(Path(scratch) / "store"), {}, Path(scratch) / "scratch")
    before = peak_resident_mib(os.getpid())
    start = time.perf_counter()
    analyse(store, upload_id, classes)
    print(before, peak_resident_mib(os.getpid()), time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--upload-mib", type=int, default=1024)
    parser.add_argument("--upload-rounds", type=int, default=3)
    parser.add_argument("--rss-samples", type=int, default=300_000)
    parser.add_argument("--rss-dim", type=int, default=2048)
    parser.add_argument("--rss-classes", type=int, default=100)
    parser.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 1,3")
    parser.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1], int(args.rss_child[2]))
        return 0
    retain_freed_memory()
    parts = {"1": throughput, "2": upload_rate, "3": memory}
    with tempfile.TemporaryDirectory(prefix="nclab-bench-analysis-") as scratch:
        for part in args.parts.split(","):
            parts[part](Path(scratch), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
