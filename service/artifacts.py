"""The files an experiment produced: kept in the artifact store, listed in the database.

The store is NCLAB_ARTIFACT_ROOT: a directory (``<data dir>/artifacts`` by default) or any
fsspec URL, such as ``s3://bucket/prefix`` with the ``s3`` extra; an experiment's files are
``<root>/<experiment id>/<name>``. Tensors are safetensors, never pickle.

A worker writes a run's files into a local working directory. With a local store that is
the experiment's own directory, and nothing is copied. With a remote one it is a scratch
directory of the worker's (``<data dir>/scratch/<id>``): each checkpoint is uploaded as it
is saved, so that an attempt on another host resumes from it, and the artifacts are
uploaded before the job's end is recorded. Either way the ``artifacts`` table is the list:
the worker records each file's size and sha256 as the job ends, and the API lists and
serves what the table names, so a file still being written (a checkpoint) is never offered.

Files users upload for analysis (``POST /uploads``) are ``<root>/uploads/<upload id>``: received
under a partial name (``.<id>.part``), renamed once their header is checked, removed if it is
refused; the ``uploads`` table lists the kept ones.
"""

import hashlib
import mimetypes
import posixpath
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from service.settings import get_settings

# The one file that is not an artifact: the latest checkpoint of a training run still in
# progress (worker/nc/checkpoint.py writes it), removed when the job ends.
CHECKPOINT_NAME = "checkpoint.safetensors"
# An artifact's name is one file name of these characters: it is a path component on disk and in URLs.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
MEDIA_TYPES = {".safetensors": "application/octet-stream", ".json": "application/json", ".csv": "text/csv"}
READ_CHUNK = 1 << 20
# The folder of the root that holds the uploads (experiment ids are UUIDs: no experiment's folder has this name).
UPLOADS = "uploads"


def media_type(name: str) -> str:
    suffix = Path(name).suffix
    return MEDIA_TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe(directory: Path) -> list[dict]:
    """Name, bytes, sha256 and media type of each artifact in a run's working directory (not the checkpoint)."""
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


class ArtifactStore:
    """The experiments' files under one root, through fsspec; the worker's side and the API's."""

    def __init__(self, root: str, storage_options: dict, scratch: Path):
        self.is_local = fsspec.utils.get_protocol(root) in LocalFileSystem.protocol
        if not self.is_local:
            # A listing cached by this process would hide a checkpoint that another host has written since.
            storage_options = {"use_listings_cache": False, **storage_options}
        self.fs, self.root = fsspec.core.url_to_fs(root, **storage_options)
        self._scratch = scratch

    def _path(self, experiment_id: str, name: str = "") -> str:
        return posixpath.join(self.root, experiment_id, name)

    def local_file(self, experiment_id: str, name: str) -> Path | None:
        """The file on this machine's disk, where the store is local (the API serves it as a file)."""
        return Path(self._path(experiment_id, name)) if self.is_local else None

    # The worker's side.

    def working_dir(self, experiment_id: str) -> Path:
        """Where a run writes its files: the experiment's own directory in a local store, else scratch."""
        if self.is_local:
            return Path(self._path(experiment_id))
        return self._scratch / experiment_id

    def fetch_checkpoint(self, experiment_id: str) -> None:
        """Bring the stored checkpoint into the working directory (a remote store's), if there is one."""
        if self.is_local:
            return
        destination = self.working_dir(experiment_id) / CHECKPOINT_NAME
        destination.unlink(missing_ok=True)  # one this host kept from an older attempt is not the latest
        if self.fs.exists(self._path(experiment_id, CHECKPOINT_NAME)):
            destination.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._path(experiment_id, CHECKPOINT_NAME), str(destination))

    def keep_checkpoint(self, experiment_id: str, checkpoint: Path) -> None:
        """Called after each checkpoint is saved: a remote store gets a copy, for an attempt elsewhere."""
        if not self.is_local:
            self.fs.put_file(str(checkpoint), self._path(experiment_id, CHECKPOINT_NAME))

    def publish(self, experiment_id: str, names: list[str]) -> None:
        """Put a finished run's artifacts in a remote store (a local store already holds them)."""
        if self.is_local:
            return
        run_dir = self.working_dir(experiment_id)
        for name in names:
            self.fs.put_file(str(run_dir / name), self._path(experiment_id, name))

    def drop_checkpoint(self, experiment_id: str) -> None:
        """A run that ended keeps its artifacts but not its checkpoint (nor, remotely, its scratch copy)."""
        checkpoint = self._path(experiment_id, CHECKPOINT_NAME)
        if self.fs.exists(checkpoint):
            self.fs.rm_file(checkpoint)
        self.release(experiment_id)

    def release(self, experiment_id: str) -> None:
        """An attempt given back: a remote store keeps the checkpoint, so the scratch copy can go."""
        if not self.is_local:
            shutil.rmtree(self.working_dir(experiment_id), ignore_errors=True)

    def discard(self, experiment_id: str) -> None:
        """Remove everything of a run that starts again from nothing, or ended without success."""
        if self.fs.exists(self._path(experiment_id)):
            self.fs.rm(self._path(experiment_id), recursive=True)
        self.release(experiment_id)

    # The API's side.

    def size(self, experiment_id: str, name: str) -> int:
        """The stored file's size; FileNotFoundError if it is missing."""
        return int(self.fs.size(self._path(experiment_id, name)))

    def open(self, experiment_id: str, name: str) -> IO[bytes]:
        return self.fs.open(self._path(experiment_id, name), "rb", block_size=READ_CHUNK)

    def read_range(self, experiment_id: str, name: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start`` to ``end`` (exclusive) of the stored file, a chunk at a time."""
        with self.open(experiment_id, name) as file:
            file.seek(start)
            remaining = end - start
            while remaining > 0 and (chunk := file.read(min(READ_CHUNK, remaining))):
                remaining -= len(chunk)
                yield chunk

    # Uploads (POST /uploads).

    def _upload_path(self, upload_id: str, partial: bool = False) -> str:
        return posixpath.join(self.root, UPLOADS, f".{upload_id}.part" if partial else upload_id)

    def receive_upload(self, upload_id: str) -> IO[bytes]:
        """A new file to write an upload's bytes into, under its partial name."""
        self.fs.makedirs(posixpath.join(self.root, UPLOADS), exist_ok=True)
        return self.fs.open(self._upload_path(upload_id, partial=True), "wb")  # a remote store's own part size

    def open_upload(self, upload_id: str, partial: bool = False) -> IO[bytes]:
        return self.fs.open(self._upload_path(upload_id, partial), "rb", block_size=READ_CHUNK)

    def keep_upload(self, upload_id: str) -> None:
        """The partial file, checked, under its own name."""
        self.fs.mv(self._upload_path(upload_id, partial=True), self._upload_path(upload_id))

    def discard_upload(self, upload_id: str) -> None:
        """An upload refused or abandoned: no file of it is left, partial or kept."""
        for path in (self._upload_path(upload_id, partial=True), self._upload_path(upload_id)):
            if self.fs.exists(path):
                self.fs.rm_file(path)


def get_store() -> ArtifactStore:
    settings = get_settings()
    return ArtifactStore(settings.resolved_artifact_root, settings.artifact_storage_options, settings.scratch_dir)
