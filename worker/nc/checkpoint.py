"""Checkpoints of a training run (worker/nc/train.py), as safetensors files.

A checkpoint is one safetensors file that holds everything a run has changed since it
began from its seed, so that a run stopped at any point can go on from its last
checkpoint and produce what it would have produced uninterrupted (docs/checkpoints.md):

- tensors `model.<name>`: the model's state_dict (parameters and BatchNorm buffers);
- tensors `optimizer.<index>.<name>`: the optimizer's per-parameter state (SGD's
  momentum_buffer; Adam's step, exp_avg and exp_avg_sq), index as in its state_dict;
- uint8 tensors `rng.data_order`, `rng.cpu` and, on CUDA, `rng.cuda`: the states of the
  generator of the batch order, of torch's global CPU generator and of the device's;
- metadata (str -> str): `epoch`, the last epoch completed; and as JSON `row`, that
  epoch's history row, `param_groups`, the optimizer's hyperparameters (its params as
  indices), and `config`, the run's configuration.

Safetensors and never torch.save: loading a safetensors file runs no code, while
torch.save writes a pickle, which can (a file on a shared volume must not be a way to run
code in a worker). Every file is written atomically (worker/nc/tensor_files.py).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from worker.nc.tensor_files import write_tensors

MODEL_PREFIX = "model."
OPTIMIZER_PREFIX = "optimizer."
DATA_ORDER_RNG = "rng.data_order"
CPU_RNG = "rng.cpu"
CUDA_RNG = "rng.cuda"


@dataclass(frozen=True)
class TrainingState:
    """What a run changes as it trains, restored in place on a resume."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data_order: torch.Generator  # draws each epoch's batch order
    device: torch.device


@dataclass(frozen=True)
class Resumed:
    """Where a resumed run stands: the epoch of its checkpoint, and that epoch's history row."""

    epoch: int
    row: dict


def saved_epoch(path: Path) -> int | None:
    """The epoch of the checkpoint at `path`, from its metadata (no tensor is read); None without one.

    A file that is no readable checkpoint (truncated, another format) is deleted and
    counts as none: a caller that asks here before resuming and the resume itself (which
    asks here first) then agree on where the run starts.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(path, framework="pt") as file:
            return int(file.metadata()["epoch"])
    except (SafetensorError, KeyError, TypeError, ValueError):  # TypeError: a file without metadata
        path.unlink(missing_ok=True)
        return None


def save_checkpoint(path: Path, state: TrainingState, epoch: int, row: dict, config: dict) -> None:
    """Save the run after `epoch` (its history row `row`) at `path`, replacing the checkpoint there.

    `config` (JSON-serializable) is the run's configuration: load_checkpoint refuses a
    checkpoint saved under another one.
    """
    optimizer_state = state.optimizer.state_dict()
    tensors = {MODEL_PREFIX + name: tensor for name, tensor in state.model.state_dict().items()}
    for index, parameter_state in optimizer_state["state"].items():
        for name, tensor in parameter_state.items():
            tensors[f"{OPTIMIZER_PREFIX}{index}.{name}"] = tensor
    tensors[DATA_ORDER_RNG] = state.data_order.get_state()
    # The batch order has a generator of its own, and the networks draw nothing at random
    # as they train; but anything that does (dropout, augmentation) draws from the global
    # generators, whose streams a resume must then go on with too.
    tensors[CPU_RNG] = torch.get_rng_state()
    if state.device.type == "cuda":
        tensors[CUDA_RNG] = torch.cuda.get_rng_state(state.device)
    metadata = {
        "epoch": str(epoch),
        "row": json.dumps(row),
        "param_groups": json.dumps(optimizer_state["param_groups"]),
        "config": _canonical(config),
    }
    write_tensors(path, tensors, metadata)


def load_checkpoint(path: Path, state: TrainingState, config: dict) -> Resumed | None:
    """Restore `state` from the checkpoint at `path`, in place; None (and `state` untouched) without one.

    Raises ValueError for a checkpoint saved under another `config`: going on from it
    would silently mix two runs.
    """
    path = Path(path)
    epoch = saved_epoch(path)
    if epoch is None:
        return None
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
    tensors = load_file(path)
    if metadata["config"] != _canonical(config):
        raise ValueError(f"{path} is the checkpoint of a run with another configuration; remove it to start afresh")

    state.model.load_state_dict(
        {name.removeprefix(MODEL_PREFIX): tensor for name, tensor in tensors.items() if name.startswith(MODEL_PREFIX)}
    )
    parameter_states: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith(OPTIMIZER_PREFIX):
            index, key = name.removeprefix(OPTIMIZER_PREFIX).split(".", 1)
            parameter_states.setdefault(int(index), {})[key] = tensor
    # load_state_dict moves each state to its parameter's device and dtype.
    state.optimizer.load_state_dict({"state": parameter_states, "param_groups": json.loads(metadata["param_groups"])})
    state.data_order.set_state(tensors[DATA_ORDER_RNG])
    torch.set_rng_state(tensors[CPU_RNG])
    if state.device.type == "cuda" and CUDA_RNG in tensors:
        torch.cuda.set_rng_state(tensors[CUDA_RNG], state.device)
    return Resumed(epoch, json.loads(metadata["row"]))


def _canonical(config: dict) -> str:
    """`config` as JSON, keys sorted, so that equal configurations give equal strings."""
    return json.dumps(config, sort_keys=True)
