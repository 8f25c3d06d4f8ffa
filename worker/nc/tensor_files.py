"""Tensors on disk as safetensors (never pickle), written atomically.

A reader (the API serving an artifact, an attempt resuming from a checkpoint) sees the
previous file or the new one, never half of one, even when the writer is killed mid-write.
"""

import os
import secrets
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (moved to the CPU, made contiguous) as a safetensors file at `path`,
    atomically; the directory is created when missing.

    The file is written under a temporary name in the same directory (os.replace is only
    atomic within one file system), flushed to the disk, then renamed over `path`. The
    temporary name starts with a dot, so that a listing of the directory's files (the
    service's artifacts) never shows it. It is created by save_file, not mkstemp, so that
    it gets the usual permissions (the umask's), not mkstemp's owner-only ones: the API
    must be able to read what a worker wrote.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, temporary, metadata)
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the directory is.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
