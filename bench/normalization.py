"""Normalized vs regularized vs plain features, the same budget, through the HTTP API.

    nclab serve &                      # or any running nclab
    python bench/normalization.py --url http://127.0.0.1:8000 --dataset digits --epochs 30

Submits one `kind: "train"` run per normalization (identical otherwise), polls them to the
end, and prints the final nc1, nc2_etf_m, nc3_etf, train and test accuracy of each: the
seed paper's comparison (Yaras et al. 2022), on whatever data the server has.
"""

import json
import time
from typing import Annotated

import httpx
import typer
from rich.console import Console
from rich.table import Table

NORMALIZATIONS = ("normalized", "regularized", "none")
# `accuracy` is measured on the training set in eval mode, with the final weights.
COLUMNS = ("nc1", "nc2_etf_m", "nc3_etf", "accuracy", "test_accuracy")


def main(
    url: str = "http://127.0.0.1:8000",
    dataset: str = "digits",
    architecture: str = "mlp",
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    n_per_class: Annotated[int | None, typer.Option(help="first n training samples of each class")] = None,
    extra: Annotated[str, typer.Option(help="more spec fields, as JSON")] = "{}",
) -> None:
    base = {"kind": "train", "dataset": dataset, "architecture": architecture, "epochs": epochs, "seed": 0,
            **({"n_per_class": n_per_class} if n_per_class else {}), **json.loads(extra)}
    with httpx.Client(base_url=url, timeout=30) as client:
        ids = {}
        for normalization in NORMALIZATIONS:
            spec = {**base, "normalization": normalization}
            response = client.post("/experiments", json=spec)
            if response.status_code != 202:
                raise SystemExit(f"{normalization}: {response.status_code} {response.json()['detail']}")
            ids[normalization] = response.json()["id"]
        start = time.monotonic()
        finished = {}
        while len(finished) < len(ids):
            for normalization, experiment_id in ids.items():
                if normalization not in finished:
                    body = client.get(f"/experiments/{experiment_id}").json()
                    if body["status"] not in ("queued", "running"):
                        finished[normalization] = body
            time.sleep(1)

    table = Table(title=f"{dataset} / {architecture}, {epochs} epochs ({time.monotonic() - start:.0f} s)")
    for column in ("normalization", *COLUMNS):
        table.add_column("train_accuracy" if column == "accuracy" else column, justify="right")
    for normalization in NORMALIZATIONS:
        body = finished[normalization]
        if body["status"] != "succeeded":
            table.add_row(normalization, f"{body['status']}: {body['error']}", *[""] * (len(COLUMNS) - 1))
            continue
        result = body["result"]
        table.add_row(normalization, *(f"{result[column]:.4g}" for column in COLUMNS))
    Console(width=120).print(table)


if __name__ == "__main__":
    typer.run(main)
