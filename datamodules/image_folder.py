"""``ImageFolderDataModule``: a ``root/train/<class>/*`` + ``root/val/<class>/*`` folder (ImageNet-100 style)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import MetricLearningDataModule
from datamodules.datasets import ImageFileDataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageFolderDataModule(MetricLearningDataModule):
    """Images in class folders, torchvision ``ImageFolder`` style, e.g. ImageNet-100.

    ImageNet-100 (Tian, Krishnan, Isola, "Contrastive Multiview Coding", 2019: 100 ImageNet classes)
    is the ImageNet folder layout restricted to those classes::

        root/train/<class>/<image>.JPEG
        root/val/<class>/<image>.JPEG

    Classes are the sorted folder names of ``train`` (label = position); ``val`` must use the same
    names. Train on ``train``; the retrieval evaluation ranks the ``val`` images against each other
    (a kNN view of the representation, not the linear probe of the self-supervised papers).

    Args:
        root: the folder holding ``train`` and ``val``.
        train_dir, val_dir: their names.
        **kwargs: see ``MetricLearningDataModule``.
    """

    def __init__(self, root: str = "data/imagenet100", train_dir: str = "train", val_dir: str = "val", **kwargs) -> None:
        super().__init__(**kwargs)
        self.root, self.train_dir, self.val_dir = root, train_dir, val_dir

    def build_datasets(self) -> None:
        root = Path(self.root)
        train, val = root / self.train_dir, root / self.val_dir
        for folder in (train, val):
            if not folder.is_dir():
                raise FileNotFoundError(f"ImageFolderDataModule: {folder} does not exist; expected {root}/{{{self.train_dir},{self.val_dir}}}/<class>/<image> folders")
        classes = sorted(p.name for p in train.iterdir() if p.is_dir())
        if not classes:
            raise FileNotFoundError(f"ImageFolderDataModule: {train} has no class folders")
        unknown = sorted({p.name for p in val.iterdir() if p.is_dir()} - set(classes))
        if unknown:
            raise ValueError(f"ImageFolderDataModule: {val} has classes {unknown[:5]} that {train} does not have")
        self.classes = classes
        self.train_dataset = self._folder_dataset(train, classes)
        self.test_dataset = self._folder_dataset(val, classes)

    @staticmethod
    def _folder_dataset(folder: Path, classes: list[str]) -> ImageFileDataset:
        paths, labels = [], []
        for label, name in enumerate(classes):
            files = sorted(p for p in (folder / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if (folder / name).is_dir() else []
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise FileNotFoundError(f"ImageFolderDataModule: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}/<class>/")
        return ImageFileDataset(paths, np.asarray(labels, dtype=np.int64))
