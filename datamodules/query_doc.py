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
- which ``k`` of the candidates (``negative_sampler``, ``miners.negative_samplers``): by default
  ``UniformSampler`` (the draw above, unchanged); ``TopKSampler``, ``SimANSSampler`` (by score, around
  the positive's score), ``PositiveAwareFilter`` (NV-Retriever's filters, then another sampler). The
  sampler gets the query's usable candidates (deduplicated, positives removed, best first), their
  scores and the positive's score when the candidates carry them, ``k`` and the seeded generator.
- a replaceable candidate store (``set_candidates``, called by ``experiments.callbacks.ANNRefresh``
  with the top-C of every train query under the current model; ANCE). Design: the candidate lists
  live in a ``CandidateStore``, one folder per rank holding one sub-folder per *version* (``v000001/
  rows.npy``, ``scores.npy``, ``pos_scores.npy``), each written to a temporary folder and renamed into
  place (atomic: a reader never sees half a version). Version 0 is the static ``data.negatives``.
  The main process owns the version counter; the epoch-tagging batch sampler reads it *per batch, in
  the main process*, and puts it in every index: ``(query_row, epoch, version)``. A DataLoader worker
  (persistent or not, forked or spawned, any count) therefore needs no shared state: it opens (memory-
  maps) the version its index names, and keeps the last one it opened. So a new store is used from the
  first batch the sampler yields after ``set_candidates``: at an epoch boundary (``ANNRefresh`` at
  ``on_train_epoch_start`` or ``on_fit_start``, before Lightning creates the epoch's iterator), every
  batch of the epoch; mid-epoch (``every_n_steps``), the batches not yet prefetched (with ``W``
  workers, ``prefetch_factor * W`` batches after the call: reproducible for a given loader setting).
  The draw is still seeded by ``(seed, epoch, query_row)``, identical on every rank (each rank writes
  the same candidates into its own folder) and for any number of workers. The last two versions are
  kept (in-flight batches of a mid-epoch refresh still name the previous one).
- the train batch sampler: ``RandomBatchSampler`` over the train queries (``batch_size`` per rank,
  disjoint shards of every global batch across DDP ranks), or the injected ``batch_sampler``
  factory (called with ``labels = arange(num_train_queries)``); either is wrapped to tag every
  index with the epoch and the candidate version.
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

import os
import shutil
import tempfile
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from datamodules.base import RetrievalDataModule
from datamodules.datasets import Indexed
from datamodules.inputs import InputPipeline, TextInputs
from datamodules.samplers import RandomBatchSampler
from miners.negative_samplers import NegativeSampler, UniformSampler

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

    def lengths(self) -> np.ndarray:
        """Each text's length, without reading the texts of a lazy collection (its line sizes)."""
        return text_lengths(self.texts)


def text_lengths(texts: Sequence[str]) -> np.ndarray:
    """Length (characters, or bytes of a lazily read file's lines) of every text of ``texts``."""
    offsets = getattr(texts, "offsets", None)
    if offsets is not None:
        return np.diff(np.asarray(offsets, dtype=np.int64))
    if isinstance(texts, RowView):
        return text_lengths(texts.data)[texts.rows]
    return np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))


