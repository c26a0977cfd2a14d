"""One faiss index helper for every nearest-neighbour search of the project.

The retrieval metrics, k-means for NMI and (next) ANN-refreshed hard negatives all call this file
instead of building faiss indexes themselves, so the index type, the metric and the device are one
configuration:

- ``metric``: ``"ip"`` (inner product; cosine on unit vectors; scores sorted descending) or
  ``"l2"`` (squared Euclidean distance, as faiss returns it; sorted ascending).
- ``index``: ``"flat"`` (exact), ``"ivf"`` (``IndexIVFFlat``: ``nlist`` k-means cells, ``nprobe``
  of them searched; Jegou, Douze, Schmid, "Product Quantization for Nearest Neighbor Search",
  TPAMI 2011) or ``"hnsw"`` (``IndexHNSWFlat``: ``hnsw_m`` links per node, ``ef_search``; Malkov,
  Yashunin, "Efficient and robust approximate nearest neighbor search using Hierarchical Navigable
  Small World graphs", TPAMI 2018).
- ``gpu``: ``None`` uses every GPU faiss sees (none on a CPU build), ``False`` forces the CPU.

Memory is bounded: the reference set is added ``add_chunk`` rows at a time (a tensor is converted
one chunk at a time, never as a whole float32 copy) and the queries are searched ``chunk`` rows at a
time, so a search holds the index plus ``O(chunk * (D + k))``. Returned ids index the reference
rows in the order they were given; a slot with no neighbour (fewer than ``k`` references) has id
``-1`` and the worst score (``-FLT_MAX`` for ``ip``, ``FLT_MAX`` for ``l2``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import Tensor

Metric = Literal["ip", "l2"]
IndexKind = Literal["flat", "ivf", "hnsw"]
ArrayLike = Tensor | np.ndarray

METRICS = ("ip", "l2")
INDEX_KINDS = ("flat", "ivf", "hnsw")
DEFAULT_CHUNK = 4096
DEFAULT_ADD_CHUNK = 65536


def as_float32(x: ArrayLike, normalize: bool = False) -> np.ndarray:
    """``[N, D]`` tensor or array -> C-contiguous float32 array (a copy when ``normalize``, which
    L2-normalises the rows in place)."""
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    out = np.array(x, dtype=np.float32, order="C", copy=normalize or None)
    if normalize:
        faiss.normalize_L2(out)
    return out


def worst_score(metric: Metric) -> float:
    """The score faiss gives an empty result slot (id ``-1``)."""
    return float(-np.finfo(np.float32).max if metric == "ip" else np.finfo(np.float32).max)


def build_index(
    reference: ArrayLike,
    metric: Metric = "ip",
    index: IndexKind = "flat",
    *,
    add_chunk: int = DEFAULT_ADD_CHUNK,
    nlist: int | None = None,
    nprobe: int = 16,
    hnsw_m: int = 32,
    ef_search: int = 128,
    gpu: bool | None = None,
    seed: int = 1234,
    normalize: bool = False,
) -> faiss.Index:
    """A faiss index over ``reference: [M, D]`` (added ``add_chunk`` rows at a time, each chunk
    L2-normalised on the way in when ``normalize``: cosine without a normalised copy of the set).

    ``nlist`` defaults to ``4 * sqrt(M)`` cells (the faiss wiki's rule of thumb), trained on at most
    ``256 * nlist`` rows sampled with ``seed``.
    """
    _check(metric, index)
    n, dim = int(reference.shape[0]), int(reference.shape[1])
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    if index == "flat":
        idx: faiss.Index = faiss.IndexFlat(dim, faiss_metric)
    elif index == "hnsw":
        idx = faiss.IndexHNSWFlat(dim, hnsw_m, faiss_metric)
        idx.hnsw.efSearch = ef_search
    else:
        cells = nlist or max(1, min(n, int(4 * np.sqrt(max(n, 1)))))
        quantizer = faiss.IndexFlat(dim, faiss_metric)
        idx = faiss.IndexIVFFlat(quantizer, dim, cells, faiss_metric)
        idx.nprobe = min(nprobe, cells)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, 256 * cells), replace=False))
        train = reference[torch.from_numpy(sample)] if isinstance(reference, Tensor) else reference[sample]
        idx.train(as_float32(train, normalize))
    idx = _to_gpu(idx, gpu)
    for start in range(0, n, add_chunk):
        idx.add(as_float32(reference[start : start + add_chunk], normalize))
    return idx


def iter_search(
    index: faiss.Index, queries: ArrayLike, k: int, chunk: int = DEFAULT_CHUNK, normalize: bool = False
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Search ``queries: [Q, D]`` ``chunk`` rows at a time (each L2-normalised when ``normalize``);
    yields ``(start, scores [c, k], ids [c, k])``."""
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be positive integers, got k={k!r}, chunk={chunk!r}")
    for start in range(0, int(queries.shape[0]), chunk):
        scores, ids = index.search(as_float32(queries[start : start + chunk], normalize), k)
        yield start, scores, ids


def search(
    queries: ArrayLike,
    reference: ArrayLike | faiss.Index,
    k: int,
    metric: Metric = "ip",
    index: IndexKind = "flat",
    chunk: int = DEFAULT_CHUNK,
    normalize: bool = False,
    **index_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest references of every query: ``(scores [Q, k] float32, ids [Q, k] int64)``.

    ``reference`` is an ``[M, D]`` array or tensor (indexed with :func:`build_index` and
    ``index_kwargs``) or an index already built. ``normalize`` L2-normalises queries and references
    chunk by chunk (cosine similarity with ``metric="ip"``). Best first: highest inner product or smallest
    squared L2 distance.
    """
    if isinstance(reference, faiss.Index):
        idx = reference
    else:
        idx = build_index(reference, metric, index, normalize=normalize, **index_kwargs)
    n = int(queries.shape[0])
    scores = np.empty((n, k), dtype=np.float32)
    ids = np.empty((n, k), dtype=np.int64)
    for start, s, i in iter_search(idx, queries, k, chunk, normalize):
        scores[start : start + len(s)], ids[start : start + len(s)] = s, i
    return scores, ids


def merge_topk(scores: np.ndarray, ids: np.ndarray, k: int, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k lists laid side by side (``[c, shards * k]``) into one top-``k`` list.

    Ordered by score, ties by ascending id (empty ``-1`` slots last), so the result does not depend
    on how the reference set was split.
    """
    key = -scores if metric == "ip" else scores
    tie = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((tie, key), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def kmeans(
    x: ArrayLike,
    k: int,
    niter: int = 20,
    seed: int = 1234,
    gpu: bool | None = None,
    min_points_per_centroid: int = 1,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on faiss: ``(centroids [k, D] float32, assignment [N] int64)``.

    ``niter=20`` and ``seed=1234`` are faiss' and pytorch-metric-learning's defaults.
    ``min_points_per_centroid=1`` only silences faiss' "please provide more points" warning (CUB has
    ~60 images per class); the clustering is unchanged.
    """
    data = as_float32(x)
    use_gpu = faiss.get_num_gpus() > 0 if gpu is None else gpu
    km = faiss.Kmeans(
        data.shape[1], k, niter=niter, seed=seed, verbose=False, gpu=bool(use_gpu),
        min_points_per_centroid=min_points_per_centroid, **kwargs,
    )
    km.train(data)
    _, assignment = km.index.search(data, 1)
    return km.centroids, assignment[:, 0]


def _to_gpu(idx: faiss.Index, gpu: bool | None) -> faiss.Index:
    use_gpu = (faiss.get_num_gpus() > 0) if gpu is None else gpu
    if not use_gpu:
        return idx
    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        raise RuntimeError("gpu=True but this faiss build sees no GPU; install faiss-gpu or pass gpu=None/False")
    return faiss.index_cpu_to_all_gpus(idx)


def _check(metric: str, index: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if index not in INDEX_KINDS:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
