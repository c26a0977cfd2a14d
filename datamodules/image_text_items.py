"""What every image-text dataset does to build an item: decode an image, transform it, fill the negative fields.

The training datasets (``CaptionPairDataset`` of caption CSVs in ``datamodules.caption_csv``,
``ShardStream`` of tar shards in ``datamodules.shard_stream``) and the evaluation sets
(``datamodules.image_text_eval``) share these helpers, so their items agree. A train item is
``{"image", "text", "index"}`` plus, when the data has negatives, ``"neg_text"``, ``"neg_image"``
(when negative images exist) and ``"has_neg"``: an item without a negative gets "" and a zero
image, and False, so any mix of items stacks into one batch.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def decode_image(data: bytes | Path | np.ndarray | Image.Image) -> Image.Image:
    """An RGB PIL image from encoded bytes, a file path or an array; fully decoded (a truncated file fails here)."""
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    if isinstance(data, np.ndarray):
        return Image.fromarray(data).convert("RGB")
    if isinstance(data, Path):
        with Image.open(data) as img:
            return img.convert("RGB")
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def _negative_fields(item: dict[str, Any], neg_text: str | None, neg_image: Image.Image | None, transform: Callable | None,
                     with_text: bool, with_image: bool) -> None:
    if not with_text:
        return
    has = neg_text is not None and (neg_image is not None or not with_image)
    item["neg_text"] = neg_text if has else ""
    if with_image:
        item["neg_image"] = _apply(transform, neg_image) if has else torch.zeros_like(item["image"])
    item["has_neg"] = has


def _apply(transform: Callable | None, image: Image.Image) -> Any:
    return transform(image) if transform is not None else image