class LengthSortedSampler(Sampler[int]):
    """The rows of an evaluation set longest first, this rank's share of them (``rank::world_size``,
    padded with the first rows to equal counts, as ``DistributedSampler``; the metric drops the
    repeats by their ``index``). A batch of similar lengths pads little: the corpus of the WordNet
    benchmark (2 to 60 characters) encodes about twice as fast as in file order."""

    def __init__(self, lengths: np.ndarray, rank: int = 0, world_size: int = 1) -> None:
        order = np.argsort(-np.asarray(lengths), kind="stable")
        per_rank = -(-len(order) // world_size) if len(order) else 0
        padded = np.concatenate([order, order[: per_rank * world_size - len(order)]]) if world_size > 1 else order
        self.rows = padded[rank::world_size] if world_size > 1 else padded

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[int]:
        return iter(int(r) for r in self.rows)


def _remove_tree(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # a forked DataLoader worker that drops its copy must not delete the owner's folder
        shutil.rmtree(path, ignore_errors=True)


class CandidateStore:
    """Versioned candidate lists on disk that a training run replaces (design: module docstring).

    ``write(rows, scores, pos_scores)`` (main process) stores version ``v = version + 1`` in
    ``directory/v{v:06d}/`` (``rows.npy [Q, C] int64`` with ``-1`` for an empty slot, optional
    ``scores.npy [Q, C] float32`` and ``pos_scores.npy [Q] float32``, NaN where unknown), written to a
    temporary folder and renamed into place, then bumps ``version``; ``load(v)`` (any process) memory-
    maps a version, caching the last one. Version 0 is the static candidates and is never on disk.
    ``directory=None``: a temporary folder, created on first use and removed when the store is (by the
    process that created it). A given directory is emptied of older versions on first use (a new run).
    """

    def __init__(self, directory: str | os.PathLike | None = None, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"CandidateStore: keep must be >= 1 (versions kept on disk), got {keep}")
        self.directory = None if directory is None else os.fspath(directory)
        self.keep = keep
        self.version = 0
        self._ready = False
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None

    def current_version(self) -> int:
        """The newest version (read by the epoch-tagging batch sampler for every batch)."""
        return self.version

    def ensure_directory(self) -> str:
        """Create (or empty) the store's folder; call in the main process before DataLoader workers start."""
        if self._ready:
            return self.directory
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="hardneg-candidates-")
            weakref.finalize(self, _remove_tree, self.directory, os.getpid())
        else:
            os.makedirs(self.directory, exist_ok=True)
            for name in os.listdir(self.directory):
                if (name.startswith("v") and name[1:].isdigit()) or name.startswith("tmp-"):  # versions of an earlier run
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self._ready = True
        return self.directory

    def path(self, version: int) -> str:
        return os.path.join(self.directory, f"v{version:06d}")

    def write(self, rows: np.ndarray, scores: np.ndarray | None = None, pos_scores: np.ndarray | None = None) -> int:
        """Store a new version (arrays already validated by ``QueryDocDataModule.set_candidates``); returns its number."""
        self.ensure_directory()
        version = self.version + 1
        tmp = os.path.join(self.directory, f"tmp-{uuid.uuid4().hex}")
        os.makedirs(tmp)
        arrays = {"rows": rows, "scores": scores, "pos_scores": pos_scores}
        for name, value in arrays.items():
            if value is not None:
                np.save(os.path.join(tmp, f"{name}.npy"), value)
        os.replace(tmp, self.path(version))
        self.version = version
        for old in range(version - self.keep, 0, -1):
            if not os.path.isdir(self.path(old)):
                break
            shutil.rmtree(self.path(old), ignore_errors=True)
        return version

    def load(self, version: int) -> dict[str, np.ndarray]:
        """``{"rows", "scores"?, "pos_scores"?}`` of ``version`` (memory-mapped; the last one is cached)."""
        if self._cache is not None and self._cache[0] == version:
            return self._cache[1]
        if self.directory is None:
            raise RuntimeError(f"CandidateStore: asked for candidate version {version} but no version was ever written "
                               f"(QueryDocDataModule.set_candidates was not called in this run)")
        folder = self.path(version)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"CandidateStore: candidate version {version} is not in {self.directory} (kept: the last {self.keep}); "
                                    f"a batch index named a version that was already removed or never written")
        out = {}
        for name in ("rows", "scores", "pos_scores"):
            file = os.path.join(folder, f"{name}.npy")
            if os.path.exists(file):
                out[name] = np.load(file, mmap_mode="r")
        self._cache = (version, out)
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None  # workers open what they need
        return state


