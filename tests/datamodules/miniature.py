"""Miniature copies of the official on-disk formats of CUB-200-2011, Cars196, SOP and In-Shop.

The real datasets cannot be downloaded here, so tests write a handful of tiny JPEGs per class
with the real file names, folder layout and metadata files, and point the DataModules at them.

Each writer ``make_*(root)`` fills ``root`` and returns the DataModule ``init_args`` that read it:
``root`` and the miniature's class counts (``num_train_classes``/``num_test_classes``), which
override the constructor defaults (the real benchmark's counts) that ``setup()`` checks.
``MINIATURES`` maps each DataModule class path to its writer; ``miniature_cli_args`` turns a
writer's result into LightningCLI arguments (``--data.init_args.root=...``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CUB_CLASSES = [
    "Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Groove_billed_Ani", "Crested_Auklet",
    "Least_Auklet", "Parakeet_Auklet", "Rhinoceros_Auklet", "Brewer_Blackbird", "Red_winged_Blackbird",
]
CARS_CLASSES = [
    "AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Acura TL Type-S 2008",
    "Acura TSX Sedan 2012", "Acura Integra Type R 2001", "Acura ZDX Hatchback 2012",
    "Aston Martin V8 Vantage Convertible 2012", "Aston Martin V8 Vantage Coupe 2012", "Aston Martin Virage Convertible 2012",
]
SOP_SUPER = ["bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp", "mug", "sofa", "stapler", "table", "toaster"]
INSHOP_CATEGORIES = [("WOMEN", "Dresses"), ("MEN", "Denim"), ("WOMEN", "Blouses_Shirts"), ("MEN", "Tees_Tanks")]
INSHOP_VIEWS = ["1_front", "2_side", "3_back", "4_full", "5_additional", "7_additional"]


def write_jpeg(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> None:
    """A tiny real JPEG: a random colour per 8x8 block, so decoding and resizing do real work."""
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, size=((h + 7) // 8, (w + 7) // 8, 3), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=85)


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))


def make_cub(root: Path, n_classes: int = 8, per_class: int = 4) -> dict[str, Any]:
    """``root/CUB_200_2011/`` as ``CUB_200_2011.tgz`` unpacks: the first half of the classes train."""
    folder = Path(root) / "CUB_200_2011"
    images, labels, classes, boxes, split = [], [], [], [], []
    image_id = 0
    for c in range(1, n_classes + 1):
        name = CUB_CLASSES[(c - 1) % len(CUB_CLASSES)]
        class_folder = f"{c:03d}.{name}"
        classes.append(f"{c} {class_folder}")
        title = "_".join(part.capitalize() for part in name.split("_"))
        for j in range(per_class):
            image_id += 1
            rel = f"{class_folder}/{title}_{j + 1:04d}_{1000 + image_id}.jpg"
            write_jpeg(folder / "images" / rel, seed=image_id, size=(40 + 4 * j, 32))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            boxes.append(f"{image_id} {2.0 + j} 3.0 {24.0 + j} 20.0")
            split.append(f"{image_id} {int(j % 2 == 0)}")
    _write_lines(folder / "images.txt", images)
    _write_lines(folder / "image_class_labels.txt", labels)
    _write_lines(folder / "classes.txt", classes)
    _write_lines(folder / "bounding_boxes.txt", boxes)
    _write_lines(folder / "train_test_split.txt", split)
    n_train = n_classes // 2
    return {"root": str(root), "num_train_classes": n_train, "num_test_classes": n_classes - n_train}


def make_cars(root: Path, n_classes: int = 8, per_class: int = 4) -> dict[str, Any]:
    """``root/cars_annos.mat`` (the official MATLAB struct layout) and ``root/car_ims/NNNNNN.jpg``."""
    from scipy.io import savemat

    root = Path(root)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    n = n_classes * per_class
    annotations = np.zeros((1, n), dtype=[(f, "O") for f in fields])
    # Images of a class are not contiguous in the real file either: interleave them.
    order = [(c, j) for j in range(per_class) for c in range(1, n_classes + 1)]
    for i, (c, j) in enumerate(order):
        rel = f"car_ims/{i + 1:06d}.jpg"
        write_jpeg(root / rel, seed=10_000 + i, size=(48, 32 + 2 * j))
        annotations[0, i] = (
            np.array([rel]),
            np.array([[3 + j]], dtype=np.uint16),
            np.array([[2]], dtype=np.uint16),
            np.array([[40]], dtype=np.uint16),
            np.array([[28]], dtype=np.uint16),
            np.array([[c]], dtype=np.uint8),
            np.array([[int(j % 2)]], dtype=np.uint8),
        )
    class_names = np.empty((1, n_classes), dtype=object)
    for c in range(n_classes):
        class_names[0, c] = np.array([CARS_CLASSES[c % len(CARS_CLASSES)]])
    savemat(str(root / "cars_annos.mat"), {"annotations": annotations, "class_names": class_names})
    n_train = n_classes // 2
    return {"root": str(root), "num_train_classes": n_train, "num_test_classes": n_classes - n_train}


def make_sop(root: Path, n_train_classes: int = 6, n_test_classes: int = 6, per_class: int = 3) -> dict[str, Any]:
    """``root/Stanford_Online_Products/`` with ``Ebay_train.txt``, ``Ebay_test.txt``, ``Ebay_info.txt``
    and the ``<super>_final/<product>_<k>.JPG`` folders; class ids of test follow train's."""
    folder = Path(root) / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    rows = {"train": [header], "test": [header]}
    info = [header]
    image_id = 0
    for class_id in range(1, n_train_classes + n_test_classes + 1):
        split = "train" if class_id <= n_train_classes else "test"
        super_id = (class_id - 1) % len(SOP_SUPER) + 1
        product = 111085122800 + 37 * class_id
        for k in range(per_class):
            image_id += 1
            rel = f"{SOP_SUPER[super_id - 1]}_final/{product}_{k}.JPG"
            write_jpeg(folder / rel, seed=20_000 + image_id, size=(36, 36 + 2 * k))
            line = f"{image_id} {class_id} {super_id} {rel}"
            rows[split].append(line)
            info.append(line)
    _write_lines(folder / "Ebay_train.txt", rows["train"])
    _write_lines(folder / "Ebay_test.txt", rows["test"])
    _write_lines(folder / "Ebay_info.txt", info)
    return {"root": str(root), "num_train_classes": n_train_classes, "num_test_classes": n_test_classes}


