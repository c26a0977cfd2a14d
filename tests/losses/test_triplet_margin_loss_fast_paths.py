"""``TripletMarginLoss`` fast paths (row-wise distances for few triplets, dense masked hinge for many)
against the plain per-triplet formula on the full distance matrix: value and gradient, float64."""

from __future__ import annotations

import pytest
import torch

from contracts.relevance import all_triplets
from losses import CosineSimilarity, LpDistance, TripletMarginLoss


def _plain(loss: TripletMarginLoss, emb, labels, a, p, n, w):
    """Reference: the hinge of every listed triplet from the full matrix, mean over the non-zero ones."""
    mat = loss.distance(emb)
    values = [loss.distance.margin(mat[i, j], mat[i, k]) + loss.margin for i, j, k in zip(a.tolist(), p.tolist(), n.tolist())]
    hinge = torch.stack(values).clamp_min(0)
    if w is not None:
        hinge = hinge * w
    nonzero = hinge > 0
    return hinge.sum() / nonzero.sum() if nonzero.any() else emb.sum() * 0


@pytest.mark.parametrize("distance", [LpDistance, CosineSimilarity])
@pytest.mark.parametrize("many", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_paths_equal_the_plain_formula(distance, many, weighted, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(24, 5, generator=g, dtype=torch.float64)
    emb[3] = emb[2]  # coincident points
    labels = torch.randint(0, 4, (24,), generator=g)
    a, p, n = all_triplets(labels, labels, True).triplets
    if not many:  # fewer than B*M/12 triplets: the row-wise path
        keep = torch.randperm(len(a), generator=g)[:40]
        a, p, n = a[keep], p[keep], n[keep]
    w = torch.rand(len(a), generator=g, dtype=torch.float64) if weighted else None
    loss = TripletMarginLoss(margin=0.3, distance=distance())
    x1 = emb.clone().requires_grad_(True)
    x2 = emb.clone().requires_grad_(True)
    from miners import Mined

    got = loss(x1, labels, Mined.from_triplets(a, p, n, w))
    expected = _plain(loss, x2, labels, a, p, n, w)
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-7)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-7, atol=1e-7)


def test_dense_path_in_half_precision_is_close() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(64, 8, generator=g)
    labels = torch.randint(0, 4, (64,), generator=g)
    loss = TripletMarginLoss(margin=0.2)
    exact = loss(emb.double(), labels)
    for dtype in (torch.float16, torch.bfloat16):
        value = loss(emb.to(dtype), labels)
        assert value.dtype == dtype and torch.isfinite(value)
        assert abs(float(value) - float(exact)) < 0.05 * float(exact)


def test_no_active_triplet_gives_a_zero_with_gradient() -> None:
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    value = TripletMarginLoss(margin=0.1)(emb, labels)  # every triplet satisfied: dense path, none active
    value.backward()
    assert float(value.detach()) == 0 and emb.grad is not None and float(emb.grad.abs().sum()) == 0
