"""The files an experiment produced: stored under NCLAB_ARTIFACT_ROOT/<experiment id>/, listed in the database.

The worker writes an experiment's files into its directory (worker/nc writes tensors as
safetensors, never pickle) and, as the job ends, records each one's size and sha256 in the
``artifacts`` table: the API lists and serves what the table names, so a file the worker
is still writing (a checkpoint) is never offered. The directory must be one the API and
every worker see at the same path (a shared volume in a fleet).
"""

import hashlib
import mimetypes
import re
import shutil
from pathlib import Path

from service.settings import get_settings

# The one file that is not an artifact: the latest checkpoint of a training run still in
# progress (worker/nc/checkpoint.py writes it), removed when the job ends.
CHECKPOINT_NAME = "checkpoint.safetensors"
# An artifact's name is one file name of these characters: it is a path component on disk and in URLs.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
MEDIA_TYPES = {".safetensors": "application/octet-stream", ".json": "application/json", ".csv": "text/csv"}
_READ_CHUNK = 1 << 20


def experiment_dir(experiment_id: str) -> Path:
    """Where an experiment's files live (not created here)."""
    return get_settings().resolved_artifact_root / experiment_id


def media_type(name: str) -> str:
    suffix = Path(name).suffix
    return MEDIA_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe(directory: Path) -> list[dict]:
    """Name, bytes, sha256 and media type of each artifact in an experiment's directory (not the checkpoint)."""
    if not directory.is_dir():
        return []
    return [
        {
            "name": path.name,
            "bytes": path.stat().st_size,
            "sha256": sha256_of(path),
            "media_type": media_type(path.name),
        }
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != CHECKPOINT_NAME and NAME_PATTERN.fullmatch(path.name)
    ]


def discard(experiment_id: str) -> None:
    """Remove what an attempt left of a run that starts again from nothing (its checkpoint and files)."""
    shutil.rmtree(experiment_dir(experiment_id), ignore_errors=True)
