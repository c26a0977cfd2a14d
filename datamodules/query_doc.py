"""The query/document DataModule base: queries, a corpus, qrels and (optionally) static hard negatives.

Text retrieval benchmarks (MS MARCO passage, the WordNet gloss benchmark) share one shape: a corpus
of documents, query splits whose relevance is a list of corpus rows per query (qrels; a document
may be relevant to several queries and a query may have several relevant documents), and for
training optionally a list of candidate hard negatives per train query, best first (BM25 or a
mined ANN list; WordNet's sibling synsets). A benchmark subclass implements one method,
``load_query_doc() -> QueryDocData``; the base validates it (qrels and negatives inside the corpus,
lengths agree), drops and counts queries without a relevant document, and builds:

- the train dataset (``make_train_dataset``, overridable; by default ``QueryDocTrainDataset``,
  ``datamodules.query_doc_train``): items ``{"query", "doc", "negs", "query_idx", "doc_idx",
  "neg_idx", "pos_idx"}``, the positive and the ``num_negatives`` negatives drawn per epoch from a
  generator seeded by ``(seed, epoch, query_row)`` (DPR's static-negative recipe), picked from the
  candidates by ``negative_sampler`` and padded as ``pad_negatives`` says.
- a replaceable candidate store (``set_candidates``, called by ``experiments.callbacks.ANNRefresh``
  with the top-C of every train query under the current model; ANCE): versioned candidate files
  that the DataLoader workers open by the version each index names (``datamodules.candidate_store``).
- the train batch sampler: ``RandomBatchSampler`` over the train queries (``batch_size`` per rank,
  disjoint shards of every global batch across DDP ranks), or the injected ``batch_sampler``
  factory (called with ``labels = arange(num_train_queries)``); either is wrapped (``EpochBatchSampler``)
  to tag every index with the epoch and the candidate version.
- the evaluation loaders (``eval_protocol = "query_doc"``): ``[queries, corpus]``, items
  ``{"input_ids", "attention_mask", ..., "index"}`` with ``index`` the row in the split's queries
  or in the corpus, sharded across DDP ranks (the padded duplicates share an index, so the metric
  drops them); ``qrels(stage)`` is the relevance of the split the query loader serves.

Texts are tokenized per batch by ``datamodules.inputs.TextInputs`` with the encoder's tokenizer;
queries get ``data_config["query_prefix"]``, documents and negatives ``data_config["doc_prefix"]``
(``query_prefix``/``doc_prefix`` arguments override them, e.g. E5's ``"query: "``/``"passage: "``).
Queries are truncated at ``data_config["query_max_length"]`` when the encoder (``HFTextEncoder(
query_max_length=...)``) or the DataModule's ``data_config`` sets it, in training and in the
evaluation query loader alike (which ``ANNRefresh`` also encodes with); documents and negatives at
``max_length``.

Collated train batch: ``query_input_ids [B, Lq]``, ``query_attention_mask``, ``doc_input_ids
[B, Ld]``, ``doc_attention_mask``, ``neg_input_ids [B*k, Ln]`` (query-major; absent when k == 0),
``neg_attention_mask``, ``query_idx [B]``, ``doc_idx [B]``, ``neg_idx [B, k]`` (-1: padded slot),
``pos_idx [B, P]`` (all known positives, padded with -1).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from datamodules.base import RetrievalDataModule
from datamodules.candidate_store import CandidateStore
from datamodules.datasets import Indexed
from datamodules.inputs import InputPipeline, TextInputs
from datamodules.query_doc_data import LengthSortedSampler, QueryDocData, QueryDocSplit, RowView, TextsDataset
from datamodules.query_doc_train import PAD_NEGATIVES, EpochBatchSampler, QueryDocTrainDataset
from datamodules.samplers import RandomBatchSampler
from miners.negative_samplers import NegativeSampler, UniformSampler

TRAIN_TEXT_FIELDS = {"query": "query_", "doc": "doc_", "negs": "neg_"}
TRAIN_ROLES = {"query": "query", "doc": "doc", "negs": "doc"}


class QueryDocDataModule(RetrievalDataModule):
    """Base of the query/document text benchmarks: a subclass implements ``load_query_doc()``.

    Args:
        num_negatives: ``k`` hard negatives per train query per epoch (0: in-batch negatives only).
        pad_negatives: how a query with fewer than ``k`` candidates is padded: ``"in_batch"`` (slot -1,
            ignored by the loss) or ``"random"`` (random non-relevant corpus rows).
        negative_sampler: which ``k`` of the candidates (``miners.negative_samplers``; default
            ``UniformSampler``, a uniform draw without replacement).
        dynamic_candidates: the candidates come from ``set_candidates`` during training (``ANNRefresh``),
            so ``num_negatives > 0`` needs no static ones.
        candidate_dir: where the replaced candidate versions are written (a ``rank{r}`` folder per rank;
            e.g. inside the run folder); default: a temporary folder per process, removed at exit.
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
        negative_sampler: NegativeSampler | None = None,
        dynamic_candidates: bool = False,
        candidate_dir: str | None = None,
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
        self.negative_sampler = negative_sampler if negative_sampler is not None else UniformSampler()
        self.dynamic_candidates, self.candidate_dir = dynamic_candidates, candidate_dir
        self.candidate_store = CandidateStore()
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
        """The train dataset (default: negatives sampled by ``negative_sampler`` from ``data.negatives`` or from
        the candidate store); indexed by ``(query_row, epoch[, version])``."""
        return QueryDocTrainDataset(data.train.queries, data.train.qrels, data.corpus, data.negatives,
                                    self.num_negatives, self.pad_negatives, self.seed, self.negative_sampler, self.candidate_store,
                                    self.dynamic_candidates)

    # ------------------------------------------------------------------------ replaceable candidates
    def set_candidates(
        self,
        rows: np.ndarray | Any,
        scores: np.ndarray | Any | None = None,
        pos_scores: np.ndarray | Any | None = None,
        query_rows: np.ndarray | Any | None = None,
    ) -> int:
        """Replace the train queries' hard-negative candidates from the next batch the sampler yields on.

        Args:
            rows: ``[Q, C]`` corpus rows per train query, best first, ``-1`` for an empty slot (the
                query's positives may be among them: they are dropped when sampling).
            scores: ``[Q, C]`` their scores under the current model (``SimANSSampler`` and
                ``PositiveAwareFilter`` need them).
            pos_scores: ``[Q]`` each query's positive score ``s(q, d+)`` (its lowest, with several).
            query_rows: ``[Q']``: ``rows`` etc. hold only these train queries (``Q = Q'``); the others
                keep their current candidates (scores NaN when those had none).

        Every rank must call it with the same arrays (``ANNRefresh`` does); each writes its own folder.
        Returns the new version number.
        """
        self.prepare_splits()
        if not isinstance(self.train_dataset, QueryDocTrainDataset):
            raise TypeError(f"{type(self).__name__}.set_candidates: the train dataset is a {type(self.train_dataset).__name__}, whose "
                            f"negatives cannot be replaced; it needs a QueryDocTrainDataset (e.g. MS MARCO with a negatives file, not 'triples')")
        n_queries, n_docs = len(self.train_dataset), len(self.data.corpus)
        rows = _as_array(rows, np.int64, "rows")
        if rows.ndim != 2:
            raise ValueError(f"{type(self).__name__}.set_candidates: rows must be [Q, C] corpus rows per train query, got shape {rows.shape}")
        if query_rows is not None:
            query_rows = _as_array(query_rows, np.int64, "query_rows")
            if query_rows.shape != (len(rows),) or (len(query_rows) and (query_rows.min() < 0 or query_rows.max() >= n_queries)):
                raise ValueError(f"{type(self).__name__}.set_candidates: query_rows must be [{len(rows)}] train query rows in "
                                 f"[0, {n_queries}), got shape {query_rows.shape}")
        expected = n_queries if query_rows is None else len(query_rows)
        if len(rows) != expected:
            raise ValueError(f"{type(self).__name__}.set_candidates: rows has {len(rows)} lists for {expected} train queries"
                             f"{'' if query_rows is None else ' (query_rows)'}; expected one per query")
        bad = (rows < -1) | (rows >= n_docs)
        if bad.any():
            q, c = (int(x[0]) for x in np.nonzero(bad))
            raise ValueError(f"{type(self).__name__}.set_candidates: rows[{q}, {c}] = {int(rows[q, c])} is outside the corpus of {n_docs} "
                             f"documents (rows 0..{n_docs - 1}, -1 for an empty slot)")
        if scores is not None:
            scores = _as_array(scores, np.float32, "scores")
            if scores.shape != rows.shape:
                raise ValueError(f"{type(self).__name__}.set_candidates: scores has shape {scores.shape}; expected {rows.shape} like rows")
        if pos_scores is not None:
            pos_scores = _as_array(pos_scores, np.float32, "pos_scores")
            if pos_scores.shape != (len(rows),):
                raise ValueError(f"{type(self).__name__}.set_candidates: pos_scores has shape {pos_scores.shape}; expected ({len(rows)},)")
        if query_rows is not None:
            rows, scores, pos_scores = self._merged_candidates(query_rows, rows, scores, pos_scores)
        if self.candidate_store.directory is None and self.candidate_dir is not None:
            self.candidate_store.directory = os.path.join(self.candidate_dir, f"rank{self._rank_world()[0]}")
        return self.candidate_store.write(rows, scores, pos_scores)

    def _merged_candidates(self, query_rows, rows, scores, pos_scores):
        """The full ``[Q, C']`` arrays: the current candidates with ``query_rows`` replaced (NaN: no score)."""
        dataset, store = self.train_dataset, self.candidate_store
        n_queries = len(dataset)
        if store.version > 0:
            current = store.load(store.version)
            old_rows = np.asarray(current["rows"])
            old_scores = np.asarray(current["scores"]) if "scores" in current else None
            old_pos = np.asarray(current["pos_scores"]) if "pos_scores" in current else None
        else:
            lists = [dataset.candidates(r) for r in range(n_queries)] if dataset.negatives is not None else [[] for _ in range(n_queries)]
            old_rows = np.full((n_queries, max((len(x) for x in lists), default=0)), -1, dtype=np.int64)
            for r, x in enumerate(lists):
                old_rows[r, : len(x)] = x
            old_scores = old_pos = None
        width = max(old_rows.shape[1], rows.shape[1])
        new_rows = np.full((n_queries, width), -1, dtype=np.int64)
        new_rows[:, : old_rows.shape[1]] = old_rows
        new_rows[query_rows] = -1
        new_rows[query_rows, : rows.shape[1]] = rows
        new_scores = new_pos = None
        if scores is not None or old_scores is not None:
            new_scores = np.full((n_queries, width), np.nan, dtype=np.float32)
            if old_scores is not None:
                new_scores[:, : old_scores.shape[1]] = old_scores
            new_scores[query_rows] = np.nan
            if scores is not None:
                new_scores[query_rows, : scores.shape[1]] = scores
        if pos_scores is not None or old_pos is not None:
            new_pos = np.full(n_queries, np.nan, dtype=np.float32) if old_pos is None else old_pos.astype(np.float32).copy()
            new_pos[query_rows] = np.nan if pos_scores is None else pos_scores
        return new_rows, new_scores, new_pos

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
        ``TextInputs`` (default ``text_fields``) lends its ``max_length`` and ``query_max_length``; any other
        ``inputs`` is used as is."""
        if self.inputs is None:
            return TextInputs(text_fields=TRAIN_TEXT_FIELDS, roles=TRAIN_ROLES)
        if isinstance(self.inputs, TextInputs) and self.inputs.text_fields == {"text": ""}:
            return TextInputs(self.inputs.max_length, text_fields=TRAIN_TEXT_FIELDS, roles=TRAIN_ROLES, keep_text=self.inputs.keep_text,
                              query_max_length=getattr(self.inputs, "query_max_length", None))
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
        version = None
        if isinstance(self.train_dataset, QueryDocTrainDataset):
            if self.candidate_store.directory is None and self.candidate_dir is not None:
                self.candidate_store.directory = os.path.join(self.candidate_dir, f"rank{self._rank_world()[0]}")
            self.candidate_store.ensure_directory()  # before any worker copies the dataset
            version = self.candidate_store.current_version
        return DataLoader(self.train_dataset, batch_sampler=EpochBatchSampler(self.train_sampler(), version), collate_fn=self.collate_fn,
                          **self._loader_kwargs())

    def _indexed_loader(self, dataset: Dataset, collate_fn: Any) -> DataLoader:
        rank, world = self._rank_world()
        if callable(getattr(dataset, "lengths", None)):
            sampler = LengthSortedSampler(dataset.lengths(), rank, world)
        else:
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


def _as_array(value: Any, dtype: type, name: str) -> np.ndarray:
    """A tensor or array-like as a C-contiguous numpy array of ``dtype``."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        return np.ascontiguousarray(np.asarray(value), dtype=dtype)
    except (TypeError, ValueError) as err:
        raise TypeError(f"set_candidates: {name} must be an array or tensor convertible to {np.dtype(dtype).name}, got {type(value).__name__}") from err
