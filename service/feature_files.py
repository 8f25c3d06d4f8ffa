"""What a file of features holds, read from its header without trusting it (``POST /uploads``, analyses).

A file of features is safetensors or ``.npz`` (numpy's zip of ``.npy`` arrays) and holds:

| tensor | shape | dtype |
| --- | --- | --- |
| ``features`` | N x d, or S x N x d (one slice per checkpoint) | float16, float32, float64 |
| ``labels`` | N | an integer type |
| ``classifier`` (optional) | K x d, or S x K x d | float |
| ``bias`` (optional) | K, or S x K | float |
| ``test_features``, ``test_labels`` (optional, together) | M x d (or S x M x d), M | as above |

``train_features`` and ``train_labels`` are taken for ``features`` and ``labels``: the names
a training run's ``features.safetensors`` uses (worker/nc/train.py).

Nothing here believes the header: a safetensors header's offsets must tile the data exactly
(as the format requires: no gap, no overlap, nothing past the end), every size is checked
against the file's, and an npz member's ``.npy`` header is parsed as text by numpy's format
module, never unpickled; an array of Python objects (a pickle) is refused. A refusal is
``BadFeatureFile`` naming the tensor and the rule. The one read of data is the labels', for
the number of classes (``count_classes``): the experiment's K is known at submit.
"""

import json
import math
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

# The safetensors format's own cap on its header (the reference implementation refuses more).
MAX_SAFETENSORS_HEADER = 100 * 2**20
# safetensors dtype -> numpy dtype (little-endian, as the format stores them). Others are refused.
SAFETENSORS_DTYPES = {
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
    "I8": "|i1",
    "I16": "<i2",
    "I32": "<i4",
    "I64": "<i8",
    "U8": "|u1",
    "U16": "<u2",
    "U32": "<u4",
    "U64": "<u8",
}
FLOAT_DTYPES = ("float16", "float32", "float64")
ALIASES = {"train_features": "features", "train_labels": "labels"}
# Each tensor: its kind of dtype and the shapes it may have (letters: S steps, N, M samples, K classes, d).
RULES = {
    "features": ("float", ("N d", "S N d")),
    "labels": ("integer", ("N",)),
    "classifier": ("float", ("K d", "S K d")),
    "bias": ("float", ("K", "S K")),
    "test_features": ("float", ("M d", "S M d")),
    "test_labels": ("integer", ("M",)),
}
READ_CHUNK = 1 << 20
# numpy's parsers of an .npy header (a Python literal, read as text): np.save writes 1.0, or 2.0 for a long one.
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class BadFeatureFile(ValueError):
    """The file cannot be analysed: ``tensor`` (None: the file as a whole) breaks the rule in the message."""

    def __init__(self, tensor: str | None, message: str):
        super().__init__(f"{tensor}: {message}" if tensor else message)
        self.tensor, self.message = tensor, message


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes are: C order, from ``offset`` of the file, or of the npz ``member``."""

    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    member: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Layout:
    """A file's tensors, checked against each other; ``steps`` is 1 for a file of one checkpoint."""

    format: str  # "safetensors" or "npz"
    tensors: dict[str, TensorLocation]
    steps: int
    samples: int
    dim: int

    def describe(self) -> dict:
        """The layout as JSON: what an upload's record keeps."""
        return {
            "format": self.format,
            "steps": self.steps,
            "samples": self.samples,
            "dim": self.dim,
            "tensors": {name: {"dtype": t.dtype.name, "shape": list(t.shape)} for name, t in self.tensors.items()},
        }


def inspect(file: IO[bytes], size: int) -> Layout:
    """The layout of a safetensors or npz file of ``size`` bytes, or BadFeatureFile."""
    file.seek(0)
    start = file.read(8)
    if start.startswith(b"PK"):
        tensors, format = _npz_tensors(file, size), "npz"
    elif len(start) == 8:
        tensors, format = _safetensors_tensors(file, size, start), "safetensors"
    else:
        raise BadFeatureFile(None, f"a file of {size} bytes is neither safetensors nor npz")
    return _checked_layout(format, tensors)


