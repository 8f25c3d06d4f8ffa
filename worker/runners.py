"""From a stored spec to the science engine, for each experiment kind."""

import dataclasses
from collections.abc import Callable

import torch

from service.settings import get_settings
from worker.nc import train, ufm

CheckpointSink = Callable[[int, dict], None]
ProgressSink = Callable[[float], None]


def device() -> torch.device:
    """One job per GPU: the worker process sees its GPU as cuda:0 (CUDA_VISIBLE_DEVICES)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def engine_config(config_type, spec: dict):
    """The engine's config dataclass from a spec: the same field names, but K and d."""
    names = {field.name for field in dataclasses.fields(config_type)}
    shared = {name: value for name, value in spec.items() if name in names}
    return config_type(num_classes=spec["K"], dim=spec["d"], **shared)


def run_ufm(spec: dict, on_checkpoint: CheckpointSink, on_progress: ProgressSink,
            should_stop: Callable[[], bool]) -> dict:
    return ufm.solve(engine_config(ufm.UFMProblem, spec), device=device(), on_checkpoint=on_checkpoint,
                     on_progress=on_progress, should_stop=should_stop)


def run_train(spec: dict, on_checkpoint: CheckpointSink, on_progress: ProgressSink,
              should_stop: Callable[[], bool]) -> dict:
    """History rows are keyed by epoch (1-based): the step of a training run is its epoch."""
    return train.train(engine_config(train.TrainConfig, spec), get_settings().data_dir, device=device(),
                       on_epoch=on_checkpoint, on_progress=on_progress, should_stop=should_stop)


RUNNERS = {"ufm": run_ufm, "train": run_train}
