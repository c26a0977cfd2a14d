"""k-NN scores of labelled queries from their neighbour lists: Recall@K, Precision@1, R-Precision, MAP@R.

Definitions (one query with label ``y``; its ranking is the reference set from nearest to farthest,
its own row removed when the query set is the reference set):

- Recall@K in the deep-metric-learning sense (Oh Song, Xiang, Jegelka, Savarese, "Deep Metric
  Learning via Lifted Structured Feature Embedding", CVPR 2016): 1 if any of the K nearest has
  label ``y``. Precision@1 = Recall@1.
- R-Precision and MAP@R (Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020,
  Sec. 3.2): ``R`` references carry ``y``; ``R-Precision = r / R`` with ``r`` of them among the first
  ``R``, and ``MAP@R = (1/R) sum_{i<=R} P(i) rel(i)``.

A query with ``R = 0`` (lone) is left out, as pytorch-metric-learning's ``AccuracyCalculator``
does. The search asks for ``k = max(max(ks), max R)`` neighbours (+1 for the query's own row)
through :func:`~lightning_modules.metrics.sharded.iter_sharded_search`, so the same code scores a
reference set held by one process or split across ranks. Per-query scores are summed once, in
global query order, so a sharded run gives the very numbers of one process.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from contracts.index import ArrayLike, IndexKind, Metric
from lightning_modules.metrics.sharded import comm_device, distributed_world, iter_sharded_search

# Working arrays per chunk are [rows, k]: cap rows * k so that a class with thousands of members
# (large R, hence large k) shrinks the chunk instead of the memory growing.
MAX_CHUNK_ELEMENTS = 1 << 22


def knn_scores(
    q: ArrayLike,
    q_pos: np.ndarray,
    q_codes_all: np.ndarray,
    r: ArrayLike,
    r_ids: np.ndarray,
    r_codes_all: np.ndarray,
    same_set: bool,
    ks: tuple[int, ...],
    metric: Metric,
    chunk_size: int,
    index: IndexKind = "flat",
    group: Any = None,
    distributed: bool = False,
    normalize: bool = False,
    **index_kwargs: Any,
) -> dict[str, float]:
    """Scores of every query against every reference, from this rank's part of each.

    Args:
        q: ``[Q_r, D]`` queries of this rank; ``q_pos: [Q_r]`` their global positions.
        q_codes_all: ``[Q]`` class codes of all queries in global order (every rank passes the same).
        r: ``[M_r, D]`` references of this rank; ``r_ids: [M_r]`` their global ids.
        r_codes_all: ``[M]`` class codes of all references by global id. With ``same_set`` the
            queries are the references (a query's global position is its reference id).
        distributed: search across the ranks of ``group`` (collective) instead of locally.
        normalize: L2-normalise queries and references chunk by chunk (cosine with ``metric="ip"``).
    """
    world = distributed_world(group) if distributed else 1
    self_count = int(same_set)
    counts = np.bincount(r_codes_all, minlength=int(q_codes_all.max()) + 1)
    big_r_all = counts[q_codes_all] - self_count
    not_lone_all = big_r_all > 0
    n_valid = int(not_lone_all.sum())
    keys = [f"recall@{k}" for k in ks] + ["precision@1", "r_precision", "map@r"]
    if n_valid == 0:
        warnings.warn("retrieval_metrics: no query has another reference with its label; k-NN scores are NaN", stacklevel=3)
        return {key: float("nan") for key in keys}

    k = min(max(max(ks), int(big_r_all.max())), len(r_codes_all) - self_count)
    k_search = k + self_count
    rows_per_chunk = max(1, min(chunk_size, MAX_CHUNK_ELEMENTS // k_search) // world)
    keep = not_lone_all[q_pos]
    if not keep.all():
        q, q_pos = q[torch.from_numpy(keep) if isinstance(q, torch.Tensor) else keep], q_pos[keep]
    per_query = np.zeros((len(q_codes_all), len(ks) + 3), dtype=np.float64)
    ranks = np.arange(1, k + 1, dtype=np.float64)
    searched = iter_sharded_search(
        q, r, k_search, r_ids, metric, index, rows_per_chunk, group, distributed, normalize, **index_kwargs
    )
    for start, _, nn in searched:
        pos = q_pos[start : start + len(nn)]
        if same_set:
            nn = drop_self(nn, pos)
        match = r_codes_all[np.maximum(nn, 0)] == q_codes_all[pos][:, None]
        match &= nn >= 0
        big_r = big_r_all[pos]
        out = per_query[pos]
        for j, kk in enumerate(ks):
            out[:, j] = match[:, : min(kk, k)].any(axis=1)
        out[:, len(ks)] = match[:, 0]
        relevant = match & (ranks[None, :] <= big_r[:, None])
        out[:, len(ks) + 1] = relevant.sum(axis=1) / big_r
        precision_at_i = np.cumsum(match, axis=1) / ranks[None, :]
        out[:, len(ks) + 2] = np.sum(precision_at_i * relevant, axis=1) / big_r
        per_query[pos] = out
    if world > 1:
        # Every query has one owner; the others hold 0 in its row, so the sum is exact.
        summed = torch.from_numpy(per_query).to(comm_device(group))
        dist.all_reduce(summed, group=group)
        per_query = summed.cpu().numpy()
    values = per_query[not_lone_all].sum(axis=0) / n_valid
    return dict(zip(keys, values.tolist()))


def drop_self(nn: np.ndarray, self_ids: np.ndarray) -> np.ndarray:
    """Remove each query's own id from its ``[c, k+1]`` neighbour list; drop the last column when
    the query is not among its k+1 nearest (possible only with many exact duplicates)."""
    own = nn == self_ids[:, None]
    own[~own.any(axis=1), -1] = True
    return nn[~own].reshape(len(nn), nn.shape[1] - 1)
