"""Readers for the SugarCrepe and SugarCrepe++ compositionality benchmarks (JSON files + COCO val2017).

Both benchmarks caption MS-COCO val2017 images; their files hold only the image file name, so a
reader takes the folder of the JSON files and the image root (``val2017/``) and returns typed
records with the full image path. The scores are in :mod:`lightning_modules.metrics.compositional`.

**SugarCrepe** (Hsieh, Zhang, Ma, Kembhavi, Krishna, "SugarCrepe: Fixing Hackable Benchmarks for
Vision-Language Compositionality", NeurIPS 2023 Datasets and Benchmarks; the ``data/`` folder of
github.com/RAIVNLab/sugar-crepe): one file per category, ``<category>.json``, a JSON object
keyed by sample id::

    {"0": {"filename": "000000544519.jpg", "caption": "...", "negative_caption": "..."}, ...}

Seven categories: ``add_att``, ``add_obj``, ``replace_att``, ``replace_obj``, ``replace_rel``,
``swap_att``, ``swap_obj``. An early release named the object files ``add_ent``, ``replace_ent``,
``swap_ent``; those names are read when the ``_obj`` file is absent.

**SugarCrepe++** (Dumpala, Jaiswal, Sastry, Milios, Oore, Sajjad, "SUGARCREPE++ Dataset:
Vision-Language Model Sensitivity to Semantic and Lexical Alterations", NeurIPS 2024 Datasets
and Benchmarks; the ``data/`` folder of github.com/Sri-Harsha/scpp): one file per category, a
JSON list of records::

    [{"id": 0, "filename": "000000331352.jpg", "caption": "...", "caption2": "...", "negative_caption": "..."}, ...]

Five categories: ``replace_att``, ``replace_obj``, ``replace_rel``, ``swap_att``, ``swap_obj``.

Errors name the file and the record: a missing category file, a file that is not JSON (with the
line and column), a record without a field or with a non-string caption, a repeated id; and
missing images are reported with their count and the first paths (``check_images=False`` skips the
image check, e.g. to score text-only models with the TOT metric).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.metadata import DatasetFormatError, check_images_exist, require_dir

SUGARCREPE_CATEGORIES = ("add_att", "add_obj", "replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
SUGARCREPE_PP_CATEGORIES = ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")
LEGACY_NAMES = {"add_obj": "add_ent", "replace_obj": "replace_ent", "swap_obj": "swap_ent"}

SUGARCREPE_EXPECTED = "the SugarCrepe data/ folder with <category>.json files (github.com/RAIVNLab/sugar-crepe)"
SUGARCREPE_PP_EXPECTED = "the SugarCrepe++ data/ folder with <category>.json files (github.com/Sri-Harsha/scpp)"
IMAGES_EXPECTED = "the MS-COCO val2017 image folder (000000xxxxxx.jpg files)"


@dataclass(frozen=True)
class SugarCrepeSample:
    """One SugarCrepe sample: an image, its caption and a hard negative caption."""

    id: str
    category: str
    filename: str
    image: Path
    caption: str
    negative_caption: str


@dataclass(frozen=True)
class SugarCrepePPSample:
    """One SugarCrepe++ sample: an image, two positive captions of the same meaning, one negative."""

    id: str
    category: str
    filename: str
    image: Path
    caption: str
    caption2: str
    negative_caption: str


def read_sugarcrepe(
    data_dir: str | Path,
    image_root: str | Path,
    categories: Sequence[str] = SUGARCREPE_CATEGORIES,
    check_images: bool = True,
) -> dict[str, list[SugarCrepeSample]]:
    """Read SugarCrepe's ``<category>.json`` files: ``{category: [SugarCrepeSample, ...]}`` in file order.

    Args:
        data_dir: the folder holding the category files.
        image_root: the COCO val2017 image folder (``image`` is ``image_root / filename``).
        categories: the categories to read (default: all seven).
        check_images: fail when listed images are absent.
    """
    root = require_dir(data_dir, "SugarCrepe", SUGARCREPE_EXPECTED)
    images = Path(image_root).expanduser()
    out: dict[str, list[SugarCrepeSample]] = {}
    for category in _check_categories(categories, SUGARCREPE_CATEGORIES, "SugarCrepe"):
        path = _category_file(root, category, SUGARCREPE_EXPECTED, LEGACY_NAMES.get(category))
        data = _load_json(path, dict, 'an object {"<id>": {"filename", "caption", "negative_caption"}, ...}')
        samples = []
        for key, record in data.items():
            where = f"{path}: record {key!r}"
            fields = _fields(record, ("filename", "caption", "negative_caption"), where)
            samples.append(SugarCrepeSample(str(key), category, fields["filename"], images / fields["filename"],
                                            fields["caption"], fields["negative_caption"]))
        out[category] = samples
    if check_images:
        _check_images(out, images, "SugarCrepe")
    return out


def read_sugarcrepe_pp(
    data_dir: str | Path,
    image_root: str | Path,
    categories: Sequence[str] = SUGARCREPE_PP_CATEGORIES,
    check_images: bool = True,
) -> dict[str, list[SugarCrepePPSample]]:
    """Read SugarCrepe++'s ``<category>.json`` files: ``{category: [SugarCrepePPSample, ...]}`` in file order.

    Args: as :func:`read_sugarcrepe`. Record ids (integers in the release) become strings and must
    be distinct within a file.
    """
    root = require_dir(data_dir, "SugarCrepe++", SUGARCREPE_PP_EXPECTED)
    images = Path(image_root).expanduser()
    out: dict[str, list[SugarCrepePPSample]] = {}
    for category in _check_categories(categories, SUGARCREPE_PP_CATEGORIES, "SugarCrepe++"):
        path = _category_file(root, category, SUGARCREPE_PP_EXPECTED)
        data = _load_json(path, list, 'a list [{"id", "filename", "caption", "caption2", "negative_caption"}, ...]')
        samples, seen = [], {}
        for position, record in enumerate(data):
            where = f"{path}: record {position}" + (f" (id {record['id']!r})" if isinstance(record, dict) and "id" in record else "")
            fields = _fields(record, ("id", "filename", "caption", "caption2", "negative_caption"), where, ids=("id",))
            sample_id = str(fields["id"])
            if sample_id in seen:
                raise DatasetFormatError(f"{where}: id {sample_id} repeats record {seen[sample_id]}; expected each id once")
            seen[sample_id] = position
            samples.append(SugarCrepePPSample(sample_id, category, fields["filename"], images / fields["filename"],
                                              fields["caption"], fields["caption2"], fields["negative_caption"]))
        out[category] = samples
    if check_images:
        _check_images(out, images, "SugarCrepe++")
    return out


def _check_categories(categories: Sequence[str], known: tuple[str, ...], what: str) -> tuple[str, ...]:
    if isinstance(categories, str):
        categories = (categories,)
    unknown = [c for c in categories if c not in known]
    if unknown or not categories:
        raise ValueError(f"{what} categories must be a non-empty subset of {known}, got {tuple(categories)!r}")
    return tuple(categories)


def _category_file(root: Path, category: str, expected: str, legacy: str | None = None) -> Path:
    path = root / f"{category}.json"
    if path.is_file():
        return path
    if legacy is not None and (root / f"{legacy}.json").is_file():
        return root / f"{legacy}.json"
    also = f" (nor its earlier name {legacy}.json)" if legacy else ""
    raise FileNotFoundError(f"{path} is missing{also}; expected {expected}")


def _load_json(path: Path, kind: type, form: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); expected {form}") from None
    except UnicodeDecodeError as e:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({e.reason}); expected a JSON file, {form}") from None
    if not isinstance(data, kind):
        raise DatasetFormatError(f"{path}: the top level is a JSON {type(data).__name__}; expected {form}")
    if not data:
        raise DatasetFormatError(f"{path}: no records; expected {form}")
    return data


def _fields(record: Any, names: tuple[str, ...], where: str, ids: tuple[str, ...] = ()) -> dict[str, Any]:
    """The named fields of one record: strings (``ids`` may also be integers), present and non-empty."""
    if not isinstance(record, dict):
        raise DatasetFormatError(f"{where} is a JSON {type(record).__name__}; expected an object with fields {', '.join(names)}")
    missing = [n for n in names if n not in record]
    if missing:
        raise DatasetFormatError(f"{where} has no field {', '.join(missing)}; expected the fields {', '.join(names)}")
    for name in names:
        value = record[name]
        allowed = (str, int) if name in ids else (str,)
        if not isinstance(value, allowed) or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
            want = "a string or integer" if name in ids else "a non-empty string"
            raise DatasetFormatError(f"{where}: field {name} is {value!r:.60}; expected {want}")
    return {n: record[n] for n in names}


def _check_images(samples: dict[str, list[Any]], image_root: Path, what: str) -> None:
    require_dir(image_root, f"{what} image", IMAGES_EXPECTED)
    listed: dict[Path, str] = {}
    for category, rows in samples.items():
        for s in rows:
            listed.setdefault(s.image, f"{category}.json record {s.id}")
    paths = list(listed)
    check_images_exist(paths, [listed[p] for p in paths], what)
