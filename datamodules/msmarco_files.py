"""MS MARCO passage ranking's official files and its common hard-negative files: one reader per format.

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

Per-query id lists are returned as ``IdLists`` (``datamodules.id_lists``) rather than a dict of
Python lists: the hard-negative files list hundreds of millions of pids, which as Python ints would
take tens of GB. ``MSMARCOPassageDataModule`` (``datamodules.msmarco``) reads the files with these.
"""

from __future__ import annotations

import gzip
import json
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datamodules.id_lists import IdLists
from datamodules.metadata import DatasetFormatError
from datamodules.text_collection import LazyTextCollection
from datamodules.tsv_blocks import BLOCK_BYTES, iter_line_blocks, parse_int_fields


@dataclass
class QueryLists:
    """What a hard-negative file says per query id: its negatives (best first, or file order), the
    positives it lists, and (Tevatron) its query texts."""

    negatives: IdLists
    positives: IdLists | None = None
    queries: dict[int, str] | None = None


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
    for lines in iter_line_blocks(path, BLOCK_BYTES, skip_blank_tail=True):
        block, buf, starts, ends, line_base = lines.block, lines.buf, lines.starts, lines.ends, lines.lines_before
        tabs = np.flatnonzero(buf[:lines.used] == 9).astype(np.int64)
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
