"""From a stored spec to the science engine, for each experiment kind."""

from collections.abc import Callable

import torch

from service.settings import get_settings
from worker.nc import train, ufm

CheckpointSink = Callable[[int, dict], None]
ProgressSink = Callable[[float], None]


def device() -> torch.device:
    """One job per GPU: the worker process sees its GPU as cuda:0 (CUDA_VISIBLE_DEVICES)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_ufm(spec: dict, on_checkpoint: CheckpointSink, on_progress: ProgressSink,
            should_stop: Callable[[], bool]) -> dict:
    counts = spec["n_per_class"]
    problem = ufm.UFMProblem(
        num_classes=spec["K"], dim=spec["d"], n_per_class=tuple(counts) if isinstance(counts, list) else counts,
        normalization=spec["normalization"], logit_scale=spec["logit_scale"], bias=spec["bias"],
        lambda_w=spec["lambda_w"], lambda_h=spec["lambda_h"], lambda_b=spec["lambda_b"],
        max_iters=spec["max_iters"], tol=spec["tol"], seed=spec["seed"],
        checkpoint_every=spec["checkpoint_every"], restarts=spec["restarts"],
    )
    return ufm.solve(problem, device=device(), on_checkpoint=on_checkpoint, on_progress=on_progress,
                     should_stop=should_stop)


def run_train(spec: dict, on_checkpoint: CheckpointSink, on_progress: ProgressSink,
              should_stop: Callable[[], bool]) -> dict:
    """History rows are keyed by epoch (1-based): the step of a training run is its epoch."""
    config = train.TrainConfig(
        dataset=spec["dataset"], architecture=spec["architecture"], normalization=spec["normalization"],
        num_classes=spec["K"], dim=spec["d"], logit_scale=spec["logit_scale"], epochs=spec["epochs"],
        batch_size=spec["batch_size"], optimizer=spec["optimizer"], lr=spec["lr"], momentum=spec["momentum"],
        lr_schedule=spec["lr_schedule"], weight_decay=spec["weight_decay"], feature_decay=spec["feature_decay"],
        n_per_class=spec["n_per_class"], random_labels=spec["random_labels"], metrics_every=spec["metrics_every"],
        seed=spec["seed"], mlp_depth=spec["mlp_depth"], mlp_width=spec["mlp_width"],
        gaussian_dim=spec["gaussian_dim"], gaussian_train_per_class=spec["gaussian_train_per_class"],
        gaussian_test_per_class=spec["gaussian_test_per_class"], gaussian_noise=spec["gaussian_noise"],
    )
    return train.train(config, get_settings().data_dir, device=device(), on_epoch=on_checkpoint,
                       on_progress=on_progress, should_stop=should_stop)


RUNNERS = {"ufm": run_ufm, "train": run_train}
