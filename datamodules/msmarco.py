"""``MSMARCOPassageDataModule``: MS MARCO passage ranking read from its official files, as a query/document benchmark.

MS MARCO (Bajaj et al., "MS MARCO: A Human Generated MAchine Reading COmprehension Dataset", 2016;
the passage ranking task of Nguyen et al. / the TREC Deep Learning track) has 8,841,823 passages,
808,731 train queries (502,939 with a relevant passage in ``qrels.train.tsv``) and the 6,980
queries of ``queries.dev.small.tsv``, on which systems report MRR@10 over the full collection.

The files are read by ``datamodules.msmarco_files`` (one reader per format). This module turns
what they hold into ``QueryDocData``: qrels and hard-negative lists become corpus rows
(``RaggedRows``), or, with ``train_negatives="triples"``, the text triples are served as they are
(``TextTriplesDataset``; the file has no ids, so ``text_id`` hashes the texts).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from datamodules.id_lists import IdLists, RaggedRows
from datamodules.metadata import DatasetFormatError, require_dir
from datamodules.msmarco_files import (
    TextTriples,
    read_collection,
    read_qidpidtriples,
    read_qrels,
    read_queries,
    read_st_hard_negatives,
    read_tevatron,
    read_text_triples,
)
from datamodules.query_doc import QueryDocDataModule
from datamodules.query_doc_data import QueryDocData, QueryDocSplit, RowView
from datamodules.text_collection import CACHE_SUFFIX, IdStrings, LazyTextCollection

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


def text_id(text: str) -> int:
    """A stable 63-bit id of a text (BLAKE2b, first 8 bytes, top bit cleared): the same text gets the same id
    in every process and run. Two different texts share an id with probability about n^2 / 2^64 for n
    texts (about 1e-5 for the 10M distinct texts of ``triples.train.small.tsv``)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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
