"""The metric catalogue of features computed elsewhere (``kind: "analysis"``), from files read in blocks.

Each checkpoint (one file, or one slice of a file's leading axis) gives one history row:
the catalogue of docs/metrics.md for ``features`` and ``labels`` (with the ``classifier`` and
``bias`` when given), and its ``test_*`` copy for held-out ``test_features`` / ``test_labels``.
The metrics are those of training (Papyan, Han & Donoho 2020; Zhu et al. 2021; Galanti et al.
2022, as worker/nc/metrics.py cites), by the same ``CollapseAccumulator`` with two passes over
the file: the class sums, then the samples centred on the final class means. Only a block of
rows is in memory at a time, in the file's dtype and once in float64 (``BLOCK_ENTRIES``), plus
the O(K d) state of the accumulator.

What only the data shows fails the analysis with ``BadData``, naming the tensor and the first
bad index: a feature that is NaN or infinite, a label outside 0..K-1, a class without samples.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from worker.nc.errors import Stopped
from worker.nc.metrics import CollapseAccumulator
from worker.nc.stored_tensors import StoredTensor

# Rows per block: about this many feature entries (8 MiB in float64), whatever d is.
BLOCK_ENTRIES = 1 << 20


class BadData(ValueError):
    """The data cannot be analysed; the message names the tensor and the first bad index."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint's tensors; the optional ones None when the file has none."""

    features: StoredTensor
    labels: StoredTensor
    classifier: StoredTensor | None = None
    bias: StoredTensor | None = None
    test_features: StoredTensor | None = None
    test_labels: StoredTensor | None = None


def analyse(
    checkpoints: list[Checkpoint],
    num_classes: int,
    steps: list[int],
    logit_scale: float = 1.0,
    normalize_classifier: bool = False,
    on_checkpoint: Callable[[int, dict], None] = lambda step, row: None,
    on_progress: Callable[[float], None] = lambda fraction: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> dict:
    """Each checkpoint's catalogue, given to ``on_checkpoint(step, row)`` in order; returns the last row and the
    number of checkpoints. ``normalize_classifier``: its rows on the unit sphere (a normalized network's effective
    classifier, Yaras et al. 2022). ``should_stop`` is asked between blocks (Stopped)."""
    total_rows = sum(_rows_read(checkpoint) for checkpoint in checkpoints)
    done = 0

    def read(rows: int) -> None:
        nonlocal done
        if should_stop():
            raise Stopped()
        done += rows
        on_progress(done / total_rows)

    row: dict = {}
    for step, checkpoint in zip(steps, checkpoints, strict=True):
        classifier = _loaded(checkpoint.classifier)
        if classifier is not None and normalize_classifier:
            classifier = classifier / np.linalg.norm(classifier.astype(np.float64), axis=1, keepdims=True)
        bias = _loaded(checkpoint.bias)
        row = catalogue(checkpoint.features, checkpoint.labels, num_classes, classifier, bias, logit_scale, read)
        if checkpoint.test_features is not None and checkpoint.test_labels is not None:
            test = catalogue(
                checkpoint.test_features, checkpoint.test_labels, num_classes, classifier, bias, logit_scale, read
            )
            row.update({f"test_{key}": value for key, value in test.items()})
        on_checkpoint(step, row)
    return {**row, "checkpoints": len(checkpoints)}


def catalogue(
    features: StoredTensor,
    labels: StoredTensor,
    num_classes: int,
    classifier: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    logit_scale: float = 1.0,
    on_block: Callable[[int], None] = lambda rows: None,
) -> dict[str, float]:
    """The catalogue of one set of features, in two passes over the stored tensors, a block at a time."""
    block_rows = max(1, BLOCK_ENTRIES // features.shape[1])
    accumulator = CollapseAccumulator(num_classes, features.shape[1], device="cpu", passes=2)
    counts = np.zeros(num_classes, dtype=np.int64)
    for block, block_labels in _checked_blocks(features, labels, num_classes, block_rows):
        counts += np.bincount(block_labels, minlength=num_classes)
        accumulator.update(torch.from_numpy(block), torch.from_numpy(block_labels))
        on_block(len(block))
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise BadData(f"{labels.name}: class {empty[0]} of 0..{num_classes - 1} has no samples; every class needs one")

    def replay() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for block, block_labels in zip(features.blocks(block_rows), labels.blocks(block_rows), strict=True):
            yield torch.from_numpy(block), torch.from_numpy(block_labels.astype(np.int64))
            on_block(len(block))

    return accumulator.compute(classifier, bias, logit_scale, replay=replay())


def _checked_blocks(
    features: StoredTensor, labels: StoredTensor, num_classes: int, block_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Blocks of features and their labels, each checked: finite features, labels in 0..K-1."""
    start = 0
    for block, block_labels in zip(features.blocks(block_rows), labels.blocks(block_rows), strict=True):
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            value = block[row][~np.isfinite(block[row])][0]
            raise BadData(f"{features.name}[{start + row}] holds {value} (features must be finite)")
        outside = (block_labels < 0) | (block_labels >= num_classes)
        if outside.any():
            row = int(np.argmax(outside))
            raise BadData(f"{labels.name}[{start + row}] = {block_labels[row]} is outside 0..{num_classes - 1}")
        yield block, block_labels.astype(np.int64)
        start += len(block)


def _loaded(tensor: StoredTensor | None) -> np.ndarray | None:
    if tensor is None:
        return None
    values = tensor.load()
    finite = np.isfinite(values)
    if not finite.all():
        index = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise BadData(f"{tensor.name}[{', '.join(map(str, index))}] holds {values[index]} (it must be finite)")
    return values


def _rows_read(checkpoint: Checkpoint) -> int:
    """The rows both passes read: the progress's whole."""
    rows = checkpoint.features.shape[0]
    if checkpoint.test_features is not None:
        rows += checkpoint.test_features.shape[0]
    return 2 * rows
