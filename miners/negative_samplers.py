"""Negative samplers: which ``k`` of a query's hard-negative candidates it trains on this epoch.

A train query of the text regime (``datamodules.query_doc``) has a candidate list: corpus rows, best
first (a BM25 list, a mined list, or the top-C of an ANN refresh under the current model), with
their scores under the current model when known and the score of the query's positive. A sampler
turns that list into the ``k`` negatives of one epoch. It is called in the DataLoader workers, once
per item, with a ``numpy.random.Generator`` seeded by ``(seed, epoch, query_row)``, so its choice is
the same on every rank and for any number of workers, and changes with the epoch.

Contract (``NegativeSampler.__call__``)::

    positions = sampler(rows [C] int64, scores [C] float32 | None, pos_score float | None, k, rng)

``rows`` are the *usable* candidates (deduplicated, the query's known positives removed, best first);
``scores[i]`` is ``s(q, rows[i])``; ``pos_score`` is ``s(q, d+)``, the query's hardest (lowest-scoring)
positive: the safe anchor when a query has several, as in ``miners.mine_hard_negatives``. The sampler
returns at most ``k`` distinct positions into ``rows``, in candidate order; fewer than ``k`` leave slots
for the DataModule's padding (``pad_negatives``). A sampler that needs scores says so
(``needs_scores``) and raises a clear error without them (static candidates have no scores: refresh
them with ``experiments.callbacks.ANNRefresh``).

- :class:`TopKSampler`: the first ``k`` (ANCE's top-ranked negatives; no randomness).
- :class:`UniformSampler`: ``k`` uniformly without replacement (the static-negative recipe of DPR and
  of Tevatron-style trainers; the DataModule's default, draw for draw what it did before samplers).
- :class:`SimANSSampler`: ambiguous negatives, sampled around the positive's score (SimANS, Eq. 2).
- :class:`PositiveAwareFilter`: NV-Retriever's positive-aware filters, then an inner sampler.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class NegativeSampler:
    """Base of the samplers (module docstring for the contract). Subclasses implement ``sample``."""

    needs_scores: bool = False

    def __call__(self, rows: np.ndarray, scores: np.ndarray | None, pos_score: float | None, k: int, rng: np.random.Generator) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"{type(self).__name__}: rows must be a 1-D array of candidate corpus rows, got shape {rows.shape}")
        if scores is not None:
            scores = np.asarray(scores, dtype=np.float32)
            if scores.shape != rows.shape:
                raise ValueError(f"{type(self).__name__}: scores has shape {scores.shape} for {rows.shape} candidate rows; expected one score per row")
        if self.needs_scores and scores is None:
            raise ValueError(
                f"{type(self).__name__} samples by score but the candidates have none (static candidates from the DataModule "
                f"carry no scores): refresh them under the current model with experiments.callbacks.ANNRefresh (first='untrained', "
                f"or first='file' with a sampler that needs no scores until the first refresh), or use TopKSampler/UniformSampler"
            )
        if k < 0:
            raise ValueError(f"{type(self).__name__}: k must be >= 0, got {k}")
        if k == 0 or len(rows) == 0:
            return np.zeros(0, dtype=np.int64)
        return np.asarray(self.sample(rows, scores, pos_score, k, rng), dtype=np.int64)

    def sample(self, rows: np.ndarray, scores: np.ndarray | None, pos_score: float | None, k: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class TopKSampler(NegativeSampler):
    """The first ``k`` usable candidates (the ``k`` best under whoever ranked them).

    ANCE (Xiong et al., "Approximate Nearest Neighbor Negative Contrastive Learning for Dense Text
    Retrieval", ICLR 2021, Sec. 3) samples its negatives from the top of the ANN list; this takes the
    top itself, as ``sampling_strategy="top"`` of ``mine_hard_negatives``. Uses no randomness.
    """

    def sample(self, rows, scores, pos_score, k, rng):
        return np.arange(min(k, len(rows)))


class UniformSampler(NegativeSampler):
    """``k`` candidates uniformly without replacement, in candidate order (all of them when there are fewer).

    The static-negative recipe: DPR (Karpukhin et al., "Dense Passage Retrieval for Open-Domain
    Question Answering", EMNLP 2020, Sec. 3.2) draws BM25 negatives; Tevatron and sentence-transformers
    trainers resample them from the candidate list every epoch. It consumes the generator exactly as
    ``QueryDocTrainDataset`` did before samplers existed (one ``rng.choice`` when there are at least
    ``k``, nothing otherwise), so the negatives of a seed did not change.
    """

    def sample(self, rows, scores, pos_score, k, rng):
        if len(rows) < k:
            return np.arange(len(rows))
        return np.sort(rng.choice(len(rows), size=k, replace=False))


class SimANSSampler(NegativeSampler):
    """Ambiguous negatives: ``k`` of the top candidates with probability peaked at the positive's score.

    Zhou et al., "SimANS: Simple Ambiguous Negatives Sampling for Dense Text Retrieval" (EMNLP 2022,
    industry track), Eq. 2: over the top-``K`` retrieved candidates ``d_i``,

        p_i  proportional to  exp(-a * (s(q, d_i) - s(q, d+) - b) ** 2)

    ``a`` sets the width (larger: a narrower peak) and ``b`` the offset of the peak. Sign convention
    (the paper's, as written in Eq. 2): the peak sits at ``s(q, d_i) = s(q, d+) + b``, so ``b = 0``
    favours negatives scored like the positive, ``b < 0`` ones a little below it (safer from false
    negatives), ``b > 0`` ones above it. The authors' released MS MARCO code uses ``b = 0`` with
    ``exp(-tau * |s_i - s_pos|)`` in places; this class implements Eq. 2 as stated.

    Scores are the candidates' scores under the current model (an ``ANNRefresh``); the paper samples
    from the top-100 (MS MARCO) or top-200 retrieved. ``k`` distinct candidates are drawn without
    replacement, successively with the normalised ``p`` (``Generator.choice(replace=False, p=p)``),
    and returned in candidate order.

    Args:
        a: density (the paper's ``a``; their MS MARCO setting is 0.5). b: peak offset (``b``; 0).
        top_k: the ``K`` candidates to sample from (``None``: all given, i.e. the refresh's depth).
    """

    needs_scores = True

    def __init__(self, a: float = 0.5, b: float = 0.0, top_k: int | None = None) -> None:
        if not a > 0:
            raise ValueError(f"SimANSSampler: a must be > 0 (the width of the sampling peak), got {a}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"SimANSSampler: top_k must be >= 1 or None, got {top_k}")
        self.a, self.b, self.top_k = float(a), float(b), top_k

    def probabilities(self, scores: np.ndarray, pos_score: float) -> np.ndarray:
        """``p [K]`` of Eq. 2 over ``scores [K]`` (computed in float64, shifted by the max exponent)."""
        logits = -self.a * (scores.astype(np.float64) - float(pos_score) - self.b) ** 2
        weights = np.exp(logits - logits.max())
        return weights / weights.sum()

    def sample(self, rows, scores, pos_score, k, rng):
        if pos_score is None or not math.isfinite(pos_score):
            raise ValueError(f"SimANSSampler needs the positive's score s(q, d+) of every query (Eq. 2), got {pos_score!r}; "
                             f"ANNRefresh computes it (set_candidates(..., pos_scores=...))")
        n = len(rows) if self.top_k is None else min(self.top_k, len(rows))
        if n <= k:
            return np.arange(n)
        p = self.probabilities(scores[:n], pos_score)
        return np.sort(rng.choice(n, size=k, replace=False, p=p))


class PositiveAwareFilter(NegativeSampler):
    """Drop the candidates that score too close to (or above) the positive, then sample with ``inner``.

    Moreira et al., "NV-Retriever: Improving text embedding models with effective hard-negative
    mining" (arXiv 2407.15831, 2024), Sec. 3-4, with the semantics of
    ``miners.mine_hard_negatives.filter_candidates`` (which this calls, on the live scores):

    - ``max_score`` (TopK-Abs): drop ``s > max_score``;
    - ``absolute_margin`` ``m`` (TopK-MarginPos): drop ``s + m > s_pos``;
    - ``relative_margin`` ``m`` (TopK-PercPos): drop ``s > s_pos - |s_pos| * m`` (their best,
      ``s <= 95% * s_pos``, is ``relative_margin=0.05``).

    ``s_pos`` is ``pos_score`` (the hardest positive). A query without a finite ``pos_score`` is not
    filtered by the margins (as ``filter_candidates``). The survivors, still best first, go to
    ``inner`` (default ``TopKSampler``: the paper's "TopK" part).
    """

    needs_scores = True

    def __init__(self, inner: NegativeSampler | None = None, absolute_margin: float | None = None, relative_margin: float | None = None,
                 max_score: float | None = None) -> None:
        if absolute_margin is None and relative_margin is None and max_score is None:
            raise ValueError("PositiveAwareFilter: set at least one of absolute_margin (TopK-MarginPos), relative_margin (TopK-PercPos) "
                             "or max_score (TopK-Abs)")
        self.inner = inner if inner is not None else TopKSampler()
        self.absolute_margin, self.relative_margin, self.max_score = absolute_margin, relative_margin, max_score

    def keep(self, rows: np.ndarray, scores: np.ndarray, pos_score: float | None) -> np.ndarray:
        """Bool ``[C]``: which candidates pass the filters."""
        from miners.mine_hard_negatives import filter_candidates  # faiss and the index helper only when a filter is used

        anchor = torch.tensor([float("inf") if pos_score is None else float(pos_score)], dtype=torch.float32)
        keep = filter_candidates(torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))[None],
                                 torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))[None], anchor,
                                 absolute_margin=self.absolute_margin, relative_margin=self.relative_margin, max_score=self.max_score)
        return keep[0].numpy()

    def sample(self, rows, scores, pos_score, k, rng):
        kept = np.flatnonzero(self.keep(rows, scores, pos_score))
        inner = self.inner(rows[kept], scores[kept], pos_score, k, rng)
        return kept[inner]
