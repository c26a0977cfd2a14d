"""ProxyAnchorLoss against pytorch-metric-learning 2.9 with the same proxies (value and gradients, float64)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import oracle

P = oracle("pytorch_metric_learning.losses")
PM = oracle("pytorch_metric_learning.miners")
PD = oracle("pytorch_metric_learning.distances")

from contracts.mined import Mined  # noqa: E402
from losses import LpDistance, ProxyAnchorLoss  # noqa: E402

C, D = 6, 8


def pair(margin: float = 0.1, alpha: float = 32.0, lp: bool = False):
    ours = ProxyAnchorLoss(C, D, margin=margin, alpha=alpha, distance=LpDistance() if lp else None).double()
    pml = P.ProxyAnchorLoss(C, D, margin=margin, alpha=alpha, **({"distance": PD.LpDistance()} if lp else {})).double()
    with torch.no_grad():
        pml.proxies.copy_(ours.proxies)
    return ours, pml


def value_and_grads(loss, emb, labels, mined):
    emb = emb.clone().requires_grad_(True)
    value = loss(emb, labels, mined)
    g_emb, g_proxy = torch.autograd.grad(value, [emb, loss.proxies])
    return value.detach(), g_emb, g_proxy


def batch(seed: int, n: int = 14):
    g = torch.Generator().manual_seed(seed)
    # labels cover only some classes, so that proxies without positives appear
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(0, C - 2, (n,), generator=g)


@pytest.mark.parametrize("miner", [None, "ms", "triplet", "pair_margin"])
@pytest.mark.parametrize("setting", [{}, {"margin": 0.3, "alpha": 8.0}, {"lp": True, "alpha": 4.0}], ids=["default", "other", "lp"])
def test_matches_pml(miner: str | None, setting: dict) -> None:
    ours, pml = pair(**setting)
    make_miner = {
        None: lambda: None,
        "ms": lambda: PM.MultiSimilarityMiner(epsilon=0.1),
        "triplet": lambda: PM.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
        "pair_margin": lambda: PM.PairMarginMiner(pos_margin=0.2, neg_margin=0.8),
    }[miner]
    compared = 0
    for seed in range(4):
        emb, labels = batch(seed)
        m = make_miner()
        indices = None if m is None else m(emb, labels)
        if indices is not None and all(len(x) == 0 for x in indices):
            continue  # PML treats an empty tuple like None; we return 0 (tested below)
        mined = None if indices is None else Mined.from_tuple(indices)
        got = value_and_grads(ours, emb, labels, mined)
        want = value_and_grads(pml, emb, labels, indices)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-10)
        compared += 1
    assert compared >= 2


def test_tuple_weights_count_as_multiplicity() -> None:
    """A triplet with integer weight k counts like the triplet listed k times."""
    ours, _ = pair()
    emb, labels = batch(5)
    a, p, n = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    weighted = ours(emb, labels, Mined.from_triplets(a, p, n, weights=torch.tensor([2.0, 1.0, 3.0])))
    repeated = ours(emb, labels, Mined.from_triplets(a[[0, 0, 1, 2, 2, 2]], p[[0, 0, 1, 2, 2, 2]], n[[0, 0, 1, 2, 2, 2]]))
    torch.testing.assert_close(weighted, repeated, rtol=1e-12, atol=0)
    ones = ours(emb, labels, Mined.from_triplets(a, p, n, weights=torch.ones(3)))
    torch.testing.assert_close(ones, ours(emb, labels, Mined.from_triplets(a, p, n)), rtol=0, atol=0)


def test_empty_mined_gives_zero_with_zero_gradients() -> None:
    ours, _ = pair()
    emb, labels = batch(1)
    empty = torch.empty(0, dtype=torch.long)
    value, g_emb, g_proxy = value_and_grads(ours, emb, labels, Mined.from_triplets(empty, empty, empty))
    assert value.item() == 0.0
    assert torch.equal(g_emb, torch.zeros_like(g_emb)) and torch.equal(g_proxy, torch.zeros_like(g_proxy))


def test_proxies_are_kaiming_fan_out_parameters() -> None:
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(num_classes=400, embedding_size=64)
    assert isinstance(loss.proxies, torch.nn.Parameter) and loss.proxies.shape == (400, 64)
    assert [p is loss.proxies for p in loss.parameters()] == [True]
    # kaiming_normal_(mode="fan_out") on [C, D]: std = sqrt(2 / C)
    assert abs(loss.proxies.std().item() / (2 / 400) ** 0.5 - 1) < 0.03


def test_bad_inputs_are_named() -> None:
    loss = ProxyAnchorLoss(C, D)
    emb = torch.randn(4, D)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 6\)"):
        loss(emb, torch.tensor([0, 1, 2, 6]))
    with pytest.raises(ValueError, match="embedding_size=8"):
        loss(torch.randn(4, D + 1), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="ref_emb"):
        loss(emb, torch.tensor([0, 1, 2, 3]), ref_emb=emb, ref_labels=torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs(dtype: torch.dtype) -> None:
    loss = ProxyAnchorLoss(C, D)
    emb, labels = batch(2)
    emb = emb.float()
    full = loss(emb, labels)
    half_emb = emb.to(dtype).requires_grad_(True)
    half = loss(half_emb, labels)
    half.backward()
    assert half.dtype == dtype
    assert torch.isfinite(half_emb.grad).all() and torch.isfinite(loss.proxies.grad).all()
    assert abs(half.float().item() - full.item()) < 0.03 * abs(full.item()) + 0.03