def make_inshop(root: Path, n_train_items: int = 6, n_test_items: int = 5, per_item: int = 4) -> dict[str, Any]:
    """``root/list_eval_partition.txt`` and ``root/img/<GENDER>/<category>/id_XXXXXXXX/<view>.jpg``:
    train items, then test items whose first half of images are queries and the rest gallery."""
    root = Path(root)
    records = []
    for item in range(1, n_train_items + n_test_items + 1):
        item_id = f"id_{item * 7:08d}"
        gender, category = INSHOP_CATEGORIES[item % len(INSHOP_CATEGORIES)]
        for k in range(per_item):
            view = INSHOP_VIEWS[k % len(INSHOP_VIEWS)]
            rel = f"img/{gender}/{category}/{item_id}/{k // len(INSHOP_VIEWS) + 1:02d}_{view}.jpg"
            write_jpeg(root / rel, seed=30_000 + 10 * item + k, size=(32, 44))
            status = "train" if item <= n_train_items else ("query" if k < per_item // 2 else "gallery")
            records.append((rel, item_id, status))
    width = max(len(r[0]) for r in records) + 10
    lines = [str(len(records)), "image_name item_id evaluation_status"]
    lines += [f"{rel.ljust(width)}{item_id.ljust(24)}{status}" for rel, item_id, status in records]
    _write_lines(root / "list_eval_partition.txt", lines)
    return {"root": str(root), "num_train_classes": n_train_items, "num_test_classes": n_test_items}


MINIATURES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "datamodules.CUB200DataModule": make_cub,
    "datamodules.Cars196DataModule": make_cars,
    "datamodules.SOPDataModule": make_sop,
    "datamodules.InShopDataModule": make_inshop,
}


def miniature_cli_args(class_path: str, root: Path) -> list[str]:
    """Write the miniature of ``class_path`` into ``root``; the ``--data.init_args.*`` that read it."""
    init_args = MINIATURES[class_path](Path(root))
    return [f"--data.init_args.{key}={value}" for key, value in init_args.items()]
