"""The evaluation sets of the CLIP regime: distinct images with their captions, and labelled images for zero-shot classification.

An evaluation split (``ImageTextEvalSet``) is read whole at setup (evaluation sets are small), so
its loaders can be sharded across DDP ranks with an index: from caption CSVs (``from_table``: the
rows of one image become one image with several captions) or from tar shards (``from_shards``: a
sample's ``.txt`` lines are its captions; a corrupt or incomplete sample is dropped, counted in
``skipped`` and logged at DEBUG level). Items, to which the loader adds ``index``: images
``{"image"}`` (``index``: the row among the split's distinct images), captions ``{"text",
"image_index"}`` (``text_to_image`` maps caption rows to image rows), zero-shot ``{"image", "label"}``.

Zero-shot images come from a CSV/TSV ``image,label`` (``read_zero_shot_csv``) or, offline, from the
Fashion-MNIST test images drawn as the scenes draw an item (``fashion_mnist_zero_shot``).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from datamodules.caption_csv import CSV_SUFFIXES, CaptionTable, _resolve
from datamodules.image_text_items import _apply, decode_image
from datamodules.webdataset_shards import iter_tar_samples

log = logging.getLogger(__name__)


class EvalImages(Dataset):
    """The distinct images of an evaluation split: ``{"image"}`` items (the loader adds ``index``)."""

    def __init__(self, sources: list[Any], transform: Callable | None = None) -> None:
        self.sources, self.transform = sources, transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image = decode_image(self.sources[i])
        except Exception as err:
            raise OSError(f"cannot read evaluation image {i} ({self.sources[i] if isinstance(self.sources[i], Path) else 'in a shard'}): {err}") from err
        return {"image": _apply(self.transform, image)}


class EvalCaptions(Dataset):
    """The captions of an evaluation split: ``{"text", "image_index"}`` items (the loader adds ``index``)."""

    def __init__(self, captions: list[str], image_index: np.ndarray) -> None:
        self.captions, self.image_index = captions, np.asarray(image_index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"text": self.captions[i], "image_index": int(self.image_index[i])}


@dataclass
class ImageTextEvalSet:
    """An evaluation split: distinct images, their captions (``text_to_image[t]`` = the image row of
    caption ``t``), the negative caption of each caption when the data has them (``None`` entries where
    not), and the samples skipped while reading it."""

    images: EvalImages
    captions: EvalCaptions
    neg_captions: list[str | None] | None = None
    skipped: int = 0
    source: str = ""

    @property
    def text_to_image(self) -> np.ndarray:
        return self.captions.image_index

    @classmethod
    def from_table(cls, table: CaptionTable, source: str = "") -> "ImageTextEvalSet":
        ids: dict[Path, int] = {}
        image_index = [ids.setdefault(p, len(ids)) for p in table.images]
        negs = list(table.neg_captions) if table.has_neg_text else None
        return cls(EvalImages(list(ids)), EvalCaptions(list(table.captions), np.asarray(image_index)), negs, 0, source)

    @classmethod
    def from_shards(cls, shards: Sequence[str], source: str = "") -> "ImageTextEvalSet":
        """Read every sample (decoding each image once to drop the corrupt ones, which are counted)."""
        sources: list[bytes] = []
        captions: list[str] = []
        image_index: list[int] = []
        negs: list[str | None] = []
        skipped = 0
        for s, path in enumerate(shards):
            for raw in iter_tar_samples(path, s):
                problem = raw.problem()
                if problem is None:
                    try:
                        decode_image(raw.image_bytes())
                    except Exception as err:
                        problem = f"undecodable image: {err}"
                if problem is not None:
                    skipped += 1
                    log.debug("skipped evaluation sample %r of %s: %s", raw.key, path, problem)
                    continue
                lines, neg_lines = raw.lines("txt"), raw.lines("neg_caption")
                for j, text in enumerate(lines):
                    captions.append(text)
                    image_index.append(len(sources))
                    negs.append(neg_lines[j] if j < len(neg_lines) else None)
                sources.append(raw.image_bytes())
        if not sources:
            raise ValueError(f"{source}: no usable sample in the shards {list(shards)[:3]} ({skipped} skipped)")
        has_negs = any(n is not None for n in negs)
        return cls(EvalImages(sources), EvalCaptions(captions, np.asarray(image_index)), negs if has_negs else None, skipped, source)


class ZeroShotImages(Dataset):
    """Labelled images for zero-shot classification: ``{"image", "label"}`` (the loader adds ``index``)."""

    def __init__(self, sources: Sequence[Any], labels: Sequence[int] | np.ndarray, transform: Callable | None = None) -> None:
        if len(sources) != len(labels):
            raise ValueError(f"ZeroShotImages: {len(sources)} images but {len(labels)} labels")
        self.sources, self.labels, self.transform = sources, np.asarray(labels, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": _apply(self.transform, decode_image(self.sources[i])), "label": int(self.labels[i])}


def read_zero_shot_csv(path: str | Path, class_names: Sequence[str], image_root: str | Path | None = None) -> ZeroShotImages:
    """A zero-shot CSV/TSV ``image,label``: label is a 0-based index into ``class_names`` or one of the names."""
    path = Path(path)
    delimiter = CSV_SUFFIXES.get(path.suffix.lower())
    if delimiter is None or not path.is_file():
        raise FileNotFoundError(f"zero-shot file {path}: expected an existing .csv or .tsv file with the columns image,label")
    root = Path(image_root) if image_root is not None else path.parent
    names = {n: i for i, n in enumerate(class_names)}
    sources, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in ("image", "label") if c not in header]
        if missing:
            raise ValueError(f"{path} line 1: the header {header} lacks the column(s) {missing}; expected image{delimiter}label")
        ci, cl = header.index("image"), header.index("label")
        for row in reader:
            if not row:
                continue
            line, value = reader.line_num, row[cl].strip()
            label = int(value) if value.isdigit() else names.get(value)
            if label is None or not 0 <= label < len(class_names):
                raise ValueError(f"{path} line {line} column 'label': {value!r} is neither an index below {len(class_names)} nor one of class_names")
            sources.append(_resolve(root, row[ci].strip(), path, line, "image"))
            labels.append(label)
    return ZeroShotImages(sources, labels)


def fashion_mnist_zero_shot(root: str, size: int | None, seed: int = 0) -> ZeroShotImages:
    """Fashion-MNIST test images drawn as the scenes draw an item (white on the dark canvas), a
    class-stratified subset of about ``size`` of them (``None``: all 10,000)."""
    from datamodules.fashion_mnist import load_fashion_mnist, stratified_subset
    from datamodules.fashion_scenes import render_single

    arrays = load_fashion_mnist(root)
    labels = arrays["test_labels"].astype(np.int64)
    keep = stratified_subset(labels, size, seed=seed) if size is not None else np.arange(len(labels))
    return ZeroShotImages([render_single(arrays["test_images"][i]) for i in keep], labels[keep])
