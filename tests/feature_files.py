"""Files of features for the analysis tests: safetensors or npz bytes, and a collapse of known metrics."""

import io
import json
import struct

import numpy as np
from safetensors.numpy import save


def safetensors_bytes(**tensors: np.ndarray) -> bytes:
    return save({name: np.ascontiguousarray(array) for name, array in tensors.items()})


def npz_bytes(compressed: bool = False, **tensors) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **tensors)
    return buffer.getvalue()


def with_header(data: bytes, edit) -> bytes:
    """A safetensors file whose JSON header ``edit(header)`` rewrote (the data left as it was)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def simplex_collapse(num_classes: int, dim: int, per_class: int, noise: float, seed: int = 0):
    """Features at the vertices of a simplex ETF (scaled by 5) plus Gaussian noise of std ``noise``, their labels,
    and the ETF itself as the classifier: (features, labels, classifier), float64."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, num_classes)))
    etf = np.sqrt(num_classes / (num_classes - 1)) * (np.eye(num_classes) - 1.0 / num_classes) @ basis.T
    labels = np.repeat(np.arange(num_classes), per_class)
    features = 5 * etf[labels] + noise * rng.standard_normal((len(labels), dim))
    return features, labels, etf
