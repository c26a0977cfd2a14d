"""A loss reuses its miner's distance matrix only when that is exact, with the same value and gradient.

Also the two fast kernels the matrix-based losses stand on: the analytic ``weighted_logsumexp`` and
the sparse products of a mostly-zero matrix gradient.
"""

from __future__ import annotations

import math

import pytest
import torch

import losses
import miners
from contracts import distances as distances_module
from contracts.distances import CosineSimilarity, DotProductSimilarity, LpDistance, _sparse_if_mostly_zero
from losses.pair_matrix import weighted_logsumexp
from tests.helpers import random_batch

DISTANCES = {
    "cosine": lambda: CosineSimilarity(),
    "lp_normalized": lambda: LpDistance(),
    "lp_raw": lambda: LpDistance(normalize_embeddings=False),
    "lp_power2": lambda: LpDistance(power=2),
    "dot": lambda: DotProductSimilarity(),
}
# (miner, loss) pairs whose loss computes the full matrix after the miner did
PAIRS = {
    "ms": lambda d: (miners.MultiSimilarityMiner(0.3, distance=d), losses.MultiSimilarityLoss(distance=d)),
    "semihard_triplet": lambda d: (miners.TripletMarginMiner(0.5, "all", distance=d), losses.TripletMarginLoss(0.5, distance=d)),
    "ms_contrastive": lambda d: (miners.MultiSimilarityMiner(0.3, distance=d), losses.ContrastiveLoss(0.2, 0.8, distance=d)),
}


