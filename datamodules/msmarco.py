"""MS MARCO passage ranking read from its official files: the readers and ``MSMARCOPassageDataModule``.

MS MARCO (Bajaj et al., "MS MARCO: A Human Generated MAchine Reading COmprehension Dataset", 2016;
the passage ranking task of Nguyen et al. / the TREC Deep Learning track) has 8,841,823 passages,
808,731 train queries (502,939 with a relevant passage in ``qrels.train.tsv``) and the 6,980
queries of ``queries.dev.small.tsv``, on which systems report MRR@10 over the full collection.

Readers (each names the file and line of a malformed line):

- ``read_queries``: ``qid<TAB>text`` -> a ``LazyTextCollection`` (texts stay on disk);
- ``read_qrels``: TREC qrels ``qid 0 pid rel`` (tab or space separated; ``rel > 0`` counts) ->
  ``{qid: [pid, ...]}``;
- ``read_text_triples``: ``triples.train.small.tsv`` (query, positive, negative texts) -> a lazy
  table of text triples;
- ``read_qidpidtriples``: ``qidpidtriples.train.full.2.tsv`` (``qid<TAB>pos pid<TAB>neg pid``) ->
  per qid its negative pids (``IdLists``), parsed vectorised in blocks (the file has about 400M lines);
- ``read_st_hard_negatives``: the sentence-transformers hard-negative JSONL
  (``{"qid", "pos": [pids], "neg": {system: [pids]}}``, ``.jsonl`` or ``.jsonl.gz``);
- ``read_tevatron``: Tevatron's training JSONL (``{"query_id", "query", "positive_passages",
  "negative_passages"}`` with ``{"docid", "title", "text"}`` passages), gz or not.

Per-query id lists are held as ``IdLists`` (keys, offsets and one flat int64 array) rather than a
dict of Python lists: the hard-negative files list hundreds of millions of pids, which as Python
ints would take tens of GB.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from datamodules.metadata import DatasetFormatError, require_dir
from datamodules.query_doc import QueryDocData, QueryDocDataModule, QueryDocSplit, RowView
from datamodules.text_collection import BLOCK_BYTES, CACHE_SUFFIX, IdStrings, LazyTextCollection, parse_int_fields

NAME = "MS MARCO passage"
FILES = {
    "collection": "collection.tsv",
    "queries.train": "queries.train.tsv",
    "qrels.train": "qrels.train.tsv",
    "queries.dev.small": "queries.dev.small.tsv",
    "qrels.dev.small": "qrels.dev.small.tsv",
    "qidpidtriples": "qidpidtriples.train.full.2.tsv",
    "triples": "triples.train.small.tsv",
    "st_jsonl": "msmarco-hard-negatives.jsonl.gz",
    "tevatron": "train.jsonl.gz",
}
EXPECTED = (
    "the MS MARCO passage ranking files in one folder: collection.tsv (from collection.tar.gz), queries.train.tsv, "
    "queries.dev.small.tsv (from queries.tar.gz, or collectionandqueries.tar.gz), qrels.train.tsv, qrels.dev.small.tsv; "
    "for training negatives one of qidpidtriples.train.full.2.tsv, triples.train.small.tsv, "
    "msmarco-hard-negatives.jsonl.gz (sentence-transformers) or a Tevatron train.jsonl(.gz)"
)


# ------------------------------------------------------------------------------------- id lists
class IdLists(Mapping):
    """Per key (a query id, or a query row), a list of integer ids, stored flat: ``keys`` ascending,
    ``values[offsets[i]:offsets[i + 1]]`` the list of ``keys[i]``, in the order the file gave them.

    A read-only mapping ``key -> np.ndarray[int64]``; ``lengths()`` gives every list's size at once.
    """

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, values: np.ndarray) -> None:
        self.keys_array = np.asarray(keys, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.int64)
        if len(self.offsets) != len(self.keys_array) + 1:
            raise ValueError(f"IdLists: {len(self.offsets)} offsets for {len(self.keys_array)} keys; expected keys + 1")

    @classmethod
    def from_segments(cls, keys: Iterable[int] | np.ndarray, lengths: Iterable[int] | np.ndarray, values: Iterable[int] | np.ndarray) -> IdLists:
        """Lists given one after another: ``keys[i]`` owns the next ``lengths[i]`` values. A key given
        twice gets its lists joined (in file order, without repeats)."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.int64).reshape(-1)
        if len(keys) != len(lengths) or int(lengths.sum()) != len(values):
            raise ValueError(f"IdLists.from_segments: {len(keys)} keys, {len(lengths)} lengths summing to {int(lengths.sum())}, {len(values)} values")
        order = np.argsort(keys, kind="stable")
        if len(keys) > 1 and bool(np.any(keys[order][1:] == keys[order][:-1])):
            return cls.from_pairs(np.repeat(keys, lengths), values)
        starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
        new_lengths = lengths[order]
        offsets = np.concatenate([[0], np.cumsum(new_lengths)]).astype(np.int64)
        # gather: element j of sorted segment i comes from starts[order[i]] + j
        gather = np.repeat(starts[order] - offsets[:-1], new_lengths) + np.arange(offsets[-1], dtype=np.int64)
        return cls(keys[order], offsets, values[gather])

    @classmethod
    def from_pairs(cls, keys: np.ndarray, values: np.ndarray, dedupe: bool = True) -> IdLists:
        """One ``(key, value)`` pair per element, in file order; ``dedupe`` keeps the first of repeated pairs."""
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        values = np.asarray(values, dtype=np.int64).reshape(-1)
        if dedupe and len(keys) > 1:
            by_pair = np.lexsort((np.arange(len(keys)), values, keys))
            repeat = (keys[by_pair][1:] == keys[by_pair][:-1]) & (values[by_pair][1:] == values[by_pair][:-1])
            keep = np.ones(len(keys), dtype=bool)
            keep[by_pair[1:][repeat]] = False
            keys, values = keys[keep], values[keep]
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], values[order]
        unique, counts = np.unique(keys, return_counts=True)
        return cls(unique, np.concatenate([[0], np.cumsum(counts)]), values)

    @classmethod
    def from_dict(cls, lists: Mapping[int, Iterable[int]]) -> IdLists:
        items = [(int(k), list(v)) for k, v in lists.items()]
        return cls.from_segments([k for k, _ in items], [len(v) for _, v in items], [x for _, v in items for x in v])

    def _position(self, key) -> int:
        key = int(key)
        i = int(np.searchsorted(self.keys_array, key))
        if i >= len(self.keys_array) or self.keys_array[i] != key:
            raise KeyError(key)
        return i

    def __getitem__(self, key) -> np.ndarray:
        i = self._position(key)
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def __contains__(self, key) -> bool:
        try:
            self._position(key)
        except (KeyError, TypeError, ValueError):
            return False
        return True

    def __len__(self) -> int:
        return len(self.keys_array)

    def __iter__(self) -> Iterator[int]:
        return (int(k) for k in self.keys_array)

    def lengths(self) -> np.ndarray:
        """The size of every list, in key order ``[len(self)]``."""
        return np.diff(self.offsets)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``keys`` among this mapping's keys (vectorised) and whether each is present."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.searchsorted(self.keys_array, keys)
        found = pos < len(self.keys_array)
        found[found] = self.keys_array[pos[found]] == keys[found]
        return pos, found

    def select(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The lists of ``keys`` one after another (vectorised): ``(lengths [len(keys)], values)``; an
        absent key has an empty list."""
        pos, found = self.lookup(keys)
        safe = np.minimum(pos, max(len(self) - 1, 0))
        lengths = np.where(found, self.lengths()[safe], 0) if len(self) else np.zeros(len(pos), dtype=np.int64)
        starts = np.where(found, self.offsets[safe], 0) if len(self) else np.zeros(len(pos), dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return lengths.astype(np.int64), self.values[gather]

    def __repr__(self) -> str:
        return f"IdLists({len(self)} keys, {len(self.values)} ids)"


class RaggedRows:
    """Per row ``i`` (a train query row), an int64 array (its candidate corpus rows): ``offsets``/``values``
    like ``IdLists`` but indexed by position; a lazy stand-in for ``list[list[int]]``."""

    def __init__(self, offsets: np.ndarray, values: np.ndarray) -> None:
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.values = np.asarray(values, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range ({len(self)} rows)")
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __repr__(self) -> str:
        return f"RaggedRows({len(self)} rows, {len(self.values)} values)"


@dataclass
class QueryLists:
    """What a hard-negative file says per query id: its negatives (best first, or file order), the
    positives it lists, and (Tevatron) its query texts."""

    negatives: IdLists
    positives: IdLists | None = None
    queries: dict[int, str] | None = None


# ------------------------------------------------------------------------------------- helpers
def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path


def _as_int(value, path: Path, number: int, what: str) -> int:
    if isinstance(value, bool):
        raise DatasetFormatError(f"{path} line {number}: {what} must be an integer id, got {value!r}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise DatasetFormatError(f"{path} line {number}: {what} must be an integer id, got {value!r}") from None


def _json_lines(path: Path, form: str) -> Iterator[tuple[int, dict]]:
    """``(line number, record)`` of a JSONL file (gz or not); a line that is not a JSON object names file and line."""
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetFormatError(f"{path} line {number}: not JSON ({err.msg} at column {err.colno}); expected {form}") from None
                if not isinstance(record, dict):
                    raise DatasetFormatError(f"{path} line {number}: expected a JSON object {form}, got {type(record).__name__}")
                yield number, record
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError) as err:
        raise DatasetFormatError(f"{path}: cannot read ({type(err).__name__}: {err}); expected {'a gzip-compressed ' if path.suffix == '.gz' else ''}"
                                 f"JSONL file") from None


def _key(record: dict, key: str, path: Path, number: int, form: str):
    if key not in record:
        raise DatasetFormatError(f"{path} line {number}: no {key!r} key (keys: {sorted(record)}); expected {form}")
    return record[key]


def _unique(values: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(values))


# ------------------------------------------------------------------------------------- readers
def read_queries(path: str | Path, cache_dir: str | Path | None = None) -> LazyTextCollection:
    """A ``qid<TAB>text`` queries file (``queries.train.tsv``, ``queries.dev.small.tsv``), read lazily."""
    return LazyTextCollection(_require_file(path, "MS MARCO queries file"), id_column=0, text_column=1, cache_dir=cache_dir,
                              name="MS MARCO queries file")


def read_collection(path: str | Path, cache_dir: str | Path | None = None) -> LazyTextCollection:
    """``collection.tsv`` (``pid<TAB>passage``), read lazily."""
    return LazyTextCollection(_require_file(path, "MS MARCO passage collection"), id_column=0, text_column=1, cache_dir=cache_dir,
                              name="MS MARCO passage collection")


def read_qrels(path: str | Path) -> dict[int, list[int]]:
    """TREC qrels ``qid 0 pid rel`` (tab or space separated) -> ``{qid: [pid, ...]}`` of the pairs with
    ``rel > 0``, pids in file order without repeats; a query whose pairs all have ``rel <= 0`` is absent."""
    path = _require_file(path, "MS MARCO qrels file")
    qrels: dict[int, list[int]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 4:
                    raise ValueError
                qid, pid, rel = int(fields[0]), int(fields[2]), int(fields[3])
            except ValueError:
                raise DatasetFormatError(f"{path} line {number}: expected 'qid 0 pid relevance' (4 integer fields, tab or space separated), "
                                         f"got {line.rstrip()!r}") from None
            if rel > 0:
                pids = qrels.setdefault(qid, [])
                if pid not in pids:
                    pids.append(pid)
    return qrels


def read_text_triples(path: str | Path, cache_dir: str | Path | None = None) -> TextTriples:
    """``triples.train.small.tsv``: ``query<TAB>positive passage<TAB>negative passage`` per line, read lazily."""
    return TextTriples(_require_file(path, "MS MARCO text triples file"), cache_dir=cache_dir)


class TextTriples(LazyTextCollection):
    """The text triples of ``triples.train.small.tsv`` by row: ``triple(row) -> (query, positive, negative)``;
    ``self[row]`` is the negative. The file has no ids."""

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None) -> None:
        super().__init__(path, id_column=None, text_column=2, cache_dir=cache_dir, name="MS MARCO text triples file")

    def triple(self, row: int) -> tuple[str, str, str]:
        fields = self.fields(row)
        if len(fields) != 3:
            raise DatasetFormatError(f"{self.path} line {int(row) + 1}: expected 'query<TAB>positive passage<TAB>negative passage' "
                                     f"(3 fields), got {len(fields)}")
        return fields[0], fields[1], fields[2]


def iter_int_rows(path: str | Path, columns: int, form: str) -> Iterator[tuple[int, np.ndarray]]:
    """Blocks of a tab-separated table of ``columns`` integers per line: ``(first line number, values int64 [n, columns])``,
    parsed vectorised. A line with another field count or a non-integer field names file and line."""
    path = Path(path)
    line_base, carry = 0, b""
    with open(path, "rb") as f:
        while True:
            data = f.read(BLOCK_BYTES)
            block = carry + data
            if not data:
                if not block.strip():
                    return
                block += b"\n"
            buf = np.frombuffer(block, dtype=np.uint8)
            newlines = np.flatnonzero(buf == 10)
            if len(newlines) == 0:
                carry = block
                continue
            used = int(newlines[-1]) + 1
            starts = np.concatenate([[0], newlines[:-1] + 1]).astype(np.int64)
            ends = newlines.astype(np.int64)
            ends -= (buf[np.maximum(ends - 1, 0)] == 13) & (ends > starts)
            tabs = np.flatnonzero(buf[:used] == 9).astype(np.int64)
            first = np.searchsorted(tabs, starts)
            count = np.searchsorted(tabs, ends) - first
            wrong = np.flatnonzero(count != columns - 1)
            if len(wrong):
                i = int(wrong[0])
                raise DatasetFormatError(f"{path} line {line_base + i + 1}: expected '{form}' ({columns} tab-separated integers), "
                                         f"got {block[starts[i]:ends[i]].decode('utf-8', errors='replace')!r}")
            out = np.empty((len(starts), columns), dtype=np.int64)
            for c in range(columns):
                field_start = starts if c == 0 else tabs[first + c - 1] + 1
                field_end = ends if c == columns - 1 else tabs[first + c]
                out[:, c], bad = parse_int_fields(buf, field_start, field_end)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise DatasetFormatError(f"{path} line {line_base + i + 1}: expected '{form}', field {c + 1} is not an integer: "
                                             f"{block[starts[i]:ends[i]].decode('utf-8', errors='replace')!r}")
            yield line_base + 1, out
            line_base += len(starts)
            carry = block[used:]
            if not data:
                return


def _cap_per_key(keys: np.ndarray, counts: np.ndarray, cap: int) -> np.ndarray:
    """Keep mask of a block's elements so that each key (dense, ``< len(counts)``) keeps at most ``cap``
    elements over all blocks (the first in file order); updates ``counts``."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    group_start = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
    sizes = np.diff(np.concatenate([group_start, [len(keys)]]))
    rank = np.arange(len(keys)) - np.repeat(group_start, sizes)
    keep = np.empty(len(keys), dtype=bool)
    keep[order] = rank + counts[sorted_keys] < cap
    np.add.at(counts, keys[keep], 1)
    return keep


def read_qidpidtriples(path: str | Path, qids: np.ndarray | None = None, max_per_query: int | None = None) -> IdLists:
    """``qidpidtriples.train.full.2.tsv`` (``qid<TAB>positive pid<TAB>negative pid``) -> per qid its negative
    pids, in file order without repeats.

    Args:
        qids: keep only these query ids (e.g. the train queries with qrels); default all.
        max_per_query: keep at most the first ``max_per_query`` lines of each qid (counted before
            repeats are removed). The full file has about 400M lines: without a cap or a ``qids``
            subset the result holds all of them (16 bytes each while reading).
    """
    path = _require_file(path, "MS MARCO qidpidtriples file")
    wanted = np.unique(np.asarray(qids, dtype=np.int64)) if qids is not None else None
    counts = np.zeros(len(wanted) if wanted is not None else 0, dtype=np.int64)
    key_parts, neg_parts = [], []
    for _, rows in iter_int_rows(path, 3, "qid<TAB>positive pid<TAB>negative pid"):
        keys, negs = rows[:, 0], rows[:, 2]
        if wanted is not None:
            dense = np.searchsorted(wanted, keys)
            inside = dense < len(wanted)
            inside[inside] = wanted[dense[inside]] == keys[inside]
            keys, negs, dense = keys[inside], negs[inside], dense[inside]
        else:
            dense = keys
            if len(keys) and keys.min() < 0:
                raise DatasetFormatError(f"{path}: negative qid {int(keys.min())}; expected MS MARCO query ids (>= 0)")
            if len(keys) and keys.max() >= len(counts):
                counts = np.concatenate([counts, np.zeros(int(keys.max()) + 1 - len(counts), dtype=np.int64)])
        if max_per_query is not None:
            keep = _cap_per_key(dense, counts, max_per_query)
            keys, negs = keys[keep], negs[keep]
        key_parts.append(keys)
        neg_parts.append(negs)
    keys = np.concatenate(key_parts) if key_parts else np.zeros(0, np.int64)
    negs = np.concatenate(neg_parts) if neg_parts else np.zeros(0, np.int64)
    return IdLists.from_pairs(keys, negs)


ST_FORM = '{"qid": int, "pos": [pid, ...], "neg": {"<system>": [pid, ...], ...}}'


def read_st_hard_negatives(path: str | Path, systems: list[str] | None = None, qids: Iterable[int] | None = None,
                           max_per_query: int | None = None) -> QueryLists:
    """The sentence-transformers MS MARCO hard-negative JSONL (``msmarco-hard-negatives.jsonl.gz``: per query
    the negatives that several retrieval systems ranked high) -> per qid its negative pids.

    Args:
        systems: which systems' lists to take (e.g. ``["bm25", "msmarco-distilbert-base-tas-b"]``), in
            this order; ``None``: every system of the line, in file order. The lists are joined
            without repeats. A name that no line has is an error listing the systems present.
        qids: keep only these query ids; default all.
        max_per_query: keep the first ``max_per_query`` negatives of each query (after joining).

    Returns:
        ``QueryLists(negatives, positives)`` (the ``pos`` lists of the file).
    """
    path = _require_file(path, "sentence-transformers hard-negative file")
    wanted = None if qids is None else {int(q) for q in qids}
    present: dict[str, None] = {}
    keys, neg_lengths, pos_lengths = array("q"), array("q"), array("q")
    neg_values, pos_values = array("q"), array("q")
    for number, record in _json_lines(path, ST_FORM):
        qid = _as_int(_key(record, "qid", path, number, ST_FORM), path, number, "qid")
        pos, neg = _key(record, "pos", path, number, ST_FORM), _key(record, "neg", path, number, ST_FORM)
        if not isinstance(neg, dict) or not isinstance(pos, list):
            raise DatasetFormatError(f"{path} line {number}: expected {ST_FORM}; 'pos' must be a list and 'neg' an object of lists per system")
        present.update(dict.fromkeys(neg))
        if wanted is not None and qid not in wanted:
            continue
        chosen = neg if systems is None else {s: neg[s] for s in systems if s in neg}
        negatives = _unique(_as_int(p, path, number, "neg pid") for lst in chosen.values() for p in lst)
        if max_per_query is not None:
            negatives = negatives[:max_per_query]
        positives = _unique(_as_int(p, path, number, "pos pid") for p in pos)
        keys.append(qid)
        neg_lengths.append(len(negatives))
        neg_values.extend(negatives)
        pos_lengths.append(len(positives))
        pos_values.extend(positives)
    if systems is not None:
        unknown = [s for s in systems if s not in present]
        if unknown:
            raise ValueError(f"{path}: no line has the system(s) {unknown}; the systems present are {list(present)}")
    return QueryLists(negatives=IdLists.from_segments(keys, neg_lengths, neg_values), positives=IdLists.from_segments(keys, pos_lengths, pos_values))


TEVATRON_FORM = '{"query_id": str, "query": str, "positive_passages": [{"docid", "title", "text"}], "negative_passages": [...]}'


def read_tevatron(path: str | Path, qids: Iterable[int] | None = None, max_per_query: int | None = None) -> QueryLists:
    """Tevatron's training JSONL (Gao, Ma, Lin, Callan, "Tevatron: An Efficient and Flexible Toolkit for Dense
    Retrieval", 2022; ``Tevatron/msmarco-passage`` ``train.jsonl.gz``) -> per query id the negative docids
    (file order), the positive docids and the query texts. Passage texts in the file are not kept."""
    path = _require_file(path, "Tevatron training file")
    wanted = None if qids is None else {int(q) for q in qids}
    keys, neg_lengths, pos_lengths = array("q"), array("q"), array("q")
    neg_values, pos_values = array("q"), array("q")
    queries: dict[int, str] = {}
    for number, record in _json_lines(path, TEVATRON_FORM):
        qid = _as_int(_key(record, "query_id", path, number, TEVATRON_FORM), path, number, "query_id")
        if wanted is not None and qid not in wanted:
            continue
        lists = []
        for field in ("positive_passages", "negative_passages"):
            passages = _key(record, field, path, number, TEVATRON_FORM)
            if not isinstance(passages, list) or not all(isinstance(p, dict) and "docid" in p for p in passages):
                raise DatasetFormatError(f"{path} line {number}: {field!r} must be a list of {{\"docid\", \"title\", \"text\"}} objects")
            lists.append(_unique(_as_int(p["docid"], path, number, f"{field} docid") for p in passages))
        positives, negatives = lists
        if max_per_query is not None:
            negatives = negatives[:max_per_query]
        queries[qid] = str(record.get("query", ""))
        keys.append(qid)
        neg_lengths.append(len(negatives))
        neg_values.extend(negatives)
        pos_lengths.append(len(positives))
        pos_values.extend(positives)
    return QueryLists(negatives=IdLists.from_segments(keys, neg_lengths, neg_values),
                      positives=IdLists.from_segments(keys, pos_lengths, pos_values), queries=queries)


def text_id(text: str) -> int:
    """A stable 63-bit id of a text (BLAKE2b, first 8 bytes, top bit cleared): the same text gets the same id
    in every process and run. Two different texts share an id with probability about n^2 / 2^64 for n
    texts (about 1e-5 for the 10M distinct texts of ``triples.train.small.tsv``)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ---------------------------------------------------------------------------------- DataModule
SOURCES = ("qidpidtriples", "st_jsonl", "tevatron", "triples")
DEFAULT_NEGATIVE_FILES = {
    "qidpidtriples": ("qidpidtriples.train.full.2.tsv",),
    "triples": ("triples.train.small.tsv",),
    "st_jsonl": ("msmarco-hard-negatives.jsonl.gz", "msmarco-hard-negatives.jsonl"),
    "tevatron": ("train.jsonl.gz", "train.jsonl"),
}


class TextTriplesDataset(Dataset):
    """Train items from the text triples of ``triples.train.small.tsv``, in the ``QueryDocTrainDataset`` item format.

    The file has texts and no ids, so ``query_idx``/``doc_idx``/``neg_idx``/``pos_idx`` are ``text_id``
    hashes of the texts (63 bits): two rows with the same passage text get the same id, which is what
    the relevance masks need (a batch's other query whose positive is this query's positive is not a
    negative). Indexed by ``(triple_row, epoch)`` or a plain row; every epoch serves the file's one
    negative (``num_negatives`` 0 or 1).
    """

    def __init__(self, triples: TextTriples, num_negatives: int = 1, num_rows: int | None = None) -> None:
        if num_negatives not in (0, 1):
            raise ValueError(f"train_negatives='triples' gives one negative per query (the file's third column); "
                             f"num_negatives must be 0 or 1, got {num_negatives}. Use qidpidtriples, st_jsonl or tevatron for more")
        self.triples, self.num_negatives = triples, num_negatives
        self.num_rows = len(triples) if num_rows is None else min(int(num_rows), len(triples))
        self.num_padded = 0

    @property
    def labels(self) -> np.ndarray:
        """``arange(len(self))``: every triple is its own class (computed on demand, not held by workers)."""
        return np.arange(self.num_rows, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index) -> dict:
        row = int(index[0]) if isinstance(index, (tuple, list)) else int(index)
        if not 0 <= row < self.num_rows:
            raise IndexError(f"triple row {row} out of range ({self.num_rows} rows)")
        query, positive, negative = self.triples.triple(row)
        doc = text_id(positive)
        negs = [negative] if self.num_negatives else []
        return {"query": query, "doc": positive, "negs": negs, "query_idx": text_id(query), "doc_idx": doc,
                "neg_idx": [text_id(n) for n in negs], "pos_idx": [doc]}


class MSMARCOPassageDataModule(QueryDocDataModule):
    """MS MARCO passage ranking (Bajaj et al., "MS MARCO: A Human Generated MAchine Reading COmprehension
    Dataset", 2016): train on ``queries.train`` with ``qrels.train`` (502,939 queries with a relevant
    passage), evaluate the 6,980 ``dev.small`` queries against all 8,841,823 passages with MRR@10
    (the official dev protocol; Recall@1000 is also commonly reported).

    Layout read (one folder, the files of ``collectionandqueries.tar.gz`` and the qrels/negatives)::

        collection.tsv                    pid<TAB>passage                 (8,841,823 lines)
        queries.train.tsv                 qid<TAB>query                   (808,731)
        qrels.train.tsv                   qid 0 pid 1                     (532,761; tab or space separated)
        queries.dev.small.tsv             qid<TAB>query                   (6,980)
        qrels.dev.small.tsv               qid 0 pid 1                     (7,437)
        qidpidtriples.train.full.2.tsv    qid<TAB>pos pid<TAB>neg pid     (train_negatives="qidpidtriples")
        triples.train.small.tsv           query<TAB>positive<TAB>negative (train_negatives="triples")
        msmarco-hard-negatives.jsonl.gz   sentence-transformers           (train_negatives="st_jsonl")
        train.jsonl.gz                    Tevatron msmarco-passage        (train_negatives="tevatron")

    The corpus and the query files are ``LazyTextCollection``s: their first use builds a byte-offset
    index cached beside the file (``<file>.hardneg-index.npz``); passage texts are read when a batch
    needs them. Train queries without a relevant passage are dropped (and counted). Hard-negative
    lists become corpus rows per train query (``RaggedRows``); a train query the file does not list
    has none (padded as ``pad_negatives`` says).

    Args:
        root: the folder with the files above.
        train_negatives: the static hard-negative source, or ``None`` (in-batch negatives only).
            ``"triples"`` serves the text triples themselves (one negative, ids hashed from texts;
            see ``TextTriplesDataset``) instead of ``queries.train``.
        negatives_file: the negatives file (default: the official name in ``root`` for the source).
        negative_systems: with ``"st_jsonl"``, which systems' lists to take (default all, in file order).
        max_train_queries: keep the first N train queries with qrels (or the first N triples).
        max_negatives_per_query: keep the first N negatives of each query (bounds the memory of the
            400M-line ``qidpidtriples`` file; see ``read_qidpidtriples``).
        dev_split: the evaluation files ``queries.<dev_split>.tsv``/``qrels.<dev_split>.tsv``.
        cache_dir: where the text indexes go (default beside the files; see ``LazyTextCollection``).
        **kwargs: see ``QueryDocDataModule`` (``num_negatives``, ``pad_negatives``, ``batch_size``, ...).
    """

    default_recall_ks = (1, 10, 100, 1000)

    def __init__(
        self,
        root: str,
        train_negatives: str | None = None,
        negatives_file: str | None = None,
        negative_systems: list[str] | None = None,
        max_train_queries: int | None = None,
        max_negatives_per_query: int | None = None,
        dev_split: str = "dev.small",
        cache_dir: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if train_negatives is not None and train_negatives not in SOURCES:
            raise ValueError(f"train_negatives must be one of {SOURCES} or None, got {train_negatives!r}")
        if negative_systems is not None and train_negatives != "st_jsonl":
            raise ValueError(f"negative_systems selects lists of the sentence-transformers file; it needs train_negatives='st_jsonl', "
                             f"got {train_negatives!r}")
        if negatives_file is not None and train_negatives is None:
            raise ValueError("negatives_file is given but train_negatives is None: say which format it is "
                             f"(train_negatives one of {SOURCES})")
        if train_negatives is None and self.num_negatives > 0 and not self.dynamic_candidates:
            raise ValueError(f"num_negatives={self.num_negatives} needs a hard-negative source: set train_negatives to one of {SOURCES}, "
                             f"or dynamic_candidates=True when a callback (ANNRefresh) supplies them")
        for arg, value in (("max_train_queries", max_train_queries), ("max_negatives_per_query", max_negatives_per_query)):
            if value is not None and value < 1:
                raise ValueError(f"{arg} must be >= 1 or None, got {value}")
        self.root, self.train_negatives, self.negatives_file = root, train_negatives, negatives_file
        self.negative_systems = list(negative_systems) if negative_systems is not None else None
        self.max_train_queries, self.max_negatives_per_query = max_train_queries, max_negatives_per_query
        self.dev_split, self.cache_dir = dev_split, cache_dir
        self.collection: LazyTextCollection | None = None
        self.triples: TextTriples | None = None
        self.negative_stats: dict[str, int | float] = {}

    # ------------------------------------------------------------------------------------ files
    def folder(self) -> Path:
        return require_dir(self.root, NAME, EXPECTED)

    def file(self, name: str) -> Path:
        """``root / name``, or ``FileNotFoundError`` naming it, listing what the folder has and the official layout."""
        folder = self.folder()
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{NAME}: {name} is missing from {folder}; {_listing(folder)}; expected {EXPECTED}")
        return path

    def negatives_path(self) -> Path:
        if self.negatives_file is not None:
            path = Path(self.negatives_file).expanduser()
            if not path.is_absolute() and not path.exists():
                path = self.folder() / path
            if not path.is_file():
                raise FileNotFoundError(f"{NAME}: negatives_file {path} does not exist ({_listing(path.parent)})")
            return path
        names = DEFAULT_NEGATIVE_FILES[self.train_negatives]
        for name in names:
            if (self.folder() / name).is_file():
                return self.folder() / name
        return self.file(names[0])

    # ------------------------------------------------------------------------------------ split
    def _split(self, queries_name: str, qrels_name: str, limit: int | None = None) -> tuple[QueryDocSplit, np.ndarray]:
        """A query split with qrels as corpus rows; returns it and the qids of its queries."""
        queries = read_queries(self.file(queries_name), self.cache_dir)
        qrels_path = self.file(qrels_name)
        qrels = read_qrels(qrels_path)
        qids = queries.ids
        relevant = IdLists.from_dict(qrels)
        _, has = relevant.lookup(qids)
        rows = np.flatnonzero(has)
        dropped = len(qids) - len(rows)
        if limit is not None:
            rows = rows[:limit]
        kept_qids = qids[rows]
        lengths, flat_pids = relevant.select(kept_qids)
        doc_rows = self._corpus_rows(flat_pids, qrels_path)
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        qrels_rows = [doc_rows[bounds[i]:bounds[i + 1]].tolist() for i in range(len(rows))]
        split = QueryDocSplit(RowView(queries, rows), qrels_rows, IdStrings(kept_qids), num_dropped=dropped)
        return split, kept_qids

    def _corpus_rows(self, pids: np.ndarray, source: Path) -> np.ndarray:
        try:
            return self.collection.row_of(np.asarray(pids, dtype=np.int64))
        except KeyError as err:
            raise DatasetFormatError(f"{source} names a passage that {self.collection.path} does not have: {err.args[0]}") from None

    def _negatives(self, qids: np.ndarray) -> RaggedRows:
        """Candidate corpus rows per train query (row order of ``qids``) from the chosen negatives file."""
        path = self.negatives_path()
        cap = self.max_negatives_per_query
        if self.train_negatives == "qidpidtriples":
            lists = read_qidpidtriples(path, qids=qids, max_per_query=cap)
        elif self.train_negatives == "st_jsonl":
            lists = read_st_hard_negatives(path, systems=self.negative_systems, qids=qids.tolist(), max_per_query=cap).negatives
        else:
            lists = read_tevatron(path, qids=qids.tolist(), max_per_query=cap).negatives
        lengths, pids = lists.select(qids)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = self._corpus_rows(pids, path)
        self.negative_stats = {"file": str(path), "queries_in_file": len(lists), "train_queries_without_negatives": int((lengths == 0).sum()),
                               "negatives_mean": float(lengths.mean()) if len(lengths) else 0.0, "negatives_max": int(lengths.max(initial=0))}
        return RaggedRows(offsets, values)

    def load_query_doc(self) -> QueryDocData:
        self.collection = read_collection(self.file(FILES["collection"]), self.cache_dir)
        train_limit = None if self.train_negatives == "triples" else self.max_train_queries
        train, train_qids = self._split(FILES["queries.train"], FILES["qrels.train"], train_limit)
        dev, _ = self._split(f"queries.{self.dev_split}.tsv", f"qrels.{self.dev_split}.tsv")
        negatives = None
        self.negative_stats = {}
        if self.train_negatives == "triples":
            self.triples = read_text_triples(self.negatives_path(), self.cache_dir)
            self.negative_stats = {"file": str(self.triples.path), "triples": len(self.triples)}
        elif self.train_negatives is not None:
            negatives = self._negatives(train_qids)
        return QueryDocData(corpus=self.collection, train=train, val=dev, test=dev, doc_ids=IdStrings(self.collection.ids), negatives=negatives)

    def make_train_dataset(self, data: QueryDocData) -> Dataset:
        if self.train_negatives == "triples":
            return TextTriplesDataset(self.triples, self.num_negatives, self.max_train_queries)
        return super().make_train_dataset(data)

    # ------------------------------------------------------------------------------- reporting
    def _stats(self, data: QueryDocData) -> dict:
        stats = super()._stats(data)
        stats["corpus"]["passages"] = stats["corpus"]["items"]
        stats["train"].update({k: v for k, v in self.negative_stats.items() if k != "file"})  # numbers only: a table prints them
        if self.train_negatives == "triples":
            stats["train"]["triples_served"] = len(self.train_dataset)
        return stats

    def summary(self) -> str:
        """Passages, queries with qrels per split (and dropped), positives per query and negatives per train query."""
        s = self.stats
        lines = [f"MS MARCO passage  {self.folder()}", f"  passages        {s['corpus']['items']:>12,}"]
        for split in ("train", "val"):
            row = s.get(split)
            if row is None:
                continue
            name = "train" if split == "train" else self.dev_split
            lines.append(f"  {name:<15} {row['items']:>12,} queries with qrels ({row['dropped']:,} without, dropped); "
                         f"positives per query mean {row['positives_mean']:.2f}, max {row['positives_max']}")
        neg = self.negative_stats
        if "triples" in neg:
            lines.append(f"  negatives       text triples {neg['file']}: {neg['triples']:,} lines, "
                         f"{s['train']['triples_served']:,} served (one negative each)")
        elif neg:
            lines.append(f"  negatives       {self.train_negatives} {neg['file']}: {neg['queries_in_file']:,} queries; per train query "
                         f"mean {neg['negatives_mean']:.1f}, max {neg['negatives_max']}; "
                         f"{neg['train_queries_without_negatives']:,} train queries without any")
        else:
            lines.append("  negatives       none (in-batch negatives only)")
        return "\n".join(lines)

    def prepare_splits(self) -> None:
        """Read and check every file (no passage text is read: the corpus is indexed by byte offsets) and
        print ``summary()`` on rank zero."""
        if self.train_dataset is not None:
            return
        super().prepare_splits()
        if self._rank_world()[0] == 0:
            print(self.summary())


def _listing(folder: Path, limit: int = 30) -> str:
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.endswith(CACHE_SUFFIX))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"the folder has {names[:limit] if names else 'nothing'}{more}"
