"""Ranking metrics of query -> document retrieval: MRR@10, nDCG@10, Recall@K, R@1 (MS MARCO, BEIR).

Relevance is binary and given as *qrels*: for query row ``i``, ``qrels[i]`` lists the corpus rows
relevant to it (MS MARCO passage: usually one; TREC-DL and BEIR: several). Every document not
listed is non-relevant. The definitions are trec_eval's, as pytrec_eval computes them (Van Gysel,
de Rijke, "Pytrec_eval: An Extremely Fast Python Interface to trec_eval", SIGIR 2018), for one query
with ``R`` relevant documents and ``rel(i)`` = 1 if the document at rank ``i`` (1-based) is relevant:

- MRR@10, the MS MARCO passage measure (Nguyen et al., "MS MARCO: A Human Generated MAchine
  Reading COmprehension Dataset", 2016): ``1 / i`` for the first relevant rank ``i <= 10``, else 0
  (trec_eval's ``recip_rank`` on the run cut at 10).
- nDCG@10 (Jarvelin, Kekalainen, "Cumulated Gain-Based Evaluation of IR Techniques", TOIS 2002;
  trec_eval's ``ndcg_cut_10``): ``DCG@10 / IDCG@10`` with ``DCG@n = sum_{i<=n} rel(i) / log2(i + 1)``
  and the ideal ``IDCG@n = sum_{i<=min(R, n)} 1 / log2(i + 1)`` (from the number of relevant
  documents in the qrels, retrieved or not).
- Recall@K (trec_eval's ``recall_K``): ``|relevant in the top K| / R``. A K larger than the corpus
  counts the whole corpus (the search is clamped to ``N`` documents; the key keeps the asked K).
- R@1: 1 if the top-1 document is relevant (trec_eval's ``success_1``, "success@1"; with one relevant
  document per query it equals Recall@1).

Means run over the queries with at least one relevant document; a query without any (an empty
``qrels[i]``) is excluded and counted (a ``UserWarning`` gives the number), which is what pytrec_eval
does when its qrels lack the query. No query with a relevant document: every value is NaN, with a
warning.

Ties: a ranking is ordered by score descending, then by corpus row ascending (the shared
:func:`~contracts.index.merge_topk` order, the same whichever way the corpus is
split). pytrec_eval re-sorts a run by score and breaks ties by document id *string*, descending, so
the two agree only without tied scores; the tests use continuous random embeddings.

Search and memory: the top ``k = max(ks, mrr_k, ndcg_k)`` (at most ``N``) documents of every query
come from the shared faiss helper (:mod:`~contracts.index`, exact ``"flat"`` by
default) ``chunk`` queries at a time; the ``[Q, N]`` score matrix is never built. Memory is the
index plus ``O(chunk * (D + k))``. :class:`~lightning_modules.metrics.ranking_metric.RankingMetrics`
(the torchmetrics ``Metric``) runs the same driver, :func:`ranking_scores`, with the corpus split
across DDP ranks (:func:`~lightning_modules.metrics.sharded.iter_sharded_search`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from contracts.arguments import is_int_at_least
from contracts.index import DEFAULT_CHUNK, ArrayLike, IndexKind, merge_topk
from lightning_modules.metrics.inputs import as_tensor, check_ks, describe
from lightning_modules.metrics.sharded import comm_device, distributed_world, iter_sharded_search

RankingDistance = Literal["cosine", "dot"]
DISTANCES = ("cosine", "dot")
# Working arrays per chunk are [rows, k] int64: cap rows * k (32 MiB each) whatever k is.
MAX_CHUNK_ELEMENTS = 1 << 22
# A qrels pair is one int64 key (query << 32 | doc): rows and document ids must stay below 2**31.
MAX_ID = (1 << 31) - 1
FINITE_CHECK_ROWS = 65536


def ranking_metrics(
    q_emb: ArrayLike,
    doc_emb: ArrayLike,
    qrels: Sequence[Iterable[int]],
    ks: Sequence[int] = (10, 100, 1000),
    distance: RankingDistance = "cosine",
    mrr_k: int = 10,
    ndcg_k: int = 10,
    chunk: int = DEFAULT_CHUNK,
    index: IndexKind = "flat",
    **index_kwargs: Any,
) -> dict[str, float]:
    """MRR@``mrr_k``, nDCG@``ndcg_k``, Recall@K and R@1 of queries against a corpus, in this process.

    Args:
        q_emb: ``[Q, D]`` query embeddings (tensor or array, any float dtype; searched in float32).
        doc_emb: ``[N, D]`` corpus embeddings; converted to float32 ``add_chunk`` rows at a time.
        qrels: ``Q`` entries; ``qrels[i]`` holds the corpus rows (integers in ``[0, N)``) relevant to
            query ``i``; repeats count once; an empty entry excludes the query (see the module doc).
        ks: the K of Recall@K.
        distance: ``"cosine"`` (inner product of L2-normalised rows, normalised chunk by chunk) or
            ``"dot"`` (raw inner product, e.g. DPR / ANCE / TAS-B style dot-product models).
        mrr_k, ndcg_k: the cut-offs of MRR and nDCG (10 for MS MARCO and BEIR).
        chunk: queries searched at once; memory is the index plus ``O(chunk * (D + k))``.
        index: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"`` (approximate; ``index_kwargs`` go to
            :func:`~contracts.index.build_index`).

    Returns:
        Python floats under ``mrr@{mrr_k}``, ``ndcg@{ndcg_k}``, ``recall@K`` for every K, ``r@1``.
    """
    ks, cutoffs = check_options(ks, distance, mrr_k, ndcg_k, chunk)
    q = as_matrix(q_emb, "q_emb", "queries")
    docs = as_matrix(doc_emb, "doc_emb", "documents (the corpus is empty)")
    if q.shape[1] != docs.shape[1]:
        raise ValueError(f"q_emb has dimension {q.shape[1]} but doc_emb has {docs.shape[1]}; expected the same")
    table = Qrels.build(qrels, "qrels", n_queries=len(q), n_docs=len(docs))
    return ranking_scores(
        q, np.arange(len(q)), np.ones(len(q), dtype=bool), table, docs, np.arange(len(docs)), len(docs),
        ks, *cutoffs, distance, chunk, index, **index_kwargs,
    )


@dataclass(frozen=True)
class Qrels:
    """Binary relevance as sorted int64 keys ``query_row << 32 | doc_row`` (searchsorted lookups:
    ``O(log P)`` per retrieved document, no per-query Python sets) and ``n_relevant: [rows]``."""

    keys: np.ndarray
    n_relevant: np.ndarray

    @classmethod
    def build(cls, qrels: Sequence[Iterable[int]], name: str, n_queries: int | None = None, n_docs: int | None = None) -> Qrels:
        if isinstance(qrels, (str, bytes, dict)) or not isinstance(qrels, (Sequence, np.ndarray)):
            raise TypeError(f"{name} must be a list with one list of relevant document rows per query, got {type(qrels).__name__}")
        if n_queries is not None and len(qrels) != n_queries:
            raise ValueError(f"{name} has {len(qrels)} entries but q_emb has {n_queries} rows; expected one entry per query")
        if len(qrels) > MAX_ID:
            raise ValueError(f"{name} has {len(qrels)} entries; at most {MAX_ID} are supported")
        parts, counts = [], np.zeros(len(qrels), dtype=np.int64)
        for i, entry in enumerate(qrels):
            docs = _doc_rows(entry, f"{name}[{i}]")
            if len(docs):
                high = n_docs if n_docs is not None else MAX_ID + 1
                if docs.min() < 0 or docs.max() >= high:
                    bad = docs[(docs < 0) | (docs >= high)]
                    where = f"the corpus has {n_docs} rows" if n_docs is not None else f"ids must lie in [0, {MAX_ID}]"
                    raise ValueError(f"{name}[{i}] names document rows {bad[:10].tolist()} out of range; {where}")
                docs = np.unique(docs)
                counts[i] = len(docs)
                parts.append((np.int64(i) << 32) | docs)
        keys = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        return cls(keys, counts)  # rows in order and docs sorted within a row: already sorted

    def relevant(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """``[c, k]`` bool: is document ``ids[j, i]`` (``-1``: empty slot) relevant to query ``rows[j]``?"""
        if len(self.keys) == 0:
            return np.zeros(ids.shape, dtype=bool)
        keys = (rows.astype(np.int64)[:, None] << 32) | np.maximum(ids, 0)
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return (self.keys[at] == keys) & (ids >= 0)


def ranking_scores(
    q: ArrayLike,
    q_rows: np.ndarray,
    evaluated: np.ndarray,
    qrels: Qrels,
    docs: Any,
    doc_ids: np.ndarray,
    n_docs: int,
    ks: tuple[int, ...],
    mrr_k: int,
    ndcg_k: int,
    distance: RankingDistance,
    chunk: int,
    index: IndexKind = "flat",
    group: Any = None,
    distributed: bool = False,
    **index_kwargs: Any,
) -> dict[str, float]:
    """The driver: this rank's queries ``q: [Q_r, D]`` (qrels rows ``q_rows``) against this rank's
    documents ``docs: [M_r, D]`` (global ids ``doc_ids``; ``n_docs`` documents over all ranks).
    ``evaluated: [rows]`` marks the queries of every rank (the same on each). Collective when
    ``distributed``: every rank must call it."""
    world = distributed_world(group) if distributed else 1
    keys = [f"mrr@{mrr_k}", f"ndcg@{ndcg_k}"] + [f"recall@{k}" for k in ks] + ["r@1"]
    counted = evaluated & (qrels.n_relevant > 0)
    n_valid, n_excluded = int(counted.sum()), int((evaluated & (qrels.n_relevant == 0)).sum())
    if n_excluded:
        warnings.warn(f"ranking_metrics: {n_excluded} queries have no relevant document and are excluded from the means", stacklevel=3)
    if n_valid == 0:  # the same on every rank (evaluated and qrels are), so no rank enters the search
        warnings.warn("ranking_metrics: no query has a relevant document; every value is NaN", stacklevel=3)
        return {key: float("nan") for key in keys}
    k = min(max(*ks, mrr_k, ndcg_k), n_docs)
    rows_per_chunk = max(1, min(chunk, MAX_CHUNK_ELEMENTS // k) // world)
    discount = 1.0 / np.log2(np.arange(2, max(k, ndcg_k) + 2, dtype=np.float64))
    ideal = np.concatenate([[0.0], np.cumsum(discount[:ndcg_k])])  # ideal[r] = IDCG of r relevant documents
    per_query = np.zeros((len(evaluated), len(keys)), dtype=np.float64)
    searched = iter_sharded_search(
        q, docs, k, doc_ids, "ip", index, rows_per_chunk, group, distributed, distance == "cosine", **index_kwargs
    )
    for start, scores, ids in searched:
        rows = q_rows[start : start + len(ids)]
        tied = (scores[:, 1:] == scores[:, :-1]).any(axis=1)
        if tied.any():  # faiss lists are sorted by score; only rows with equal scores need ids ascending
            ids = ids.copy()
            ids[tied] = merge_topk(scores[tied], ids[tied], k, "ip")[1]
        match = qrels.relevant(rows, ids)
        big_r = np.maximum(qrels.n_relevant[rows], 1)  # R = 0 rows are excluded below
        out = np.zeros((len(rows), len(keys)), dtype=np.float64)
        head = match[:, : min(mrr_k, k)]
        out[:, 0] = np.where(head.any(axis=1), 1.0 / (head.argmax(axis=1) + 1), 0.0)
        cut = min(ndcg_k, k)
        out[:, 1] = (match[:, :cut] * discount[:cut]).sum(axis=1) / ideal[np.minimum(big_r, ndcg_k)]
        for j, kk in enumerate(ks):
            out[:, 2 + j] = match[:, : min(kk, k)].sum(axis=1) / big_r
        out[:, -1] = match[:, 0]
        per_query[rows] = out
    if world > 1:
        # Every query has one owner; the other ranks hold 0 in its row, so the sum is exact.
        summed = torch.from_numpy(per_query).to(comm_device(group))
        dist.all_reduce(summed, group=group)
        per_query = summed.cpu().numpy()
    values = per_query[counted].sum(axis=0) / n_valid
    return dict(zip(keys, values.tolist()))


def check_options(
    ks: Sequence[int], distance: str, mrr_k: int, ndcg_k: int, chunk: int
) -> tuple[tuple[int, ...], tuple[int, int]]:
    ks = check_ks(ks)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    for name, value in (("mrr_k", mrr_k), ("ndcg_k", ndcg_k), ("chunk", chunk)):
        if not is_int_at_least(value, 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return ks, (mrr_k, ndcg_k)


def as_matrix(x: Any, name: str, rows: str) -> Tensor:
    """``x`` as a CPU ``[N, D]`` float tensor without copying (numpy shares memory); rows checked for
    NaN/Inf ``FINITE_CHECK_ROWS`` at a time, so a corpus-sized input gets no full-size boolean mask."""
    t = as_tensor(x, name)
    if t.dim() != 2 or not t.is_floating_point() or t.shape[1] == 0:
        raise ValueError(f"{name} must be a floating-point array [N, D], got {describe(t)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has no rows; expected at least one row of {rows}, got {describe(t)}")
    for start in range(0, len(t), FINITE_CHECK_ROWS):
        rows = t[start : start + FINITE_CHECK_ROWS]
        if bool(torch.isfinite(rows.sum(dim=1)).all()):  # one reduction; a non-finite sum may be overflow: look closer
            continue
        finite = torch.isfinite(rows).all(dim=1)
        if not bool(finite.all()):
            bad = (start + (~finite).nonzero().flatten()).tolist()
            raise ValueError(f"{name} has NaN or Inf in rows {bad[:10]}")
    return t


def _doc_rows(entry: Any, name: str) -> np.ndarray:
    if isinstance(entry, (str, bytes, float)) or not isinstance(entry, Iterable):
        raise TypeError(f"{name} must be a list of integer document rows, got {entry!r:.80}")
    values = entry.cpu().numpy() if isinstance(entry, Tensor) else np.asarray(list(entry) if not isinstance(entry, np.ndarray) else entry)
    if values.size == 0:
        return np.empty(0, dtype=np.int64)
    if values.ndim != 1 or values.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a list of integer document rows, got {values.tolist()!r:.80}")
    return values.astype(np.int64)