class QueryDocTrainDataset(Dataset):
    """Train items of a query/document split with ``k`` hard negatives per query, drawn per epoch.

    Indexed by ``(query_row, epoch)`` or ``(query_row, epoch, version)`` (a plain ``query_row`` means
    epoch 0; no version means 0, the static candidates). The positive is drawn from the query's qrels
    and the negatives by ``negative_sampler`` from its candidates of that version (deduplicated,
    positives removed, best first; with their scores when the version has them), with a generator
    seeded by ``(seed, epoch, query_row)``. Missing slots are padded as ``pad_negatives`` says
    (module docstring).

    Args:
        queries: query texts by row. qrels: relevant corpus rows per query (>= 1 each).
        corpus: document texts by corpus row.
        negatives: static candidate corpus rows per query, best first (needed when ``num_negatives > 0``
            unless ``dynamic_candidates``).
        num_negatives: ``k``. pad_negatives: ``"in_batch"`` or ``"random"``. seed: the global seed.
        negative_sampler: picks the ``k`` (``miners.negative_samplers``; default ``UniformSampler``).
        store: the ``CandidateStore`` that versions ``>= 1`` are read from.
        dynamic_candidates: the candidates will come from ``store`` (``set_candidates``), so no static
            ones are needed; until the first version, queries without static candidates are padded.

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
        negative_sampler: NegativeSampler | None = None,
        store: CandidateStore | None = None,
        dynamic_candidates: bool = False,
    ) -> None:
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        if pad_negatives not in PAD_NEGATIVES:
            raise ValueError(f"pad_negatives must be one of {PAD_NEGATIVES}, got {pad_negatives!r}")
        if num_negatives > 0 and negatives is None and not dynamic_candidates:
            raise ValueError(
                f"num_negatives={num_negatives} needs hard-negative candidates for every train query, but the data has none "
                f"(QueryDocData.negatives is None): set num_negatives=0 to train on in-batch negatives only, or give the "
                f"DataModule its candidates (e.g. WordNetGlossDataModule(siblings_as_negatives=True), an MS MARCO negatives "
                f"file) or mine them with an encoder first, or refresh them during training (dynamic_candidates=True with "
                f"experiments.callbacks.ANNRefresh(first='untrained'))"
            )
        if negatives is not None and len(negatives) != len(queries):
            raise ValueError(f"negatives has {len(negatives)} candidate lists for {len(queries)} train queries; expected one per query")
        self.queries, self.qrels, self.corpus, self.negatives = queries, qrels, corpus, negatives
        self.num_negatives, self.pad_negatives, self.seed = num_negatives, pad_negatives, seed
        self.negative_sampler = negative_sampler if negative_sampler is not None else UniformSampler()
        if not callable(self.negative_sampler):
            raise TypeError(f"negative_sampler must be a miners.negative_samplers.NegativeSampler (callable), got {type(negative_sampler).__name__}")
        self.store = store if store is not None else CandidateStore()
        self.labels = np.arange(len(queries), dtype=np.int64)
        self.num_docs = len(corpus)
        self.num_padded = 0
        if num_negatives > 0:
            if negatives is not None:
                self.num_padded = sum(len(self.candidates(row, num_negatives)) < num_negatives for row in range(len(queries)))
            if pad_negatives == "random":
                worst = max((len(set(q)) for q in qrels), default=0)
                if len(corpus) - worst < num_negatives:
                    raise ValueError(f"pad_negatives='random' needs {num_negatives} non-relevant documents per query, "
                                     f"but a query has {worst} positives in a corpus of {len(corpus)}")

    def __len__(self) -> int:
        return len(self.queries)

    def candidates(self, row: int, limit: int | None = None) -> list[int]:
        """The usable static negatives of query ``row``: its candidates in order, deduplicated, without its
        positives (the first ``limit`` of them when given)."""
        if self.negatives is None:
            return []
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

    def usable(self, row: int, version: int = 0) -> tuple[np.ndarray, np.ndarray | None, float | None]:
        """``(rows [C], scores [C] | None, pos_score | None)``: the usable candidates of query ``row`` in
        ``version`` (0: the static ones), best first, deduplicated, without its positives."""
        if version == 0:
            return np.asarray(self.candidates(row), dtype=np.int64), None, None
        stored = self.store.load(version)
        rows = np.asarray(stored["rows"][row])
        scores = np.asarray(stored["scores"][row]) if "scores" in stored else None
        pos = float(stored["pos_scores"][row]) if "pos_scores" in stored else None
        seen = {int(p) for p in self.qrels[row]}
        keep = []
        for i, c in enumerate(rows.tolist()):
            if c >= 0 and c not in seen:
                seen.add(c)
                keep.append(i)
        keep = np.asarray(keep, dtype=np.int64)
        if scores is not None:
            scores = scores[keep].astype(np.float32)
            if len(scores) and np.isnan(scores).all():
                scores = None  # a query this version did not refresh (set_candidates(query_rows=...)) over unscored candidates
        if pos is not None and np.isnan(pos):
            pos = None
        return rows[keep], scores, pos

    def draw(self, row: int, epoch: int, version: int = 0) -> tuple[int, list[int]]:
        """``(positive, negatives)`` of query ``row`` at ``epoch`` from candidate ``version``: corpus rows, -1 for a padded slot."""
        rng = np.random.default_rng([self.seed, epoch, row])
        positives = self.qrels[row]
        doc = int(positives[int(rng.integers(len(positives)))])
        k = self.num_negatives
        if k == 0:
            return doc, []
        rows, scores, pos_score = self.usable(row, version)
        picks = self.negative_sampler(rows, scores, pos_score, k, rng)
        if len(picks) > k or len(set(picks.tolist())) != len(picks):
            raise ValueError(f"{self.negative_sampler!r} returned {len(picks)} positions {picks.tolist()} for k={k}; expected at most k distinct")
        negs = [int(rows[i]) for i in picks]
        if len(negs) == k:
            return doc, negs
        if self.pad_negatives == "in_batch":
            return doc, negs + [-1] * (k - len(negs))
        taken = {int(p) for p in positives} | set(negs)
        while len(negs) < k:
            c = int(rng.integers(len(self.corpus)))
            if c not in taken:
                taken.add(c)
                negs.append(c)
        return doc, negs

    def __getitem__(self, index: int | tuple[int, int] | tuple[int, int, int]) -> dict[str, Any]:
        if isinstance(index, (tuple, list)):
            row, epoch, version = int(index[0]), int(index[1]), int(index[2]) if len(index) > 2 else 0
        else:
            row, epoch, version = int(index), 0, 0
        doc, negs = self.draw(row, epoch, version)
        return {
            "query": self.queries[row],
            "doc": self.corpus[doc],
            "negs": [self.corpus[n] if n >= 0 else "" for n in negs],
            "query_idx": row,
            "doc_idx": doc,
            "neg_idx": negs,
            "pos_idx": [int(p) for p in self.qrels[row]],
        }


class EpochBatchSampler(Sampler[list[tuple[int, ...]]]):
    """Wrap a batch sampler so that every index carries the epoch: ``[i, ...]`` -> ``[(i, epoch), ...]``,
    and, once ``version()`` (the candidate store's) is above 0, the version: ``[(i, epoch, version), ...]``.

    The train dataset draws its per-epoch negatives from the epoch in the index, and reads the
    candidates of the version in the index, so no state has to reach the DataLoader workers.
    ``version()`` is called in the main process for every batch, as the DataLoader asks for it (module
    docstring). ``set_epoch`` is forwarded to the wrapped sampler.
    """

    def __init__(self, batch_sampler: Sampler[list[int]], version: Callable[[], int] | None = None) -> None:
        self.batch_sampler = batch_sampler
        self.version = version
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

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        for batch in self.batch_sampler:
            version = 0 if self.version is None else int(self.version())
            if version == 0:  # the static candidates: the plain (row, epoch) index
                yield [(int(i), self.epoch) for i in batch]
            else:
                yield [(int(i), self.epoch, version) for i in batch]


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
        ``TextInputs`` (default ``text_fields``) lends its ``max_length``; any other ``inputs`` is used as is."""
        if self.inputs is None:
            return TextInputs(text_fields=TRAIN_TEXT_FIELDS, roles=TRAIN_ROLES)
        if isinstance(self.inputs, TextInputs) and self.inputs.text_fields == {"text": ""}:
            return TextInputs(self.inputs.max_length, text_fields=TRAIN_TEXT_FIELDS, roles=TRAIN_ROLES, keep_text=self.inputs.keep_text)
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
