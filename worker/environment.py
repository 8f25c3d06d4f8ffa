"""Provenance: what produced a result (versions, device, host, worker), recorded with each attempt.

Two results are comparable only if their environments are: a torch or CUDA upgrade, another
GPU model, or cuDNN's autotuner can each move the last digits of a metric.
"""

import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

_REPOSITORY = Path(__file__).resolve().parent.parent


@functools.cache
def nclab_commit() -> str | None:
    """The git commit of the code that runs: NCLAB_COMMIT (set by an image build), else the checkout's HEAD."""
    if os.environ.get("NCLAB_COMMIT"):
        return os.environ["NCLAB_COMMIT"]
    if not (_REPOSITORY / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(_REPOSITORY), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() or None


def _nclab_version() -> str | None:
    try:
        return importlib.metadata.version("nclab")
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(device: torch.device, worker: str) -> dict:
    """This process's environment, for a job about to run on ``device``."""
    on_gpu = device.type == "cuda"
    return {
        "nclab": _nclab_version(),
        "commit": nclab_commit(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion, a str subclass
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "host": socket.gethostname(),
        "worker": worker,
        "threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
