"""Which queues a worker serves, and which GPU each of its pool processes runs on.

A node runs one pool process per GPU (``nclab worker --gpus 0,1,2,3`` or ``all``): the
process with pool index i sees only GPU i of the list, as its cuda:0, through
CUDA_VISIBLE_DEVICES. Celery's prefork pool gives a process that replaces a dead one the
dead one's index, so a replacement takes over the same GPU and two live processes never
share one.

Whether CUDA is visible is asked of a short-lived child process: initializing CUDA in the
worker's main process, which forks the pool, would leave CUDA unusable in every pool
process.
"""

import os
import subprocess
import sys
from pathlib import Path

from service.schemas import QUEUES

# The GPUs of this worker's pool processes, by pool index; set in the main process before
# the pool forks (configure), read in each pool process (pin_gpu). Empty: no pinning.
_pinned_gpus: list[str] = []


class FleetError(Exception):
    """A worker asked to do what its host cannot: the message says what and how to proceed."""


def visible_gpu_count() -> int:
    """CUDA devices this process's children would see (CUDA_VISIBLE_DEVICES applies); 0 without a driver."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return 0
    if not Path("/proc/driver/nvidia/gpus").is_dir() and not Path("/dev/nvidia0").exists():
        return 0  # no NVIDIA driver: no need to start torch to know
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0


def resolve_gpus(requested: str | None, cuda_count: int) -> list[str]:
    """The device ids of ``--gpus``: a comma-separated list, or ``all`` (CUDA_VISIBLE_DEVICES's list when
    set, else every device torch sees); none when not asked."""
    if requested is None:
        return []
    if requested.strip() == "all":
        from_environment = [gpu.strip() for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
        gpus = [gpu for gpu in from_environment if gpu] or [str(index) for index in range(cuda_count)]
        if not gpus:
            raise FleetError("--gpus all: no GPU is visible (CUDA_VISIBLE_DEVICES is unset and torch sees none)")
        return gpus
    gpus = [gpu.strip() for gpu in requested.split(",")]
    if not all(gpus) or len(set(gpus)) != len(gpus):
        raise FleetError(f"--gpus {requested!r}: give distinct device ids separated by commas, or 'all'")
    return gpus


def resolve_queues(requested: str | None, cuda_count: int, gpus: list[str], allow_cpu: bool) -> list[str]:
    """The queues to serve: those asked for, or those this host can (gpu where CUDA is visible, cpu always).

    A host without CUDA refuses the gpu queue, and pinned GPUs, unless ``allow_cpu``: a training
    job taken there would run on the CPU, for hours or days.
    """
    if requested is None:
        queues = ["cpu", "gpu"] if cuda_count or (gpus and allow_cpu) else ["cpu"]
    else:
        queues = list(dict.fromkeys(queue.strip() for queue in requested.split(",") if queue.strip()))
        unknown = [queue for queue in queues if queue not in QUEUES]
        if unknown or not queues:
            raise FleetError(f"--queues {requested!r}: name one or more of {', '.join(QUEUES)}")
    if cuda_count == 0 and not allow_cpu and ("gpu" in queues or gpus):
        asked = "to serve queue gpu" if "gpu" in queues else f"to pin GPUs {','.join(gpus)}"
        raise FleetError(
            f"asked {asked}, but no CUDA device is visible on this host: its jobs would train on the CPU. "
            "Serve --queues cpu, or pass --allow-cpu to run them here anyway."
        )
    return queues


def configure(gpus: list[str]) -> None:
    """In the worker's main process, before the pool forks: pool process i will run on gpus[i]."""
    _pinned_gpus[:] = gpus


def pinned_gpus() -> list[str]:
    return list(_pinned_gpus)


def pin_gpu(pool_index: int) -> str | None:
    """In a pool process, before anything touches CUDA: see only this process's GPU (None: not pinned)."""
    if not _pinned_gpus:
        return None
    gpu = _pinned_gpus[pool_index]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    return gpu
