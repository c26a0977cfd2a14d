"""The offline compositional test set of the Fashion-MNIST scenes (``datamodules.fashion_scenes``).

``generate_compositional_test`` adds the offline compositional test set beside the scenes: for every
held-out test scene, one negative caption and its rendered image per category (a rule of
``NEGATIVE_RULES``), ``compositional-test.csv``; ``read_compositional_test`` reads it
(``experiments.callbacks.CompositionalReport`` and ``hardneg compositional --scenes`` score it).
"""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.fashion_mnist import DEBIAN_ROOT, load_fashion_mnist
from datamodules.fashion_scenes import (
    MANIFEST,
    NEGATIVE_RULES,
    TEMPLATES,
    _read_manifest,
    _remove,
    caption,
    class_pool,
    png_bytes,
    read_specs,
    render,
)
from datamodules.metadata import DatasetFormatError, check_images_exist

COMPOSITIONAL_TEST = "compositional-test.csv"
COMPOSITIONAL_MANIFEST = "compositional-test.json"
COMPOSITIONAL_IMAGES = "compositional-test-images"
COMPOSITIONAL_COLUMNS = ("image", "caption", "negative_caption", "negative_image", "category")
COMPOSITIONAL_VERSION = 1


@dataclass(frozen=True)
class CompositionalSample:
    """One row of the compositional test set: a held-out test scene, one of its captions, the caption of
    the ``category`` edit of the scene through the same template, and the rendering of that edit."""

    id: str
    category: str
    image: Path
    caption: str
    negative_caption: str
    negative_image: Path


