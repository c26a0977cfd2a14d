"""The query/document DataModule base: queries, a corpus, qrels and (optionally) static hard negatives.

Text retrieval benchmarks (MS MARCO passage, the WordNet gloss benchmark) share one shape: a corpus
of documents, query splits whose relevance is a list of corpus rows per query (qrels; a document
may be relevant to several queries and a query may have several relevant documents), and for
training optionally a list of candidate hard negatives per train query, best first (BM25 or a
mined ANN list; WordNet's sibling synsets). A benchmark subclass implements one method,
``load_query_doc() -> QueryDocData``; the base validates it (qrels and negatives inside the corpus,
lengths agree), drops and counts queries without a relevant document, and builds:

- the train dataset (``make_train_dataset``, overridable): items ``{"query", "doc", "negs",
  "query_idx", "doc_idx", "neg_idx", "pos_idx"}``. The sampler yields ``(query_row, epoch)``
  indices, so the positive (one of the query's qrels) and the ``num_negatives`` negatives (a
  sample without replacement from its candidates, never a positive) are drawn from a generator
  seeded by ``(seed, epoch, query_row)``: the same on every rank, for any number of DataLoader
  workers, and different each epoch. This is the static-negative recipe of DPR (Karpukhin et al.,
  "Dense Passage Retrieval for Open-Domain Question Answering", EMNLP 2020, Sec. 3.2: one BM25
  negative per question beside the in-batch negatives) and of the MS MARCO training triples, with
  the per-epoch resampling of Tevatron/sentence-transformers-style trainers. A query with fewer
  than ``k`` usable candidates is padded (``pad_negatives``): ``"in_batch"`` marks the slot -1 (the
  loss ignores it; the query keeps its in-batch negatives), ``"random"`` fills it with random
  corpus rows that are not among its positives.
- the train batch sampler: ``RandomBatchSampler`` over the train queries (``batch_size`` per rank,
  disjoint shards of every global batch across DDP ranks), or the injected ``batch_sampler``
  factory (called with ``labels = arange(num_train_queries)``); either is wrapped to tag every
  index with the epoch.
- the evaluation loaders (``eval_protocol = "query_doc"``): ``[queries, corpus]``, items
  ``{"input_ids", "attention_mask", ..., "index"}`` with ``index`` the row in the split's queries
  or in the corpus, sharded across DDP ranks (the padded duplicates share an index, so the metric
  drops them); ``qrels(stage)`` is the relevance of the split the query loader serves.

Texts are tokenized per batch by ``datamodules.inputs.TextInputs`` with the encoder's tokenizer;
queries get ``data_config["query_prefix"]``, documents and negatives ``data_config["doc_prefix"]``
(``query_prefix``/``doc_prefix`` arguments override them, e.g. E5's ``"query: "``/``"passage: "``).

Collated train batch: ``query_input_ids [B, Lq]``, ``query_attention_mask``, ``doc_input_ids
[B, Ld]``, ``doc_attention_mask``, ``neg_input_ids [B*k, Ln]`` (query-major; absent when k == 0),
``neg_attention_mask``, ``query_idx [B]``, ``doc_idx [B]``, ``neg_idx [B, k]`` (-1: padded slot),
``pos_idx [B, P]`` (all known positives, padded with -1).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from datamodules.base import RetrievalDataModule
from datamodules.datasets import Indexed
from datamodules.inputs import InputPipeline, TextInputs
from datamodules.samplers import RandomBatchSampler

TRAIN_TEXT_FIELDS = {"query": "query_", "doc": "doc_", "negs": "neg_"}
TRAIN_ROLES = {"query": "query", "doc": "doc", "negs": "doc"}
PAD_NEGATIVES = ("in_batch", "random")


@dataclass
class QueryDocSplit:
    """One query split: query texts by row, the relevant corpus rows of every query, optional official ids.

    ``queries`` may be lazy (``__len__`` and ``__getitem__(int) -> str``). ``num_dropped``: queries
    the loader dropped for having no relevant document (reported by ``hardneg data check``).
    """

    queries: Sequence[str]
    qrels: list[list[int]]
    query_ids: Sequence[str] | None = None
    num_dropped: int = 0


@dataclass
class QueryDocData:
    """What ``QueryDocDataModule.load_query_doc`` returns: the corpus (lazy is fine), the splits, optional
    official document ids and optional static hard-negative candidates per train query (best first)."""

    corpus: Sequence[str]
    train: QueryDocSplit
    val: QueryDocSplit | None = None
    test: QueryDocSplit | None = None
    doc_ids: Sequence[str] | None = None
    negatives: Sequence[Sequence[int]] | None = None


class RowView(Sequence):
    """The rows ``rows`` of a (possibly lazy) sequence, without copying it."""

    def __init__(self, data: Sequence, rows: Sequence[int]) -> None:
        self.data, self.rows = data, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.data[int(self.rows[index])]


class TextsDataset(Dataset):
    """Texts by row as ``{"text": str}`` items (the evaluation queries or the corpus; ``Indexed`` adds the row)."""

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self.texts[index]}


class QueryDocTrainDataset(Dataset):
    """Train items of a query/document split with ``k`` static hard negatives per query, drawn per epoch.

    Indexed by ``(query_row, epoch)`` (a plain ``query_row`` means epoch 0). The positive is drawn
    from the query's qrels and the negatives from its candidates (deduplicated, positives removed;
    without replacement, kept in candidate order) by a generator seeded with
    ``(seed, epoch, query_row)``. Missing slots are padded as ``pad_negatives`` says (module docstring).

    Args:
        queries: query texts by row. qrels: relevant corpus rows per query (>= 1 each).
        corpus: document texts by corpus row.
        negatives: candidate corpus rows per query, best first (needed when ``num_negatives > 0``).
        num_negatives: ``k``. pad_negatives: ``"in_batch"`` or ``"random"``. seed: the global seed.

    Attributes:
        labels: ``arange(num_queries)``: every query is its own class (for the batch-sampler factory).
        num_padded: queries with fewer than ``k`` usable candidates (padded every epoch).
    """

    def __init__(
        self,
        queries: Sequence[str],
        qrels: Sequence[Sequence[int]],
        corpus: Sequence[str],
        negatives: Sequence[Sequence[int]] | None = None,
        num_negatives: int = 0,
        pad_negatives: str = "in_batch",
        seed: int = 0,
    ) -> None:
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        if pad_negatives not in PAD_NEGATIVES:
            raise ValueError(f"pad_negatives must be one of {PAD_NEGATIVES}, got {pad_negatives!r}")
        if num_negatives > 0 and negatives is None:
            raise ValueError(
                f"num_negatives={num_negatives} needs hard-negative candidates for every train query, but the data has none "
                f"(QueryDocData.negatives is None): set num_negatives=0 to train on in-batch negatives only, or give the "
                f"DataModule its candidates (e.g. WordNetGlossDataModule(siblings_as_negatives=True), an MS MARCO negatives "
                f"file) or mine them with an encoder first"
            )
        if negatives is not None and len(negatives) != len(queries):
            raise ValueError(f"negatives has {len(negatives)} candidate lists for {len(queries)} train queries; expected one per query")
        self.queries, self.qrels, self.corpus, self.negatives = queries, qrels, corpus, negatives
        self.num_negatives, self.pad_negatives, self.seed = num_negatives, pad_negatives, seed
        self.labels = np.arange(len(queries), dtype=np.int64)
        self.num_docs = len(corpus)
        self.num_padded = 0
        if num_negatives > 0:
            self.num_padded = sum(len(self.candidates(row, num_negatives)) < num_negatives for row in range(len(queries)))
            if pad_negatives == "random":
                worst = max((len(set(q)) for q in qrels), default=0)
                if len(corpus) - worst < num_negatives:
                    raise ValueError(f"pad_negatives='random' needs {num_negatives} non-relevant documents per query, "
                                     f"but a query has {worst} positives in a corpus of {len(corpus)}")

    def __len__(self) -> int:
        return len(self.queries)

    def candidates(self, row: int, limit: int | None = None) -> list[int]:
        """The usable negatives of query ``row``: its candidates in order, deduplicated, without its
        positives (the first ``limit`` of them when given)."""
        seen = {int(p) for p in self.qrels[row]}
        out: list[int] = []
        for c in self.negatives[row]:
            c = int(c)
            if c not in seen:
                if not 0 <= c < self.num_docs:
                    raise ValueError(f"negatives of train query row {row} hold corpus row {c}, outside the corpus of {self.num_docs} documents")
                seen.add(c)
                out.append(c)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def draw(self, row: int, epoch: int) -> tuple[int, list[int]]:
        """``(positive, negatives)`` of query ``row`` at ``epoch``: corpus rows, -1 for a padded slot."""
        rng = np.random.default_rng([self.seed, epoch, row])
        positives = self.qrels[row]
        doc = int(positives[int(rng.integers(len(positives)))])
        k = self.num_negatives
        if k == 0:
            return doc, []
        cands = self.candidates(row)
        if len(cands) >= k:
            return doc, [cands[i] for i in np.sort(rng.choice(len(cands), size=k, replace=False))]
        negs = list(cands)
        if self.pad_negatives == "in_batch":
            return doc, negs + [-1] * (k - len(negs))
        taken = {int(p) for p in positives} | set(negs)
        while len(negs) < k:
            c = int(rng.integers(len(self.corpus)))
            if c not in taken:
                taken.add(c)
                negs.append(c)
        return doc, negs

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        row, epoch = (int(index[0]), int(index[1])) if isinstance(index, (tuple, list)) else (int(index), 0)
        doc, negs = self.draw(row, epoch)
        return {
            "query": self.queries[row],
            "doc": self.corpus[doc],
            "negs": [self.corpus[n] if n >= 0 else "" for n in negs],
            "query_idx": row,
            "doc_idx": doc,
            "neg_idx": negs,
            "pos_idx": [int(p) for p in self.qrels[row]],
        }


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Wrap a batch sampler so that every index carries the epoch: ``[i, ...]`` -> ``[(i, epoch), ...]``.

    The train dataset draws its per-epoch negatives from the epoch in the index, so no state has to
    reach the DataLoader workers. ``set_epoch`` is forwarded to the wrapped sampler.
    """

    def __init__(self, batch_sampler: Sampler[list[int]]) -> None:
        self.batch_sampler = batch_sampler
        self.epoch = 0
        # Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``, not on the batch sampler itself.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        inner = getattr(self.batch_sampler, "set_epoch", None)
        if callable(inner):
            inner(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batch_sampler:
            yield [(int(i), self.epoch) for i in batch]


class QueryDocDataModule(RetrievalDataModule):
    """Base of the query/document text benchmarks: a subclass implements ``load_query_doc()``.

    Args:
        num_negatives: ``k`` static hard negatives per train query per epoch (0: in-batch negatives only).
        pad_negatives: how a query with fewer than ``k`` candidates is padded: ``"in_batch"`` (slot -1,
            ignored by the loss) or ``"random"`` (random non-relevant corpus rows).
        batch_size: train queries per rank per step (the default ``RandomBatchSampler``).
        num_batches: train batches per epoch per rank; default: one pass over the train queries.
        query_prefix, doc_prefix: override ``data_config["query_prefix"]``/``["doc_prefix"]`` (E5:
            ``"query: "``, ``"passage: "``).
        **kwargs: see ``RetrievalDataModule`` (``batch_sampler``, ``eval_batch_size``, ``num_workers``,
            ``seed``, ``data_config`` (tokenizer, max_length), ``inputs`` ...); the P x K arguments do not apply.

    After ``prepare_splits()``: ``data`` (the validated ``QueryDocData``), ``train_dataset``,
    ``val_dataset``/``test_dataset`` (the query texts of the evaluation splits), ``corpus_dataset``,
    ``stats`` (the counts ``hardneg data check`` prints) and ``num_padded`` (train queries padded).
    """

    eval_protocol = "query_doc"
    item_noun = "items"
    default_recall_ks = (1, 10, 100)

    def __init__(
        self,
        num_negatives: int = 0,
        pad_negatives: Literal["in_batch", "random"] = "in_batch",
        batch_size: int = 32,
        num_batches: int | None = None,
        query_prefix: str | None = None,
        doc_prefix: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        if pad_negatives not in PAD_NEGATIVES:
            raise ValueError(f"pad_negatives must be one of {PAD_NEGATIVES}, got {pad_negatives!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if self.batch_sampler is not None:
            ignored = [f"{k}={v}" for k, v, default in (("batch_size", batch_size, 32), ("num_batches", num_batches, None)) if v != default]
            if ignored:
                warnings.warn(f"{type(self).__name__}: {', '.join(ignored)} configure the default RandomBatchSampler and are ignored "
                              f"with batch_sampler set; give them in batch_sampler.init_args", stacklevel=2)
        self.num_negatives, self.pad_negatives = num_negatives, pad_negatives
        self.batch_size, self.num_batches = batch_size, num_batches
        self.query_prefix, self.doc_prefix = query_prefix, doc_prefix
        self.data: QueryDocData | None = None
        self.corpus_dataset: TextsDataset | None = None
        self.stats: dict[str, dict[str, Any]] = {}
        self.num_padded = 0
        self.query_collate_fn = self.doc_collate_fn = None

    # ------------------------------------------------------------------------ what a subclass writes
    def load_query_doc(self) -> QueryDocData:
        """Read the benchmark: corpus, splits (qrels as corpus rows), optional ids and negatives."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_query_doc() -> QueryDocData")

    def make_train_dataset(self, data: QueryDocData) -> Dataset:
        """The train dataset (default: static negatives from ``data.negatives``); indexed by ``(query_row, epoch)``."""
        return QueryDocTrainDataset(data.train.queries, data.train.qrels, data.corpus, data.negatives,
                                    self.num_negatives, self.pad_negatives, self.seed)

    # ------------------------------------------------------------------------------------ splits
    def build_datasets(self) -> None:
        data = self.load_query_doc()
        if not isinstance(data, QueryDocData):
            raise TypeError(f"{type(self).__name__}.load_query_doc() must return a QueryDocData, got {type(data).__name__}")
        data = self._validated(data)
        self.data = data
        self.train_dataset = self.make_train_dataset(data)
        self.corpus_dataset = TextsDataset(data.corpus)
        self.val_dataset = TextsDataset(data.val.queries) if data.val is not None else None
        self.test_dataset = TextsDataset(data.test.queries) if data.test is not None else None
        self.num_padded = int(getattr(self.train_dataset, "num_padded", 0))
        self.stats = self._stats(data)
        if self.num_padded:
            fill = "marked -1 (the loss ignores them; in-batch negatives remain)" if self.pad_negatives == "in_batch" else "filled with random corpus rows"
            rank_zero_warn(f"{type(self).__name__}: {self.num_padded} of {len(data.train.queries)} train queries have fewer than "
                           f"num_negatives={self.num_negatives} hard-negative candidates; their missing slots are {fill} "
                           f"(pad_negatives={self.pad_negatives!r})")

    def prepare_splits(self) -> None:
        """Load and validate the data and build the datasets (no tokenizer needed); ``setup()`` calls it."""
        if self.train_dataset is not None:
            return
        try:
            if self.val_class_fraction > 0:
                raise ValueError(f"{type(self).__name__}: val_class_fraction does not apply to query/document data; its splits are query splits")
            self.build_datasets()
            if self.verify:
                self.verify_images()
        except BaseException:
            self.train_dataset = self.val_dataset = self.test_dataset = self.corpus_dataset = self.data = None
            raise

    def _validated(self, data: QueryDocData) -> QueryDocData:
        name = type(self).__name__
        n_docs = len(data.corpus)
        if data.doc_ids is not None and len(data.doc_ids) != n_docs:
            raise ValueError(f"{name}: {len(data.doc_ids)} doc_ids for a corpus of {n_docs} documents")
        if data.train is None:
            raise ValueError(f"{name}.load_query_doc() gave no train split")
        negatives = data.negatives
        if negatives is not None and len(negatives) != len(data.train.queries):
            raise ValueError(f"{name}: negatives has {len(negatives)} candidate lists for {len(data.train.queries)} train queries; "
                             f"expected one per train query")
        splits: dict[str, QueryDocSplit | None] = {}
        for split_name in ("train", "val", "test"):
            split = getattr(data, split_name)
            if split is None:
                splits[split_name] = None
                continue
            splits[split_name], kept = self._validated_split(split, split_name, n_docs)
            if split_name == "train" and negatives is not None and kept is not None:
                negatives = RowView(negatives, kept)
        return QueryDocData(data.corpus, splits["train"], splits["val"], splits["test"], data.doc_ids, negatives)

    def _validated_split(self, split: QueryDocSplit, split_name: str, n_docs: int) -> tuple[QueryDocSplit, np.ndarray | None]:
        """The split with its queries without qrels dropped (and counted), after checking every qrel is a corpus row."""
        name = type(self).__name__
        n = len(split.queries)
        if len(split.qrels) != n:
            raise ValueError(f"{name} {split_name} split: {len(split.qrels)} qrels lists for {n} queries; expected one per query")
        if split.query_ids is not None and len(split.query_ids) != n:
            raise ValueError(f"{name} {split_name} split: {len(split.query_ids)} query_ids for {n} queries")
        for row, rels in enumerate(split.qrels):
            for r in rels:
                if not (isinstance(r, (int, np.integer)) and 0 <= r < n_docs):
                    qid = f" (query id {split.query_ids[row]})" if split.query_ids is not None else ""
                    raise ValueError(f"{name} {split_name} split: query row {row}{qid} has relevant corpus row {r!r}, "
                                     f"outside the corpus of {n_docs} documents (rows 0..{n_docs - 1})")
        kept = [row for row, rels in enumerate(split.qrels) if len(rels)]
        if len(kept) == n:
            return split, None
        dropped = n - len(kept)
        rank_zero_warn(f"{name} {split_name} split: dropped {dropped} of {n} queries without a relevant document")
        ids = RowView(split.query_ids, kept) if split.query_ids is not None else None
        new = QueryDocSplit(RowView(split.queries, kept), [split.qrels[r] for r in kept], ids, split.num_dropped + dropped)
        return new, np.asarray(kept, dtype=np.int64)

    def _stats(self, data: QueryDocData) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for split_name in ("train", "val", "test"):
            split = getattr(data, split_name)
            if split is None:
                continue
            counts = np.fromiter((len(q) for q in split.qrels), dtype=np.int64, count=len(split.qrels))
            row = {"items": len(split.queries), "classes": None, "dropped": int(split.num_dropped),
                   "positives_mean": float(counts.mean()) if len(counts) else 0.0, "positives_max": int(counts.max()) if len(counts) else 0}
            if split_name == "train" and self.num_negatives > 0:
                row["fewer_than_k_negatives"] = self.num_padded
            out[split_name] = row
        out["corpus"] = {"items": len(data.corpus), "classes": None}
        return out

    def split_sizes(self) -> dict[str, dict[str, Any]]:
        """Queries per split and corpus documents (``items``), plus per split the queries dropped for having
        no qrels, positives per query (mean, max) and, for train with ``num_negatives > 0``, the queries
        with fewer than ``k`` candidates (printed by ``hardneg data check``)."""
        return {name: dict(row) for name, row in self.stats.items()}

    def pk_settings(self) -> dict[str, Any] | None:
        return None  # no P x K structure: the pre-flight P x K checks do not apply

    def split(self, stage: str) -> QueryDocSplit:
        """The query split that ``stage`` (``"fit"``/``"train"``, ``"validate"``/``"val"``, ``"test"``) evaluates on;
        ``"validate"`` falls back to the test split when the data has no validation split."""
        if self.data is None:
            raise RuntimeError(f"{type(self).__name__}: call prepare_splits() or setup() before asking for a split")
        if stage in ("fit", "train"):
            return self.data.train
        if stage in ("validate", "val", "validation"):
            split = self.data.val if self.data.val is not None else self.data.test
        elif stage == "test":
            split = self.data.test
        else:
            raise ValueError(f"unknown stage {stage!r}; expected 'fit', 'validate' or 'test'")
        if split is None:
            raise ValueError(f"{type(self).__name__} has no {stage} split (its load_query_doc() gave none)")
        return split

    def qrels(self, stage: str) -> list[list[int]]:
        """The relevant corpus rows of every query of the split that ``stage``'s query loader serves."""
        return self.split(stage).qrels

    # ------------------------------------------------------------------------------------ inputs
    def input_pipeline(self, data_config: dict[str, Any] | None = None) -> InputPipeline:
        """The train pipeline: ``TextInputs`` over query/doc/negs with their roles; a given plain
        ``TextInputs`` (default ``text_fields``) lends its ``max_length``; any other ``inputs`` is used as is."""
        if self.inputs is None:
            return TextInputs(text_fields=TRAIN_TEXT_FIELDS, roles=TRAIN_ROLES)
        if isinstance(self.inputs, TextInputs) and self.inputs.text_fields == {"text": ""}:
            return TextInputs(self.inputs.max_length, text_fields=TRAIN_TEXT_FIELDS, roles=TRAIN_ROLES)
        return self.inputs

    def resolved_data_config(self) -> dict[str, Any]:
        cfg = super().resolved_data_config()
        if self.query_prefix is not None:
            cfg["query_prefix"] = self.query_prefix
        if self.doc_prefix is not None:
            cfg["doc_prefix"] = self.doc_prefix
        return cfg

    def setup(self, stage: str | None = None) -> None:
        self.prepare_splits()
        cfg = self.resolved_data_config()
        self.collate_fn = self.input_pipeline(cfg).collate_fn(cfg)
        self.query_collate_fn = TextInputs(text_fields={"text": ""}, roles={"text": "query"}).collate_fn(cfg)
        self.doc_collate_fn = TextInputs(text_fields={"text": ""}, roles={"text": "doc"}).collate_fn(cfg)

    # ------------------------------------------------------------------------------- dataloaders
    def train_sampler(self) -> Sampler[list[int]]:
        """This rank's train batch sampler over the train queries (before epoch tagging)."""
        rank, world = self._rank_world()
        labels = np.asarray(self.train_dataset.labels)
        if self.batch_sampler is None:
            return RandomBatchSampler(labels, self.batch_size, rank=rank, world_size=world, seed=self.seed, num_batches=self.num_batches)
        return self.batch_sampler(labels, rank=rank, world_size=world, seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_sampler=EpochBatchSampler(self.train_sampler()), collate_fn=self.collate_fn,
                          **self._loader_kwargs())

    def _indexed_loader(self, dataset: Dataset, collate_fn: Any) -> DataLoader:
        rank, world = self._rank_world()
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        return DataLoader(Indexed(dataset), batch_size=self.eval_batch_size, sampler=sampler, shuffle=False, collate_fn=collate_fn,
                          **self._loader_kwargs())

    def eval_loaders(self, queries: Dataset | None, stage: str) -> list[DataLoader]:
        """``[queries, corpus]`` loaders of an evaluation split (``index``: row in the split's queries / in the corpus)."""
        if queries is None:
            raise ValueError(f"{type(self).__name__} has no {stage} split (its load_query_doc() gave none)")
        return [self._indexed_loader(queries, self.query_collate_fn), self._indexed_loader(self.corpus_dataset, self.doc_collate_fn)]

    def val_dataloader(self) -> list[DataLoader]:
        return self.eval_loaders(self.val_dataset if self.val_dataset is not None else self.test_dataset, "validate")

    def test_dataloader(self) -> list[DataLoader]:
        return self.eval_loaders(self.test_dataset, "test")
