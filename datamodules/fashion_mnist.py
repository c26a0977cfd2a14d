"""Fashion-MNIST as a deep-metric-learning benchmark (train on some classes, retrieve unseen ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import MetricLearningDataModule, class_subset
from datamodules.datasets import ArrayImageDataset
from datamodules.idx import read_idx

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_idx_file(root: Path, stem: str) -> Path:
    """``stem.gz`` or ``stem`` in ``root`` (or in torchvision's ``FashionMNIST/raw`` below it)."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}; expected the four idx files of the official "
        f"release (Debian package dataset-fashion-mnist installs them in {DEBIAN_ROOT}), or pass download=True"
    )


def load_fashion_mnist(root: str | Path, download: bool = False) -> dict[str, np.ndarray]:
    """The four arrays of Fashion-MNIST (Xiao, Rasul, Vollgraf, 2017) from idx files."""
    root = Path(root)
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST root {root} does not exist; install the Debian package dataset-fashion-mnist "
            f"(files in {DEBIAN_ROOT}), point root= at a folder with the idx files, or pass download=True"
        )
    arrays = {key: read_idx(find_idx_file(root, stem)) for key, stem in FILES.items()}
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
        if n_img != n_lab:
            raise ValueError(f"Fashion-MNIST {split}: {n_img} images but {n_lab} labels in {root}")
    return arrays


class FashionMNISTDataModule(MetricLearningDataModule):
    """Fashion-MNIST with the DML split: train on classes ``train_classes``, retrieve ``test_classes``.

    Defaults: train on classes 0-4 of the official train file (30,000 images), test on classes 5-9
    of the official test file (5,000 images), query = gallery minus self.

    Args:
        root: folder with the idx files (``.gz`` or not); default: the Debian package's folder.
        download: fetch with torchvision first (needs a network).
        train_classes, test_classes: the disjoint class split.
        val_size: evaluate validation on a fixed, class-stratified subset of this many test images
            (``None``: the whole test set).
        **kwargs: see ``MetricLearningDataModule``.
    """

    def __init__(
        self,
        root: str = DEBIAN_ROOT,
        download: bool = False,
        train_classes: tuple[int, ...] = (0, 1, 2, 3, 4),
        test_classes: tuple[int, ...] = (5, 6, 7, 8, 9),
        val_size: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if set(train_classes) & set(test_classes):
            raise ValueError(f"train_classes and test_classes overlap: {sorted(set(train_classes) & set(test_classes))}")
        self.root, self.download = root, download
        self.train_classes, self.test_classes = tuple(train_classes), tuple(test_classes)
        self.val_size = val_size

    def prepare_data(self) -> None:
        if self.download:
            load_fashion_mnist(self.root, download=True)

    def build_datasets(self) -> None:
        arrays = load_fashion_mnist(self.root)
        tr = class_subset(arrays["train_labels"], self.train_classes, f"Fashion-MNIST train split in {self.root}")
        te = class_subset(arrays["test_labels"], self.test_classes, f"Fashion-MNIST test split in {self.root}")
        self.train_dataset = ArrayImageDataset(arrays["train_images"][tr], arrays["train_labels"][tr])
        self.test_dataset = ArrayImageDataset(arrays["test_images"][te], arrays["test_labels"][te])
        if self.val_size is not None:
            keep = stratified_subset(self.test_dataset.labels, self.val_size, seed=self.seed)
            self.val_dataset = ArrayImageDataset(self.test_dataset.images[keep], self.test_dataset.labels[keep])


def stratified_subset(labels: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A fixed subset of about ``size`` indices with the classes in their original proportions."""
    if size >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = max(2, round(size * len(members) / len(labels)))
        keep.append(rng.choice(members, size=min(n, len(members)), replace=False))
    return np.sort(np.concatenate(keep))