class CountingMatrices:
    """Counts ``compute_mat`` calls of every distance class (the matmuls actually run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        for cls in (CosineSimilarity, LpDistance, DotProductSimilarity):
            original = cls.compute_mat

            def counted(this, q, r, _original=original):
                self.calls += 1
                return _original(this, q, r)

            monkeypatch.setattr(cls, "compute_mat", counted)


def batch(ref: bool, seed: int = 0):
    return random_batch(seed, n=14, classes=3, ref=11 if ref else None)


def run(miner, loss, emb, labels, ref_emb, ref_labels, reuse: bool):
    x = emb.clone().requires_grad_(True)
    r = None if ref_emb is None else ref_emb.clone().requires_grad_(True)
    mined = miner(x, labels, r, ref_labels)
    if not reuse:
        mined = mined.without_matrices()
    value = loss(x, labels, mined, r, ref_labels)
    value.backward()
    return value.detach(), x.grad, None if r is None else r.grad


@pytest.mark.parametrize("ref", [False, True], ids=["batch", "ref_emb"])
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("dist", DISTANCES)
def test_reused_matrix_gives_the_same_loss_and_gradients(dist: str, pair: str, ref: bool, monkeypatch) -> None:
    counter = CountingMatrices(monkeypatch)
    miner, loss = PAIRS[pair](DISTANCES[dist]())
    inputs = batch(ref)
    expected = run(miner, loss, *inputs, reuse=False)
    calls_without = counter.calls
    got = run(miner, loss, *inputs, reuse=True)
    assert counter.calls - calls_without == calls_without - 1, "the loss should not compute the matrix again"
    assert expected[0] != 0
    for a, b in zip(got, expected):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_separate_but_equal_distance_objects_share_the_matrix(monkeypatch) -> None:
    counter = CountingMatrices(monkeypatch)
    miner, loss = miners.MultiSimilarityMiner(0.3, distance=CosineSimilarity()), losses.MultiSimilarityLoss(distance=CosineSimilarity())
    run(miner, loss, *batch(False), reuse=True)
    assert counter.calls == 1


def test_a_different_distance_computes_its_own(monkeypatch) -> None:
    counter = CountingMatrices(monkeypatch)
    miner, loss = miners.MultiSimilarityMiner(0.3, distance=LpDistance()), losses.MultiSimilarityLoss(distance=CosineSimilarity())
    run(miner, loss, *batch(False), reuse=True)
    assert counter.calls == 2


def test_embeddings_changed_in_place_are_not_matched(monkeypatch) -> None:
    counter = CountingMatrices(monkeypatch)
    emb, labels, _, _ = batch(False)
    miner, loss = miners.MultiSimilarityMiner(0.3), losses.MultiSimilarityLoss()
    x = emb.clone()
    mined = miner(x, labels)
    x.mul_(2).add_(1)  # same storage, new contents
    fresh = loss(x, labels, mined.without_matrices())
    assert counter.calls == 2
    assert torch.equal(loss(x, labels, mined), fresh)
    assert counter.calls == 3, "a stale matrix must not be reused"


def test_a_miner_that_edits_its_matrix_is_not_trusted(monkeypatch) -> None:
    class Scribbler(miners.MultiSimilarityMiner):
        def mine(self, inputs):
            mat = self.distance(inputs.emb, None if inputs.same_set else inputs.ref_emb)
            mat.fill_(0.0)  # a miner may use its matrix as scratch space
            return super().mine(inputs)

    counter = CountingMatrices(monkeypatch)
    emb, labels, _, _ = batch(False)
    expected = losses.MultiSimilarityLoss()(emb, labels, miners.MultiSimilarityMiner(0.3)(emb, labels))
    before = counter.calls
    mined = Scribbler(0.3)(emb, labels)
    assert len(mined.matrices) == 2
    torch.testing.assert_close(losses.MultiSimilarityLoss()(emb, labels, mined), expected)
    assert counter.calls - before == 2, "only the untouched record is reused"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.5])
@pytest.mark.parametrize("distance", [CosineSimilarity(), LpDistance(normalize_embeddings=False)], ids=type)
def test_sparse_and_dense_matrix_gradients_agree(distance, density: float, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    q, r = torch.randn(300, 16, generator=g, dtype=dtype), torch.randn(200, 16, generator=g, dtype=dtype)
    r[:5] = q[:5]  # some zero distances
    mat = distance.compute_mat(q, r)
    grad = torch.randn(300, 200, generator=g, dtype=dtype) * (torch.rand(300, 200, generator=g) < density)
    grad[:5, :5] = 1.0
    maybe_sparse = _sparse_if_mostly_zero(grad)
    assert maybe_sparse.is_sparse == (density < distances_module.SPARSE_GRAD_DENSITY)
    got = distance.mat_backward(q, r, mat, maybe_sparse, (True, True))
    expected = distance.mat_backward(q, r, mat, grad, (True, True))
    # rows 0-4 have (near-)zero distances, where 1/d amplifies the summation order of the products
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-6, "atol": 1e-7}
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **tol)
    # and the dense analytic gradient is autograd's
    qq, rr = q.clone().requires_grad_(True), r.clone().requires_grad_(True)
    (distance.compute_mat(qq, rr) * grad).sum().backward()
    torch.testing.assert_close(expected[0], qq.grad, **tol)
    torch.testing.assert_close(expected[1], rr.grad, **tol)


def reference_lse(x: torch.Tensor, w: torch.Tensor, scale: float, offset: float) -> torch.Tensor:
    """Brute force: ``log sum_j w_j exp(scale x_j + offset)`` per row in float64 with autograd."""
    out = []
    for row, weights in zip(scale * x + offset, w.to(torch.float64)):
        keep = weights > 0
        out.append(torch.logsumexp(row[keep] + weights[keep].log(), 0) if keep.any() else row.sum() * 0 - math.inf)
    return torch.stack(out)


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (-2.0, 1.0), (50.0, -25.0), (300.0, 0.0)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_weighted_logsumexp_equals_brute_force(kind: str, scale: float, offset: float) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.rand(7, 9, generator=g, dtype=torch.float64) * 4 - 2
    keep = torch.rand(7, 9, generator=g) < 0.4
    keep[3] = False  # a row without any mined entry
    w = keep if kind == "bool" else keep * torch.rand(7, 9, generator=g, dtype=torch.float64) * 3
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = weighted_logsumexp(x1, w, scale=scale, offset=offset)
    expected = reference_lse(x2, w, scale, offset)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(7, generator=g, dtype=torch.float64)
    finite = torch.isfinite(expected)
    (got[finite] * upstream[finite]).sum().backward()
    (expected[finite] * upstream[finite]).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)
    assert torch.equal(x1.grad[3], torch.zeros(9, dtype=torch.float64)) and torch.equal(x1.grad[~keep], torch.zeros_like(x1.grad[~keep]))


def test_weighted_logsumexp_over_columns_and_in_float32() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g)
    w = torch.rand(6, 5, generator=g) * (torch.rand(6, 5, generator=g) < 0.6)
    got = weighted_logsumexp(x, w, dim=0)
    expected = reference_lse(x.double().t(), w.t(), 1.0, 0.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def test_weighted_logsumexp_rejects_weights_with_gradient_and_bad_shapes() -> None:
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="must not require gradient"):
        weighted_logsumexp(x, torch.rand(3, 4, requires_grad=True))
    with pytest.raises(ValueError, match=r"shape \(4, 3\), expected \(3, 4\)"):
        weighted_logsumexp(x, torch.rand(4, 3))
