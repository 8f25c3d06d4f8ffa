"""Data sets for `kind: "train"` experiments, read from standard files; nothing is
downloaded (docs/data.md).

`load_dataset` returns whole tensors: float32 inputs normalized with fixed per-data-set
mean/std constants, int64 labels 0..K-1 of the first K classes. No augmentation: the
neural-collapse metrics are measured on the training set itself (Papyan et al. 2020), so
training and measurement see the same images.

Files expected under `data_dir`:

- mnist, fashion_mnist: `mnist/` resp. `fashion_mnist/` with the four IDX files
  train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,
  t10k-labels-idx1-ubyte.gz;
- cifar10: `cifar-10-batches-py/` data_batch_1..5 and test_batch; cifar100:
  `cifar-100-python/` train and test (the python pickles of the official archives,
  fine labels). Pickles can run code when loaded: the data directory must be trusted.

Two need no files: `digits`, scikit-learn's bundled 8x8 digits (every fifth sample of
each class held out as test), and `gaussian`, a seeded K-class Gaussian mixture whose
inputs are vectors (channels = D, image_size = 1), so it only suits the `mlp`
architecture.
"""

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# name: (folder, train files, test files, key of the labels in each pickled dict)
CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}

# (classes, per-channel mean, per-channel std) of the training images scaled to [0, 1].
STATISTICS = {
    "mnist": (10, (0.1307,), (0.3081,)),
    "fashion_mnist": (10, (0.2860,), (0.3530,)),
    "cifar10": (10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": (100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "digits": (10, (0.3053,), (0.3760,)),
}
DATASETS = (*STATISTICS, "gaussian")

# Pixel values of scikit-learn's digits are 0..16 (the others are bytes, 0..255).
DIGITS_MAX = 16

# Distance of the Gaussian mixture's class means from the origin.
GAUSSIAN_MEAN_NORM = 3.0


@dataclass(frozen=True)
class Dataset:
    name: str
    num_classes: int
    channels: int
    image_size: int
    train_x: torch.Tensor  # N x C x H x W (N x D for gaussian), float32
    train_y: torch.Tensor  # N, int64 in 0..K-1
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_dataset(
    name: str,
    data_dir,
    num_classes: int,
    n_per_class: int | None = None,
    seed: int = 0,
    random_labels: bool = False,
    gaussian_dim: int = 32,
    gaussian_train_per_class: int = 100,
    gaussian_test_per_class: int = 50,
    gaussian_noise: float = 1.0,
    test_n_per_class: int | None = None,
) -> Dataset:
    """The first `num_classes` classes of data set `name`.

    `n_per_class` keeps the first n training samples of each class, in file order.
    `random_labels` then shuffles the training labels with `seed` (Zhang et al. 2017,
    "Understanding deep learning requires rethinking generalization"): a permutation
    rather than fresh draws keeps every class's count, so a balanced subset stays
    balanced and no class is left empty. The test set is all test samples of the
    first K classes, with true labels; `test_n_per_class` keeps the first n of each
    (all of a class that has fewer).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if name == "gaussian":
        train_x, train_y, test_x, test_y = gaussian_mixture(
            num_classes, gaussian_dim, gaussian_train_per_class, gaussian_test_per_class, gaussian_noise, seed
        )
    elif name in STATISTICS:
        available = STATISTICS[name][0]
        if num_classes > available:
            raise ValueError(f"{name} has {available} classes, num_classes is {num_classes}")
        train_x, train_y, test_x, test_y = _read(name, data_dir)
        train_x, train_y = _first_classes(train_x, train_y, num_classes)
        test_x, test_y = _first_classes(test_x, test_y, num_classes)
        train_x, test_x = _normalize(train_x, name), _normalize(test_x, name)
    else:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")

    if n_per_class is not None:
        train_x, train_y = _first_per_class(train_x, train_y, num_classes, n_per_class)
    if test_n_per_class is not None:
        smallest = int(torch.bincount(test_y, minlength=num_classes).min())
        test_x, test_y = _first_per_class(test_x, test_y, num_classes, min(test_n_per_class, smallest))
    if random_labels:
        generator = torch.Generator().manual_seed(seed)
        train_y = train_y[torch.randperm(len(train_y), generator=generator)]
    image_size = 1 if name == "gaussian" else train_x.shape[-1]
    return Dataset(name, num_classes, train_x.shape[1], image_size, train_x, train_y, test_x, test_y)


def gaussian_mixture(num_classes: int, dim: int, train_per_class: int, test_per_class: int, noise: float, seed: int):
    """Class means: random directions at norm 3; samples: mean + noise * N(0, I).
    Samples are ordered by class; train and test share the means."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    means *= GAUSSIAN_MEAN_NORM / means.norm(dim=1, keepdim=True)

    def sample(per_class):
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        x = means[labels] + noise * torch.randn(len(labels), dim, generator=generator, dtype=torch.float64)
        return x.float(), labels

    return *sample(train_per_class), *sample(test_per_class)


def _read(name: str, data_dir):
    """(train images uint8 N x C x H x W, train labels, test images, test labels)."""
    if name == "digits":
        return _digits()
    data_dir = Path(data_dir)
    if name in ("mnist", "fashion_mnist"):
        folder = data_dir / name
        files = {split: [folder / f for f in IDX_FILES[split]] for split in IDX_FILES}
        _require(files["train"] + files["test"])
        return (*_idx_split(*files["train"]), *_idx_split(*files["test"]))
    folder, train_files, test_files, label_key = CIFAR_FILES[name]
    train = [data_dir / folder / f for f in train_files]
    test = [data_dir / folder / f for f in test_files]
    _require(train + test)
    return (*_cifar(train, label_key), *_cifar(test, label_key))


def _require(paths: list[Path]) -> None:
    """Check every file up front, so that one error names all that are missing."""
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"missing data files: {', '.join(missing)}")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as a uint8 array: magic 0x0000 08 n, then n big-endian
    int32 dimensions, then the data (LeCun et al., the MNIST file format)."""
    with gzip.open(path, "rb") as file:
        content = file.read()
    if len(content) < 4 or content[:2] != b"\0\0" or content[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = content[3]
    shape = tuple(np.frombuffer(content, dtype=">i4", count=ndim, offset=4))
    data = np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != np.prod(shape):
        raise ValueError(f"{path}: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def _idx_split(images_path: Path, labels_path: Path):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{images_path}, {labels_path}: shapes {images.shape}, {labels.shape}")
    return images[:, None], labels


def _cifar(paths: list[Path], label_key: bytes):
    images, labels = [], []
    for path in paths:
        with open(path, "rb") as file:
            batch = pickle.load(file, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key]))
    return np.concatenate(images), np.concatenate(labels)


def _digits():
    """scikit-learn's 8x8 digits (values 0..DIGITS_MAX); in each class, the samples whose
    index within the class is a multiple of 5 are the test set."""
    from sklearn.datasets import load_digits  # lazily: only this data set needs it

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]
    labels = digits.target
    index_in_class = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = labels == label
        index_in_class[members] = np.arange(members.sum())
    test = index_in_class % 5 == 0
    return images[~test], labels[~test], images[test], labels[test]


def _first_classes(images: np.ndarray, labels: np.ndarray, num_classes: int):
    keep = labels < num_classes
    return images[keep], torch.from_numpy(labels[keep].astype(np.int64))


def _normalize(images: np.ndarray, name: str) -> torch.Tensor:
    _, mean, std = STATISTICS[name]
    scaled = torch.from_numpy(images).float().div_(DIGITS_MAX if name == "digits" else 255)
    return scaled.sub_(torch.tensor(mean).view(-1, 1, 1)).div_(torch.tensor(std).view(-1, 1, 1))


def _first_per_class(x: torch.Tensor, y: torch.Tensor, num_classes: int, n: int):
    """The first n samples of every class, in their original order."""
    if n < 1:
        raise ValueError(f"n_per_class must be at least 1, got {n}")
    counts = torch.bincount(y, minlength=num_classes)
    short = [k for k in range(num_classes) if counts[k] < n]
    if short:
        raise ValueError(
            f"n_per_class={n} but classes {short} have only {[int(counts[k]) for k in short]} training samples"
        )
    # Rank of each sample within its class: its position among the samples of that class.
    order = torch.argsort(y, stable=True)
    rank = torch.empty_like(y)
    starts = torch.cumsum(counts, 0) - counts
    rank[order] = torch.arange(len(y)) - starts[y[order]]
    keep = rank < n
    return x[keep], y[keep]
