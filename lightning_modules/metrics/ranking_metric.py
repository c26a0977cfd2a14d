"""``RankingMetrics``: :func:`~lightning_modules.metrics.ranking.ranking_metrics` as a torchmetrics ``Metric``, the corpus sharded across DDP ranks.

The metric definitions (MRR@10, nDCG@10, Recall@K, R@1 as trec_eval / pytrec_eval compute them),
the qrels format and the tie rule are those of :mod:`~lightning_modules.metrics.ranking`; this module
holds what accumulating them over validation batches under DDP adds:

- queries and documents arrive in batches, in any order and any split across ranks, each row with its
  index (query row / corpus id); a row seen twice (``DistributedSampler`` pads the last shard with
  repeats) counts once, on the lowest rank that saw it;
- the corpus (MS MARCO passage: 8.8M rows, 27 GB of 768-d float32) is never gathered: each rank
  keeps its rows as its shard and ``compute()`` runs the same driver as the function
  (:func:`~lightning_modules.metrics.ranking.ranking_scores`) over a sharded search
  (:func:`~lightning_modules.metrics.sharded.iter_sharded_search`), only query chunks and ``world x k``
  candidates per query crossing the wire;
- :class:`RowChunks` indexes a shard straight from the list of accumulated batches, without one
  concatenated copy of it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from contracts.index import DEFAULT_CHUNK, IndexKind
from lightning_modules.metrics.embedding_store import first_per_key
from lightning_modules.metrics.inputs import describe
from lightning_modules.metrics.ranking import MAX_ID, Qrels, RankingDistance, check_options, ranking_scores
from lightning_modules.metrics.sharded import comm_device, distributed_world


class RankingMetrics(Metric):
    """:func:`~lightning_modules.metrics.ranking.ranking_metrics` accumulated over batches, with the corpus sharded across DDP ranks.

    Usage::

        metric = RankingMetrics(qrels)            # or RankingMetrics() and metric.set_qrels(qrels)
        metric.update_queries(q_emb, q_index)     # q_index: [B] rows of the split's queries (qrels rows)
        metric.update_docs(d_emb, d_index)        # d_index: [B] corpus rows (the ids qrels name)
        metric.compute()                          # {"mrr@10": tensor, "ndcg@10": ..., "recall@K": ..., "r@1": ...}

    (``update(emb, index, is_query)`` is the same with a flag: one dataloader per set.) Rows may
    come in any order and in any split across ranks; a row seen twice (``DistributedSampler`` pads
    the last shard with repeats) counts once: a query or document index seen on two ranks is kept
    on the lower rank, and on one rank at its first update. ``compute()`` is collective and returns
    the same float64 tensors (on the metric's device) on every rank, equal to :func:`~lightning_modules.metrics.ranking.ranking_metrics` of one process that saw
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


def _is_range(local: Tensor) -> bool:
    return len(local) > 0 and int(local[-1]) - int(local[0]) + 1 == len(local) and bool((local.diff() == 1).all())


def _describe_any(x: Any) -> str:
    return describe(x) if isinstance(x, Tensor) else type(x).__name__
