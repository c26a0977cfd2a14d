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
index plus ``O(chunk * (D + k))``. :class:`RankingMetrics` runs the same driver with the corpus
split across DDP ranks (:func:`~lightning_modules.metrics.sharded.iter_sharded_search`).
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
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from contracts.index import DEFAULT_CHUNK, ArrayLike, IndexKind, merge_topk
from lightning_modules.metrics.embedding_store import first_per_key
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


class RankingMetrics(Metric):
    """:func:`ranking_metrics` accumulated over batches, with the corpus sharded across DDP ranks.

    Usage::

        metric = RankingMetrics(qrels)            # or RankingMetrics() and metric.set_qrels(qrels)
        metric.update_queries(q_emb, q_index)     # q_index: [B] rows of the split's queries (qrels rows)
        metric.update_docs(d_emb, d_index)        # d_index: [B] corpus rows (the ids qrels name)
        metric.compute()                          # {"mrr@10": tensor, "ndcg@10": ..., "recall@K": ..., "r@1": ...}

    (``update(emb, index, is_query)`` is the same with a flag: one dataloader per set.) Rows may
    come in any order and in any split across ranks; a row seen twice (``DistributedSampler`` pads
    the last shard with repeats) counts once: a query or document index seen on two ranks is kept
    on the lower rank, and on one rank at its first update. ``compute()`` is collective and returns
    the same float64 tensors (on the metric's device) on every rank, equal to :func:`ranking_metrics` of one process that saw
    the queries and the corpus once, in index order (up to ties at the k-th place).

    Under DDP:

    - queries (small: MS MARCO dev has 7k) are gathered to every rank, deduplicated, ordered by
      index, and split into one contiguous block per rank;
    - the corpus is *not* gathered: each rank keeps its own rows as its shard and the search is
      :func:`~lightning_modules.metrics.sharded.iter_sharded_search` with the rows' global ids = their
      corpus index, so the top-k lists of every shard are merged per query;
    - deduplication needs one ``int32 [max index + 1]`` owner table per rank (35 MB for 8.8M
      documents), all-reduced with ``MIN``; no embedding crosses the wire, only query chunks and
      ``world x k`` candidates per query.

    Memory for an 8.8M-document corpus (MS MARCO passage, 768-d: 27 GB of float32) on ``W`` ranks:
    the accumulated states (``emb`` as given, on the metric's device; ``compute_on_cpu=True`` moves
    them to the CPU after each update) plus this rank's faiss index (``27 / W`` GB of float32, filled
    ``add_chunk`` rows at a time straight from the list of batches: no concatenated copy of the shard
    is made), the owner table, and ``O(W * chunk * (D + k))`` per search round.

    ``index`` and ``index_kwargs`` (``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``, ``gpu``,
    ``add_chunk``) choose the faiss index of each shard, as in
    :func:`~contracts.index.build_index`; other keyword arguments go to
    ``torchmetrics.Metric``.

    Qrels are configuration, not state: ``reset()`` keeps them. A relevant document that no rank
    passed to ``update_docs`` (e.g. Lightning's sanity check, or ``limit_val_batches``) still counts
    in ``R`` but cannot be retrieved; a warning says how many. A query index without a qrels row is
    an error.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        qrels: Sequence[Iterable[int]] | None = None,
        ks: Sequence[int] = (10, 100, 1000),
        distance: RankingDistance = "cosine",
        mrr_k: int = 10,
        ndcg_k: int = 10,
        chunk_size: int = DEFAULT_CHUNK,
        index: IndexKind = "flat",
        index_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("sync_on_compute", False):
            raise ValueError(
                "RankingMetrics(sync_on_compute=True) would gather the whole corpus to every rank; the corpus stays "
                "sharded and compute() syncs what it needs itself"
            )
        kwargs["sync_on_compute"] = False
        super().__init__(**kwargs)
        self.ks, (self.mrr_k, self.ndcg_k) = check_options(ks, distance, mrr_k, ndcg_k, chunk_size)
        self.distance = distance
        self.chunk_size = chunk_size
        self.index_kind = index
        self.index_kwargs = dict(index_kwargs or {})
        self.qrels: Qrels | None = None
        if qrels is not None:
            self.set_qrels(qrels)
        self.add_state("q_emb", default=[], dist_reduce_fx="cat")
        self.add_state("q_index", default=[], dist_reduce_fx="cat")
        self.add_state("d_emb", default=[], dist_reduce_fx="cat")
        self.add_state("d_index", default=[], dist_reduce_fx="cat")

    def set_qrels(self, qrels: Sequence[Iterable[int]]) -> None:
        """Set the relevance judgements: ``qrels[i]`` = corpus indices relevant to query index ``i``."""
        self.qrels = Qrels.build(qrels, "RankingMetrics.set_qrels: qrels")
        self._computed = None

    def update_queries(self, emb: Tensor, index: Tensor) -> None:
        """Add queries: ``emb: [B, D]``, ``index: [B]`` their rows in the split (qrels rows)."""
        self.update(emb, index, True)

    def update_docs(self, emb: Tensor, index: Tensor) -> None:
        """Add corpus rows: ``emb: [B, D]``, ``index: [B]`` their corpus indices (the ids qrels name)."""
        self.update(emb, index, False)

    def update(self, emb: Tensor, index: Tensor, is_query: bool) -> None:
        """Add a batch of queries (``is_query=True``) or documents: ``emb: [B, D]``, ``index: [B]``."""
        owner = f"{type(self).__name__}.update_{'queries' if is_query else 'docs'}"
        if not isinstance(is_query, bool):
            raise TypeError(f"{type(self).__name__}.update: is_query must be a bool (one set per batch), got {is_query!r:.80}")
        if not isinstance(emb, Tensor) or emb.dim() != 2 or not emb.is_floating_point() or emb.shape[1] == 0:
            raise ValueError(f"{owner}: emb must be a floating-point tensor [B, D], got {_describe_any(emb)}")
        if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point() or index.dtype == torch.bool:
            raise ValueError(f"{owner}: index must be an integer tensor [B], got {_describe_any(index)}")
        if len(index) != len(emb):
            raise ValueError(f"{owner}: index has {len(index)} entries but emb has {len(emb)} rows; expected one index per row")
        if len(index) and (int(index.min()) < 0 or int(index.max()) > MAX_ID):
            raise ValueError(f"{owner}: index values must lie in [0, {MAX_ID}], got [{int(index.min())}, {int(index.max())}]")
        for name in ("q_emb", "d_emb"):
            seen = getattr(self, name)
            if seen and seen[0].shape[1] != emb.shape[1]:
                raise ValueError(f"{owner}: emb has dimension {emb.shape[1]} but earlier batches have {seen[0].shape[1]}")
        (self.q_emb if is_query else self.d_emb).append(emb.detach())
        (self.q_index if is_query else self.d_index).append(index.detach().long().to(emb.device))

    def compute(self) -> dict[str, Tensor]:
        if self.qrels is None:
            raise ValueError("RankingMetrics.compute: no qrels; pass qrels to RankingMetrics(...) or call set_qrels(qrels) first")
        group = self.process_group
        world = distributed_world(group)
        rank = dist.get_rank(group) if world > 1 else 0
        device = comm_device(group) if world > 1 else torch.device("cpu")
        q_index, d_index = self._cat_index("q_index"), self._cat_index("d_index")
        dims = [int(self.q_emb[0].shape[1]) if self.q_emb else 0, int(self.d_emb[0].shape[1]) if self.d_emb else 0]
        meta = torch.tensor([*dims, int(d_index.max()) + 1 if len(d_index) else 0], dtype=torch.int64, device=device)
        if world > 1:
            meta_all = torch.stack(gather_all_tensors(meta, group)).cpu()
        else:
            meta_all = meta.cpu()[None]
        dim_set = set(meta_all[:, :2].flatten().tolist()) - {0}
        if len(dim_set) > 1:
            raise ValueError(f"RankingMetrics.compute: query and document embeddings have different dimensions {sorted(dim_set)}")
        dim = dim_set.pop() if dim_set else 0

        # Queries: gathered (float32), one row per index (lower rank first), in index order.
        q_local = torch.cat([e.float() for e in self.q_emb]) if self.q_emb else torch.empty(0, dim, device=self.device)
        if world > 1:
            q_all = torch.cat([t.cpu() for t in gather_all_tensors(q_local.to(device), group)])
            q_index_all = torch.cat([t.cpu() for t in gather_all_tensors(q_index.to(device), group)])
        else:
            q_all, q_index_all = q_local.cpu(), q_index.cpu()
        if len(q_index_all) == 0:
            raise ValueError("RankingMetrics.compute: no queries; call update_queries(emb, index) before compute()")
        order = first_per_key(q_index_all)
        q_rows, q_ids = q_all[order], q_index_all[order].numpy()
        n_rows = len(self.qrels.n_relevant)
        if int(q_ids[-1]) >= n_rows:
            bad = q_ids[q_ids >= n_rows]
            raise ValueError(
                f"RankingMetrics.compute: query indices {bad[:10].tolist()} have no qrels row (qrels has {n_rows} rows); "
                "expected query indices in [0, len(qrels))"
            )
        evaluated = np.zeros(n_rows, dtype=bool)
        evaluated[q_ids] = True
        block = np.array_split(np.arange(len(q_ids)), world)[rank]

        # Documents: each rank keeps its own rows; a corpus index seen on several ranks stays on the lowest.
        space = int(meta_all[:, 2].max())
        if space == 0:
            raise ValueError("RankingMetrics.compute: the corpus is empty; call update_docs(emb, index) before compute()")
        keep = torch.zeros(len(d_index), dtype=torch.bool)
        keep[first_per_key(d_index.cpu())] = True
        if world > 1:
            owner = torch.full((space,), world, dtype=torch.int32, device=device)
            owner[d_index.to(device)] = rank
            dist.all_reduce(owner, op=dist.ReduceOp.MIN, group=group)
            owner = owner.cpu()
            keep &= owner[d_index.cpu()] == rank
            seen = (owner < world).numpy()
            del owner
        else:
            seen = np.zeros(space, dtype=bool)
            seen[d_index.cpu().numpy()] = True
        n_docs = int(seen.sum())
        self._warn_unseen(evaluated, seen)
        docs = RowChunks([e[k.to(e.device)] if not bool(k.all()) else e for e, k in zip(self.d_emb, keep.split([len(e) for e in self.d_emb]))])
        doc_ids = d_index.cpu()[keep].numpy()
        out = ranking_scores(
            q_rows[torch.from_numpy(block)], q_ids[block], evaluated, self.qrels, docs, doc_ids, n_docs,
            self.ks, self.mrr_k, self.ndcg_k, self.distance, self.chunk_size, self.index_kind,
            group=group, distributed=world > 1, **self.index_kwargs,
        )
        # On the metric's device, so that Lightning's log(sync_dist=True) also works under NCCL (MPS has no float64).
        dtype = torch.float32 if self.device.type == "mps" else torch.float64
        return {key: torch.tensor(value, dtype=dtype, device=self.device) for key, value in out.items()}

    def _cat_index(self, name: str) -> Tensor:
        state = getattr(self, name)
        return torch.cat(state) if state else torch.empty(0, dtype=torch.long, device=self.device)

    def _warn_unseen(self, evaluated: np.ndarray, seen: np.ndarray) -> None:
        assert self.qrels is not None
        docs = (self.qrels.keys & 0xFFFFFFFF).astype(np.int64)
        rows = self.qrels.keys >> 32
        wanted = docs[evaluated[rows]]
        missing = int(np.count_nonzero((wanted >= len(seen)) | ~seen[np.minimum(wanted, len(seen) - 1)]))
        if missing:
            warnings.warn(
                f"RankingMetrics.compute: {missing} of the {len(wanted)} relevant documents of the evaluated queries were "
                "never passed to update_docs (a partial corpus, e.g. Lightning's sanity check or limit_val_batches); "
                "they count as relevant but cannot be retrieved",
                stacklevel=2,
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


class RowChunks:
    """A read-only ``[N, D]`` view over a list of ``[n_i, D]`` batches (row slices and row-index
    arrays, all the index helper asks of a reference set), so a shard is indexed from the batches
    as they were accumulated, without one concatenated copy."""

    def __init__(self, parts: Sequence[Tensor]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        dim = int(self.parts[0].shape[1]) if self.parts else int(parts[0].shape[1]) if parts else 0
        self.shape = (int(self.offsets[-1]), dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | Tensor | np.ndarray) -> Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise ValueError("RowChunks supports contiguous row slices only")
            rows = np.arange(start, stop)
        else:
            rows = key.cpu().numpy() if isinstance(key, Tensor) else np.asarray(key)
        if len(rows) == 0:
            return torch.empty(0, self.shape[1])
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        pieces = []
        for p in np.unique(part):
            local = torch.from_numpy(rows[part == p] - self.offsets[p])
            src = self.parts[p]
            pieces.append(src[local.to(src.device)].cpu() if not _is_range(local) else src[int(local[0]) : int(local[-1]) + 1].cpu())
        out = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if not np.all(np.diff(part) >= 0):  # rows not grouped by part: restore the asked order
            out = out[torch.from_numpy(np.argsort(np.argsort(part, kind="stable"), kind="stable"))]
        return out


def check_options(
    ks: Sequence[int], distance: str, mrr_k: int, ndcg_k: int, chunk: int
) -> tuple[tuple[int, ...], tuple[int, int]]:
    ks = check_ks(ks)
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    for name, value in (("mrr_k", mrr_k), ("ndcg_k", ndcg_k), ("chunk", chunk)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
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


def _is_range(local: Tensor) -> bool:
    return len(local) > 0 and int(local[-1]) - int(local[0]) + 1 == len(local) and bool((local.diff() == 1).all())


def _describe_any(x: Any) -> str:
    return describe(x) if isinstance(x, Tensor) else type(x).__name__
