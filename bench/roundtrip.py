"""Time from submit to `succeeded` for one spec, against a running nclab server.

    python bench/roundtrip.py --url http://127.0.0.1:8000 --repeats 5

Prints each run's submit-to-succeeded time (polling every 10 ms), the solver's own
iteration count, and the median.
"""

import json
import statistics
import time
from typing import Annotated

import httpx
import typer

DONE_WHEN_SPEC = {"kind": "ufm", "K": 10, "d": 16, "n_per_class": 20, "normalization": "normalized",
                  "logit_scale": 10, "seed": 0}


def main(url: str = "http://127.0.0.1:8000", repeats: Annotated[int, typer.Option(min=1)] = 5,
         spec: Annotated[str, typer.Option(help="JSON spec")] = json.dumps(DONE_WHEN_SPEC)) -> None:
    seconds = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for _ in range(repeats):
            start = time.perf_counter()
            experiment = client.post("/experiments", json=json.loads(spec)).raise_for_status().json()
            while experiment["status"] in ("queued", "running"):
                time.sleep(0.01)
                experiment = client.get(f"/experiments/{experiment['id']}").raise_for_status().json()
            elapsed = time.perf_counter() - start
            seconds.append(elapsed)
            result = experiment["result"] or {}
            print(f"{experiment['status']:>9}  {elapsed:7.3f} s  iterations={result.get('iterations')}"
                  f"  optimality_gap={result.get('optimality_gap')}")
    print(f"median submit-to-finish: {statistics.median(seconds):.3f} s over {repeats} runs")


if __name__ == "__main__":
    typer.run(main)
