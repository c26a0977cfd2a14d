"""Search a reference set split across DDP ranks: each rank indexes its own part, top-k lists merge.

No rank holds the whole reference set (MS MARCO: 8.8M x 768 floats = 27 GB). Per round, every rank
contributes up to ``chunk`` of its queries; the chunks are all-gathered (``world * chunk`` query rows,
padded to one size), every rank searches them all against its own shard with the index helper, and
each owner receives, by one ``gather`` per rank, the ``[c, k]`` (score, global id) lists of its
queries from every shard and merges them with :func:`~contracts.index.merge_topk`.
What crosses the wire: the query chunks and ``world x k`` candidates per query; never the references.
Memory per rank: its shard's index plus ``O(world * chunk * (D + k))``.

Global ids are what the caller passes as ``reference_ids`` (e.g. the dataset index of each row, or
its position in rank order), so the merged lists equal one process's search over the concatenated
references, ties broken by id, whichever way the set was split.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from contracts.index import (
    DEFAULT_CHUNK,
    ArrayLike,
    IndexKind,
    Metric,
    as_float32,
    build_index,
    merge_topk,
    worst_score,
)


def distributed_world(group: Any = None) -> int:
    """The number of processes of ``group`` (1 when torch.distributed is not initialised)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def iter_sharded_search(
    queries: ArrayLike,
    reference: ArrayLike,
    k: int,
    reference_ids: ArrayLike | None = None,
    metric: Metric = "ip",
    index: IndexKind = "flat",
    chunk: int = DEFAULT_CHUNK,
    group: Any = None,
    distributed: bool = True,
    normalize: bool = False,
    **index_kwargs: Any,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Top-``k`` of this rank's ``queries: [Q_r, D]`` over every rank's ``reference: [M_r, D]``.

    Collective: every rank of ``group`` must call it (with its own queries and shard, possibly
    empty) and exhaust the iterator. ``reference_ids: [M_r]`` are the global ids of this rank's
    references (default: offsets in rank order). Yields ``(start, scores [c, k], ids [c, k])`` for
    this rank's queries, chunk by chunk; ids are global. Without torch.distributed (or with
    ``distributed=False``, e.g. on one rank only) it is the plain chunked search of
    :func:`~contracts.index.iter_search` with the ids mapped.
    """
    world = distributed_world(group) if distributed else 1
    dim = int(queries.shape[1]) if queries.shape[0] else int(reference.shape[1]) if reference.shape[0] else 0
    n_ref = int(reference.shape[0])
    local_index = build_index(reference, metric, index, normalize=normalize, **index_kwargs) if n_ref else None
    if world == 1:
        ids_map = _ids(reference_ids, 0, n_ref)
        for start in range(0, int(queries.shape[0]), chunk):
            s, i = _search(local_index, as_float32(queries[start : start + chunk], normalize), k, metric)
            yield start, s, _to_global(i, ids_map)
        return

    rank = dist.get_rank(group)
    device = comm_device(group)
    sizes = _all_gather_ints([int(queries.shape[0]), n_ref, dim], group)  # [world, 3]
    dim = int(sizes[:, 2].max())
    ids_map = _ids(reference_ids, int(sizes[:rank, 1].sum()), n_ref)
    rounds = int(-(-int(sizes[:, 0].max()) // chunk))
    for r in range(rounds):
        counts = np.clip(sizes[:, 0] - r * chunk, 0, chunk)
        mine = np.zeros((chunk, dim), dtype=np.float32)
        mine[: counts[rank]] = as_float32(queries[r * chunk : r * chunk + counts[rank]], normalize).reshape(-1, dim)
        gathered = [torch.empty(chunk, dim, device=device) for _ in range(world)]
        dist.all_gather(gathered, torch.from_numpy(mine).to(device), group=group)
        block = np.concatenate([g.cpu().numpy()[: counts[j]] for j, g in enumerate(gathered)])
        scores, ids = _search(local_index, block, k, metric)
        ids = _to_global(ids, ids_map)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        merged = None
        for owner in range(world):
            if counts[owner] == 0:
                continue
            part = slice(offsets[owner], offsets[owner + 1])
            payload = torch.cat([torch.from_numpy(scores[part]).view(torch.int32).long(), torch.from_numpy(ids[part])], 1)
            payload = payload.to(device)
            bucket = [torch.empty_like(payload) for _ in range(world)] if owner == rank else None
            dist.gather(payload, bucket, dst=_global_rank(owner, group), group=group)
            if owner == rank:
                merged = _merge([b.cpu() for b in bucket], k, metric)
        if merged is not None:
            yield r * chunk, merged[0], merged[1]


def sharded_search(
    queries: ArrayLike,
    reference: ArrayLike,
    k: int,
    reference_ids: ArrayLike | None = None,
    metric: Metric = "ip",
    index: IndexKind = "flat",
    chunk: int = DEFAULT_CHUNK,
    group: Any = None,
    distributed: bool = True,
    normalize: bool = False,
    **index_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`iter_sharded_search` collected: ``(scores [Q_r, k], global ids [Q_r, k])``."""
    n = int(queries.shape[0])
    scores, ids = np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.int64)
    for start, s, i in iter_sharded_search(
        queries, reference, k, reference_ids, metric, index, chunk, group, distributed, normalize, **index_kwargs
    ):
        scores[start : start + len(s)], ids[start : start + len(s)] = s, i
    return scores, ids


def _search(local_index: Any, q: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    if local_index is None or len(q) == 0:
        return np.full((len(q), k), worst_score(metric), dtype=np.float32), np.full((len(q), k), -1, dtype=np.int64)
    return local_index.search(q, k)


def _merge(bucket: list[Tensor], k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """``world`` payloads ``[c, 2k]`` (float32 bits as int64 | ids) -> merged ``(scores, ids) [c, k]``."""
    scores = np.concatenate([b[:, :k].to(torch.int32).view(torch.float32).numpy() for b in bucket], axis=1)
    ids = np.concatenate([b[:, k:].numpy() for b in bucket], axis=1)
    return merge_topk(scores, ids, k, metric)


def _ids(reference_ids: ArrayLike | None, offset: int, n: int) -> np.ndarray:
    if reference_ids is None:
        return np.arange(offset, offset + n, dtype=np.int64)
    ids = reference_ids.cpu().numpy() if isinstance(reference_ids, Tensor) else np.asarray(reference_ids)
    if ids.shape != (n,):
        raise ValueError(f"reference_ids has shape {ids.shape}; expected ({n},), one global id per reference row")
    return ids.astype(np.int64)


def _to_global(ids: np.ndarray, ids_map: np.ndarray) -> np.ndarray:
    return np.where(ids >= 0, ids_map[np.maximum(ids, 0)] if len(ids_map) else -1, -1)


def comm_device(group: Any = None) -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather_ints(values: list[int], group: Any) -> np.ndarray:
    t = torch.tensor(values, dtype=torch.int64, device=comm_device(group))
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return torch.stack(out).cpu().numpy()


def _global_rank(group_rank: int, group: Any) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
