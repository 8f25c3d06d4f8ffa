"""From an analysis's source (uploads, or another experiment's artifact) to the checkpoints worker/nc/analysis reads.

The files are read where they are stored, through the artifact store (a local directory or
any fsspec URL), a block at a time: nothing is copied first. Each file's header is checked
again here (service/feature_files.py): the worker trusts no header either, the upload's record
included.
"""

import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import IO

from service.artifacts import ArtifactStore
from service.feature_files import CLASSIFIER_KEYS, Layout, inspect, network_classifier
from service.schemas import upload_ids
from worker.nc.analysis import Checkpoint
from worker.nc.stored_tensors import Opener, StoredTensor

FileOpener = Callable[[], IO[bytes]]


def checkpoints(store: ArtifactStore, source: dict) -> list[Checkpoint]:
    """The source's checkpoints in step order: each file's, each slice of a file's leading axis."""
    found: list[Checkpoint] = []
    for open_file in _files(store, source):
        layout = _layout(open_file)
        tensors = {name: _stored(name, open_file, layout) for name in layout.tensors}
        if source.get("model") is not None:
            tensors.update(_network_classifier(partial(store.open, source["experiment"], source["model"]), layout))
        for step in range(layout.steps):
            found.append(Checkpoint(**{name: _step_of(name, tensor, step) for name, tensor in tensors.items()}))
    return found


def _layout(open_file: FileOpener) -> Layout:
    with open_file() as file:
        file.seek(0, 2)
        return inspect(file, file.tell())


def _network_classifier(open_file: FileOpener, features: Layout) -> dict[str, StoredTensor]:
    """The classifier and bias of a network's state_dict (a training run's model.safetensors)."""
    with open_file() as file:
        file.seek(0, 2)
        size = file.tell()
        tensors = network_classifier(file, size, features)
    return {
        name: StoredTensor(name, _opener(open_file, None), where.offset, where.dtype, where.shape)
        for name, where in tensors.items()
        if name in CLASSIFIER_KEYS
    }


def _files(store: ArtifactStore, source: dict) -> list[FileOpener]:
    if "upload" in source:
        return [partial(store.open_upload, upload_id) for upload_id in upload_ids(source)]
    return [partial(store.open, source["experiment"], source["artifact"])]


# The tensors whose leading axis is the checkpoint's in a sequence (service/feature_files.py: RULES's "S").
STEP_RANKS = {"features": 3, "classifier": 3, "bias": 2, "test_features": 3}


def _step_of(name: str, tensor: StoredTensor, step: int) -> StoredTensor:
    return tensor.slice(step) if len(tensor.shape) == STEP_RANKS.get(name) else tensor


def _stored(name: str, open_file: FileOpener, layout: Layout) -> StoredTensor:
    where = layout.tensors[name]
    return StoredTensor(name, _opener(open_file, where.member), where.offset, where.dtype, where.shape)


def _opener(open_file: FileOpener, member: str | None) -> Opener:
    """A stream of the tensor's bytes: the file, or its npz member."""

    @contextmanager
    def stream() -> Iterator[IO[bytes]]:
        with open_file() as file:
            if member is None:
                yield file
                return
            with zipfile.ZipFile(file) as archive, archive.open(member) as member_stream:
                yield member_stream

    return stream
