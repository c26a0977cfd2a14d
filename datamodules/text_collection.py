"""A large ``id<TAB>text`` file read lazily: ``LazyTextCollection`` (the MS MARCO passage collection, its query files).

MS MARCO's ``collection.tsv`` has 8,841,823 passages (about 3 GB). Holding it as Python strings
costs several GB per process, and every DataLoader worker would copy it. Instead, one pass over the
file builds two numpy arrays, the byte offset of every line and its integer id, and a passage is
read when asked for (``os.pread`` of its bytes, decoded then). The arrays take 16 bytes per line
(141 MB for MS MARCO) and are cached beside the file, so the pass runs once per file.

Design:

- The pass reads the file in binary blocks (``datamodules.tsv_blocks``) and finds newlines, tabs and
  the digits of the id with vectorised numpy, never splitting lines into Python objects (``benchmarks/text_collection.py``
  measures it; ``docs/msmarco.md`` has the numbers).
- The cache ``<file>.hardneg-index.npz`` records the file's size and modification time, the column
  choice and a format version; a mismatch on any of them rebuilds it. It is written to a temporary
  file and renamed (``os.replace``), so a reader never sees half a cache and two processes building
  it at once (DDP ranks) both end with a valid one. When the file's folder is not writable the cache
  goes to ``cache_dir`` (default ``$HARDNEG_CACHE`` or ``~/.cache/hardneg/text_index``), with a warning.
- ``row_of(ids)`` is vectorised: a binary search (``np.searchsorted``) over the sorted ids, or an
  offset when the ids are consecutive (``collection.tsv``: 0 .. 8,841,822), never a Python dict.
- The file descriptor is opened on first use in each process and re-opened when ``os.getpid()``
  changes, so DataLoader workers (forked or spawned) each read through their own descriptor.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.metadata import DatasetFormatError
from datamodules.tsv_blocks import BLOCK_BYTES, iter_line_blocks, parse_int_fields

FORMAT_VERSION = 1
CACHE_SUFFIX = ".hardneg-index.npz"


def default_cache_dir() -> Path:
    """Where indexes go when a data folder is read-only: ``$HARDNEG_CACHE/text_index`` or ``~/.cache/hardneg/text_index``."""
    base = os.environ.get("HARDNEG_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "hardneg") / "text_index"


def _show(line: bytes, limit: int = 80) -> str:
    text = line.decode("utf-8", errors="replace").rstrip("\r\n")
    return repr(text if len(text) <= limit else text[:limit] + "...")


class LazyTextCollection(Sequence):
    """The texts of a TSV file by row, read from disk on access; integer ids by row, mapped back with ``row_of``.

    Row ``i`` is line ``i + 1`` of the file (no header; every line has a text). A field is the text
    between tabs; the text column, when it is the last column asked for, runs to the end of the line
    (so a tab inside a passage stays in it). Texts are decoded as UTF-8 (undecodable bytes replaced).

    Args:
        path: the TSV file (uncompressed: reading a line needs its byte offset).
        id_column: the column of the integer id (0-based); ``None``: the file has no ids (``ids`` are
            the row numbers, e.g. the text triples of MS MARCO).
        text_column: the column of the text.
        cache_dir: where to keep the index; default: beside the file, or ``default_cache_dir()``
            when that folder is read-only.
        name: what the file is, for messages (e.g. "MS MARCO passage collection").

    Raises:
        FileNotFoundError: no such file.
        DatasetFormatError: a line without enough tab-separated fields, an empty or non-integer
            id, or an id that repeats; the message names the file and line.
    """

    def __init__(self, path: str | os.PathLike, id_column: int | None = 0, text_column: int = 1, cache_dir: str | os.PathLike | None = None,
                 name: str = "text collection") -> None:
        self.path = Path(path).expanduser()
        if (id_column is not None and id_column < 0) or text_column < 0 or id_column == text_column:
            raise ValueError(f"LazyTextCollection({self.path}): id_column={id_column} and text_column={text_column} must be distinct and >= 0")
        if not self.path.is_file():
            raise FileNotFoundError(f"{name} {self.path} does not exist")
        if self.path.suffix in (".gz", ".bz2", ".xz", ".zip"):
            raise ValueError(f"{name} {self.path} is compressed; LazyTextCollection reads lines by byte offset: decompress it first")
        self.id_column, self.text_column, self.name = id_column, text_column, name
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._fd: int | None = None
        self._pid: int | None = None
        self._sorted_ids: np.ndarray | None = None
        self.index_source = ""  # "built" or "cache", and the cache path: for benchmarks and messages
        self.offsets, self.ids, self.order = self._load_or_build()

    # ------------------------------------------------------------------------------- sequence
    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        row = int(row)
        n = len(self)
        if row < 0:
            row += n
        if not 0 <= row < n:
            raise IndexError(f"row {row} out of range for {self.name} {self.path} ({n} rows)")
        line = self.line_bytes(row)
        last = self.id_column is None or self.text_column > self.id_column
        fields = line.split(b"\t", self.text_column) if last else line.split(b"\t")
        if len(fields) <= self.text_column:
            raise DatasetFormatError(f"{self.path} line {row + 1}: no text column {self.text_column}; got {_show(line)}")
        return fields[self.text_column].decode("utf-8", errors="replace")

    def line_bytes(self, row: int) -> bytes:
        """The raw bytes of row ``row`` (without the line break)."""
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        data = os.pread(self._descriptor(), end - start, start)
        if len(data) != end - start:
            raise OSError(f"{self.path} changed while in use: read {len(data)} of {end - start} bytes of line {row + 1}; delete its index and reload")
        return data.rstrip(b"\r\n")

    def fields(self, row: int) -> list[str]:
        """All tab-separated fields of row ``row``, decoded."""
        return self.line_bytes(int(row)).decode("utf-8", errors="replace").split("\t")

    def _descriptor(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            # A forked worker inherits the parent's descriptor number; it opens its own instead.
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), pid
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError, TypeError):  # at interpreter exit, os may be half torn down
            self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        state["_sorted_ids"] = None
        return state

    def __repr__(self) -> str:
        return f"LazyTextCollection({str(self.path)!r}, rows={len(self)})"

    # ------------------------------------------------------------------------------------ ids
    def row_of(self, ids):
        """Rows of the given ids (an int or an array-like of ints; returns the same shape, int64).

        Raises ``KeyError`` naming the first unknown id, how many are unknown, and the file.
        """
        if self.ids is None:
            raise TypeError(f"{self.name} {self.path} has no id column (id_column=None): its rows have no ids to look up")
        query = np.asarray(ids)
        if query.dtype.kind not in "iu":
            if query.size == 0:
                query = query.astype(np.int64)
            else:
                raise TypeError(f"row_of expects integer ids, got {query.dtype} ({self.name} {self.path})")
        flat = query.astype(np.int64, copy=False).reshape(-1)
        n = len(self.ids)
        if n == 0:
            rows, found = np.zeros(len(flat), dtype=np.int64), np.zeros(len(flat), dtype=bool)
        elif self.order is None:  # ids ascending
            if int(self.ids[-1]) - int(self.ids[0]) == n - 1:  # consecutive: an offset
                rows = flat - self.ids[0]
                found = (rows >= 0) & (rows < n)
            else:
                rows = np.searchsorted(self.ids, flat)
                found = rows < n
                found[found] = self.ids[rows[found]] == flat[found]
        else:
            if self._sorted_ids is None:
                self._sorted_ids = self.ids[self.order]
            pos = np.searchsorted(self._sorted_ids, flat)
            found = pos < n
            found[found] = self._sorted_ids[pos[found]] == flat[found]
            rows = np.where(found, self.order[np.minimum(pos, n - 1)], -1)
        if not found.all():
            missing = flat[~found]
            raise KeyError(f"id {int(missing[0])} is not in {self.name} {self.path}"
                           + (f" ({len(missing)} of the {len(flat)} ids asked for are not)" if len(missing) > 1 else ""))
        rows = rows.astype(np.int64, copy=False)
        return int(rows[0]) if query.ndim == 0 else rows.reshape(query.shape)

    def __contains__(self, item) -> bool:  # an id, like a dict's keys (Sequence's default would scan the texts)
        try:
            self.row_of(int(item))
        except (KeyError, TypeError, ValueError):
            return False
        return True

    # --------------------------------------------------------------------------------- index
    def cache_path(self) -> Path:
        """The index file beside the data file (``<file>.hardneg-index.npz``), or in ``cache_dir`` when one is set."""
        if self.cache_dir is None:
            return self.path.with_name(self.path.name + CACHE_SUFFIX)
        return self._fallback_cache_path(self.cache_dir)

    def _fallback_cache_path(self, folder: Path) -> Path:
        digest = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:12]
        return folder / f"{self.path.name}.{digest}{CACHE_SUFFIX}"

    def _signature(self) -> np.ndarray:
        st = os.stat(self.path)
        id_column = -1 if self.id_column is None else self.id_column
        return np.array([FORMAT_VERSION, st.st_size, st.st_mtime_ns, id_column, self.text_column], dtype=np.int64)

    def _load_or_build(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        signature = self._signature()
        candidates = [self.cache_path()]
        if self.cache_dir is None:
            candidates.append(self._fallback_cache_path(default_cache_dir()))
        for candidate in candidates:
            loaded = self._read_cache(candidate, signature)
            if loaded is not None:
                self.index_source = f"cache {candidate}"
                return loaded
        offsets, ids, order = self.build_index()
        self._write_cache(candidates, signature, offsets, ids, order)
        return offsets, ids, order

    @staticmethod
    def _read_cache(path: Path, signature: np.ndarray):
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if not np.array_equal(data["signature"], signature):
                    return None
                order = data["order"]
                ids = data["ids"] if signature[3] >= 0 else None
                return data["offsets"], ids, (order if len(order) else None)
        except (OSError, ValueError, KeyError, EOFError):  # unreadable or truncated by hand: rebuild
            return None

    def _write_cache(self, candidates: list[Path], signature, offsets, ids, order) -> None:
        arrays = {"signature": signature, "offsets": offsets, "ids": ids if ids is not None else np.zeros(0, np.int64), "order": order if order is not None else np.zeros(0, np.int64)}
        for i, target in enumerate(candidates):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
            except OSError:
                continue
            try:
                with os.fdopen(fd, "wb") as f:
                    np.savez(f, **arrays)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.index_source = f"built, cached in {target}"
            if i > 0:
                warnings.warn(f"{self.path.parent} is not writable: the index of {self.path} is cached in {target}", stacklevel=3)
            return
        self.index_source = "built, not cached"
        warnings.warn(f"could not write the index of {self.path} to any of {[str(c) for c in candidates]}; it will be rebuilt next time",
                      stacklevel=3)

    def build_index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One pass over the file: ``(offsets int64 [N + 1], ids int64 [N], order)`` where ``order`` sorts
        the ids (``None`` when they already ascend). Errors name the file and line."""
        need_tabs = max(self.id_column or 0, self.text_column)
        offsets_parts, id_parts = [], []
        for lines in iter_line_blocks(self.path, BLOCK_BYTES):
            ids = self._parse_block(lines.block, lines.buf[:lines.used], lines.starts, lines.ends, need_tabs, lines.lines_before)
            offsets_parts.append(lines.starts + lines.file_pos)
            id_parts.append(ids)
        size = os.path.getsize(self.path)
        offsets = np.concatenate([*offsets_parts, np.array([size], dtype=np.int64)]) if offsets_parts else np.array([size], dtype=np.int64)
        ids = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype=np.int64)
        order = None
        if self.id_column is None:
            return offsets, None, None
        if len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            order = np.argsort(ids, kind="stable")
            sorted_ids = ids[order]
            dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
            if len(dup):
                first, again = sorted((int(order[dup[0]]), int(order[dup[0] + 1])))
                raise DatasetFormatError(f"{self.path} line {again + 1}: id {int(ids[again])} repeats line {first + 1}; expected each id once")
        return offsets, ids, order

    def _parse_block(self, block: bytes, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, need_tabs: int, line_base: int) -> np.ndarray:
        tabs = np.flatnonzero(buf == 9).astype(np.int64)
        first_tab = np.searchsorted(tabs, starts)
        n_tabs = np.searchsorted(tabs, ends) - first_tab
        short = np.flatnonzero(n_tabs < need_tabs)
        if len(short):
            i = int(short[0])
            line = block[starts[i]:ends[i]]
            what = "an empty line" if ends[i] == starts[i] else _show(line)
            raise DatasetFormatError(f"{self.path} line {line_base + i + 1}: expected {need_tabs + 1} tab-separated fields "
                                     f"(id in column {self.id_column}, text in column {self.text_column}), got {what}")
        if self.id_column is None:
            return np.zeros(0, dtype=np.int64)
        c = self.id_column
        field_start = starts if c == 0 else tabs[first_tab + c - 1] + 1
        has_end = first_tab + c < np.searchsorted(tabs, ends)
        field_end = np.where(has_end, tabs[np.minimum(first_tab + c, max(len(tabs) - 1, 0))] if len(tabs) else ends, ends)
        ids, bad = parse_int_fields(buf, field_start, field_end)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            field = block[field_start[i]:field_end[i]]
            what = "an empty id" if not field.strip() else f"the id {field.decode('utf-8', errors='replace')!r}"
            raise DatasetFormatError(f"{self.path} line {line_base + i + 1}: expected an integer id in column {c}, got {what} "
                                     f"in {_show(block[starts[i]:ends[i]])}")
        return ids


class IdStrings(Sequence):
    """Integer ids shown as the strings the data files write (``QueryDocData.doc_ids``/``query_ids``), without a list of strings."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = np.asarray(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [str(int(v)) for v in self.ids[i]]
        return str(int(self.ids[i]))
