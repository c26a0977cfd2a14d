"""Stanford Cars (Cars196) read from the official ``cars_annos.mat`` and ``car_ims/``, DML class split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from datamodules.base import MetricLearningDataModule
from datamodules.datasets import ImageFileDataset
from datamodules.metadata import (
    DatasetFormatError,
    check_class_count,
    check_images_exist,
    check_total_classes,
    require_dir,
    require_file,
)

NAME = "Cars196"
EXPECTED = "the folder with the official cars_annos.mat and car_ims/ (from car_ims.tgz)"
FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")


def read_cars_annos(path: Path, need_boxes: bool = False) -> tuple[list[dict[str, Any]], list[str] | None]:
    """The records of ``cars_annos.mat``: ``[{path, class, box}]`` and the class names (or ``None``).

    The file holds a 1 x N MATLAB struct array ``annotations`` with fields ``relative_im_path``
    (``car_ims/000001.jpg``), ``bbox_x1``, ``bbox_y1``, ``bbox_x2``, ``bbox_y2`` (pixels), ``class``
    (1-196) and ``test`` (the *classification* split, unused here), and a cell array ``class_names``.
    """
    from scipy.io import loadmat  # scipy is only needed for this benchmark

    try:
        mat = loadmat(str(path), squeeze_me=True)
    except Exception as err:  # scipy raises several types for non-MATLAB content
        raise DatasetFormatError(f"{path} is not a readable MATLAB .mat file ({err}); expected the official cars_annos.mat") from err
    if "annotations" not in mat:
        raise DatasetFormatError(
            f"{path} has no 'annotations' variable (it has {sorted(k for k in mat if not k.startswith('__'))}); "
            f"expected the official cars_annos.mat with a struct array annotations{list(FIELDS)} and class_names"
        )
    annotations = np.atleast_1d(mat["annotations"])
    names = annotations.dtype.names or ()
    required = FIELDS[:6] if need_boxes else ("relative_im_path", "class")
    missing = [f for f in required if f not in names]
    if missing:
        raise DatasetFormatError(f"{path}: the annotations struct has no field(s) {missing}; it has {list(names)}, expected {list(FIELDS)}")
    records = []
    for i, ann in enumerate(annotations):
        where = f"{path} annotations({i + 1})"  # MATLAB's 1-based index, as the file's owner would look it up
        rel = ann["relative_im_path"]
        if not isinstance(rel, str) or not rel.strip():
            raise DatasetFormatError(f"{where}.relative_im_path is {rel!r}; expected a path like 'car_ims/000001.jpg'")
        record = {"path": rel.strip(), "class": _as_int(ann["class"], f"{where}.class")}
        if need_boxes:
            x1, y1, x2, y2 = (_as_int(ann[f], f"{where}.{f}") for f in FIELDS[1:5])
            if x2 <= x1 or y2 <= y1:
                raise DatasetFormatError(f"{where}: empty box x1={x1} y1={y1} x2={x2} y2={y2}; expected x2 > x1 and y2 > y1")
            record["box"] = (x1, y1, x2 - x1, y2 - y1)
        records.append(record)
    class_names = None
    if "class_names" in mat:
        class_names = [str(n) for n in np.atleast_1d(mat["class_names"]).tolist()]
    return records, class_names


def _as_int(value: Any, where: str) -> int:
    try:
        number = float(np.asarray(value).item())
    except (ValueError, TypeError):
        raise DatasetFormatError(f"{where} is {value!r}; expected one integer") from None
    if not number.is_integer():
        raise DatasetFormatError(f"{where} is {number}; expected an integer")
    return int(number)


class Cars196DataModule(MetricLearningDataModule):
    """Stanford Cars (Krause, Stark, Deng, Fei-Fei, "3D Object Representations for Fine-Grained
    Categorization", 3dRR 2013) with the retrieval split of Oh Song et al. (CVPR 2016), Sec. 5:
    classes 1-98 train (8,054 images), classes 99-196 test (8,131 images), every test image a
    query against the others. The ``test`` flag of the annotations (a classification split) is unused.

    Layout read::

        cars_annos.mat      annotations (relative_im_path, bbox_x1..bbox_y2, class, test), class_names
        car_ims/000001.jpg  ... car_ims/016185.jpg

    Labels: class ``c`` gets label ``c - 1`` (train ``0 .. num_train_classes - 1``); each dataset
    holds ``class_ids`` (the 1-based ids of the file).

    Args:
        root: the folder with ``cars_annos.mat`` (image paths in it are relative to this folder).
        num_train_classes, num_test_classes: the split and the counts ``setup()`` checks
            (``class_names`` must have their sum); defaults are the real benchmark's.
        crop_to_bbox: crop every image to its annotated box.
        **kwargs: see ``MetricLearningDataModule``.
    """

    default_recall_ks = (1, 2, 4, 8)

    def __init__(
        self,
        root: str,
        num_train_classes: int = 98,
        num_test_classes: int = 98,
        crop_to_bbox: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_train_classes < 1 or num_test_classes < 1:
            raise ValueError(f"num_train_classes and num_test_classes must be >= 1, got {num_train_classes}, {num_test_classes}")
        self.root = root
        self.num_train_classes, self.num_test_classes = num_train_classes, num_test_classes
        self.crop_to_bbox = crop_to_bbox

    def build_datasets(self) -> None:
        folder = require_dir(self.root, NAME, EXPECTED)
        annos = require_file(folder / "cars_annos.mat", NAME, EXPECTED)
        records, class_names = read_cars_annos(annos, need_boxes=self.crop_to_bbox)
        total = self.num_train_classes + self.num_test_classes
        if class_names is not None:
            check_total_classes(len(class_names), self.num_train_classes, self.num_test_classes, f"{annos} class_names", NAME)
        for i, r in enumerate(records):
            if not 1 <= r["class"] <= total:
                raise DatasetFormatError(
                    f"{annos} annotations({i + 1}).class is {r['class']}; expected 1..{total} "
                    f"(num_train_classes + num_test_classes)"
                )
        ids = np.array([r["class"] for r in records], dtype=np.int64)
        paths = [folder / r["path"] for r in records]
        check_images_exist(paths, [f"{annos} annotations({i + 1})" for i in range(len(records))], NAME)
        for split, expected, members in (
            ("train", self.num_train_classes, ids <= self.num_train_classes),
            ("test", self.num_test_classes, ids > self.num_train_classes),
        ):
            check_class_count(len(np.unique(ids[members])), expected, split, NAME, f"num_{split}_classes", hint=" (some classes have no images)")
            keep = np.flatnonzero(members)
            boxes = [records[i]["box"] for i in keep] if self.crop_to_bbox else None
            ds = ImageFileDataset([paths[i] for i in keep], ids[keep] - 1, boxes=boxes)
            ds.class_ids = ids[keep]
            setattr(self, f"{split}_dataset", ds)
