"""Tensors in files, read a block of rows at a time: the memory a reader takes is its block, whatever the file's size.

A ``StoredTensor`` says where a tensor's bytes are (a stream that ``open`` gives, from
``offset``, in C order) and what they are (dtype, shape); it never reads more than it is asked
for. A safetensors tensor is a byte range of its file, an ``.npz`` member's a byte range of
the member's stream (decompressed as it is read, for np.savez_compressed): either is read
front to back, block by block, into one buffer that is reused.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import IO

import numpy as np

Opener = Callable[[], AbstractContextManager[IO[bytes]]]


@dataclass(frozen=True)
class StoredTensor:
    name: str  # as errors name it, e.g. "features" or, for a checkpoint's slice, "features[3]"
    open: Opener
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    def slice(self, index: int) -> "StoredTensor":
        """The tensor's ``index``-th slice along its first axis (a checkpoint of a sequence)."""
        row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        return replace(self, name=f"{self.name}[{index}]", offset=self.offset + index * row_bytes, shape=self.shape[1:])

    def blocks(self, block_rows: int) -> Iterator[np.ndarray]:
        """The rows (along the first axis) in blocks of at most ``block_rows``, each a view of one reused buffer:
        a block is valid until the next one is read."""
        rows, row_shape = self.shape[0], self.shape[1:]
        buffer = np.empty((min(block_rows, rows), *row_shape), dtype=self.dtype)
        with self.open() as stream:
            stream.seek(self.offset)
            for start in range(0, rows, block_rows):
                block = buffer[: min(block_rows, rows - start)]
                view = block.reshape(-1).view(np.uint8).data
                filled = 0
                while filled < len(view):
                    read = stream.readinto(view[filled:])  # type: ignore[attr-defined]
                    if not read:
                        raise EOFError(f"{self.name}: the file ends before the tensor does (truncated)")
                    filled += read
                yield block

    def load(self) -> np.ndarray:
        """The whole tensor (for the small ones: a classifier, a bias)."""
        return next(self.blocks(self.shape[0])).copy()