def generate_compositional_test(
    root: str | Path,
    categories: Sequence[str] | None = None,
    fashion_mnist_root: str | Path = DEBIAN_ROOT,
) -> Path:
    """Write the compositional test set beside the scenes of ``root`` (once) and return its CSV path.

    For every held-out test scene (``test-specs.jsonl``) and every category (a rule of
    ``NEGATIVE_RULES``: swap_objects, swap_attributes, replace_object, replace_attribute,
    replace_relation), one hard negative: the rule's edit of the scene, its caption through the
    template the positive caption uses (one template drawn per scene and category), and its
    rendering from the Fashion-MNIST *test* images at the scenes' canvas size. This is the
    SugarCrepe protocol (Hsieh et al., NeurIPS 2023: one negative per sample and category, an image
    scored against its caption and the negative) with a negative image per sample as well
    (TripletCLIP, Patel et al., NeurIPS 2024), so both directions are measured.

    Everything is a function of the scenes' ``seed``: the rule of scene ``i`` and category ``c`` draws
    from ``np.random.default_rng([seed, 3, index of c in NEGATIVE_RULES, i])``, so a category's
    negatives do not depend on which other categories are written. A rule that does not apply (e.g.
    swapping the objects of a scene with two items of one class) leaves no row. The negatives may
    show held-out combinations: the test scenes hold one by construction; only the *train*
    negatives (``generate_scenes(with_negatives=True)``) are kept free of them.

    Layout, under ``root``: ``compositional-test.csv`` (``image,caption,negative_caption,negative_image,category``,
    paths relative to ``root``; ``image`` is the scene's ``test-images/KEY.png``),
    ``compositional-test-images/KEY.CATEGORY.png`` and ``compositional-test.json`` (the parameters and the
    counts per category), written last; a call whose parameters match it returns at once. Concurrent
    calls (the cells of a grid) serialise on a lock file.

    Raises:
        FileNotFoundError: ``root`` has no complete scene dataset (no ``scenes.json``).
    """
    names = list(NEGATIVE_RULES) if categories is None else list(categories)
    unknown = [c for c in names if c not in NEGATIVE_RULES]
    if unknown or not names:
        raise ValueError(f"generate_compositional_test categories must be a non-empty subset of {list(NEGATIVE_RULES)}, got {names}")
    root = Path(root)
    scenes = _read_manifest(root / MANIFEST)
    if scenes is None or not (root / "test-specs.jsonl").is_file():
        raise FileNotFoundError(f"{root} has no complete scene dataset ({MANIFEST}, test-specs.jsonl); write it first with "
                                f"generate_scenes({str(root)!r}, ...) or FashionScenesDataModule.prepare_data")
    params = {"version": COMPOSITIONAL_VERSION, "scenes": scenes["params"], "categories": names}
    csv_path = root / COMPOSITIONAL_TEST
    with open(root / f".{COMPOSITIONAL_TEST}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = _read_manifest(root / COMPOSITIONAL_MANIFEST)
        if old is not None and old.get("params") == params and csv_path.is_file() and (root / COMPOSITIONAL_IMAGES).is_dir():
            return csv_path
        _write_compositional_test(root, params, names, fashion_mnist_root)
    return csv_path


def _write_compositional_test(root: Path, params: dict[str, Any], names: list[str], fashion_mnist_root: str | Path) -> None:
    seed, size = int(params["scenes"]["seed"]), int(params["scenes"]["image_size"])
    arrays = load_fashion_mnist(fashion_mnist_root)
    images, pool = arrays["test_images"], class_pool(arrays["test_labels"])
    order = list(NEGATIVE_RULES)
    build = Path(tempfile.mkdtemp(prefix=".compositional-build-", dir=root))
    try:
        (build / COMPOSITIONAL_IMAGES).mkdir()
        rows, counts = [], {c: 0 for c in names}
        for i, row in enumerate(read_specs(root / "test-specs.jsonl")):
            spec, key = row["spec"], row["key"]
            for name in names:
                rng = np.random.default_rng([seed, 3, order.index(name), i])
                template = int(rng.integers(len(TEMPLATES)))
                neg = NEGATIVE_RULES[name](spec, rng, pool)
                if neg is None or neg == spec:
                    continue
                neg_name = f"{COMPOSITIONAL_IMAGES}/{key}.{name}.png"
                (build / neg_name).write_bytes(png_bytes(render(neg, images, size)))
                rows.append([f"test-images/{key}.png", caption(spec, template), caption(neg, template), neg_name, name])
                counts[name] += 1
        with open(build / COMPOSITIONAL_TEST, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COMPOSITIONAL_COLUMNS)
            writer.writerows(rows)
        manifest_path = root / COMPOSITIONAL_MANIFEST
        if manifest_path.exists():
            manifest_path.unlink()
        for name in (COMPOSITIONAL_IMAGES, COMPOSITIONAL_TEST):
            _remove(root / name)
            os.replace(build / name, root / name)
        (build / COMPOSITIONAL_MANIFEST).write_text(json.dumps({"params": params, "counts": counts}, indent=2, sort_keys=True) + "\n")
        os.replace(build / COMPOSITIONAL_MANIFEST, manifest_path)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def read_compositional_test(path: str | Path, check_images: bool = True) -> dict[str, list[CompositionalSample]]:
    """Read a ``compositional-test.csv``: ``{category: [CompositionalSample, ...]}`` in file order.

    Paths are relative to the CSV's folder. Errors name the file and line: a missing column, an
    empty cell; absent images are reported with their count (``check_images=False`` skips that).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; expected the compositional test set written by "
                                f"datamodules.compositional_test_set.generate_compositional_test (columns {', '.join(COMPOSITIONAL_COLUMNS)})")
    out: dict[str, list[CompositionalSample]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COMPOSITIONAL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetFormatError(f"{path} line 1: header {reader.fieldnames} lacks {', '.join(missing)}; expected {', '.join(COMPOSITIONAL_COLUMNS)}")
        for row in reader:
            line = reader.line_num
            empty = [c for c in COMPOSITIONAL_COLUMNS if not (row.get(c) or "").strip()]
            if empty:
                raise DatasetFormatError(f"{path} line {line}: empty {', '.join(empty)}; every row needs {', '.join(COMPOSITIONAL_COLUMNS)}")
            out.setdefault(row["category"], []).append(CompositionalSample(
                f"{line}", row["category"], path.parent / row["image"], row["caption"], row["negative_caption"], path.parent / row["negative_image"]))
    if not out:
        raise DatasetFormatError(f"{path}: no rows; expected one row per test scene and category")
    if check_images:
        listed: dict[Path, str] = {}
        for rows in out.values():
            for s in rows:
                listed.setdefault(s.image, f"{path.name} line {s.id}")
                listed.setdefault(s.negative_image, f"{path.name} line {s.id}")
        check_images_exist(list(listed), list(listed.values()), f"compositional test set {path}")
    return out
