"""``retrieval_metrics``: Recall@K, Precision@1, R-Precision, MAP@R and NMI of labelled embeddings.

A pure function for embeddings already in memory (or saved to disk). The Metric classes call the
same driver, :func:`labelled_scores`, with each rank's part of the queries and references.

Conventions are those of pytorch-metric-learning's ``AccuracyCalculator`` (v2.9, with
``k="max_bin_count"``), so the numbers agree with it: lone queries (no other reference of their
class) are left out of the k-NN scores (NaN, with a warning, if every query is lone; NMI still uses
every query); ties are broken by reference index; identical embeddings of other rows are ordinary
neighbours, only the query's own row is removed; NMI clusters the *query* embeddings into as many
clusters as the queries have classes. Definitions: :mod:`~lightning_modules.metrics.knn_scores`
and :mod:`~lightning_modules.metrics.nmi`.

Cost: a faiss index over the references (exact ``"flat"`` by default) and a search of
``chunk_size`` queries at a time, so memory is the index plus ``O(chunk_size * k)``; the ``[Q, M]``
distance matrix is never built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from contracts.index import IndexKind, as_float32
from lightning_modules.metrics.inputs import ArrayLike, Distance, as_embeddings, as_labels, check_distance, check_ks
from lightning_modules.metrics.knn_scores import knn_scores
from lightning_modules.metrics.nmi import kmeans_nmi
from lightning_modules.metrics.sharded import comm_device, distributed_world


def retrieval_metrics(
    emb: ArrayLike,
    labels: ArrayLike,
    ref_emb: ArrayLike | None = None,
    ref_labels: ArrayLike | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    nmi: bool = False,
    distance: Distance = "cosine",
    chunk_size: int = 4096,
    seed: int = 1234,
    index: IndexKind = "flat",
    **index_kwargs: Any,
) -> dict[str, float]:
    """Retrieval scores of a query set against a reference set, in this process.

    Args:
        emb: ``[Q, D]`` query embeddings (tensor or array, any float dtype; searched in float32).
        labels: ``[Q]`` integer class labels of the queries.
        ref_emb: ``[M, D]`` reference (gallery) embeddings, e.g. In-Shop's gallery. ``None`` means
            the queries are also the references and each query's own row is left out of its
            ranking (the CUB/Cars/SOP protocol).
        ref_labels: ``[M]`` integer labels of the references; given together with ``ref_emb``.
        ks: the K of Recall@K. A K larger than the number of references counts them all.
        nmi: also cluster the queries with k-means and report NMI against their labels.
        distance: ``"cosine"`` (inner product of L2-normalised embeddings; k-means on them too) or
            ``"euclidean"`` (L2 distance on the raw embeddings).
        chunk_size: number of queries searched at once; memory is ``O(chunk_size * k)``.
        seed: k-means seed (faiss' default, 1234, is also pytorch-metric-learning's).
        index: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"`` (approximate; ``index_kwargs`` as in
            :func:`~contracts.index.build_index`).

    Returns:
        Python floats under ``recall@K`` for each K, ``precision@1``, ``r_precision``, ``map@r``
        and, with ``nmi=True``, ``nmi``.
    """
    ks = check_ks(ks)
    check_distance(distance)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    query = as_embeddings(emb, "emb")
    query_labels = as_labels(labels, "labels", len(query), "emb")
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together (or both left as None)")
    if ref_emb is None:
        return labelled_scores(query, query_labels, np.arange(len(query)), None, None, None, ks, nmi, distance,
                               chunk_size, seed, index, distributed=False, **index_kwargs)
    ref = as_embeddings(ref_emb, "ref_emb")
    if ref.shape[1] != query.shape[1]:
        raise ValueError(f"ref_emb has dimension {ref.shape[1]} but emb has {query.shape[1]}; expected the same")
    ref_label_t = as_labels(ref_labels, "ref_labels", len(ref), "ref_emb")
    return labelled_scores(query, query_labels, np.arange(len(query)), ref, ref_label_t, np.arange(len(ref)), ks, nmi,
                           distance, chunk_size, seed, index, distributed=False, **index_kwargs)


def labelled_scores(
    q: Tensor,
    q_labels_all: Tensor,
    q_pos: np.ndarray,
    r: Tensor | None,
    r_labels_all: Tensor | None,
    r_ids: np.ndarray | None,
    ks: tuple[int, ...],
    nmi: bool,
    distance: Distance,
    chunk_size: int,
    seed: int,
    index: IndexKind = "flat",
    group: Any = None,
    distributed: bool = False,
    **index_kwargs: Any,
) -> dict[str, float]:
    """The driver: this rank's queries ``q: [Q_r, D]`` (global positions ``q_pos``) and references
    ``r: [M_r, D]`` (global ids ``r_ids``; ``None`` when the queries are the references), with the
    labels of *all* queries and references in global order (labels are small; embeddings are not
    gathered). Collective when ``distributed``."""
    same_set = r is None
    all_labels = q_labels_all if same_set else torch.cat([q_labels_all, r_labels_all])
    _, codes = torch.unique(all_labels, return_inverse=True)
    codes = codes.numpy()
    q_codes = codes[: len(q_labels_all)]
    r_codes = q_codes if same_set else codes[len(q_labels_all) :]
    normalize = distance == "cosine"
    # Normalised chunk by chunk inside the search: no float32 copy of the whole set is made.
    metric = "ip" if normalize else "l2"
    r_rows = q if same_set else r
    out = knn_scores(q, q_pos, q_codes, r_rows, q_pos if same_set else r_ids, r_codes, same_set, ks, metric,
                     chunk_size, index, group, distributed, normalize, **index_kwargs)
    if nmi:
        # k-means is not sharded: NMI needs every query embedding in one process (the labelled
        # benchmarks' query sets are at most ~60k rows; the corpus-sized reference set is not needed).
        q_np = as_float32(q, normalize)
        if distributed and distributed_world(group) > 1:
            all_q = gather_rows(q_np, q_pos, len(q_codes), group)
        elif np.array_equal(q_pos, np.arange(len(q_codes))):
            all_q = q_np
        else:  # rows in update order: put them in global order, which k-means' seeding depends on
            all_q = np.empty_like(q_np)
            all_q[q_pos] = q_np
        out["nmi"] = kmeans_nmi(all_q, q_codes, seed)
    return out


def gather_rows(x: np.ndarray, pos: np.ndarray, n: int, group: Any = None) -> np.ndarray:
    """Every rank's rows ``x: [n_r, D]`` placed at their global positions ``pos`` -> ``[n, D]`` on every rank."""
    from torchmetrics.utilities.distributed import gather_all_tensors

    device = comm_device(group)
    rows = gather_all_tensors(torch.from_numpy(np.ascontiguousarray(x)).to(device), group)
    where = gather_all_tensors(torch.from_numpy(pos.astype(np.int64)).to(device), group)
    out = np.empty((n, x.shape[1]), dtype=x.dtype)
    for part, p in zip(rows, where):
        out[p.cpu().numpy()] = part.cpu().numpy()
    return out
