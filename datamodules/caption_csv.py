"""Caption CSV/TSV files: the reader (``read_caption_csv`` -> ``CaptionTable``) and the training pairs they give.

Format (``.csv``: comma, ``.tsv``: tab; header required): columns ``image`` (a path relative to the
CSV's folder, or to ``image_root``), ``caption``, optional ``neg_caption`` and ``neg_image`` (a hard
negative caption per row and the image it describes; empty cells: none). Every listed file is
checked at setup; a missing column or file names the CSV, line and column. Training reads rows
map-style (``CaptionPairDataset``, one item per row); evaluation (``datamodules.image_text_eval``)
merges the rows of one image into one image with several captions.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from datamodules.image_text_items import _apply, _negative_fields, decode_image

CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}


@dataclass
class CaptionTable:
    """The rows of caption CSV/TSV files: per row its image path, caption, optional negative caption and
    negative image path (``None`` where the cell is empty or the column absent), and where it came from."""

    images: list[Path] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    neg_captions: list[str | None] = field(default_factory=list)
    neg_images: list[Path | None] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)  # "file.csv line 7" per row

    def __len__(self) -> int:
        return len(self.captions)

    def extend(self, other: "CaptionTable") -> None:
        for name in ("images", "captions", "neg_captions", "neg_images", "origins"):
            getattr(self, name).extend(getattr(other, name))

    @property
    def has_neg_text(self) -> bool:
        return any(c is not None for c in self.neg_captions)

    @property
    def has_neg_image(self) -> bool:
        return any(p is not None for p in self.neg_images)


def read_caption_csv(path: str | Path, image_root: str | Path | None = None) -> CaptionTable:
    """Read a caption CSV (``,``) or TSV (tab) with a header row: ``image,caption[,neg_caption][,neg_image]``.

    Image paths are relative to ``image_root`` (default: the CSV's folder) unless absolute. Raises
    ``FileNotFoundError``/``ValueError`` naming the file, line and column of a missing column, an
    empty required cell or an image file that does not exist.
    """
    path = Path(path)
    delimiter = CSV_SUFFIXES.get(path.suffix.lower())
    if delimiter is None:
        raise ValueError(f"caption file {path}: expected a .csv (comma) or .tsv (tab) file")
    if not path.is_file():
        raise FileNotFoundError(f"caption file {path} does not exist")
    root = Path(image_root) if image_root is not None else path.parent
    table = CaptionTable()
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"caption file {path} is empty; expected a header line image{delimiter}caption[...]")
        header = [h.strip() for h in header]
        missing = [c for c in ("image", "caption") if c not in header]
        if missing:
            raise ValueError(f"{path} line 1: the header {header} lacks the column(s) {missing}; "
                             f"expected image{delimiter}caption[{delimiter}neg_caption][{delimiter}neg_image]")
        col = {name: header.index(name) for name in ("image", "caption", "neg_caption", "neg_image") if name in header}
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"{path} line {line}: {len(row)} fields, the header has {len(header)} ({header})")

            def cell(name: str) -> str | None:
                value = row[col[name]].strip() if name in col else ""
                return value or None

            for name in ("image", "caption"):
                if cell(name) is None:
                    raise ValueError(f"{path} line {line} column {name!r}: empty; every row needs an image and a caption")
            image = _resolve(root, cell("image"), path, line, "image")
            neg_image = _resolve(root, cell("neg_image"), path, line, "neg_image") if cell("neg_image") else None
            if neg_image is not None and cell("neg_caption") is None:
                raise ValueError(f"{path} line {line}: column 'neg_image' is set but 'neg_caption' is empty; a negative image needs its caption")
            table.images.append(image)
            table.captions.append(cell("caption"))
            table.neg_captions.append(cell("neg_caption"))
            table.neg_images.append(neg_image)
            table.origins.append(f"{path} line {line}")
    if not len(table):
        raise ValueError(f"caption file {path} has a header but no rows")
    return table


def _resolve(root: Path, name: str, csv_path: Path, line: int, column: str) -> Path:
    p = Path(name)
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        raise FileNotFoundError(f"{csv_path} line {line} column {column!r}: image file {p} does not exist")
    return p


class CaptionPairDataset(Dataset):
    """Training pairs from caption CSVs, map-style: ``{"image", "text", "index"}`` per row (+ the negative fields).

    ``labels`` is the id of the row's distinct image (two captions of one image share it), so a
    ``batch_sampler`` factory (``RetrievalDataModule``) can build batches by image.
    """

    def __init__(self, table: CaptionTable, transform: Callable | None = None) -> None:
        self.table, self.transform = table, transform
        ids: dict[Path, int] = {}
        self.labels = np.asarray([ids.setdefault(p, len(ids)) for p in table.images], dtype=np.int64)
        self.with_neg_text, self.with_neg_image = table.has_neg_text, table.has_neg_image

    def __len__(self) -> int:
        return len(self.table)

    def _load(self, path: Path, i: int) -> Image.Image:
        try:
            return decode_image(path)
        except Exception as err:  # PIL raises several types for truncated/corrupt files
            raise OSError(f"cannot read image {path} ({self.table.origins[i]}): {err}") from err

    def __getitem__(self, i: int) -> dict[str, Any]:
        t = self.table
        item = {"image": _apply(self.transform, self._load(t.images[i], i)), "text": t.captions[i], "index": i}
        neg_image = self._load(t.neg_images[i], i) if self.with_neg_image and t.neg_images[i] is not None else None
        _negative_fields(item, t.neg_captions[i], neg_image, self.transform, self.with_neg_text, self.with_neg_image)
        return item

    def verify(self, num_threads: int = 8) -> None:
        """Decode every image and negative image; an ``OSError`` names the unreadable ones."""
        from concurrent.futures import ThreadPoolExecutor

        paths = sorted({(p, i) for i, p in enumerate(self.table.images)} | {(p, i) for i, p in enumerate(self.table.neg_images) if p},
                       key=lambda x: x[1])

        def check(pi: tuple[Path, int]) -> str | None:
            try:
                self._load(*pi)
            except OSError as err:
                return str(err)
            return None

        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            errors = [e for e in pool.map(check, paths) if e is not None]
        if errors:
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise OSError(f"{len(errors)} unreadable images{more}: " + "; ".join(errors[:5]))
