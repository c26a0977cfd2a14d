"""Stanford Online Products read from the official ``Stanford_Online_Products`` folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import MetricLearningDataModule
from datamodules.datasets import ImageFileDataset
from datamodules.metadata import (
    DatasetFormatError,
    check_class_count,
    check_images_exist,
    dense_labels,
    find_dataset_dir,
    read_rows,
    require_dir,
    require_file,
    unique_ids,
)

NAME = "Stanford Online Products"
EXPECTED = (
    "the Stanford_Online_Products folder of the official Stanford_Online_Products.zip (Ebay_train.txt, "
    "Ebay_test.txt, bicycle_final/ ... toaster_final/), or the folder that contains it"
)
HEADER = ("image_id", "class_id", "super_class_id", "path")


class SOPDataModule(MetricLearningDataModule):
    """Stanford Online Products (Oh Song, Xiang, Jegelka, Savarese, "Deep Metric Learning via
    Lifted Structured Feature Embedding", CVPR 2016, Sec. 4): the official split files, 11,318
    train classes (59,551 images) and 11,316 test classes (60,502 images); every test image is a
    query against the others; Recall@1/10/100/1000.

    Layout read::

        Stanford_Online_Products/Ebay_train.txt   header "image_id class_id super_class_id path",
        Stanford_Online_Products/Ebay_test.txt    then <int> <int> <int> <super>_final/<file>.JPG
        Stanford_Online_Products/<super>_final/<file>.JPG   (12 super-classes: bicycle ... toaster)

    Labels: train classes get ``0 .. C_train - 1`` and test classes the labels after them, in
    class-id order. Each dataset also holds ``class_ids`` and ``super_labels`` (the
    ``super_class_id`` of every image, kept for per-category analysis).

    Args:
        root: the ``Stanford_Online_Products`` folder or its parent.
        num_train_classes, num_test_classes: the class counts ``setup()`` checks (defaults: the real
            benchmark's; ``None`` skips a check; a miniature copy passes its own).
        **kwargs: see ``MetricLearningDataModule``.
    """

    default_recall_ks = (1, 10, 100, 1000)

    def __init__(
        self,
        root: str,
        num_train_classes: int | None = 11318,
        num_test_classes: int | None = 11316,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.num_train_classes, self.num_test_classes = num_train_classes, num_test_classes

    def dataset_dir(self) -> Path:
        return find_dataset_dir(require_dir(self.root, NAME, EXPECTED), "Ebay_train.txt", ["Stanford_Online_Products"])

    def build_datasets(self) -> None:
        folder = self.dataset_dir()
        splits = {}
        for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
            path = require_file(folder / name, NAME, EXPECTED)
            _check_header(path)
            rows = read_rows(path, [int, int, int, str], "<image_id> <class_id> <super_class_id> <path>", skip=1)
            unique_ids(rows, path)
            splits[split] = (path, rows)
        train_classes = {values[1] for _, values in splits["train"][1]}
        test_path, test_rows = splits["test"]
        for number, values in test_rows:
            if values[1] in train_classes:
                raise DatasetFormatError(
                    f"{test_path} line {number}: class_id {values[1]} is also a train class; expected disjoint train and test classes"
                )
        offset = 0
        for split, (path, rows) in splits.items():
            class_ids = np.array([v[1] for _, v in rows], dtype=np.int64)
            expected = getattr(self, f"num_{split}_classes")
            check_class_count(len(np.unique(class_ids)), expected, split, NAME, f"num_{split}_classes")
            paths = [folder / v[3] for _, v in rows]
            check_images_exist(paths, [f"{path} line {number}" for number, _ in rows], NAME)
            labels, distinct = dense_labels(class_ids.tolist(), offset)
            offset += len(distinct)
            ds = ImageFileDataset(paths, labels)
            ds.class_ids = class_ids
            ds.super_labels = np.array([v[2] for _, v in rows], dtype=np.int64)
            setattr(self, f"{split}_dataset", ds)


def _check_header(path: Path) -> None:
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    if tuple(first.split()) != HEADER:
        raise DatasetFormatError(f"{path} line 1: expected the header '{' '.join(HEADER)}', got {first.rstrip()!r}")
