"""NMI between class labels and a k-means clustering of the embeddings.

Normalised mutual information (Manning, Raghavan, Schuetze, "Introduction to Information
Retrieval", 2008, Sec. 16.3, with the arithmetic mean of the two entropies as normaliser as in
scikit-learn's ``normalized_mutual_info_score``); the clustering is faiss k-means with as many
clusters as classes and a fixed seed, as pytorch-metric-learning's ``AccuracyCalculator`` does.
"""

from __future__ import annotations

import numpy as np

from contracts.index import kmeans

KMEANS_NITER = 20


def normalized_mutual_info(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """NMI of two labellings ``[N], [N]`` with the arithmetic mean of their entropies as normaliser.

    ``I(U, V) / ((H(U) + H(V)) / 2)`` (Manning et al. 2008, Eq. 16.2 with the arithmetic-mean variant
    that scikit-learn uses by default), natural log, with scikit-learn's limit cases: 1.0 when both
    labellings are a single cluster, 0.0 when the mutual information is zero. The contingency table
    is kept sparse (SOP has ~11k classes).
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


def kmeans_nmi(x: np.ndarray, codes: np.ndarray, seed: int = 1234) -> float:
    """NMI of ``codes: [N]`` against k-means of ``x: [N, D]`` (Lloyd, ``niter=20``, one cluster per class)."""
    _, assignment = kmeans(x, len(np.unique(codes)), niter=KMEANS_NITER, seed=seed)
    return normalized_mutual_info(codes, assignment)
