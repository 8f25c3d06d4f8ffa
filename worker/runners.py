"""From a stored spec to the science engine, for each experiment kind."""

from collections.abc import Callable

import torch

from worker.nc import ufm

CheckpointSink = Callable[[int, dict], None]


def device() -> torch.device:
    """One job per GPU: the worker process sees its GPU as cuda:0 (CUDA_VISIBLE_DEVICES)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_ufm(spec: dict, on_checkpoint: CheckpointSink, on_progress: Callable[[float], None],
            should_stop: Callable[[], bool]) -> dict:
    problem = ufm.UFMProblem(
        num_classes=spec["K"], dim=spec["d"], n_per_class=spec["n_per_class"],
        normalization=spec["normalization"], logit_scale=spec["logit_scale"], bias=spec["bias"],
        lambda_w=spec["lambda_w"], lambda_h=spec["lambda_h"], lambda_b=spec["lambda_b"],
        max_iters=spec["max_iters"], tol=spec["tol"], seed=spec["seed"],
        checkpoint_every=spec["checkpoint_every"],
    )

    def checkpoint(step: int, row: dict) -> None:
        on_progress(step / problem.max_iters)
        on_checkpoint(step, row)

    return ufm.solve(problem, device=device(), on_checkpoint=checkpoint, should_stop=should_stop)


RUNNERS = {"ufm": run_ufm}
