"""CUB-200-2011 read from its official archive layout, with the deep-metric-learning class split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.base import MetricLearningDataModule
from datamodules.datasets import ImageFileDataset
from datamodules.metadata import (
    DatasetFormatError,
    check_class_count,
    check_images_exist,
    check_total_classes,
    find_dataset_dir,
    read_rows,
    require_dir,
    require_file,
    unique_ids,
)

NAME = "CUB-200-2011"
EXPECTED = (
    "the CUB_200_2011 folder of the official archive CUB_200_2011.tgz (images.txt, image_class_labels.txt, "
    "classes.txt, images/<class>/<file>.jpg), or the folder that contains it"
)


class CUB200DataModule(MetricLearningDataModule):
    """Caltech-UCSD Birds-200-2011 (Wah et al., "The Caltech-UCSD Birds-200-2011 Dataset", 2011)
    with the zero-shot retrieval split of Oh Song et al., "Deep Metric Learning via Lifted
    Structured Feature Embedding" (CVPR 2016), Sec. 5: train on classes 1-100 (5,864 images),
    retrieve among classes 101-200 (5,924 images), every test image a query against the others.
    The archive's own ``train_test_split.txt`` (a classification split) is not used.

    Layout read (as ``CUB_200_2011.tgz`` unpacks)::

        CUB_200_2011/images.txt              <image_id> <class_folder>/<file>.jpg
        CUB_200_2011/image_class_labels.txt  <image_id> <class_id>
        CUB_200_2011/classes.txt             <class_id> <class_name>
        CUB_200_2011/bounding_boxes.txt      <image_id> <x> <y> <width> <height>  (crop_to_bbox only)
        CUB_200_2011/images/<class_folder>/<file>.jpg

    Labels: the ``k``-th class id in sorted order gets label ``k - 1``, so the train split has labels
    ``0 .. num_train_classes - 1`` (what proxy losses index) and the test split the labels after
    them. Each dataset also holds ``class_ids`` (the ids of ``classes.txt``) per image.

    Args:
        root: the ``CUB_200_2011`` folder or its parent.
        num_train_classes, num_test_classes: the split, and the class counts ``setup()`` checks:
            the first ``num_train_classes`` class ids train, the next ``num_test_classes`` test, and
            ``classes.txt`` must list exactly their sum. The defaults are the real benchmark's; a
            miniature copy (tests) passes its own counts.
        crop_to_bbox: crop every image to its box from ``bounding_boxes.txt`` (an easier variant;
            the standard protocol uses whole images).
        **kwargs: see ``MetricLearningDataModule`` (``verify=True`` decodes every image at setup).
    """

    default_recall_ks = (1, 2, 4, 8)

    def __init__(
        self,
        root: str,
        num_train_classes: int = 100,
        num_test_classes: int = 100,
        crop_to_bbox: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_train_classes < 1 or num_test_classes < 1:
            raise ValueError(f"num_train_classes and num_test_classes must be >= 1, got {num_train_classes}, {num_test_classes}")
        self.root = root
        self.num_train_classes, self.num_test_classes = num_train_classes, num_test_classes
        self.crop_to_bbox = crop_to_bbox

    def dataset_dir(self) -> Path:
        return find_dataset_dir(require_dir(self.root, NAME, EXPECTED), "images.txt", ["CUB_200_2011"])

    def build_datasets(self) -> None:
        folder = self.dataset_dir()
        files = {name: require_file(folder / name, NAME, EXPECTED) for name in ("images.txt", "image_class_labels.txt", "classes.txt")}
        images = read_rows(files["images.txt"], [int, str], "<image_id> <image_name>")
        labels = read_rows(files["image_class_labels.txt"], [int, int], "<image_id> <class_id>")
        classes = read_rows(files["classes.txt"], [int, str], "<class_id> <class_name>")
        image_pos = unique_ids(images, files["images.txt"])
        label_pos = unique_ids(labels, files["image_class_labels.txt"])
        class_pos = unique_ids(classes, files["classes.txt"], column="class_id")

        for number, (image_id, class_id) in labels:
            if image_id not in image_pos:
                raise DatasetFormatError(f"{files['image_class_labels.txt']} line {number}: image_id {image_id} is not in images.txt")
            if class_id not in class_pos:
                raise DatasetFormatError(f"{files['image_class_labels.txt']} line {number}: class_id {class_id} is not in classes.txt")
        for number, (image_id, _) in images:
            if image_id not in label_pos:
                raise DatasetFormatError(f"{files['images.txt']} line {number}: image_id {image_id} has no class in image_class_labels.txt")

        class_ids = sorted(class_pos)
        class_names = {class_id: name for _, (class_id, name) in classes}
        check_total_classes(len(class_ids), self.num_train_classes, self.num_test_classes, str(files["classes.txt"]), NAME)
        train_ids = set(class_ids[: self.num_train_classes])

        boxes = self._boxes(folder, image_pos) if self.crop_to_bbox else None
        image_class = {image_id: class_id for _, (image_id, class_id) in labels}
        paths = [folder / "images" / name for _, (_, name) in images]
        sources = [f"{files['images.txt']} line {number}" for number, _ in images]
        ids = np.array([image_class[image_id] for _, (image_id, _) in images], dtype=np.int64)
        check_images_exist(paths, sources, NAME)

        all_labels = np.searchsorted(class_ids, ids).astype(np.int64)  # k-th class id -> label k - 1
        for split, expected, members in (
            ("train", self.num_train_classes, np.isin(ids, list(train_ids))),
            ("test", self.num_test_classes, ~np.isin(ids, list(train_ids))),
        ):
            found = len(np.unique(ids[members]))
            check_class_count(found, expected, split, NAME, f"num_{split}_classes", hint=" (some classes have no images)")
            keep = np.flatnonzero(members)
            ds = ImageFileDataset([paths[i] for i in keep], all_labels[keep], boxes=[boxes[i] for i in keep] if boxes else None)
            ds.class_ids = ids[keep]
            # The class as classes.txt and images/ name it ("002.Laysan_Albatross"), for messages.
            ds.class_names = {int(all_labels[i]): class_names[ids[i]] for i in keep}
            setattr(self, f"{split}_dataset", ds)

    def _boxes(self, folder: Path, image_pos: dict[int, int]) -> list[tuple[float, float, float, float]]:
        path = require_file(folder / "bounding_boxes.txt", NAME, f"{EXPECTED}; crop_to_bbox=True needs bounding_boxes.txt")
        rows = read_rows(path, [int, float, float, float, float], "<image_id> <x> <y> <width> <height>")
        boxes: list = [None] * len(image_pos)
        for number, (image_id, x, y, w, h) in rows:
            if image_id not in image_pos:
                raise DatasetFormatError(f"{path} line {number}: image_id {image_id} is not in images.txt")
            if w <= 0 or h <= 0:
                raise DatasetFormatError(f"{path} line {number}: box width and height must be > 0, got {w} x {h}")
            boxes[image_pos[image_id]] = (x, y, w, h)
        absent = [i for i, b in enumerate(boxes) if b is None]
        if absent:
            raise DatasetFormatError(f"{path}: {len(absent)} images of images.txt have no box (e.g. the image on row {absent[0] + 1})")
        return boxes
