"""Retrieval metrics for labelled embeddings: Recall@K, Precision@1, R-Precision, MAP@R and NMI.

``retrieval_metrics`` is a pure function for embeddings already in memory (or saved to disk);
``RetrievalMetrics`` and ``QueryGalleryRetrievalMetrics`` are torchmetrics ``Metric`` wrappers
that accumulate embeddings over ``update()`` calls, gather them across DDP ranks and call it.

Definitions (one query ``q`` with label ``y``; its ranking is the reference set sorted from
nearest to farthest, with the query's own row removed when the query set is the reference set):

- Recall@K, in the deep-metric-learning sense of Oh Song, Xiang, Jegelka, Savarese, "Deep
  Metric Learning via Lifted Structured Feature Embedding" (CVPR 2016): 1 if any of the K nearest
  references has label ``y``, else 0. (It is not the information-retrieval recall.)
- Precision@1: the fraction of queries whose nearest reference has label ``y`` (= Recall@1).
- R-Precision and MAP@R, from Musgrave, Belongie, Lim, "A Metric Learning Reality Check"
  (ECCV 2020), Sec. 3.2: ``R`` is the number of references with label ``y`` (the query itself
  excluded), ``R-Precision = r / R`` with ``r`` the number of those among the first ``R`` ranked,
  and ``MAP@R = (1/R) sum_{i=1..R} P(i) rel(i)`` with ``P(i)`` the precision at rank ``i`` and
  ``rel(i)`` 1 if rank ``i`` has label ``y``.
- NMI (normalised mutual information, Manning, Raghavan, Schuetze, "Introduction to Information
  Retrieval", 2008, Sec. 16.3, with the arithmetic mean of the two entropies as normaliser as in
  scikit-learn's ``normalized_mutual_info_score``) between the labels and a k-means clustering
  (faiss, as many clusters as classes, fixed seed) of the query embeddings.

Every score is a mean over queries. The conventions are those of pytorch-metric-learning's
``AccuracyCalculator`` (v2.9, with ``k="max_bin_count"``), so the numbers agree with it:

- a *lone* query, one whose label no other reference carries (``R = 0``), is left out of every
  k-NN score (Recall@K, Precision@1, R-Precision, MAP@R): those scores average over the other
  queries only. If every query is lone the k-NN scores are NaN (with a warning). NMI still uses
  every query.
- ties in distance are broken by faiss (in practice by reference index); identical embeddings of
  other rows are ordinary neighbours, only the query's own row is removed.
- NMI clusters the *query* embeddings only, into as many clusters as the queries have classes.

Cost: a faiss flat index over the references and an exact k-NN search for ``chunk_size`` queries
at a time with ``k = max(max(ks), max R)`` (+1 to remove the query itself), so memory is the
index plus ``O(chunk_size * k)``: the full ``[Q, M]`` distance matrix is never built.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

Distance = Literal["cosine", "euclidean"]
ArrayLike = Tensor | np.ndarray

_DISTANCES = ("cosine", "euclidean")
# Working arrays per chunk are [rows, k] int64/float64: cap rows * k so that a class with
# thousands of members (large R, hence large k) shrinks the chunk instead of the memory growing.
_MAX_CHUNK_ELEMENTS = 1 << 22
_KMEANS_NITER = 20


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
) -> dict[str, float]:
    """Retrieval scores of a query set against a reference set (see the module docstring).

    Args:
        emb: ``[Q, D]`` query embeddings (tensor or array, any float dtype; searched in float32).
        labels: ``[Q]`` integer class labels of the queries.
        ref_emb: ``[M, D]`` reference (gallery) embeddings, e.g. In-Shop's gallery. ``None`` means
            the queries are also the references and each query's own row is left out of its
            ranking (the CUB/Cars/SOP protocol).
        ref_labels: ``[M]`` integer labels of the references; given together with ``ref_emb``.
        ks: the K of Recall@K. A K larger than the number of references counts them all.
        nmi: also cluster the queries with k-means and report NMI against their labels.
        distance: ``"cosine"`` (rank by cosine similarity; k-means on L2-normalised embeddings)
            or ``"euclidean"`` (rank by L2 distance on the raw embeddings).
        chunk_size: number of queries searched at once; memory is ``O(chunk_size * k)``.
        seed: k-means seed (faiss' default, 1234, is also pytorch-metric-learning's).

    Returns:
        Python floats under ``recall@K`` for each K, ``precision@1``, ``r_precision``, ``map@r``
        and, with ``nmi=True``, ``nmi``. The k-NN scores average over the queries that have at
        least one other reference of their class (pytorch-metric-learning's convention); they are
        NaN, with a warning, when no query has one.
    """
    ks = _check_ks(ks)
    if distance not in _DISTANCES:
        raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    query = _as_embeddings(emb, "emb")
    query_labels = _as_labels(labels, "labels", len(query), "emb")
    same_set = ref_emb is None
    if (ref_emb is None) != (ref_labels is None):
        raise ValueError("ref_emb and ref_labels must be given together (or both left as None)")
    if same_set:
        ref, ref_label_t = query, query_labels
    else:
        ref = _as_embeddings(ref_emb, "ref_emb")
        if ref.shape[1] != query.shape[1]:
            raise ValueError(f"ref_emb has dimension {ref.shape[1]} but emb has {query.shape[1]}; expected the same")
        ref_label_t = _as_labels(ref_labels, "ref_labels", len(ref), "ref_emb")

    q_np = _to_faiss_array(query, distance)
    r_np = q_np if same_set else _to_faiss_array(ref, distance)
    # Map labels to 0..C-1 over queries and references together so counts are one bincount.
    all_labels = query_labels if same_set else torch.cat([query_labels, ref_label_t])
    _, codes = torch.unique(all_labels, return_inverse=True)
    codes = codes.numpy()
    q_codes = codes[: len(query)]
    r_codes = q_codes if same_set else codes[len(query) :]

    out = _knn_scores(q_np, q_codes, r_np, r_codes, same_set, ks, distance, chunk_size)
    if nmi:
        out["nmi"] = _kmeans_nmi(q_np, q_codes, seed)
    return out


def normalized_mutual_info(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """NMI of two labellings ``[N], [N]`` with the arithmetic mean of their entropies as normaliser.

    ``I(U, V) / ((H(U) + H(V)) / 2)`` (Manning et al., "Introduction to Information Retrieval",
    2008, Eq. 16.2 with the arithmetic-mean variant that scikit-learn uses by default), natural
    log, with scikit-learn's limit cases: 1.0 when both labellings are a single cluster, 0.0 when
    the mutual information is zero. The contingency table is kept sparse (SOP has ~11k classes).
    """
    _, u = np.unique(np.asarray(labels_true), return_inverse=True)
    _, v = np.unique(np.asarray(labels_pred), return_inverse=True)
    if len(u) != len(v):
        raise ValueError(f"labellings have {len(u)} and {len(v)} entries; expected the same number")
    n_u, n_v = (int(u.max()) + 1, int(v.max()) + 1) if len(u) else (0, 0)
    if n_u == n_v and n_u <= 1:
        return 1.0
    n = float(len(u))
    pair, n_ij = np.unique(u.astype(np.int64) * n_v + v, return_counts=True)
    a = np.bincount(u).astype(np.float64)
    b = np.bincount(v).astype(np.float64)
    n_ij = n_ij.astype(np.float64)
    mi = float(np.sum(n_ij / n * (np.log(n_ij) + np.log(n) - np.log(a[pair // n_v]) - np.log(b[pair % n_v]))))
    if n_u == 1 or n_v == 1 or mi <= 0.0:
        return 0.0

    def entropy(counts: np.ndarray) -> float:
        p = counts / n
        return float(-np.sum(p * np.log(p)))

    return mi / max((entropy(a) + entropy(b)) / 2.0, np.finfo(np.float64).eps)


def _knn_scores(
    q: np.ndarray,
    q_codes: np.ndarray,
    r: np.ndarray,
    r_codes: np.ndarray,
    same_set: bool,
    ks: tuple[int, ...],
    distance: str,
    chunk_size: int,
) -> dict[str, float]:
    """Chunked exact k-NN on faiss, reduced to per-query scores chunk by chunk."""
    self_count = int(same_set)
    counts = np.bincount(r_codes, minlength=int(q_codes.max()) + 1)
    big_r = counts[q_codes] - self_count
    not_lone = big_r > 0
    n_valid = int(not_lone.sum())
    available = len(r) - self_count
    keys = [f"recall@{k}" for k in ks] + ["precision@1", "r_precision", "map@r"]
    if n_valid == 0:
        warnings.warn(
            "retrieval_metrics: no query has another reference with its label; k-NN scores are NaN",
            stacklevel=3,
        )
        return {key: float("nan") for key in keys}

    k = min(max(max(ks), int(big_r.max())), available)
    k_search = k + self_count
    rows_per_chunk = max(1, min(chunk_size, _MAX_CHUNK_ELEMENTS // k_search))
    index = faiss.IndexFlatIP(r.shape[1]) if distance == "cosine" else faiss.IndexFlatL2(r.shape[1])
    index.add(r)

    ranks = np.arange(1, k + 1, dtype=np.float64)
    recall_hits = np.zeros(len(ks), dtype=np.int64)
    p1_hits = 0
    r_precision_sum = 0.0
    map_r_sum = 0.0
    for start in range(0, len(q), rows_per_chunk):
        stop = min(start + rows_per_chunk, len(q))
        keep = not_lone[start:stop]
        if not keep.any():
            continue
        _, nn = index.search(q[start:stop], k_search)
        if same_set:
            nn = _drop_self(nn, start)
        nn = nn[keep]
        query_r = big_r[start:stop][keep]
        match = r_codes[nn] == q_codes[start:stop][keep][:, None]
        for j, kk in enumerate(ks):
            recall_hits[j] += int(match[:, : min(kk, k)].any(axis=1).sum())
        p1_hits += int(match[:, 0].sum())
        within_r = ranks[None, :] <= query_r[:, None]
        relevant = match & within_r
        r_precision_sum += float(np.sum(relevant.sum(axis=1) / query_r))
        precision_at_i = np.cumsum(match, axis=1) / ranks[None, :]
        map_r_sum += float(np.sum(np.sum(precision_at_i * relevant, axis=1) / query_r))

    values = [h / n_valid for h in recall_hits.tolist()] + [p1_hits / n_valid, r_precision_sum / n_valid, map_r_sum / n_valid]
    return dict(zip(keys, values))


def _drop_self(nn: np.ndarray, start: int) -> np.ndarray:
    """Remove each query's own row from its ``[c, k+1]`` neighbour list; drop the last column when
    the query is not among its k+1 nearest (possible only with many exact duplicates)."""
    own = nn == np.arange(start, start + len(nn))[:, None]
    own[~own.any(axis=1), -1] = True
    return nn[~own].reshape(len(nn), nn.shape[1] - 1)


def _kmeans_nmi(x: np.ndarray, codes: np.ndarray, seed: int) -> float:
    """k-means (Lloyd, faiss, ``niter=20`` like pytorch-metric-learning) with one cluster per class."""
    n_clusters = len(np.unique(codes))
    # min_points_per_centroid only silences faiss' "please provide more points" warning, which every
    # DML test set triggers (CUB has ~60 images per class); the clustering is unchanged.
    kmeans = faiss.Kmeans(
        x.shape[1], n_clusters, niter=_KMEANS_NITER, seed=seed, verbose=False, min_points_per_centroid=1
    )
    kmeans.train(x)
    _, assignment = kmeans.index.search(x, 1)
    return normalized_mutual_info(codes, assignment[:, 0])


def _to_faiss_array(x: Tensor, distance: str) -> np.ndarray:
    """``[N, D]`` -> C-contiguous float32 ``[N, D]`` (a copy, L2-normalised in place, for cosine)."""
    if distance == "euclidean":
        return np.ascontiguousarray(x.to(torch.float32).numpy())
    out = x.to(torch.float32, copy=True).contiguous().numpy()
    faiss.normalize_L2(out)
    return out


def _as_embeddings(x: Any, name: str) -> Tensor:
    t = _as_tensor(x, name)
    if t.dim() != 2 or not t.is_floating_point() or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty floating-point array [N, D], got {_describe(t)}")
    finite = torch.isfinite(t).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        raise ValueError(f"{name} has NaN or Inf in rows {bad[:10]}{' ...' if len(bad) > 10 else ''}")
    return t


def _as_labels(x: Any, name: str, n: int, emb_name: str) -> Tensor:
    t = _as_tensor(x, name)
    if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer array [N] of class labels, got {_describe(t)}")
    if len(t) != n:
        raise ValueError(f"{name} has {len(t)} entries but {emb_name} has {n} rows; expected one label per embedding")
    return t.long()


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, Tensor):
        return x.detach().cpu()
    raise ValueError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)} dtype {t.dtype}"


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive integers, got {ks!r}")
    return tuple(dict.fromkeys(ks))


def _first_per_key(key: Tensor) -> Tensor:
    """Positions that keep one row per distinct ``key`` (its first occurrence), in key order."""
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    first = torch.ones_like(sorted_key, dtype=torch.bool)
    first[1:] = sorted_key[1:] != sorted_key[:-1]
    return order[first]


def _check_update(emb: Tensor, labels: Tensor, index: Tensor | None, owner: str) -> None:
    if not isinstance(emb, Tensor) or emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(f"{owner}.update: emb must be a floating-point tensor [B, D], got {emb!r:.80}")
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point() or len(labels) != len(emb):
        raise ValueError(
            f"{owner}.update: labels must be an integer tensor [B] with B = {len(emb)} (one per embedding), "
            f"got {_describe(labels) if isinstance(labels, Tensor) else type(labels).__name__}"
        )
    if index is not None and (
        not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point() or len(index) != len(emb)
    ):
        raise ValueError(f"{owner}.update: index must be an integer tensor [B] with B = {len(emb)} (one per embedding)")


class _EmbeddingStore(Metric):
    """Accumulates ``emb``, ``labels`` and an optional sample ``index`` as ``cat``-synced list states."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        ks: Sequence[int] = (1, 2, 4, 8),
        nmi: bool = False,
        distance: Distance = "cosine",
        chunk_size: int = 4096,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if distance not in _DISTANCES:
            raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
        self.ks = _check_ks(ks)
        self.nmi = nmi
        self.distance = distance
        self.chunk_size = chunk_size
        self.add_state("emb", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def _store(self, emb: Tensor, labels: Tensor, index: Tensor | None) -> None:
        _check_update(emb, labels, index, type(self).__name__)
        if self.labels and (index is None) != (len(self.index) == 0):
            raise ValueError(f"{type(self).__name__}.update: pass index in every update or in none")
        self.emb.append(emb.detach())
        self.labels.append(labels.detach())
        if index is not None:
            self.index.append(index.detach().to(labels.device))

    def _gathered(self) -> tuple[Tensor, Tensor, Tensor | None]:
        if isinstance(self.labels, list) and not self.labels:
            raise ValueError(f"{type(self).__name__}.compute() called before any update()")
        emb = dim_zero_cat(self.emb)
        labels = dim_zero_cat(self.labels).long()
        # A rank without index still contributes an empty tensor to the gathered state.
        index = dim_zero_cat(self.index).long() if len(self.index) else None
        if index is None or len(index) == 0:
            return emb, labels, None
        if len(index) != len(labels):
            raise ValueError(f"{type(self).__name__}: some ranks passed index and some did not; pass it everywhere")
        return emb, labels, index

    def _score(self, emb: Tensor, labels: Tensor, ref_emb: Tensor | None = None, ref_labels: Tensor | None = None) -> dict[str, float]:
        return retrieval_metrics(
            emb, labels, ref_emb, ref_labels, ks=self.ks, nmi=self.nmi, distance=self.distance, chunk_size=self.chunk_size
        )


class RetrievalMetrics(_EmbeddingStore):
    """Recall@K, Precision@1, R-Precision, MAP@R (and NMI) of a set retrieving from itself.

    The CUB-200 / Cars196 / SOP protocol: every embedding is a query against all the others (its
    own row removed); see :func:`retrieval_metrics` for the definitions and the lone-query rule.

    Usage: ``metric.update(emb, labels)`` per batch (``emb: [B, D]``, ``labels: [B]``), then
    ``metric.compute()`` returns a dict of Python floats. Under DDP the states are gathered from
    all ranks (``dist_reduce_fx="cat"``) and every rank computes the same numbers.

    DDP duplicates: ``DistributedSampler(drop_last=False)`` pads the last shard by repeating
    samples, which would count them twice. Pass ``index`` (``[B]``, the dataset index of each row)
    in every ``update`` and ``compute`` keeps one row per index (the first gathered) and orders rows
    by index, so the result equals a single process that saw the dataset once, in order.
    """

    def update(self, emb: Tensor, labels: Tensor, index: Tensor | None = None) -> None:
        """Add a batch: ``emb: [B, D]``, ``labels: [B]``, optional ``index: [B]`` dataset indices."""
        self._store(emb, labels, index)

    def compute(self) -> dict[str, float]:
        emb, labels, index = self._gathered()
        if index is not None:
            keep = _first_per_key(index.to(labels.device))
            emb, labels = emb[keep], labels[keep]
        return self._score(emb, labels)


class QueryGalleryRetrievalMetrics(_EmbeddingStore):
    """The same scores with separate query and gallery sets (In-Shop Clothes Retrieval protocol).

    Usage: ``metric.update(emb, labels, is_query, index=None)``, where ``is_query`` is a Python
    bool for a batch that is all queries or all gallery (one dataloader per set: pass
    ``dataloader_idx == 0``), or a bool tensor ``[B]`` for mixed batches. ``compute()`` ranks the
    whole gathered gallery for every gathered query; no row is removed from a ranking, and a query
    whose label is absent from the gallery is lone (left out of the k-NN scores). NMI, when asked
    for, clusters the queries.

    DDP duplicates: pass ``index`` as in :class:`RetrievalMetrics`; query and gallery indices are
    separate name spaces (the pair ``(is_query, index)`` identifies a row), so two dataloaders
    may each count from 0.
    """

    def __init__(
        self,
        ks: Sequence[int] = (1, 2, 4, 8),
        nmi: bool = False,
        distance: Distance = "cosine",
        chunk_size: int = 4096,
        **kwargs: Any,
    ) -> None:
        super().__init__(ks=ks, nmi=nmi, distance=distance, chunk_size=chunk_size, **kwargs)
        self.add_state("is_query", default=[], dist_reduce_fx="cat")

    def update(self, emb: Tensor, labels: Tensor, is_query: bool | Tensor, index: Tensor | None = None) -> None:
        """Add a batch: ``emb: [B, D]``, ``labels: [B]``, ``is_query``: bool or bool ``[B]``, optional ``index: [B]``."""
        if isinstance(is_query, bool):
            flag = torch.full((len(labels),), is_query, dtype=torch.bool, device=labels.device)
        elif isinstance(is_query, Tensor) and is_query.dtype == torch.bool and is_query.shape in ((), (len(labels),)):
            flag = is_query.detach().to(labels.device).expand(len(labels)).clone()
        else:
            raise ValueError(
                f"{type(self).__name__}.update: is_query must be a bool or a bool tensor [B] with B = {len(labels)}, "
                f"got {is_query!r:.80}"
            )
        self._store(emb, labels, index)
        self.is_query.append(flag)

    def compute(self) -> dict[str, float]:
        emb, labels, index = self._gathered()
        is_query = dim_zero_cat(self.is_query).bool()
        if index is not None:
            keep = _first_per_key(index.to(labels.device) * 2 + is_query.long())
            emb, labels, is_query = emb[keep], labels[keep], is_query[keep]
        if bool(is_query.all()) or not bool(is_query.any()):
            raise ValueError(
                f"{type(self).__name__}.compute: need both query and gallery rows, got "
                f"{int(is_query.sum())} queries and {int((~is_query).sum())} gallery rows"
            )
        return self._score(emb[is_query], labels[is_query], emb[~is_query], labels[~is_query])