def _safetensors_tensors(file: IO[bytes], size: int, start: bytes) -> dict[str, TensorLocation]:
    (header_length,) = struct.unpack("<Q", start)
    if header_length > min(size - 8, MAX_SAFETENSORS_HEADER):
        raise BadFeatureFile(
            None, f"the safetensors header claims {header_length} bytes; the file has {size - 8} after its length"
        )
    try:
        header = json.loads(file.read(header_length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadFeatureFile(None, f"the safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise BadFeatureFile(None, "the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadFeatureFile(None, "the safetensors __metadata__ is not an object of strings")
    data_start, data_length = 8 + header_length, size - 8 - header_length
    tensors, spans = {}, []
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.keys() != {"dtype", "shape", "data_offsets"}:
            raise BadFeatureFile(name, "a safetensors entry has exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise BadFeatureFile(name, f"dtype {dtype!r} is not taken: {', '.join(SAFETENSORS_DTYPES)}")
        if not isinstance(shape, list) or not all(_natural(n) for n in shape):
            raise BadFeatureFile(name, f"shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_natural(n) for n in offsets):
            raise BadFeatureFile(name, f"data_offsets {offsets!r} is not two non-negative integers")
        tensor = TensorLocation(np.dtype(SAFETENSORS_DTYPES[dtype]), tuple(shape), data_start + offsets[0])
        if offsets[1] - offsets[0] != tensor.nbytes:
            raise BadFeatureFile(
                name,
                f"data_offsets {offsets} span {offsets[1] - offsets[0]} bytes; {dtype} {shape} takes {tensor.nbytes}",
            )
        tensors[name] = tensor
        spans.append((offsets[0], offsets[1], name))
    # The format's rule: the tensors tile the data, in offset order, with no gap, overlap or trailing byte.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise BadFeatureFile(name, f"data_offsets start at {begin}; the data before ends at {position}")
        position = end
    if position != data_length:
        raise BadFeatureFile(None, f"the tensors end at byte {position} of the data; the file holds {data_length}")
    return tensors


def _npz_tensors(file: IO[bytes], size: int) -> dict[str, TensorLocation]:
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile as exc:
        raise BadFeatureFile(None, f"not a readable npz (zip) file: {exc}") from None
    tensors: dict[str, TensorLocation] = {}
    with archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if name == info.filename:
                raise BadFeatureFile(info.filename, "an npz member is an .npy array")
            if name in tensors:
                raise BadFeatureFile(name, "appears twice in the npz")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise BadFeatureFile(name, "an npz member is stored or deflated (np.savez, np.savez_compressed)")
            if info.header_offset + info.compress_size > size:
                raise BadFeatureFile(name, "the npz member runs past the end of the file (truncated)")
            try:
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = NPY_HEADER_READERS.get(version)
                    if read_header is None:
                        raise ValueError(f".npy format version {version} is not taken (1.0 or 2.0: np.save's)")
                    shape, fortran_order, dtype = read_header(member)
                    header_length = member.tell()
            except (ValueError, zipfile.BadZipFile, EOFError, OSError) as exc:
                raise BadFeatureFile(name, f"not a readable .npy header: {exc}") from None
            if dtype.hasobject:
                raise BadFeatureFile(
                    name, "holds Python objects (a pickle), which is never loaded: save numeric arrays"
                )
            if fortran_order:
                raise BadFeatureFile(name, "is in Fortran order: save it C-contiguous (np.ascontiguousarray)")
            if dtype.byteorder == ">":
                raise BadFeatureFile(name, f"dtype {dtype.str} is big-endian: save it little-endian")
            tensor = TensorLocation(dtype, tuple(shape), header_length, info.filename)
            if info.file_size != header_length + tensor.nbytes:
                raise BadFeatureFile(
                    name,
                    f"the member holds {info.file_size - header_length} bytes of data; "
                    f"{dtype} {list(shape)} takes {tensor.nbytes}",
                )
            tensors[name] = tensor
    return tensors


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_layout(format: str, found: dict[str, TensorLocation]) -> Layout:
    """The tensors under their own names, each of its dtype and rank, and their sizes consistent."""
    tensors: dict[str, TensorLocation] = {}
    for name, tensor in found.items():
        own = ALIASES.get(name, name)
        if own not in RULES:
            raise BadFeatureFile(name, f"unknown tensor: a file of features holds {', '.join(RULES)}")
        if own in tensors:
            raise BadFeatureFile(name, f"the file holds both {name} and {own}")
        tensors[own] = tensor
    for name in ("features", "labels"):
        if name not in tensors:
            raise BadFeatureFile(name, "missing: a file of features holds features (N x d) and labels (N)")
    if ("test_features" in tensors) != ("test_labels" in tensors):
        raise BadFeatureFile(
            "test_labels" if "test_features" in tensors else "test_features",
            "missing: held-out features come with their labels",
        )
    tensors = {name: tensors[name] for name in RULES if name in tensors}  # the features first: they set N and d
    sizes: dict[str, int] = {}
    for name, tensor in tensors.items():
        kind, shapes = RULES[name]
        taken = FLOAT_DTYPES if kind == "float" else None
        if (taken is not None and tensor.dtype.name not in taken) or (
            kind == "integer" and tensor.dtype.kind not in "iu"
        ):
            raise BadFeatureFile(
                name, f"dtype {tensor.dtype.name}: {'float16, float32 or float64' if taken else 'integers'} are taken"
            )
        letters = next((shape.split() for shape in shapes if len(shape.split()) == len(tensor.shape)), None)
        if letters is None:
            raise BadFeatureFile(name, f"shape {list(tensor.shape)}: {' or '.join(shapes)} is taken")
        for letter, extent in zip(letters, tensor.shape, strict=True):
            known = sizes.setdefault(letter, extent)
            if known != extent:
                what = {"S": "steps", "N": "samples", "M": "held-out samples", "K": "classes", "d": "the dimension"}
                raise BadFeatureFile(
                    name, f"shape {list(tensor.shape)}: {what[letter]} {extent}, the file's other tensors have {known}"
                )
    if sizes["N"] == 0 or sizes["d"] == 0 or sizes.get("S", 1) == 0 or sizes.get("M", 1) == 0:
        raise BadFeatureFile("features", f"shape {list(tensors['features'].shape)} holds no features")
    return Layout(format, tensors, sizes.get("S", 1), sizes["N"], sizes["d"])


def _tensor_bytes(file: IO[bytes], tensor: TensorLocation, start: int, length: int) -> Iterator[bytes]:
    """``length`` bytes of the tensor from byte ``start`` of its data, a chunk at a time (an npz member is
    decompressed as it is read)."""
    if tensor.member is None:
        yield from _chunks(file, tensor.offset + start, length)
        return
    with zipfile.ZipFile(file) as archive, archive.open(tensor.member) as member:
        yield from _chunks(member, tensor.offset + start, length)


def _chunks(stream: IO[bytes], start: int, length: int) -> Iterator[bytes]:
    stream.seek(start)
    while length > 0:
        chunk = stream.read(min(READ_CHUNK, length))
        if not chunk:
            raise BadFeatureFile(None, "the file ends before its tensors' data does (truncated)")
        length -= len(chunk)
        yield chunk


# A network's classifier in its state_dict (worker/nc/models.py: NCModel.classifier, an nn.Linear).
CLASSIFIER_KEYS = {"classifier": "classifier.weight", "bias": "classifier.bias"}


def network_classifier(file: IO[bytes], size: int, features: Layout) -> dict[str, TensorLocation]:
    """The classifier and bias of a network's safetensors state_dict, checked against the features: K x d, K."""
    file.seek(0)
    tensors = _safetensors_tensors(file, size, file.read(8))
    found = {}
    for name, key in CLASSIFIER_KEYS.items():
        if key not in tensors:
            raise BadFeatureFile(key, "missing: the network's state_dict has no such tensor")
        found[name] = tensors[key]
    return _checked_layout(features.format, {**features.tensors, **found}).tensors


def count_classes(file: IO[bytes], layout: Layout) -> int:
    """K: the classifier's rows where there is one, else the largest label + 1 (a label below 0 or
    past K fails the analysis, which names it)."""
    if "classifier" in layout.tensors:
        return layout.tensors["classifier"].shape[-2]
    labels = layout.tensors["labels"]
    largest = -1
    remainder = b""
    for chunk in _tensor_bytes(file, labels, 0, labels.nbytes):
        chunk = remainder + chunk
        whole = len(chunk) - len(chunk) % labels.dtype.itemsize
        values = np.frombuffer(chunk[:whole], dtype=labels.dtype)
        if values.size:
            largest = max(largest, int(values.max()))
        remainder = chunk[whole:]
    return largest + 1
