"""Image-text pairs for the CLIP regime: ``ImageTextDataModule`` reads CSV/TSV files or webdataset tar shards.

Sources (by extension):

- **CSV/TSV** (``.csv``: comma, ``.tsv``: tab; header required): columns ``image`` (a path relative
  to the CSV's folder, or to ``image_root``), ``caption``, optional ``neg_caption`` and
  ``neg_image`` (a hard negative caption per row and the image it describes; empty cells: none).
  Every listed file is checked at setup; a missing column or file names the CSV, line and column.
  Training reads rows map-style (one item per row); evaluation merges the rows of one image into one
  image with several captions.
- **tar shards** in the webdataset layout (Breuel, the ``webdataset`` format: a sample is the run of
  consecutive members sharing a key, the member name up to its first dot): ``KEY.jpg|jpeg|png|webp``
  (the image), ``KEY.txt`` (caption(s), one per line; training draws one at random), optional
  ``KEY.neg_caption`` (one per line, aligned with the captions) and ``KEY.neg_image.png|jpg``.
  Shard lists are brace patterns (``scenes-{000000..000009}.tar``, ``{a,b}``), globs, or lists of
  them. Read with ``tarfile``, no extra dependency.

Training on shards is an ``IterableDataset`` (``ShardStream``) that yields whole batches. Every rank
yields exactly ``num_batches`` batches per epoch, so DDP ranks never disagree on the number of
steps: ``num_batches`` is given, or derived from the sample total (counted from the shard headers at
setup, or declared with ``num_samples``) as ``total // (batch_size * world_size)``. The samples are
split across the (rank, dataloader worker) slots: with counted shards, every pass's sample sequence
is cut into one contiguous chunk per slot, at least as large as what the slot consumes, so the slots
of an epoch read disjoint samples; with a declared total, a slot reads whole shards
(``shards[slot::slots]``) when there are enough, else every ``slots``-th sample. A slot cycles pass
after pass, reshuffling the shard order every pass (from ``seed``, the epoch and the pass, identical
on every rank) and its samples through a shuffle buffer, until its batches are done. The epoch is set by Lightning's ``set_epoch``
call on the loader's sampler and held in shared memory, so persistent workers see it.

A corrupt or incomplete sample (undecodable image, no image or caption member, a truncated shard)
is skipped and counted, never silently: ``skipped_samples()`` gives the count per split, and the
end of fit (``teardown``) logs it and warns when it is not zero. Evaluation shards are read into a
list at setup (evaluation sets are small) so their loaders can be sharded with an index.

Batches (the contract ``CLIPModule`` reads; the tokenizer is ``data_config["tokenizer"]``, a callable
``list[str] -> LongTensor [B, L]`` as open_clip's):

- train: ``{"image": [B, 3, H, W], "text": [B, L] long, "index": [B] long}``, plus, when the data
  has negatives, ``"neg_text" [B, L]``, ``"neg_image" [B, 3, H, W]`` (when negative images exist)
  and ``"has_neg" [B] bool`` (an item without a negative gets "" and a zero image, and False).
- evaluation (``eval_protocol = "image_text"``): ``val_dataloader()``/``test_dataloader()`` return
  ``[images, captions]`` loaders, plus ``zero_shot`` when there are zero-shot classes: images
  ``{"image", "index"}`` (the row among the split's distinct images), captions ``{"text", "index",
  "image_index"}``, zero-shot ``{"image", "label", "index"}``; ``text_to_image(stage)`` maps caption
  rows to image rows. Each loader is sharded across DDP ranks (padded; the index drops duplicates).
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
import re
import tarfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, default_collate, get_worker_info

from datamodules.base import RetrievalDataModule
from datamodules.fashion_mnist import DEBIAN_ROOT
from datamodules.inputs import ImageInputs, InputPipeline
from datamodules.samplers import RandomBatchSampler

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
NEG_IMAGE_SUFFIXES = ("neg_image.png", "neg_image.jpg", "neg_image.jpeg")
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
INDEX_SHIFT = 24  # a shard sample's index: shard number << 24 | its position in the shard
_MAX_WORKERS = 256


# ----------------------------------------------------------------------------------- sources
def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``{000..009}`` (zero-padded numeric ranges) and ``{a,b}``, nested or repeated."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"shard pattern {pattern!r}: braces must hold a range {{000..009}} or a list {{a,b}}, got {{{body}}}")
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def expand_shards(spec: str | Sequence[str], what: str = "shards") -> list[str]:
    """The shard files of ``spec``: brace patterns, globs and plain paths, or a list of them, in order.
    Every file must exist: a missing one is named (``FileNotFoundError``)."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[str] = []
    missing: list[str] = []
    for s in specs:
        for path in expand_braces(str(s)):
            if any(ch in path for ch in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise FileNotFoundError(f"{what}: the glob {path} matches no file")
                out += found
            elif not Path(path).is_file():
                missing.append(path)
            else:
                out.append(path)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{what}: {len(missing)} of {len(missing) + len(out)} shards of {spec!r} do not exist: {', '.join(missing[:3])}{more}")
    if not out:
        raise FileNotFoundError(f"{what}: {spec!r} names no shard")
    return out


def source_kind(spec: str | Sequence[str], what: str) -> str:
    """``"csv"`` when every entry ends with .csv/.tsv, ``"shards"`` when none does; a mix is an error."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise ValueError(f"{what}: no source given; expected a CSV/TSV path or tar shard pattern(s)")
    is_csv = [Path(str(s)).suffix.lower() in CSV_SUFFIXES for s in specs]
    if all(is_csv):
        return "csv"
    if not any(is_csv):
        return "shards"
    raise ValueError(f"{what}: {specs} mixes CSV/TSV files and tar shards; give one kind per split")


# ------------------------------------------------------------------------------------- CSV/TSV
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


# ---------------------------------------------------------------------------------- tar shards
@dataclass
class RawSample:
    """One webdataset sample as read: its members (suffix -> bytes), or ``error`` when the shard broke."""

    shard: int
    position: int
    key: str
    members: dict[str, bytes]
    error: str | None = None

    @property
    def index(self) -> int:
        return (self.shard << INDEX_SHIFT) | self.position

    def image_bytes(self) -> bytes | None:
        return next((self.members[s] for s in IMAGE_SUFFIXES if s in self.members), None)

    def neg_image_bytes(self) -> bytes | None:
        return next((self.members[s] for s in NEG_IMAGE_SUFFIXES if s in self.members), None)

    def lines(self, suffix: str) -> list[str]:
        data = self.members.get(suffix)
        if data is None:
            return []
        return [line.strip() for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]

    def problem(self) -> str | None:
        """Why the sample cannot be used (without decoding its image), or ``None``."""
        if self.error is not None:
            return self.error
        if self.image_bytes() is None:
            return f"no image member (.{'/.'.join(IMAGE_SUFFIXES)})"
        if not self.lines("txt"):
            return "no caption (.txt missing or empty)"
        return None


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.neg_image.png`` -> (``dir/abc``, ``neg_image.png``): the key is the name up to the
    first dot of its last path component, the suffix the rest (lower case)."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (suffix.lower() if dot else "")


def iter_tar_samples(path: str, shard: int = 0, read_data: bool = True) -> Iterator[RawSample]:
    """The samples of one tar shard in order. A shard that breaks off (truncated, not a tar) ends
    with a sample whose ``error`` says so. ``read_data=False`` reads only the headers (members map to b"")."""
    position = 0
    current: RawSample | None = None
    try:
        # Reading data: one sequential stream; headers only: random access, seeking over the data.
        with tarfile.open(path, "r|*" if read_data else "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, suffix = split_member_name(member.name)
                if current is not None and key != current.key:
                    yield current
                    position += 1
                    current = None
                if current is None:
                    current = RawSample(shard, position, key, {})
                if read_data:
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} has {len(data)} of its {member.size} bytes")
                    current.members[suffix] = data
                else:
                    current.members[suffix] = b""
            # tarfile ends quietly when the file breaks off inside a header: an uncompressed shard
            # must still hold the end-of-archive blocks after the last member.
            plain = getattr(tar.fileobj, "comptype", "tar") == "tar" and not path.endswith((".gz", ".bz2", ".xz"))
            if plain and os.path.getsize(path) < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("the file ends without the end-of-archive blocks (truncated)")
    except (tarfile.TarError, OSError, EOFError) as err:
        if current is not None:
            current.error = f"shard {path} broke off in sample {current.key!r}: {err}"
            yield current
        else:
            yield RawSample(shard, position, "", {}, error=f"shard {path} is unreadable after {position} samples: {err}")
        return
    if current is not None:
        yield current


@dataclass
class ShardScan:
    """What the headers of a set of shards hold (no image decoded): usable samples, incomplete ones,
    and whether negatives are present."""

    samples: int = 0
    incomplete: int = 0
    with_neg_text: int = 0
    with_neg_image: int = 0
    per_shard: list[int] = field(default_factory=list)  # complete samples
    raw_per_shard: list[int] = field(default_factory=list)  # all samples, as ``ShardStream`` counts positions


def scan_shards(shards: Sequence[str]) -> ShardScan:
    """Count the complete samples of ``shards`` from their member names (tar headers only)."""
    scan = ShardScan()
    for s, path in enumerate(shards):
        n = n_raw = 0
        for raw in iter_tar_samples(path, s, read_data=False):
            n_raw += 1
            if raw.error is None and raw.image_bytes() is not None and "txt" in raw.members:
                n += 1
                scan.with_neg_text += "neg_caption" in raw.members
                scan.with_neg_image += raw.neg_image_bytes() is not None
            else:
                scan.incomplete += 1
        scan.per_shard.append(n)
        scan.raw_per_shard.append(n_raw)
        scan.samples += n
    return scan


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


class SkipCounter:
    """Skipped-sample counts shared with dataloader workers: one shared-memory slot per worker
    (each slot written by one process only), summed on read."""

    def __init__(self) -> None:
        self.counts = torch.zeros(_MAX_WORKERS + 1, dtype=torch.long).share_memory_()

    def add(self, n: int = 1) -> None:
        info = get_worker_info()
        self.counts[0 if info is None else 1 + info.id % _MAX_WORKERS] += n

    def total(self) -> int:
        return int(self.counts.sum())


# ------------------------------------------------------------------------------------ datasets
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


class ShardStream(IterableDataset):
    """Training pairs streamed from tar shards as whole batches (lists of items); see the module docstring.

    Each item is ``{"image", "text", "index"}`` (+ ``neg_text``, ``neg_image``, ``has_neg`` when
    ``with_neg_text``/``with_neg_image``); ``index`` is ``shard << 24 | position in shard``.
    ``len()`` is ``num_batches``, this rank's batches per epoch, split over the dataloader workers.

    Args:
        shards: the shard files (every rank the same list, in the same order).
        batch_size: items per batch (per rank).
        num_batches: batches per epoch on this rank (the same on every rank).
        rank, world_size: this process's place in DDP.
        seed: shard order and shuffling are functions of (seed, epoch, pass, slot).
        shuffle_buffer: samples held for shuffling per slot (1: read order).
        with_neg_text, with_neg_image: emit the negative fields.
        transform: per-image transform (set by the input pipeline).
        skipped: the shared counter of skipped samples.
        shard_sizes: samples per shard (all, complete or not; ``scan_shards``), for balanced disjoint slots.
    """

    labels = np.zeros(0, dtype=np.int64)  # no per-item labels without reading the shards

    def __init__(
        self,
        shards: Sequence[str],
        batch_size: int,
        num_batches: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        with_neg_text: bool = False,
        with_neg_image: bool = False,
        transform: Callable | None = None,
        skipped: SkipCounter | None = None,
        shard_sizes: Sequence[int] | None = None,
    ) -> None:
        if not shards:
            raise ValueError("ShardStream needs at least one shard")
        if batch_size < 1 or num_batches < 1:
            raise ValueError(f"ShardStream needs batch_size >= 1 and num_batches >= 1, got {batch_size}, {num_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards, self.batch_size, self.num_batches = list(shards), batch_size, num_batches
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, max(1, shuffle_buffer)
        self.with_neg_text, self.with_neg_image = with_neg_text, with_neg_image
        self.transform = transform
        if shard_sizes is not None and len(shard_sizes) != len(self.shards):
            raise ValueError(f"ShardStream: {len(shard_sizes)} shard sizes for {len(self.shards)} shards")
        self.shard_sizes = list(shard_sizes) if shard_sizes is not None else None
        self.skipped = skipped if skipped is not None else SkipCounter()
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        info = get_worker_info()
        return self.iter_slot(0 if info is None else info.id, 1 if info is None else info.num_workers)

    def batches_of(self, worker: int, num_workers: int) -> int:
        """Batches per epoch of dataloader worker ``worker`` (the rank's ``num_batches`` split over its workers)."""
        return self.num_batches // num_workers + (worker < self.num_batches % num_workers)

    def iter_slot(self, worker: int, num_workers: int) -> Iterator[list[dict[str, Any]]]:
        """The batches of dataloader worker ``worker`` of ``num_workers`` on this rank (``__iter__``
        calls it with the worker info; tests call it directly to simulate workers)."""
        n_batches = self.batches_of(worker, num_workers)
        if n_batches == 0:
            return
        epoch = int(self._epoch[0])
        rng = np.random.default_rng([self.seed, epoch, self.rank * num_workers + worker, 1])
        buffer: list[RawSample] = []
        batch: list[dict[str, Any]] = []
        done, in_pass, good_in_pass = 0, 0, 0
        for raw in self._raw_stream(epoch, worker, num_workers):
            if raw is not None:
                in_pass += 1
                buffer.append(raw)
                if len(buffer) < self.shuffle_buffer:
                    continue
            # a full buffer releases one random sample; the end of a pass (None) drains it, so a pass is read whole before the next
            while buffer:
                k = int(rng.integers(len(buffer)))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                item = self.decode(buffer.pop(), rng)
                if item is not None:
                    good_in_pass += 1
                    batch.append(item)
                    if len(batch) == self.batch_size:
                        yield batch
                        batch, done = [], done + 1
                        if done == n_batches:
                            return
                if raw is not None:
                    break
            if raw is None:
                if good_in_pass == 0:
                    raise RuntimeError(f"ShardStream: rank {self.rank} worker {worker} found no usable sample in a whole pass over its part "
                                       f"of the shards ({in_pass} read, {self.skipped.total()} skipped so far); shards: {self.shards[:3]}")
                in_pass = good_in_pass = 0

    def _raw_stream(self, epoch: int, worker: int, num_workers: int) -> Iterator[RawSample | None]:
        """This (rank, worker) slot's samples, pass after pass (``None`` marks the end of a pass).

        Every pass orders the shards by a permutation of (seed, epoch, pass), the same on every rank.
        With the shard sizes known, the pass's sample sequence is cut into contiguous chunks, one per
        slot, sized in proportion to the slot's batches (each chunk holds at least what its slot
        consumes, so the slots of one epoch read disjoint samples); without, a slot reads whole
        shards (``shards[slot::slots]``) when there are enough, else every ``slots``-th sample.
        """
        slots = self.world_size * num_workers
        slot = self.rank * num_workers + worker
        demand = [self.batches_of(w, num_workers) for _ in range(self.world_size) for w in range(num_workers)]
        p = 0
        while True:
            order = np.random.default_rng([self.seed, epoch, p, 0]).permutation(len(self.shards))
            if self.shard_sizes is not None:
                sizes = np.asarray(self.shard_sizes)[order]
                total, before = int(sizes.sum()), sum(demand[:slot])
                lo, hi = total * before // sum(demand), total * (before + demand[slot]) // sum(demand)
                start = 0
                for s, size in zip(order, sizes):
                    if start < hi and start + size > lo:
                        for raw in iter_tar_samples(self.shards[s], int(s)):
                            if start + raw.position >= hi:
                                break
                            if start + raw.position >= lo:
                                yield raw
                    start += int(size)
            elif len(self.shards) >= slots:
                for s in order[slot::slots]:
                    yield from iter_tar_samples(self.shards[s], int(s))
            else:
                counter = 0
                for s in order:
                    for raw in iter_tar_samples(self.shards[s], int(s)):
                        if counter % slots == slot:
                            yield raw
                        counter += 1
            yield None
            p += 1

    def decode(self, raw: RawSample, rng: np.random.Generator) -> dict[str, Any] | None:
        """The item of ``raw``, or ``None`` (counted in ``skipped``) when it is incomplete or does not decode."""
        problem = raw.problem()
        if problem is None:
            try:
                image = decode_image(raw.image_bytes())
                captions = raw.lines("txt")
                j = int(rng.integers(len(captions)))
                item = {"image": _apply(self.transform, image), "text": captions[j], "index": raw.index}
                negs = raw.lines("neg_caption")
                neg_text = negs[j] if j < len(negs) else (negs[0] if negs else None)
                neg_bytes = raw.neg_image_bytes() if self.with_neg_image and neg_text is not None else None
                neg_image = decode_image(neg_bytes) if neg_bytes is not None else None
                _negative_fields(item, neg_text, neg_image, self.transform, self.with_neg_text, self.with_neg_image)
                return item
            except Exception as err:  # PIL raises several types for truncated/corrupt files
                problem = f"undecodable image: {err}"
        self.skipped.add()
        log.debug("skipped sample %r of shard %s: %s", raw.key, self.shards[raw.shard] if raw.shard < len(self.shards) else "?", problem)
        return None


class _EpochSignal(Sampler):
    """The sampler of a ``ShardStream`` loader: infinite (the stream decides when an epoch ends) and
    forwarding Lightning's ``set_epoch`` call to the stream."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[None]:
        while True:
            yield None

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)


def stream_loader(stream: ShardStream, collate_fn: Callable | None, **kwargs) -> DataLoader:
    """A ``DataLoader`` over a ``ShardStream`` (it yields whole batches) whose sampler receives ``set_epoch``."""
    loader = DataLoader(stream, batch_size=None, collate_fn=collate_fn, **kwargs)
    # DataLoader refuses a sampler for an IterableDataset; the signal replaces its constant one after init.
    object.__setattr__(loader, "sampler", _EpochSignal(stream))
    return loader


# ------------------------------------------------------------------------------- evaluation
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


# ------------------------------------------------------------------------------- input pipeline
class ImageTextCollate:
    """Collate image-text items: ``text``/``neg_text`` tokenized as one batch each with ``tokenizer``
    (``list[str] -> LongTensor [B, L]``), the rest default-collated."""

    text_fields = ("text", "neg_text")

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        out = self.tokenizer(texts)
        if isinstance(out, Mapping):
            raise TypeError(f"image-text tokenizer {self.tokenizer!r} returned a mapping ({sorted(out)}); the CLIP contract is a callable "
                            f"list[str] -> LongTensor [B, L] (open_clip's tokenizer), e.g. lambda t: hf(t, ...)['input_ids']")
        out = torch.as_tensor(out)
        if out.ndim != 2 or out.shape[0] != len(texts):
            raise ValueError(f"image-text tokenizer {self.tokenizer!r} returned shape {tuple(out.shape)} for {len(texts)} texts; expected [B, L]")
        return out.long()

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in self.text_fields:
            if key in items[0]:
                batch[key] = self.tokenize([item[key] for item in items])
        rest = [{k: v for k, v in item.items() if k not in self.text_fields} for item in items]
        batch.update(default_collate(rest))
        if "has_neg" in batch:
            batch["has_neg"] = batch["has_neg"].bool()
        return batch


class ImageTextInputs(ImageInputs):
    """Image transforms from ``data_config`` and a tokenizing collate (the CLIP regime).

    Train images: RandomResizedCrop over ``train_scale`` without horizontal flip (a flip would
    contradict "to the left of" captions); eval: resize + centre crop.

    Args:
        image_size: override the encoder's input height/width.
        train_scale: RandomResizedCrop scale range (open_clip's default ``(0.9, 1.0)``).
        augment: False trains on the evaluation transform.
    """

    def __init__(self, image_size: int | None = None, train_scale: tuple[float, float] = (0.9, 1.0), augment: bool = True) -> None:
        super().__init__(image_size, train_scale, augment)

    def apply(self, datamodule: Any, data_config: dict[str, Any]) -> None:
        from datamodules.transforms import build_eval_transform, build_train_transform

        eval_tf = build_eval_transform(data_config)
        if datamodule.train_dataset is not None:
            datamodule.train_dataset.transform = build_train_transform(data_config, scale=self.train_scale, hflip=0.0) if self.augment else eval_tf
        for ds in {id(d): d for d in datamodule.eval_datasets()}.values():
            ds.transform = eval_tf

    def collate_fn(self, data_config: dict[str, Any]) -> Callable:
        tokenizer = data_config.get("tokenizer")
        if tokenizer is None or not callable(tokenizer) or isinstance(tokenizer, str):
            raise ValueError(
                f"ImageTextInputs: data_config tokenizer is {tokenizer!r}; the CLIP regime needs a callable list[str] -> LongTensor [B, L] "
                f"(OpenCLIPEncoder's data_config has one), or set data.init_args.data_config.tokenizer"
            )
        return ImageTextCollate(tokenizer)


# ------------------------------------------------------------------------------- DataModule
class ImageTextDataModule(RetrievalDataModule):
    """Image-caption pairs from CSV/TSV files or webdataset tar shards (see the module docstring).

    Args:
        train: a CSV/TSV path, a shard pattern, or a list of either kind.
        val, test: the evaluation splits, same forms (read map-style at setup); ``val=None``
            validates on the test split.
        image_root: the folder CSV image paths are relative to (default: each CSV's folder).
        batch_size: train items per batch per rank.
        num_batches: train batches per epoch per rank (shards and CSV); default: the sample total
            (CSV rows; shards: counted from their headers at setup, or ``num_samples``) divided by
            the global batch ``batch_size * world_size``, at least 1.
        num_samples: declare the shard sample total instead of counting it (large remote corpora).
        shuffle_buffer: samples per dataloader worker held to shuffle a shard stream.
        zero_shot: ``"fashion_mnist"`` (the Fashion-MNIST test images and class names, offline) or
            a CSV/TSV ``image,label`` path with ``class_names``; ``None``: no zero-shot loader.
        class_names: the zero-shot class names (a CSV's labels index them).
        zero_shot_templates: prompts, ``{}`` the class name (default: "a photo of a {}." ...).
        zero_shot_size: Fashion-MNIST zero-shot images (a class-stratified subset; ``None``: all).
        fashion_mnist_root: the Fashion-MNIST idx folder (zero-shot ``"fashion_mnist"``).
        image_size, train_scale, augment: see ``ImageTextInputs``.
        **kwargs: see ``RetrievalDataModule`` (``eval_batch_size``, ``num_workers``, ``seed``,
            ``data_config``, ``recall_ks``, ``verify``; ``batch_sampler`` replaces the shuffled
            batches of a CSV train set: its labels are the distinct-image ids).
    """

    eval_protocol = "image_text"
    item_noun = "images"
    default_recall_ks = (1, 5, 10)

    def __init__(
        self,
        train: str | list[str],
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        image_root: str | None = None,
        batch_size: int = 64,
        num_batches: int | None = None,
        num_samples: int | None = None,
        shuffle_buffer: int = 1000,
        zero_shot: str | None = None,
        class_names: list[str] | None = None,
        zero_shot_templates: list[str] | None = None,
        zero_shot_size: int | None = 1000,
        fashion_mnist_root: str = DEBIAN_ROOT,
        image_size: int | None = None,
        train_scale: tuple[float, float] = (0.9, 1.0),
        augment: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(num_batches=num_batches, **kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train, self.val, self.test = train, val, test
        self.train_kind = source_kind(train, "train")
        for name, spec in (("val", val), ("test", test)):
            if spec is not None:
                source_kind(spec, name)
        self.image_root, self.batch_size, self.num_samples, self.shuffle_buffer = image_root, batch_size, num_samples, shuffle_buffer
        self.image_size, self.train_scale, self.augment = image_size, tuple(train_scale), augment
        self.zero_shot, self.zero_shot_size, self.fashion_mnist_root = zero_shot, zero_shot_size, fashion_mnist_root
        if zero_shot == "fashion_mnist":
            from datamodules.fashion_scenes import CLASS_NAMES, ZERO_SHOT_TEMPLATES

            self.zero_shot_classes: list[str] | None = list(class_names) if class_names is not None else list(CLASS_NAMES)
            default_templates = list(ZERO_SHOT_TEMPLATES)
        elif zero_shot is not None:
            if not class_names:
                raise ValueError(f"zero_shot={zero_shot!r} (a CSV) needs class_names: the names its labels index")
            self.zero_shot_classes, default_templates = list(class_names), ["a photo of a {}."]
        else:
            self.zero_shot_classes, default_templates = None, ["a photo of a {}."]
        self.zero_shot_templates: list[str] = list(zero_shot_templates) if zero_shot_templates is not None else default_templates
        bad = [t for t in self.zero_shot_templates if "{}" not in t]
        if bad:
            raise ValueError(f"zero_shot_templates {bad} lack the '{{}}' where the class name goes")
        self.zero_shot_dataset: ZeroShotImages | None = None
        self.train_scan: ShardScan | None = None
        self.train_shards: list[str] | None = None
        self._train_skipped = SkipCounter()

    # -------------------------------------------------------------------------------- datasets
    def build_datasets(self) -> None:
        if self.train_kind == "csv":
            table = CaptionTable()
            for path in [self.train] if isinstance(self.train, (str, Path)) else self.train:
                table.extend(read_caption_csv(path, self.image_root))
            self.train_dataset = CaptionPairDataset(table)
        else:
            self.train_shards = expand_shards(self.train, "train")
            self.train_scan = scan_shards(self.train_shards) if self.num_samples is None else scan_shards(self.train_shards[:1])
            total = self.num_samples if self.num_samples is not None else self.train_scan.samples
            if total < 1:
                raise ValueError(f"train shards {self.train_shards[:3]}... hold no complete sample (image + .txt); "
                                 f"{self.train_scan.incomplete} incomplete")
            # Placeholder until train_dataloader() knows the rank: setup() needs a dataset to give its transform.
            self.train_dataset = self._make_stream(0, 1)
        self.test_dataset = self._read_eval(self.test, "test") if self.test is not None else None
        self.val_dataset = self._read_eval(self.val, "val") if self.val is not None else None
        if self.zero_shot == "fashion_mnist":
            self.zero_shot_dataset = fashion_mnist_zero_shot(self.fashion_mnist_root, self.zero_shot_size, self.seed)
        elif self.zero_shot is not None:
            self.zero_shot_dataset = read_zero_shot_csv(self.zero_shot, self.zero_shot_classes, self.image_root)

    def _read_eval(self, spec: str | list[str], name: str) -> ImageTextEvalSet:
        if source_kind(spec, name) == "csv":
            table = CaptionTable()
            for path in [spec] if isinstance(spec, (str, Path)) else spec:
                table.extend(read_caption_csv(path, self.image_root))
            return ImageTextEvalSet.from_table(table, name)
        return ImageTextEvalSet.from_shards(expand_shards(spec, name), name)

    def _check_protocol(self) -> None:
        if self.eval_protocol != "image_text":
            raise ValueError(f"{type(self).__name__}.eval_protocol is {self.eval_protocol!r}; expected 'image_text'")

    def prepare_splits(self) -> None:
        if self.train_dataset is None:
            self.zero_shot_dataset = None
        super().prepare_splits()

    def input_pipeline(self, data_config: dict[str, Any] | None = None) -> InputPipeline:
        if self.inputs is not None:
            return self.inputs
        return ImageTextInputs(image_size=self.image_size, train_scale=self.train_scale, augment=self.augment)

    def eval_datasets(self) -> list[Dataset]:
        """The datasets that take the evaluation transform: every evaluation split's images, the zero-shot images."""
        out: list[Dataset] = [s.images for s in (self.val_dataset, self.test_dataset) if s is not None]
        return out + ([self.zero_shot_dataset] if self.zero_shot_dataset is not None else [])

    def verify_images(self, num_threads: int = 8) -> None:
        """``verify=True``: decode every CSV image (an ``OSError`` names the unreadable ones); shard samples
        are decoded when read (evaluation: at setup; training: corrupt ones are skipped and counted)."""
        if hasattr(self.train_dataset, "verify"):
            self.train_dataset.verify(num_threads)
        for split in {id(s): s for s in (self.val_dataset, self.test_dataset) if s is not None}.values():
            for i in range(len(split.images)):
                split.images[i]

    def pk_settings(self) -> dict[str, Any] | None:
        return None  # image-text batches are not P x K

    # ------------------------------------------------------------------------------ train data
    def _make_stream(self, rank: int, world: int) -> ShardStream:
        total = self.num_samples if self.num_samples is not None else self.train_scan.samples
        num_batches = self.num_batches if self.num_batches is not None else max(1, total // (self.batch_size * world))
        return ShardStream(
            self.train_shards, self.batch_size, num_batches, rank=rank, world_size=world, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
            with_neg_text=self.train_scan.with_neg_text > 0, with_neg_image=self.train_scan.with_neg_image > 0,
            transform=getattr(self.train_dataset, "transform", None), skipped=self._train_skipped,
            shard_sizes=self.train_scan.raw_per_shard if self.num_samples is None else None,
        )

    def train_sampler(self) -> Sampler[list[int]]:
        """The batch sampler of a CSV train set: shuffled batches (``datamodules.samplers.RandomBatchSampler``:
        a per-epoch permutation cut into global batches, rank ``r`` the ``r``-th slice), or the ``batch_sampler`` factory's."""
        rank, world = self._rank_world()
        if self.batch_sampler is not None:
            return self.batch_sampler(self.train_dataset.labels, rank=rank, world_size=world, seed=self.seed)
        return RandomBatchSampler(len(self.train_dataset), self.batch_size, rank=rank, world_size=world, seed=self.seed, num_batches=self.num_batches)

    def train_dataloader(self) -> DataLoader:
        if self.train_kind == "csv":
            return DataLoader(self.train_dataset, batch_sampler=self.train_sampler(), collate_fn=self.collate_fn, **self._loader_kwargs())
        rank, world = self._rank_world()
        self.train_dataset = self._make_stream(rank, world)
        return stream_loader(self.train_dataset, self.collate_fn, **self._loader_kwargs())

    # ----------------------------------------------------------------------------- evaluation
    def _eval_split(self, stage: str) -> ImageTextEvalSet:
        split = self.test_dataset if stage == "test" else (self.val_dataset or self.test_dataset)
        if split is None:
            raise ValueError(f"{type(self).__name__}: no evaluation data for stage {stage!r}; give test= (and optionally val=)")
        return split

    def eval_loaders(self, stage: str) -> list[DataLoader]:
        """``[images, captions]`` (+ ``zero_shot``) loaders of the split of ``stage``."""
        split = self._eval_split(stage)
        loaders = [self.eval_dataloader(split.images), self.eval_dataloader(split.captions)]
        if self.zero_shot_dataset is not None:
            loaders.append(self.eval_dataloader(self.zero_shot_dataset))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self.eval_loaders("validate") if (self.val_dataset or self.test_dataset) is not None else []

    def test_dataloader(self) -> list[DataLoader]:
        return self.eval_loaders("test")

    def text_to_image(self, stage: str) -> torch.Tensor:
        """``[T]`` long: the image row of every caption row of the split of ``stage`` ("validate"/"val" or "test")."""
        return torch.as_tensor(self._eval_split(stage).text_to_image, dtype=torch.long)

    # ------------------------------------------------------------------------------- reporting
    def skipped_samples(self) -> dict[str, int]:
        """Samples skipped per split: ``train`` counts every skipped read of a shard sample during training on
        this rank (a corrupt sample read in two passes counts twice; a CSV train set never skips: an
        unreadable file raises naming it); ``val``/``test`` the shard samples dropped at setup."""
        out = {"train": self._train_skipped.total()}
        for name in ("val", "test"):
            split = getattr(self, f"{name}_dataset")
            if split is not None and not (name == "val" and split is self.test_dataset):
                out[name] = split.skipped
        return out

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            counts = self.skipped_samples()
            rank = self._rank_world()[0]
            message = f"{type(self).__name__} (rank {rank}): skipped samples per split: {counts}"
            if any(counts.values()):
                warnings.warn(message + " (corrupt or incomplete; see the DEBUG log of datamodules.image_text for which)", stacklevel=2)
                log.warning(message)
            else:
                log.info(message)

    def split_sizes(self) -> dict[str, dict[str, int]]:
        """Images and captions per split (train shards: complete samples counted from the headers)."""
        out: dict[str, dict[str, int]] = {}
        if isinstance(self.train_dataset, CaptionPairDataset):
            out["train"] = {"images": int(len(np.unique(self.train_dataset.labels))), "captions": len(self.train_dataset)}
        elif self.train_scan is not None:
            n = self.num_samples if self.num_samples is not None else self.train_scan.samples
            out["train"] = {"images": int(n), "captions": int(n)}
        for name in ("val", "test"):
            split = getattr(self, f"{name}_dataset")
            if split is not None and not (name == "val" and split is self.test_dataset):
                out[name] = {"images": len(split.images), "captions": len(split.captions)}
        if self.zero_shot_dataset is not None:
            out["zero_shot"] = {"images": len(self.zero_shot_dataset), "classes": len(self.zero_shot_classes)}
        return out

    def data_summary(self) -> str:
        """What ``hardneg data check`` prints beyond the split sizes: captions per image, negatives, skipped samples."""
        lines = []
        if isinstance(self.train_dataset, CaptionPairDataset):
            t = self.train_dataset.table
            lines.append(f"train: {len(t)} pairs from CSV, negatives: {sum(c is not None for c in t.neg_captions)} captions, "
                         f"{sum(p is not None for p in t.neg_images)} images")
        elif self.train_scan is not None:
            s = self.train_scan
            counted = "declared" if self.num_samples is not None else "counted"
            lines.append(f"train: {len(self.train_shards)} shards, {self.num_samples or s.samples} samples ({counted}), "
                         f"{s.incomplete} incomplete (no image or caption){' in the first shard' if self.num_samples else ''}, "
                         f"negatives: {s.with_neg_text} captions, {s.with_neg_image} images")
        for name in ("val", "test"):
            split = getattr(self, f"{name}_dataset")
            if split is None or (name == "val" and split is self.test_dataset):
                continue
            per = np.bincount(split.text_to_image, minlength=len(split.images))
            negs = sum(n is not None for n in split.neg_captions) if split.neg_captions is not None else 0
            lines.append(f"{name}: {len(split.images)} images, {len(split.captions)} captions ({per.min()}-{per.max()} per image, "
                         f"mean {per.mean():.2f}), negatives: {negs} captions, skipped: {split.skipped}")
        if self.zero_shot_classes is not None:
            lines.append(f"zero-shot: {len(self.zero_shot_classes)} classes, templates {self.zero_shot_templates}")
        return "\n".join(lines)


class FashionScenesDataModule(ImageTextDataModule):
    """The offline image-text benchmark: Fashion-MNIST scenes (``datamodules.fashion_scenes``) written
    once under ``root`` by ``prepare_data`` (rank 0; every later run and rank reads the files), then
    read like any image-text data: training from the webdataset shards (or the CSV), evaluation on
    the held-out scenes (several captions per image) and zero-shot on the Fashion-MNIST test images.

    Args:
        root: where the scenes are written (reused when its manifest matches the parameters).
        n_train, n_test, scene_seed, shard_size, with_negatives, captions_per_test_image, scene_size:
            ``generate_scenes`` parameters (``scene_seed`` fixes the data, independent of ``seed``).
        train_format: "shards" (webdataset tar files) or "csv".
        zero_shot: "fashion_mnist" (default: the Fashion-MNIST test images, class-name prompts) or None.
        **kwargs: see ``ImageTextDataModule`` (``batch_size``, ``num_batches``, ``image_size`` ...).
    """

    def __init__(
        self,
        root: str = "data/fashion_scenes",
        n_train: int = 10_000,
        n_test: int = 1_000,
        scene_seed: int = 0,
        shard_size: int = 1_000,
        with_negatives: bool = False,
        captions_per_test_image: int = 3,
        scene_size: int = 64,
        train_format: str = "shards",
        zero_shot: str | None = "fashion_mnist",
        **kwargs,
    ) -> None:
        from datamodules.fashion_scenes import shard_pattern

        if train_format not in ("shards", "csv"):
            raise ValueError(f"train_format={train_format!r}; expected 'shards' or 'csv'")
        self.scene_args = dict(n_train=n_train, n_test=n_test, seed=scene_seed, shard_size=shard_size, with_negatives=with_negatives,
                               captions_per_test_image=captions_per_test_image, image_size=scene_size)
        self.root = Path(root)
        count = -(-n_train // shard_size)
        train = shard_pattern(self.root, "train", count) if train_format == "shards" else str(self.root / "train.csv")
        super().__init__(train=train, test=str(self.root / "test.csv"), zero_shot=zero_shot, **kwargs)

    def generate(self):
        from datamodules.fashion_scenes import generate_scenes

        return generate_scenes(self.root, fashion_mnist_root=self.fashion_mnist_root, **self.scene_args)

    def prepare_data(self) -> None:
        self.generate()

    def build_datasets(self) -> None:
        paths = self.generate()  # returns at once when prepare_data wrote them (or `hardneg data check` runs alone)
        if self.train_kind == "shards" and self.train != paths.train_shards:
            raise RuntimeError(f"FashionScenesDataModule: generated shards {paths.train_shards} differ from the expected {self.train}")
        super().build_datasets()
