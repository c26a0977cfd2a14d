"""DeepFashion In-Shop Clothes Retrieval read from ``list_eval_partition.txt`` and ``img/``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import MetricLearningDataModule
from datamodules.datasets import ImageFileDataset, QueryGalleryDataset
from datamodules.metadata import (
    DatasetFormatError,
    check_class_count,
    check_images_exist,
    dense_labels,
    find_dataset_dir,
    read_rows,
    require_dir,
    unique_ids,
)

NAME = "In-Shop"
LIST = "list_eval_partition.txt"
EXPECTED = (
    "the In-shop Clothes Retrieval Benchmark folder with list_eval_partition.txt (or Eval/list_eval_partition.txt) "
    "and the img/ folder of img.zip (or Img/img/)"
)
HEADER = ("image_name", "item_id", "evaluation_status")
STATUSES = ("train", "query", "gallery")


def _status(value: str) -> str:
    if value not in STATUSES:
        raise ValueError(value)
    return value


class InShopDataModule(MetricLearningDataModule):
    """In-Shop Clothes Retrieval (Liu, Luo, Qiu, Wang, Tang, "DeepFashion: Powering Robust Clothes
    Recognition and Retrieval with Rich Annotations", CVPR 2016): train on 3,997 items (25,882
    images); evaluate 14,218 query images against a gallery of 12,612 (3,985 items), Recall@1, 10,
    20, 30, 40, 50.

    Layout read (the benchmark's ``Eval/`` and ``Img/img.zip`` unpacked, or both side by side)::

        list_eval_partition.txt   line 1: number of images; line 2: "image_name item_id evaluation_status";
                                  then img/<GENDER>/<category>/id_XXXXXXXX/<file>.jpg id_XXXXXXXX train|query|gallery
        img/WOMEN/Dresses/id_00000002/02_1_front.jpg ...

    Evaluation uses the query/gallery protocol: ``query_dataset`` and ``gallery_dataset``, and
    ``test_dataset`` their ``QueryGalleryDataset``. Labels: train items ``0 .. C_train - 1``, test
    items after them, the same label for an item in query and gallery; ``class_ids`` holds the
    item ids (``id_00000002``).

    Args:
        root: the folder with ``list_eval_partition.txt`` (or ``Eval/``) and ``img/`` (or ``Img/img/``).
        num_train_classes: train items ``setup()`` checks for (default: the real 3,997; ``None`` skips).
        num_test_classes: items the query set and the gallery must each have (default 3,985).
        **kwargs: see ``MetricLearningDataModule``.
    """

    default_recall_ks = (1, 10, 20, 30, 40, 50)
    eval_protocol = "query_gallery"

    def __init__(
        self,
        root: str,
        num_train_classes: int | None = 3997,
        num_test_classes: int | None = 3985,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.num_train_classes, self.num_test_classes = num_train_classes, num_test_classes

    def build_datasets(self) -> None:
        root = require_dir(self.root, NAME, EXPECTED)
        list_path = find_dataset_dir(root, LIST, ["Eval"]) / LIST
        if not list_path.is_file():
            raise FileNotFoundError(f"{NAME}: metadata file {LIST} is missing from {root} and {root / 'Eval'}; expected {EXPECTED}")
        image_root = find_dataset_dir(root, "img", ["Img"])
        rows = self._read_list(list_path)
        by_status = {s: [(n, v) for n, v in rows if v[2] == s] for s in STATUSES}
        for status in STATUSES:
            if not by_status[status]:
                raise DatasetFormatError(f"{list_path}: no image has evaluation_status '{status}'; expected train, query and gallery images")
        paths = {s: [image_root / v[0] for _, v in by_status[s]] for s in STATUSES}
        check_images_exist(
            [p for s in STATUSES for p in paths[s]],
            [f"{list_path} line {n}" for s in STATUSES for n, _ in by_status[s]],
            NAME,
        )
        items = {s: [v[1] for _, v in by_status[s]] for s in STATUSES}
        check_class_count(len(set(items["train"])), self.num_train_classes, "train", NAME, "num_train_classes")
        check_class_count(len(set(items["query"])), self.num_test_classes, "query", NAME, "num_test_classes")
        check_class_count(len(set(items["gallery"])), self.num_test_classes, "gallery", NAME, "num_test_classes")

        train_labels, train_items = dense_labels(items["train"])
        _, test_items = dense_labels(items["query"] + items["gallery"], offset=len(train_items))
        test_label = {item: i + len(train_items) for i, item in enumerate(test_items)}
        self.train_dataset = self._dataset(paths["train"], train_labels, items["train"])
        self.query_dataset = self._dataset(paths["query"], [test_label[i] for i in items["query"]], items["query"])
        self.gallery_dataset = self._dataset(paths["gallery"], [test_label[i] for i in items["gallery"]], items["gallery"])
        self.test_dataset = QueryGalleryDataset(self.query_dataset, self.gallery_dataset)

    @staticmethod
    def _dataset(paths: list[Path], labels, items: list[str]) -> ImageFileDataset:
        ds = ImageFileDataset(paths, np.asarray(labels, dtype=np.int64))
        ds.class_ids = np.asarray(items)
        return ds

    @staticmethod
    def _read_list(path: Path) -> list[tuple[int, tuple]]:
        with open(path, encoding="utf-8", errors="replace") as f:
            count_line, header_line = f.readline(), f.readline()
        try:
            count = int(count_line.strip())
        except ValueError:
            raise DatasetFormatError(f"{path} line 1: expected the number of images, got {count_line.rstrip()!r}") from None
        if tuple(header_line.split()) != HEADER:
            raise DatasetFormatError(f"{path} line 2: expected the header '{' '.join(HEADER)}', got {header_line.rstrip()!r}")
        rows = read_rows(path, [str, str, _status], "<image_name> <item_id> train|query|gallery", skip=2)
        if len(rows) != count:
            raise DatasetFormatError(f"{path} line 1 announces {count} images but the file lists {len(rows)}; expected the complete list")
        unique_ids(rows, path, column="image_name")
        return rows
