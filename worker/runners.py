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


# How a spec's fields reach its engine's config (UFMSpec -> ufm.UFMProblem, TrainSpec ->
# train.TrainConfig): each to the config field of the same name, but those renamed here
# and those the engine is not given. Any other spec field that the config lacks fails the
# job (engine_config), so that a field added to a spec but not to its engine cannot be
# accepted from users and then silently ignored. tests/test_spec_config.py checks both
# directions on the real specs, and that the config's defaults are the spec's.
RENAMED = {"K": "num_classes", "d": "dim"}  # the papers' letters in the API, words in the engine
NOT_FOR_THE_ENGINE = {"kind"}  # it chose the runner (RUNNERS); each engine does one kind


def engine_config(config_type, spec: dict):
    """The engine's config dataclass from a validated spec (every field filled in)."""
    config_fields = {field.name for field in dataclasses.fields(config_type)}
    arguments = {RENAMED.get(name, name): value for name, value in spec.items() if name not in NOT_FOR_THE_ENGINE}
    unwired = sorted(arguments.keys() - config_fields)
    if unwired:
        raise TypeError(
            f"{config_type.__name__} has no field for the spec field(s) {', '.join(unwired)}: add them "
            f"to {config_type.__name__}, or declare them in worker.runners.RENAMED or NOT_FOR_THE_ENGINE"
        )
    return config_type(**arguments)


def run_ufm(
    spec: dict, on_checkpoint: CheckpointSink, on_progress: ProgressSink, should_stop: Callable[[], bool]
) -> dict:
    return ufm.solve(
        engine_config(ufm.UFMProblem, spec),
        device=device(),
        on_checkpoint=on_checkpoint,
        on_progress=on_progress,
        should_stop=should_stop,
    )


def run_train(
    spec: dict, on_checkpoint: CheckpointSink, on_progress: ProgressSink, should_stop: Callable[[], bool]
) -> dict:
    """History rows are keyed by epoch (1-based): the step of a training run is its epoch."""
    return train.train(
        engine_config(train.TrainConfig, spec),
        get_settings().data_dir,
        device=device(),
        on_epoch=on_checkpoint,
        on_progress=on_progress,
        should_stop=should_stop,
    )


RUNNERS = {"ufm": run_ufm, "train": run_train}
