"""Reading and checking the metadata of benchmark folders (CUB, Cars196, SOP, In-Shop ...).

Every check fails at ``setup()``, before training, with a message that names the file and line
(or the image) that is wrong and what was expected there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class DatasetFormatError(ValueError):
    """A benchmark folder does not have the layout or content of its official release."""


def require_dir(path: str | Path, what: str, expected: str) -> Path:
    """``path`` as a ``Path`` if it is a folder; otherwise ``FileNotFoundError`` saying what was expected."""
    path = Path(path).expanduser()
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{what} root {path} {state}; expected {expected}")
    return path


def find_dataset_dir(root: Path, marker: str, subfolders: Sequence[str] = ()) -> Path:
    """The folder holding ``marker``: ``root`` itself or one of ``root / sub`` (archives unpack into a
    named folder, and users point ``root`` either at it or at its parent). Returns ``root`` if none has it."""
    for folder in (root, *(root / s for s in subfolders)):
        if (folder / marker).exists():
            return folder
    return root


def require_file(path: Path, what: str, expected: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: metadata file {path} is missing; expected {expected}")
    return path


def read_rows(
    path: Path,
    converters: Sequence[Callable[[str], Any]],
    form: str,
    skip: int = 0,
) -> list[tuple[int, tuple]]:
    """Parse a whitespace-separated text table, one record per line.

    Args:
        path: the file.
        converters: one per column (``int``, ``float``, ``str`` ...); a line must have exactly as
            many fields.
        form: the expected line, e.g. ``"<image_id> <class_id>"``, quoted in errors.
        skip: header lines to skip.

    Returns:
        ``[(line_number, values), ...]`` (1-based line numbers; blank lines are skipped).

    Raises:
        DatasetFormatError naming ``path``, the line number and the line when a line does not parse.
    """
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if number <= skip or not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != len(converters):
                    raise ValueError(f"{len(fields)} fields")
                values = tuple(convert(field) for convert, field in zip(converters, fields))
            except ValueError:
                raise DatasetFormatError(
                    f"{path} line {number}: expected '{form}', got {line.rstrip()!r}"
                ) from None
            rows.append((number, values))
    return rows


def unique_ids(rows: list[tuple[int, tuple]], path: Path, column: str = "image_id") -> dict[Any, int]:
    """Map the first field of each row to its row position; error on a repeated id."""
    seen: dict[Any, int] = {}
    for position, (number, values) in enumerate(rows):
        key = values[0]
        if key in seen:
            first = rows[seen[key]][0]
            raise DatasetFormatError(f"{path} line {number}: {column} {key} repeats line {first}; expected each once")
        seen[key] = position
    return seen


def check_images_exist(paths: Sequence[Path], sources: Sequence[str], what: str) -> None:
    """Every listed image must be a file; ``sources[i]`` says where ``paths[i]`` is listed.

    Raises ``FileNotFoundError`` naming the missing images (the first five) and their count.
    """
    missing = [i for i, p in enumerate(paths) if not os.path.isfile(p)]
    if missing:
        shown = "; ".join(f"{paths[i]} (listed in {sources[i]})" for i in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{what}: {len(missing)} listed images are absent: {shown}{more}")


def check_class_count(found: int, expected: int | None, split: str, what: str, argument: str, hint: str = "") -> None:
    """The split must have ``expected`` classes (``None`` skips the check)."""
    if expected is not None and found != expected:
        raise DatasetFormatError(
            f"{what}: the {split} split has {found} classes; expected {expected} ({argument}={expected}). "
            f"A partial or modified copy of the benchmark is not the benchmark{hint}; if this subset is intended "
            f"(e.g. a miniature copy for tests), pass {argument}={found}"
        )


def check_total_classes(found: int, num_train: int, num_test: int, where: str, what: str) -> None:
    """A class-id split (first ``num_train`` ids train, next ``num_test`` test) needs ``where`` to list
    exactly ``num_train + num_test`` classes."""
    if found != num_train + num_test:
        raise DatasetFormatError(
            f"{what}: {where} lists {found} classes; expected num_train_classes + num_test_classes = "
            f"{num_train} + {num_test} = {num_train + num_test}. If this subset is intended (e.g. a miniature copy "
            f"for tests), pass num_train_classes and num_test_classes that sum to {found}"
        )


def dense_labels(ids: Sequence[Any], offset: int = 0) -> tuple[np.ndarray, list[Any]]:
    """Integer labels ``offset .. offset + C - 1`` for class ids, in sorted id order.

    Returns the labels ``[N]`` and the sorted distinct ids (``ids_sorted[label - offset]`` is the id).
    """
    distinct = sorted(set(ids))
    index = {c: i + offset for i, c in enumerate(distinct)}
    return np.fromiter((index[c] for c in ids), dtype=np.int64, count=len(ids)), distinct
