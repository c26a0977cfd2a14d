"""Retrieval metrics against pytorch-metric-learning's AccuracyCalculator, scikit-learn's NMI and a
brute-force loop written from the definitions; torchmetrics accumulation and a 2-process DDP run."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

import contracts.index as index_module
from lightning_modules.metrics import (
    QueryGalleryRetrievalMetrics,
    RetrievalMetrics,
    normalized_mutual_info,
    retrieval_metrics,
)
from tests.helpers import gloo_group

KS = (1, 2, 4, 8, 16)
SEEDS = (0, 1, 2)
DISTANCES = ("cosine", "euclidean")
PML_KEYS = {"precision_at_1": "precision@1", "r_precision": "r_precision", "mean_average_precision_at_r": "map@r"}


def clustered(seed: int, n: int = 400, n_classes: int = 70, dim: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous data (no distance ties) with uneven class sizes, some classes of one sample."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    labels[:5] = torch.arange(1000, 1005)  # singleton classes: lone queries
    centers = torch.randn(n_classes + 1005, dim, generator=g, dtype=torch.float64)
    emb = centers[labels] + 0.9 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return emb, labels


def query_gallery(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    emb, labels = clustered(seed, n=500)
    q, g = emb[:200], emb[200:]
    ql, gl = labels[:200].clone(), labels[200:]
    ql[5:10] = 5000  # labels absent from the gallery: lone queries
    return q, ql, g, gl


def brute_force(q, ql, r, rl, same_set: bool, ks, distance: str) -> dict[str, float]:
    """One query at a time, in float64, straight from the definitions (lone queries skipped)."""
    q, r = q.double(), r.double()
    if distance == "cosine":
        d = -(F.normalize(q, dim=1) @ F.normalize(r, dim=1).T)
    else:
        d = torch.cdist(q, r)
    ql, rl = ql.tolist(), rl.tolist()
    sums = {f"recall@{k}": 0.0 for k in ks} | {"precision@1": 0.0, "r_precision": 0.0, "map@r": 0.0}
    n_valid = 0
    for i in range(len(q)):
        order = torch.argsort(d[i]).tolist()
        if same_set:
            order.remove(i)
        rel = [rl[j] == ql[i] for j in order]
        big_r = sum(rel)
        if big_r == 0:
            continue
        n_valid += 1
        for k in ks:
            sums[f"recall@{k}"] += float(any(rel[:k]))
        sums["precision@1"] += float(rel[0])
        sums["r_precision"] += sum(rel[:big_r]) / big_r
        sums["map@r"] += sum(sum(rel[:i]) / i for i in range(1, big_r + 1) if rel[i - 1]) / big_r
    return {key: value / n_valid for key, value in sums.items()}


def pml_scores(q, ql, r=None, rl=None, nmi: bool = False) -> dict[str, float]:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    include = tuple(PML_KEYS) + (("NMI",) if nmi else ())
    calc = AccuracyCalculator(include=include, k="max_bin_count", device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = calc.get_accuracy(q, ql, r, rl, ref_includes_query=False)
    return {PML_KEYS.get(key, key.lower()): value for key, value in out.items()}


def for_pml(x: torch.Tensor, distance: str) -> torch.Tensor:
    """PML ranks by L2 on what it is given: hand it unit vectors for cosine (same ranking)."""
    return (F.normalize(x.double(), dim=1) if distance == "cosine" else x).float()


def assert_scores_equal(ours: dict[str, float], ref: dict[str, float], tol: float = 1e-12) -> None:
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=tol, rel=tol), key


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("seed", SEEDS)
def test_query_is_reference_matches_pml_and_brute_force(seed: int, distance: str) -> None:
    emb, labels = clustered(seed)
    ours = retrieval_metrics(emb, labels, ks=KS, nmi=True, distance=distance)
    assert all(isinstance(v, float) for v in ours.values())
    assert 0.2 < ours["precision@1"] < 0.95  # informative data, not a degenerate 0 or 1
    assert ours["recall@1"] == ours["precision@1"]
    assert_scores_equal(ours, pml_scores(for_pml(emb, distance), labels, nmi=True))
    assert_scores_equal(ours, brute_force(emb, labels, emb, labels, True, KS, distance))


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("seed", SEEDS)
def test_query_gallery_matches_pml_and_brute_force(seed: int, distance: str) -> None:
    q, ql, g, gl = query_gallery(seed)
    ours = retrieval_metrics(q, ql, g, gl, ks=KS, nmi=True, distance=distance)
    assert_scores_equal(ours, pml_scores(for_pml(q, distance), ql, for_pml(g, distance), gl, nmi=True))
    assert_scores_equal(ours, brute_force(q, ql, g, gl, False, KS, distance))


def test_lone_queries_are_left_out_not_counted_as_misses() -> None:
    # class 0 = {0, 1} side by side; class 1 = {2} alone (a lone query); class 2 = {3, 4} far apart,
    # each of them nearer to point 2 and to class 0 than to its partner (its partner ranks 4th)
    emb = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [10.0, 0.0], [-10.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 2])
    out = retrieval_metrics(emb, labels, ks=(1, 3, 4), distance="euclidean")
    # averaged over queries 0, 1, 3, 4 (counting query 2 as a miss would give 0.4, 0.6, 0.8)
    assert out["precision@1"] == 0.5
    assert out["recall@3"] == 0.5
    assert out["recall@4"] == 1.0
    assert out["r_precision"] == 0.5
    assert out["map@r"] == 0.5  # R = 1: a match at rank 4 adds nothing to MAP@R


def test_all_lone_gives_nan_with_warning() -> None:
    emb, _ = clustered(0, n=20)
    with pytest.warns(UserWarning, match="no query"):
        out = retrieval_metrics(emb, torch.arange(20), nmi=True)
    assert math.isnan(out["recall@1"]) and math.isnan(out["map@r"])
    assert out["nmi"] == pytest.approx(1.0)  # 20 clusters of 20 points: every point its own cluster


def test_exact_duplicates_are_neighbours_only_self_is_removed() -> None:
    # 30 copies of one point per class: the query's own row may fall outside the k+1 returned
    # (faiss breaks ties by index), which exercises the drop-the-last-column branch.
    emb = torch.eye(4, dtype=torch.float64)[torch.repeat_interleave(torch.tensor([0, 1]), 30)]
    labels = torch.repeat_interleave(torch.tensor([7, 9]), 30)
    for distance in DISTANCES:
        out = retrieval_metrics(emb, labels, ks=(1, 29, 100), distance=distance)
        assert out == {"recall@1": 1.0, "recall@29": 1.0, "recall@100": 1.0, "precision@1": 1.0, "r_precision": 1.0, "map@r": 1.0}


def test_chunks_bound_the_search_and_do_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    emb, labels = clustered(3)
    whole = retrieval_metrics(emb, labels, ks=KS, chunk_size=10_000)
    searched_rows: list[int] = []
    real_faiss = index_module.faiss
    flat = real_faiss.IndexFlat

    class RecordingIndex:
        def __init__(self, dim: int, metric: int) -> None:
            self.inner = flat(dim, metric)

        def add(self, x: np.ndarray) -> None:
            self.inner.add(x)

        def search(self, x: np.ndarray, k: int):
            searched_rows.append(len(x))
            return self.inner.search(x, k)

    monkeypatch.setattr(real_faiss, "IndexFlat", RecordingIndex)
    chunked = retrieval_metrics(emb, labels, ks=KS, chunk_size=7)
    assert chunked == pytest.approx(whole, abs=1e-12)  # only the summation order differs
    assert max(searched_rows) == 7 and sum(searched_rows) <= len(emb)


@pytest.mark.parametrize("seed", SEEDS)
def test_normalized_mutual_info_matches_sklearn(seed: int) -> None:
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(seed)
    a = rng.integers(0, 30, 500)
    b = np.where(rng.random(500) < 0.6, a * 7 + 3, rng.integers(0, 40, 500))  # partly agrees, other ids
    cases = [(a, b), (a, a), (a, np.zeros(500, dtype=int)), (np.zeros(5, int), np.zeros(5, int)), (a, rng.permutation(a))]
    for x, y in cases:
        assert normalized_mutual_info(x, y) == pytest.approx(normalized_mutual_info_score(x, y), abs=1e-12)


def test_numpy_and_tensor_inputs_agree() -> None:
    q, ql, g, gl = query_gallery(4)
    from_tensor = retrieval_metrics(q, ql, g, gl, nmi=True)
    from_numpy = retrieval_metrics(q.numpy(), ql.numpy(), g.numpy(), gl.numpy(), nmi=True)
    assert from_numpy == from_tensor


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(emb=torch.ones(4, 3), labels=torch.arange(5)), "labels has 5 entries but emb has 4 rows"),
        (dict(emb=torch.ones(4), labels=torch.arange(4)), r"emb must be .*\[N, D\]"),
        (dict(emb=torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]), labels=torch.arange(2)), r"NaN or Inf in rows \[1\]"),
        (dict(emb=torch.ones(4, 3), labels=torch.ones(4)), "integer array"),
        (dict(emb=torch.ones(4, 3), labels=torch.arange(4), ref_emb=torch.ones(2, 3)), "given together"),
        (dict(emb=torch.ones(4, 3), labels=torch.arange(4), ref_emb=torch.ones(2, 5), ref_labels=torch.arange(2)), "dimension 5"),
        (dict(emb=torch.ones(4, 3), labels=torch.arange(4), ref_emb=torch.ones(2, 3), ref_labels=torch.arange(3)), "ref_labels has 3"),
        (dict(emb=torch.ones(4, 3), labels=torch.arange(4), distance="manhattan"), "distance must be one of"),
        (dict(emb=torch.ones(4, 3), labels=torch.arange(4), ks=(1, 0)), "ks must be"),
        (dict(emb=[[1.0]], labels=torch.arange(1)), "torch.Tensor or numpy.ndarray"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(**kwargs)


def test_metric_updates_in_chunks_equal_one_call() -> None:
    emb, labels = clustered(5)
    metric = RetrievalMetrics(ks=KS, nmi=True)
    for part_e, part_l in zip(emb.split(37), labels.split(37)):
        metric.update(part_e, part_l)
    assert metric.compute() == retrieval_metrics(emb, labels, ks=KS, nmi=True)


def test_query_gallery_metric_with_flags_and_tensor_masks() -> None:
    q, ql, g, gl = query_gallery(6)
    expected = retrieval_metrics(q, ql, g, gl, ks=KS, distance="euclidean")
    by_loader = QueryGalleryRetrievalMetrics(ks=KS, distance="euclidean")
    for part_e, part_l in zip(g.split(64), gl.split(64)):
        by_loader.update(part_e, part_l, is_query=False)
    for part_e, part_l in zip(q.split(50), ql.split(50)):
        by_loader.update(part_e, part_l, is_query=True)
    assert by_loader.compute() == expected
    # one shuffled stream with a per-row mask: the same sets, so the same scores
    emb, labels = torch.cat([q, g]), torch.cat([ql, gl])
    mask = torch.arange(len(emb)) < len(q)
    perm = torch.randperm(len(emb), generator=torch.Generator().manual_seed(0))
    mixed = QueryGalleryRetrievalMetrics(ks=KS, distance="euclidean")
    for chunk in perm.split(90):
        mixed.update(emb[chunk], labels[chunk], mask[chunk])
    assert mixed.compute() == pytest.approx(expected, abs=1e-12)


def test_index_drops_padded_duplicates_and_restores_order() -> None:
    emb, labels = clustered(7, n=101)
    index = torch.cat([torch.arange(101).flip(0), torch.arange(3)])  # 3 padded repeats, reversed order
    metric = RetrievalMetrics(nmi=True)
    metric.update(emb[index], labels[index], index=index)
    assert metric.compute() == retrieval_metrics(emb, labels, nmi=True)
    without_index = RetrievalMetrics()
    without_index.update(emb[index], labels[index])
    assert without_index.compute() != retrieval_metrics(emb, labels)  # the repeats do count without index


def test_metric_misuse_raises() -> None:
    metric = RetrievalMetrics()
    with pytest.raises(ValueError, match="before any update"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics' own "compute before update" warning
        metric.compute()
    metric.update(torch.randn(4, 3), torch.arange(4), index=torch.arange(4))
    with pytest.raises(ValueError, match="every update or in none"):
        metric.update(torch.randn(4, 3), torch.arange(4))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        metric.update(torch.randn(4, 3), torch.arange(3), index=torch.arange(3))
    qg = QueryGalleryRetrievalMetrics()
    with pytest.raises(ValueError, match="is_query must be a bool"):
        qg.update(torch.randn(4, 3), torch.arange(4), is_query=torch.ones(3, dtype=torch.bool))
    qg.update(torch.randn(4, 3), torch.arange(4), is_query=True)
    with pytest.raises(ValueError, match="need both query and gallery"):
        qg.compute()


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str, emb, labels, is_query) -> None:
    with gloo_group(rank, world_size, init_file):
        # shuffled and padded (101 samples on 2 ranks: one repeat), as Lightning's sampler does
        shard = torch.tensor(list(DistributedSampler(range(len(emb)), world_size, rank, shuffle=True, seed=3)))
        with_index = RetrievalMetrics(ks=KS, nmi=True)
        query_gallery_metric = QueryGalleryRetrievalMetrics(ks=KS, nmi=True, distance="euclidean")
        for chunk in shard.split(20):
            with_index.update(emb[chunk], labels[chunk], index=chunk)
            query_gallery_metric.update(emb[chunk], labels[chunk], is_query[chunk], index=chunk)
        # contiguous halves of uneven size (51 / 50) without index: gathered in rank order
        half = torch.arange(len(emb)).tensor_split(world_size)[rank]
        without_index = RetrievalMetrics(ks=KS, nmi=True)
        without_index.update(emb[half], labels[half])
        results = {
            "with_index": with_index.compute(),
            "query_gallery": query_gallery_metric.compute(),
            "without_index": without_index.compute(),
        }
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process(tmp_path: Path) -> None:
    emb, labels = clustered(8, n=101)
    is_query = torch.arange(101) % 3 == 0
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), emb, labels, is_query), nprocs=2)
    expected = {
        "with_index": retrieval_metrics(emb, labels, ks=KS, nmi=True),
        "without_index": retrieval_metrics(emb, labels, ks=KS, nmi=True),
        "query_gallery": retrieval_metrics(
            emb[is_query], labels[is_query], emb[~is_query], labels[~is_query], ks=KS, nmi=True, distance="euclidean"
        ),
    }
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected
