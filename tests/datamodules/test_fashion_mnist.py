import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from datamodules import FashionMNISTDataModule
from datamodules.fashion_mnist import DEBIAN_ROOT
from datamodules.idx import read_idx
from tests.helpers import require_path


def write_idx(path: Path, array: np.ndarray, truncate: int = 0) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[: len(data) - truncate] if truncate else data)


def make_fashion(root: Path, n_train=60, n_test=40, truncate_file=None) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28))
        labels = np.arange(n) % 10
        write_idx(root / f"{split}-images-idx3-ubyte.gz", imgs, truncate=7 if truncate_file == f"{split}-images" else 0)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), arr)


def test_truncated_idx_is_named(tmp_path):
    make_fashion(tmp_path, truncate_file="train-images")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*truncated"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path / "nope")).setup()


def test_missing_file_is_named(tmp_path):
    make_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        FashionMNISTDataModule(root=str(tmp_path)).setup()


def test_class_split_on_miniature(tmp_path):
    make_fashion(tmp_path)
    dm = FashionMNISTDataModule(root=str(tmp_path), image_size=32, num_workers=0, classes_per_batch=5, samples_per_class=2)
    dm.setup()
    assert set(dm.train_dataset.labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(dm.test_dataset.labels.tolist()) == {5, 6, 7, 8, 9}
    x = dm.train_dataset[0]["image"]
    assert tuple(x.shape) == (3, 32, 32)
    batch = next(iter(dm.train_dataloader()))
    xb, yb = batch["image"], batch["label"]
    assert xb.shape == (10, 3, 32, 32) and sorted(np.bincount(yb.numpy()).tolist()) == [2, 2, 2, 2, 2]
    batch = next(iter(dm.test_dataloader()))
    xe, idx = batch["image"], batch["index"]
    assert len(idx) == len(xe) and idx[0] == 0


def test_debian_copy_has_the_official_sizes():
    require_path(DEBIAN_ROOT, "Debian package dataset-fashion-mnist")
    dm = FashionMNISTDataModule()
    dm.setup()
    assert dm.split_sizes()["train"] == {"images": 30000, "classes": 5}
    assert dm.split_sizes()["test"] == {"images": 5000, "classes": 5}
