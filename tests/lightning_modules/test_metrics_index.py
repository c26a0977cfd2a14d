"""The shared faiss index helper against brute force: exact flat search, approximate IVF/HNSW,
chunking, merging of per-shard top-k lists, and k-means."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contracts.index import build_index, kmeans, merge_topk, search, worst_score


def data(seed: int = 0, n: int = 300, q: int = 57, dim: int = 16):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((q, dim)).astype(np.float32), rng.standard_normal((n, dim)).astype(np.float32)


def brute(queries: np.ndarray, reference: np.ndarray, k: int, metric: str):
    q, r = queries.astype(np.float64), reference.astype(np.float64)
    scores = q @ r.T if metric == "ip" else ((q[:, None, :] - r[None]) ** 2).sum(-1)
    order = np.argsort(-scores if metric == "ip" else scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_flat_search_equals_brute_force_in_any_chunking(metric: str) -> None:
    queries, reference = data()
    expected_scores, expected_ids = brute(queries, reference, 10, metric)
    for chunk, add_chunk in [(4096, 65536), (7, 13)]:
        scores, ids = search(torch.from_numpy(queries), torch.from_numpy(reference), 10, metric, chunk=chunk, add_chunk=add_chunk)
        assert scores.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (57, 10)
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind, kwargs", [("ivf", {"nlist": 8, "nprobe": 8}), ("hnsw", {"ef_search": 256})])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_approximate_indexes_find_the_true_neighbours(kind: str, kwargs: dict, metric: str) -> None:
    queries, reference = data(1)
    _, expected = brute(queries, reference, 10, metric)
    _, ids = search(queries, reference, 10, metric, index=kind, **kwargs)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, expected)])
    assert recall > 0.95  # IVF with every cell probed is exact; HNSW at ef 256 on 300 points nearly


def test_prebuilt_index_fewer_references_than_k_and_bad_config() -> None:
    queries, reference = data(2, n=5)
    index = build_index(reference, "l2")
    scores, ids = search(queries, index, 8)
    assert (ids[:, 5:] == -1).all() and (scores[:, 5:] == worst_score("l2")).all()
    with pytest.raises(ValueError, match="metric must be one of"):
        build_index(reference, "cosine")
    with pytest.raises(ValueError, match="index must be one of"):
        build_index(reference, "ip", "lsh")


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_merge_of_shards_equals_one_search(metric: str) -> None:
    queries, reference = data(3, n=101)
    whole_scores, whole_ids = search(queries, reference, 12, metric)
    parts = np.array_split(np.arange(101), 3)
    shard_scores, shard_ids = [], []
    for part in parts[:2] + [parts[2][:3]] + [parts[2][3:]]:  # a shard smaller than k
        s, i = search(queries, reference[part], 12, metric)
        shard_scores.append(s)
        shard_ids.append(np.where(i >= 0, part[np.maximum(i, 0)], -1))
    scores, ids = merge_topk(np.concatenate(shard_scores, 1), np.concatenate(shard_ids, 1), 12, metric)
    np.testing.assert_array_equal(ids, whole_ids)
    np.testing.assert_array_equal(scores, whole_scores)


def test_merge_breaks_ties_by_id_and_puts_empty_slots_last() -> None:
    scores = np.array([[1.0, 2.0, 2.0, -np.finfo(np.float32).max]], dtype=np.float32)
    ids = np.array([[4, 9, 3, -1]])
    _, merged = merge_topk(scores, ids, 4, "ip")
    assert merged.tolist() == [[3, 9, 4, -1]]


def test_kmeans_recovers_separated_clusters() -> None:
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 50)
    x = (np.eye(8)[truth] * 10 + rng.standard_normal((200, 8)) * 0.1).astype(np.float32)
    centroids, assignment = kmeans(torch.from_numpy(x), 4, nredo=5)  # keeps the best of 5 seedings
    assert centroids.shape == (4, 8) and assignment.shape == (200,)
    pairs = set(zip(truth.tolist(), assignment.tolist()))
    assert len(pairs) == 4  # one cluster per class, no class split
