"""From a stored spec to the science engine, for each experiment kind."""

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from service import artifacts
from service.artifacts import CHECKPOINT_NAME
from service.settings import get_settings
from worker import sources
from worker.nc import analysis, checkpoint, train, ufm

HistorySink = Callable[[int, dict], None]
ProgressSink = Callable[[float], None]
CheckpointCopy = Callable[[Path], None]


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
# kind chose the runner (RUNNERS), each engine does one kind; resources chose the queue.
NOT_FOR_THE_ENGINE = {"kind", "resources"}


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
    spec: dict,
    run_dir: Path,
    on_checkpoint: HistorySink,
    on_progress: ProgressSink,
    should_stop: Callable[[], bool],
    keep_checkpoint: CheckpointCopy,
) -> dict:
    """Keeps the solution (W, H, b) in run_dir. A solve has no checkpoint: it is short, and starts again."""
    return ufm.solve(
        engine_config(ufm.UFMProblem, spec),
        device=device(),
        on_checkpoint=on_checkpoint,
        on_progress=on_progress,
        should_stop=should_stop,
        outputs=run_dir,
    )


def run_train(
    spec: dict,
    run_dir: Path,
    on_checkpoint: HistorySink,
    on_progress: ProgressSink,
    should_stop: Callable[[], bool],
    keep_checkpoint: CheckpointCopy,
) -> dict:
    """History rows are keyed by epoch (1-based): the step of a training run is its epoch. Checkpoints,
    the final weights and (save_features) the features are kept in run_dir; a checkpoint there is resumed.
    keep_checkpoint is given each checkpoint as it is saved (a remote artifact store copies it)."""
    return train.train(
        engine_config(train.TrainConfig, spec),
        get_settings().data_dir,
        device=device(),
        on_epoch=on_checkpoint,
        on_progress=on_progress,
        should_stop=should_stop,
        checkpoint_path=run_dir / CHECKPOINT_NAME,
        on_checkpoint_saved=keep_checkpoint,
        outputs=run_dir,
    )


def run_analysis(
    spec: dict,
    run_dir: Path,
    on_checkpoint: HistorySink,
    on_progress: ProgressSink,
    should_stop: Callable[[], bool],
    keep_checkpoint: CheckpointCopy,
) -> dict:
    """The catalogue of the source's files, read from the artifact store in blocks, one history row per checkpoint
    (steps 0, 1, ... unless the spec gives them). Keeps no files, and no checkpoint: it starts again."""
    found = sources.checkpoints(artifacts.get_store(), spec["source"])
    return analysis.analyse(
        found,
        spec["K"],
        spec["steps"] or list(range(len(found))),
        spec["logit_scale"],
        spec["normalize_classifier"],
        on_checkpoint,
        on_progress,
        should_stop,
    )


RUNNERS = {"ufm": run_ufm, "train": run_train, "analysis": run_analysis}


def resume_point(kind: str, run_dir: Path) -> int | None:
    """The step an attempt of this kind resumes after: a training run's checkpointed epoch; None: from the start."""
    if kind != "train":
        return None
    return checkpoint.saved_epoch(run_dir / CHECKPOINT_NAME)
