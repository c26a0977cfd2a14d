"""scikit-learn's 8x8 handwritten digits as a tiny DML benchmark for fast tests and smoke runs."""

from __future__ import annotations

import numpy as np

from datamodules.base import MetricLearningDataModule, class_subset
from datamodules.datasets import ArrayImageDataset


class DigitsDataModule(MetricLearningDataModule):
    """The UCI optical digits (1,797 images of 8x8, shipped by scikit-learn), split by class.

    Train on ``train_classes`` (default 0-4), retrieve ``test_classes`` (default 5-9). Pixel values
    0-16 are scaled to 0-255.
    """

    def __init__(
        self,
        train_classes: tuple[int, ...] = (0, 1, 2, 3, 4),
        test_classes: tuple[int, ...] = (5, 6, 7, 8, 9),
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.train_classes, self.test_classes = tuple(train_classes), tuple(test_classes)

    def build_datasets(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        labels = digits.target.astype(np.int64)
        tr = class_subset(labels, self.train_classes, "digits train split")
        te = class_subset(labels, self.test_classes, "digits test split")
        self.train_dataset = ArrayImageDataset(images[tr], labels[tr])
        self.test_dataset = ArrayImageDataset(images[te], labels[te])
