"""Offline hard-negative mining over a whole corpus, with the semantics of sentence-transformers.

The miners of this package pick negatives inside a batch (or a memory). This file mines them
*before* training: every train query is searched against the whole corpus with the shared faiss
helper (``contracts.index``), its positives are removed, the candidates that are
probably unlabelled positives are filtered out by their score, and ``num_negatives`` of the rest
are kept. The result is a static candidate list per query, the input of the static-negative recipe
of ``datamodules.query_doc_train`` (DPR, Karpukhin et al., EMNLP 2020, Sec. 3.2) and of ``hardneg mine``,
which writes it in sentence-transformers' hard-negative JSONL.

Semantics are those of ``sentence_transformers.util.mine_hard_negatives`` (v5.6+, checked against
6.2 in ``tests/miners/test_mine_hard_negatives.py``), argument by argument, so that a user of the text
regime gets the same negatives for the same settings:

1. Candidates: the ``range_max + max_positives`` nearest documents of each query by cosine
   similarity (``max_positives``: the most positives any query has, so that removing them still
   leaves ``range_max`` candidates). ``range_max`` defaults to ``range_min + num_negatives +
   max_positives``, or ``range_min + 10 * num_negatives + max_positives`` when a margin or
   ``max_score`` filter is set (some candidates will be dropped).
2. Filters (:func:`filter_candidates`; each drops a candidate of score ``s``), with ``s_pos`` the
   query's *lowest* positive score (its hardest positive: the safe anchor when a query has several):

   - a positive of the query (unless ``include_positives``);
   - ``absolute_margin`` ``m``: ``s + m > s_pos``. NV-Retriever's TopK-MarginPos.
   - ``relative_margin`` ``m``: ``s > s_pos - |s_pos| * m``. NV-Retriever's TopK-PercPos, whose
     ``s <= p * s_pos`` with ``p = 95%`` is ``relative_margin=0.05`` (their best method); the
     ``|s_pos|`` keeps the threshold below ``s_pos`` when ``s_pos < 0``, where ``p * s_pos`` would lie above it.
   - ``max_score``: ``s > max_score``. NV-Retriever's TopK-Abs.
   - ``min_score``: ``s < min_score`` (too easy to teach anything).
3. Window (:func:`select_negatives`): the survivors in descending score; the ranks ``[range_min,
   range_max)`` *of the survivors* form the window (``range_min`` skips the very top, which is where
   unlabelled positives sit). ``sampling_strategy="top"`` keeps its first ``num_negatives``;
   ``"random"`` draws ``num_negatives`` of its valid entries uniformly without replacement and
   returns them in descending score.

Moreira et al., "NV-Retriever: Improving text embedding models with effective hard-negative mining",
arXiv 2407.15831, 2024, Sec. 3-4 (TopK-Abs, TopK-MarginPos, TopK-PercPos). Reimers, Gurevych et al.,
sentence-transformers, ``util/hard_negatives.py``.

Differences from sentence-transformers (by design; none changes the negatives of a dataset both can express):

- Input: embeddings and corpus rows instead of a ``Dataset`` of ``(anchor, positive)`` text pairs and a
  model. sentence-transformers merges equal texts (one query per distinct anchor, one document per
  distinct text); here rows are rows: give distinct texts, or a duplicate of a positive may be mined
  as a negative. ``max_positives`` is the longest positives list as given (theirs counts the pair rows
  per anchor: the same unless a pair is repeated).
- A query may have no positive here; the margin filters then drop nothing for it.
- Ties between equal scores go to the earlier candidate (faiss order), where ``torch.topk`` leaves them unspecified.
- ``"random"`` draws from a ``random.Random(seed)`` per call, one ``sample(range(max(n_valid, k)), k)``
  per query in query order: exactly their calls on the global ``random`` module, so the same seed
  gives the same negatives (``random.seed(seed)`` before their function).
- No cross-encoder rescoring, and no automatic cap of ``range_max`` for faiss on GPU (2048 results per
  query there): pass ``range_max`` yourself on a GPU index.
- Memory is bounded for any corpus size: queries are searched ``chunk`` at a time against the index
  (flat, IVF or HNSW), never a ``[Q, N]`` matrix; theirs holds ``[faiss_batch_size, N]`` without faiss.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import Tensor

from contracts.arguments import is_int_at_least
from contracts.index import DEFAULT_CHUNK, ArrayLike, IndexKind, as_float32, build_index, iter_search

SamplingStrategy = Literal["top", "random"]
SAMPLING_STRATEGIES = ("top", "random")


def default_range_max(num_negatives: int, max_positives: int, range_min: int = 0, filtered: bool = False) -> int:
    """sentence-transformers' default ``range_max``: room for the skipped ranks, the positives and the
    negatives, ten times the negatives when a margin or ``max_score`` filter will drop some."""
    return range_min + (10 if filtered else 1) * num_negatives + max_positives


def filter_candidates(
    cand_scores: Tensor,
    cand_ids: Tensor,
    pos_scores_min: Tensor | None = None,
    positive_ids: Tensor | None = None,
    *,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
) -> Tensor:
    """Which candidates may be negatives: ``keep [Q, C]`` (bool), the filters of the module docstring.

    Args:
        cand_scores: ``[Q, C]`` similarity of each query to its candidates (any order).
        cand_ids: ``[Q, C]`` their corpus rows; ``-1`` marks an empty slot (never kept).
        pos_scores_min: ``[Q]`` each query's lowest positive score, the anchor of the margins; needed
            when a margin is set (``+inf`` or ``nan``: no anchor, the margins drop nothing for that query).
        positive_ids: ``[Q, P]`` each query's positive rows, padded with ``-1``; these are never kept
            (``None``: keep positives, sentence-transformers' ``include_positives=True``).
        absolute_margin, relative_margin, max_score, min_score: the filters (``None``: off).

    For online use too (an ANN-refreshed candidate list): run it on the fresh top-C, then
    :func:`select_negatives`.
    """
    if cand_scores.dim() != 2 or cand_scores.shape != cand_ids.shape:
        raise ValueError(f"filter_candidates: cand_scores {tuple(cand_scores.shape)} and cand_ids {tuple(cand_ids.shape)} must both be [Q, C]")
    keep = cand_ids >= 0
    if positive_ids is not None:
        if positive_ids.dim() != 2 or positive_ids.shape[0] != cand_ids.shape[0]:
            raise ValueError(f"filter_candidates: positive_ids {tuple(positive_ids.shape)} must be [Q={cand_ids.shape[0]}, P] padded with -1")
        keep &= ~_row_isin(cand_ids, positive_ids)
    if absolute_margin is not None or relative_margin is not None:
        if pos_scores_min is None or pos_scores_min.shape != (cand_scores.shape[0],):
            got = None if pos_scores_min is None else tuple(pos_scores_min.shape)
            raise ValueError(f"filter_candidates: a margin needs pos_scores_min of shape [Q={cand_scores.shape[0]}], got {got}")
        anchor = pos_scores_min.to(cand_scores.dtype).unsqueeze(1)
        has_anchor = torch.isfinite(anchor)
        if absolute_margin is not None:
            keep &= ~(has_anchor & (cand_scores + absolute_margin > anchor))
        if relative_margin is not None:
            keep &= ~(has_anchor & (cand_scores > anchor - anchor.abs() * relative_margin))
    if max_score is not None:
        keep &= ~(cand_scores > max_score)
    if min_score is not None:
        keep &= ~(cand_scores < min_score)
    return keep


def select_negatives(
    cand_scores: Tensor,
    cand_ids: Tensor,
    keep: Tensor,
    num_negatives: int,
    range_min: int = 0,
    range_max: int | None = None,
    sampling_strategy: SamplingStrategy = "top",
    rng: random.Random | None = None,
) -> tuple[Tensor, Tensor]:
    """The negatives of each query from its filtered candidates: ``(ids [Q, n] long, scores [Q, n])``.

    The kept candidates in descending score (ties: candidate order), ranks ``[range_min, range_max)``
    of them; ``"top"``: the first ``num_negatives``; ``"random"``: ``num_negatives`` valid ones drawn
    with ``rng`` (sentence-transformers' draw, module docstring), in descending score. Missing slots:
    id ``-1``, score ``-inf``, at the end of the row.
    """
    if sampling_strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"sampling_strategy must be one of {SAMPLING_STRATEGIES}, got {sampling_strategy!r}")
    n_rows, n_cand = cand_scores.shape
    masked = torch.where(keep, cand_scores.float(), torch.tensor(float("-inf")))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    stop = n_cand if range_max is None else min(range_max, n_cand)
    window = order[:, range_min:stop]
    scores = torch.gather(masked, 1, window)
    ids = torch.gather(cand_ids.long(), 1, window)
    valid = torch.isfinite(scores)
    if sampling_strategy == "top":
        scores, ids, valid = scores[:, :num_negatives], ids[:, :num_negatives], valid[:, :num_negatives]
    else:
        rng = rng if rng is not None else random.Random()
        n_valid = valid.sum(1).tolist()
        width = scores.shape[1]
        # their draw: sample(range(max(options, k)), k); a slot past the window is simply missing
        picks = [rng.sample(range(max(n, num_negatives)), k=num_negatives) for n in n_valid]
        cols = torch.tensor(picks, dtype=torch.long).reshape(n_rows, num_negatives)
        inside = cols < width
        cols = cols.clamp(max=max(width - 1, 0))
        if width:
            scores, ids = torch.gather(scores, 1, cols), torch.gather(ids, 1, cols)
            valid = torch.gather(valid, 1, cols) & inside
        else:
            scores = torch.full((n_rows, num_negatives), float("-inf"))
            ids, valid = torch.full((n_rows, num_negatives), -1, dtype=torch.long), torch.zeros(n_rows, num_negatives, dtype=torch.bool)
        scores = torch.where(valid, scores, torch.tensor(float("-inf")))
        resort = torch.sort(scores, dim=1, descending=True, stable=True).indices
        scores, ids, valid = torch.gather(scores, 1, resort), torch.gather(ids, 1, resort), torch.gather(valid, 1, resort)
    pad = num_negatives - scores.shape[1]
    if pad > 0:
        scores = torch.cat([scores, scores.new_full((n_rows, pad), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((n_rows, pad), -1)], 1)
        valid = torch.cat([valid, valid.new_zeros((n_rows, pad))], 1)
    return torch.where(valid, ids, torch.tensor(-1)), torch.where(valid, scores, torch.tensor(float("-inf")))


def mine_hard_negatives(
    query_emb: ArrayLike,
    corpus_emb: ArrayLike,
    positives: Sequence[Sequence[int]],
    num_negatives: int = 3,
    range_min: int = 0,
    range_max: int | None = None,
    max_score: float | None = None,
    min_score: float | None = None,
    absolute_margin: float | None = None,
    relative_margin: float | None = None,
    sampling_strategy: SamplingStrategy = "top",
    include_positives: bool = False,
    seed: int | random.Random | None = None,
    chunk: int = DEFAULT_CHUNK,
    return_scores: bool = False,
    *,
    max_positives: int | None = None,
    index: IndexKind | faiss.Index = "flat",
    **index_kwargs: Any,
) -> Tensor | tuple[Tensor, Tensor]:
    """Mine ``num_negatives`` hard negatives per query from the corpus (module docstring for the semantics).

    Args:
        query_emb: ``[Q, D]`` query embeddings (tensor or array; L2-normalised here: cosine similarity).
        corpus_emb: ``[N, D]`` document embeddings (a memory-mapped array is fine: read in chunks).
        positives: per query its positive corpus rows (``positives[q]``, in ``[0, N)``).
        num_negatives, range_min, range_max, max_score, min_score, absolute_margin, relative_margin,
            sampling_strategy, include_positives: as ``sentence_transformers.util.mine_hard_negatives``.
        seed: seed (or a ``random.Random``) of ``"random"`` sampling; ``None``: unseeded.
        chunk: queries searched at a time (memory ``O(chunk * (D + range_max))`` beside the index).
        return_scores: also return the negatives' cosine scores ``[Q, n]`` (``-inf`` where missing).
        max_positives: the most positives of any query, which sets the search depth and the default
            ``range_max``; default: from ``positives``. Give the global value when mining a dataset in
            parts (``hardneg mine`` does), so every part matches one call on the whole.
        index: ``"flat"`` (exact, as sentence-transformers), ``"ivf"``, ``"hnsw"`` (approximate;
            ``index_kwargs`` go to :func:`~contracts.index.build_index`), or a faiss
            index already built over the *normalised* corpus with inner product (reused across calls).

    Returns:
        ``ids [Q, num_negatives]`` (long; corpus rows, ``-1`` where fewer were found, missing slots
        last), and with ``return_scores`` also the scores.
    """
    n_queries, n_docs = _check_shapes(query_emb, corpus_emb)
    if len(positives) != n_queries:
        raise ValueError(f"mine_hard_negatives: {len(positives)} positives lists for {n_queries} queries; expected one list of corpus rows per query")
    lengths = np.fromiter((len(p) for p in positives), dtype=np.int64, count=n_queries)
    flat = np.fromiter((int(d) for p in positives for d in p), dtype=np.int64, count=int(lengths.sum()))
    if flat.size and (flat.min() < 0 or flat.max() >= n_docs):
        bad = int(np.flatnonzero((flat < 0) | (flat >= n_docs))[0])
        row = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        raise ValueError(f"mine_hard_negatives: positives[{row}] holds corpus row {int(flat[bad])}, outside the corpus of {n_docs} rows (0..{n_docs - 1})")
    if max_positives is None:
        max_positives = int(lengths.max()) if n_queries else 0
    range_max = check_mining_settings(num_negatives, range_min, range_max, max_positives, sampling_strategy, chunk,
                                filtered=absolute_margin is not None or relative_margin is not None or max_score is not None)
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    ids_out = torch.full((n_queries, num_negatives), -1, dtype=torch.long)
    scores_out = torch.full((n_queries, num_negatives), float("-inf"))
    if n_queries == 0:
        return (ids_out, scores_out) if return_scores else ids_out
    faiss_index = index if isinstance(index, faiss.Index) else build_index(corpus_emb, "ip", index, normalize=True, **index_kwargs)
    if faiss_index.ntotal != n_docs:
        raise ValueError(f"mine_hard_negatives: the given index holds {faiss_index.ntotal} vectors for a corpus of {n_docs} rows")
    depth = min(range_max + max_positives, n_docs)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    need_anchor = absolute_margin is not None or relative_margin is not None
    for start, scores, ids in iter_search(faiss_index, query_emb, depth, chunk, normalize=True):
        stop = start + len(scores)
        part = slice(int(offsets[start]), int(offsets[stop]))
        rows = np.repeat(np.arange(stop - start), lengths[start:stop])
        pos_ids = _padded(rows, flat[part], stop - start)
        anchor = _lowest_positive_scores(query_emb, corpus_emb, start, stop, rows, flat[part]) if need_anchor else None
        cand_scores, cand_ids = torch.from_numpy(scores), torch.from_numpy(ids)
        keep = filter_candidates(cand_scores, cand_ids, anchor, None if include_positives else pos_ids, absolute_margin=absolute_margin,
                                 relative_margin=relative_margin, max_score=max_score, min_score=min_score)
        neg_ids, neg_scores = select_negatives(cand_scores, cand_ids, keep, num_negatives, range_min, range_max, sampling_strategy, rng)
        ids_out[start:stop], scores_out[start:stop] = neg_ids, neg_scores
    return (ids_out, scores_out) if return_scores else ids_out


def _check_shapes(query_emb: ArrayLike, corpus_emb: ArrayLike) -> tuple[int, int]:
    for name, x in (("query_emb", query_emb), ("corpus_emb", corpus_emb)):
        if len(getattr(x, "shape", ())) != 2:
            raise ValueError(f"mine_hard_negatives: {name} must be a 2-D [rows, D] tensor or array, got shape {tuple(getattr(x, 'shape', ()))}")
    if query_emb.shape[1] != corpus_emb.shape[1]:
        raise ValueError(f"mine_hard_negatives: query_emb is [Q, {query_emb.shape[1]}] but corpus_emb is [N, {corpus_emb.shape[1]}]; "
                         f"they must share the embedding size")
    if corpus_emb.shape[0] == 0:
        raise ValueError("mine_hard_negatives: corpus_emb is empty; there is nothing to mine from")
    return int(query_emb.shape[0]), int(corpus_emb.shape[0])


def check_mining_settings(num_negatives: int, range_min: int, range_max: int | None, max_positives: int, sampling_strategy: str, chunk: int,
                    filtered: bool) -> int:
    """The validated ``range_max`` (sentence-transformers' default when ``None``), with their checks and messages."""
    if sampling_strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"mine_hard_negatives: sampling_strategy must be one of {SAMPLING_STRATEGIES}, got {sampling_strategy!r}")
    if not is_int_at_least(num_negatives, 1):
        raise ValueError(f"mine_hard_negatives: num_negatives must be an integer >= 1, got {num_negatives!r}")
    if not is_int_at_least(chunk, 1):
        raise ValueError(f"mine_hard_negatives: chunk must be a positive integer, got {chunk!r}")
    if range_min < 0:
        raise ValueError(f"mine_hard_negatives: range_min must be non-negative, got range_min={range_min}")
    if range_max is None:
        range_max = default_range_max(num_negatives, max_positives, range_min, filtered)
    if range_min >= range_max:
        raise ValueError(f"mine_hard_negatives: range_min must be smaller than range_max, got range_min={range_min} and range_max={range_max}")
    if num_negatives > range_max - range_min:
        raise ValueError(f"mine_hard_negatives: cannot mine {num_negatives} negatives per query: only {range_max - range_min} candidates remain "
                         f"after skipping the first range_min={range_min} of range_max={range_max}; decrease num_negatives or range_min, "
                         f"or increase range_max")
    return int(range_max)


def _padded(rows: np.ndarray, values: np.ndarray, n_rows: int) -> Tensor:
    """Per-row lists given as (row, value) pairs sorted by row -> ``[n_rows, P]`` padded with -1."""
    counts = np.bincount(rows, minlength=n_rows)
    out = np.full((n_rows, max(int(counts.max(initial=0)), 1)), -1, dtype=np.int64)
    col = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    out[rows, col] = values
    return torch.from_numpy(out)


def _lowest_positive_scores(query_emb: ArrayLike, corpus_emb: ArrayLike, start: int, stop: int, rows: np.ndarray, docs: np.ndarray) -> Tensor:
    """``[stop - start]``: each query's lowest cosine to its positives (``+inf`` without positives)."""
    q = as_float32(query_emb[start:stop], normalize=True)
    unique, inverse = np.unique(docs, return_inverse=True)
    picked = corpus_emb[torch.from_numpy(unique)] if isinstance(corpus_emb, Tensor) else corpus_emb[unique]
    d = as_float32(picked, normalize=True)
    pair = np.einsum("ij,ij->i", q[rows], d[inverse]) if len(rows) else np.zeros(0, dtype=np.float32)
    out = torch.full((stop - start,), float("inf"))
    return out.scatter_reduce(0, torch.from_numpy(rows), torch.from_numpy(pair.astype(np.float32)), reduce="amin")


def _row_isin(cand_ids: Tensor, positive_ids: Tensor) -> Tensor:
    """``[Q, C]``: is ``cand_ids[q, c]`` among ``positive_ids[q]`` (``-1`` padding never matches)."""
    width = max(int(cand_ids.max()) if cand_ids.numel() else 0, int(positive_ids.max()) if positive_ids.numel() else 0, 0) + 2
    rows = torch.arange(cand_ids.shape[0], dtype=torch.long).unsqueeze(1) * width
    pos = positive_ids.long()
    pos_keys = torch.where(pos >= 0, rows + pos, torch.tensor(-1))
    return torch.isin(rows + cand_ids.long(), pos_keys) & (cand_ids >= 0)
