"""Labelled image datasets: in-memory arrays (Fashion-MNIST, digits) and image files on disk (CUB, SOP ...)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


class LabelledDataset(Dataset):
    """A dataset of ``{"image", "label"}`` items with its integer ``labels`` available without loading images.

    Items are dicts of named fields, the batch format every LightningModule reads (default collate
    turns a list of them into ``{"image": [B, ...], "label": [B]}``)."""

    labels: np.ndarray
    transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = self.load(index)
        if self.transform is not None:
            img = self.transform(img)
        return {"image": img, "label": int(self.labels[index])}

    def subset(self, indices: np.ndarray) -> "LabelledDataset":
        """A new dataset of the items ``indices`` (no transform), with its own ``transform`` slot."""
        raise NotImplementedError(f"{type(self).__name__} does not support subset()")

    def _copy_item_arrays(self, new: "LabelledDataset", indices: np.ndarray) -> "LabelledDataset":
        # Per-item annotations set by a DataModule (class_ids, super_labels ...) follow their items.
        for name, value in vars(self).items():
            if name not in vars(new) and isinstance(value, np.ndarray) and len(value) == len(self):
                setattr(new, name, value[indices])
            elif name == "class_names":  # label -> the dataset's own class name: valid for any subset
                setattr(new, name, value)
        return new


class ArrayImageDataset(LabelledDataset):
    """Images held in memory as a ``uint8`` array ``[N, H, W]`` (grayscale) or ``[N, H, W, 3]``."""

    def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray, transform: Callable | None = None) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"ArrayImageDataset expects uint8 images [N, H, W] or [N, H, W, 3], got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"ArrayImageDataset: {len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels, transform

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def subset(self, indices: np.ndarray) -> "ArrayImageDataset":
        indices = np.asarray(indices)
        return self._copy_item_arrays(ArrayImageDataset(self.images[indices], self.labels[indices]), indices)


class ImageFileDataset(LabelledDataset):
    """Images read from files, with an optional crop box ``(x, y, w, h)`` per image.

    A file that is missing or cannot be decoded raises an ``OSError`` naming the path, so a corrupt
    image in a benchmark folder is found with its name rather than as a bare decoder error.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | np.ndarray,
        transform: Callable | None = None,
        boxes: Sequence[tuple[float, float, float, float]] | None = None,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"ImageFileDataset: {len(paths)} paths but {len(labels)} labels")
        if boxes is not None and len(boxes) != len(paths):
            raise ValueError(f"ImageFileDataset: {len(boxes)} boxes for {len(paths)} images")
        self.paths = [Path(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.boxes = boxes

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as err:  # PIL raises several types for truncated/corrupt files
            raise OSError(f"cannot read image {path}: {err}") from err
        if self.boxes is not None:
            x, y, w, h = self.boxes[index]
            img = img.crop((int(x), int(y), int(x + w), int(y + h)))
        return img

    def subset(self, indices: np.ndarray) -> "ImageFileDataset":
        indices = np.asarray(indices, dtype=np.int64)
        boxes = [self.boxes[i] for i in indices] if self.boxes is not None else None
        new = ImageFileDataset([self.paths[i] for i in indices], self.labels[indices], boxes=boxes)
        return self._copy_item_arrays(new, indices)

    def verify(self, num_threads: int = 8) -> None:
        """Decode every image once (``num_threads`` at a time); raise an ``OSError`` naming the images
        that are missing or corrupt (the first five, and how many)."""
        from concurrent.futures import ThreadPoolExecutor

        def check(i: int) -> str | None:
            try:
                self.load(i)
            except OSError as err:
                return str(err)
            return None

        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            errors = [e for e in pool.map(check, range(len(self.paths))) if e is not None]
        if errors:
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise OSError(f"{len(errors)} unreadable images{more}: " + "; ".join(errors[:5]))


class QueryGalleryDataset(LabelledDataset):
    """A query set followed by a gallery set, as one dataset (In-Shop's evaluation protocol).

    Items are ``{"image", "label"}`` like any labelled dataset; ``is_query [N]`` tells the two parts
    apart and ``labels`` are the two label arrays concatenated. Setting ``transform`` sets it on
    both parts.
    """

    def __init__(self, query: LabelledDataset, gallery: LabelledDataset) -> None:
        self.query, self.gallery = query, gallery
        self.labels = np.concatenate([np.asarray(query.labels), np.asarray(gallery.labels)]).astype(np.int64)
        self.is_query = np.concatenate([np.ones(len(query), dtype=bool), np.zeros(len(gallery), dtype=bool)])

    @property
    def transform(self) -> Callable | None:
        return self.query.transform

    @transform.setter
    def transform(self, value: Callable | None) -> None:
        self.query.transform = value
        self.gallery.transform = value

    def __getitem__(self, index: int) -> dict[str, Any]:
        n_query = len(self.query)
        return self.query[index] if index < n_query else self.gallery[index - n_query]

    def verify(self, num_threads: int = 8) -> None:
        for part in (self.query, self.gallery):
            if hasattr(part, "verify"):
                part.verify(num_threads)


class TextDataset(LabelledDataset):
    """Labelled texts held in memory: ``{"text": str, "label": int}`` items (tokenized per batch by
    ``datamodules.inputs.TextInputs``, not per item)."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int] | np.ndarray) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"TextDataset: {len(texts)} texts but {len(labels)} labels")
        self.texts = list(texts)
        self.labels = np.asarray(labels, dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self.texts[index], "label": int(self.labels[index])}

    def subset(self, indices: np.ndarray) -> "TextDataset":
        indices = np.asarray(indices, dtype=np.int64)
        return self._copy_item_arrays(TextDataset([self.texts[i] for i in indices], self.labels[indices]), indices)


class Indexed(Dataset):
    """Wrap a dataset so items carry their index: ``{"image", "label", "index"}``.

    Evaluation loaders use it so that the duplicates a ``DistributedSampler`` pads in under DDP can
    be dropped before the metrics are computed. With ``with_query_flag`` the dataset must have an
    ``is_query`` array (``QueryGalleryDataset``) and items also hold ``"is_query"``.
    """

    def __init__(self, dataset: Dataset, with_query_flag: bool = False) -> None:
        if with_query_flag and not hasattr(dataset, "is_query"):
            raise ValueError(f"Indexed(with_query_flag=True) needs a dataset with is_query, got {type(dataset).__name__}")
        self.dataset = dataset
        self.with_query_flag = with_query_flag

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {**self.dataset[index], "index": index}
        if self.with_query_flag:
            item["is_query"] = bool(self.dataset.is_query[index])
        return item
