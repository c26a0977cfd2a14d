"""The training side of the query/document regime: hard negatives drawn per epoch, and the batch sampler that tags the epoch.

``QueryDocTrainDataset`` serves items ``{"query", "doc", "negs", "query_idx", "doc_idx", "neg_idx",
"pos_idx"}``. The sampler yields ``(query_row, epoch)`` indices, so the positive (one of the query's
qrels) and the ``num_negatives`` negatives (a sample without replacement from its candidates, never
a positive) are drawn from a generator seeded by ``(seed, epoch, query_row)``: the same on every
rank, for any number of DataLoader workers, and different each epoch. This is the static-negative
recipe of DPR (Karpukhin et al., "Dense Passage Retrieval for Open-Domain Question Answering", EMNLP
2020, Sec. 3.2: one BM25 negative per question beside the in-batch negatives) and of the MS MARCO
training triples, with the per-epoch resampling of Tevatron/sentence-transformers-style trainers. A
query with fewer than ``k`` usable candidates is padded (``pad_negatives``): ``"in_batch"`` marks
the slot -1 (the loss ignores it; the query keeps its in-batch negatives), ``"random"`` fills it
with random corpus rows that are not among its positives.

Which ``k`` of the candidates (``negative_sampler``, ``miners.negative_samplers``): by default
``UniformSampler`` (the draw above, unchanged); ``TopKSampler``, ``SimANSSampler`` (by score, around
the positive's score), ``PositiveAwareFilter`` (NV-Retriever's filters, then another sampler). The
sampler gets the query's usable candidates (deduplicated, positives removed, best first), their
scores and the positive's score when the candidates carry them, ``k`` and the seeded generator.

``EpochBatchSampler`` wraps the train batch sampler and tags every index with the epoch and, once
the candidates were replaced, their version: ``(query_row, epoch[, version])``. It reads the
version of the ``CandidateStore`` (``datamodules.candidate_store``) per batch, in the main process,
as the DataLoader asks for the batch, so a DataLoader worker needs no shared state: it opens the
version its index names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from datamodules.candidate_store import CandidateStore
from miners.negative_samplers import NegativeSampler, UniformSampler

PAD_NEGATIVES = ("in_batch", "random")


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
