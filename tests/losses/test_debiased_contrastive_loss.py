"""DebiasedContrastiveLoss against the closed form of Chuang et al. (2020), computed by a loop over pairs."""

from __future__ import annotations

import math

import pytest
import torch

from contracts.mined import Mined
from contracts.relevance import all_pairs
from losses import CosineSimilarity, DebiasedContrastiveLoss, LpDistance, NTXentLoss


def brute_force(emb, labels, temperature, tau_plus, mined=None, ref_emb=None, ref_labels=None, distance=None):
    """The paper's objective, one positive pair at a time, in float64 Python arithmetic on torch scalars."""
    distance = CosineSimilarity() if distance is None else distance
    same = ref_emb is None
    ref_emb, ref_labels = (emb, labels) if same else (ref_emb, ref_labels)
    mat = distance(emb, ref_emb)
    sim = mat if distance.is_inverted else -mat
    mined = all_pairs(labels, ref_labels, same) if mined is None else mined
    a1, p, a2, n, pw, nw = mined.as_pairs()
    pw = [1.0] * len(a1) if pw is None else pw.tolist()
    nw = [1.0] * len(a2) if nw is None else nw.tolist()
    if len(a1) == 0 or len(a2) == 0:
        return emb.sum() * 0
    terms = []
    for i in range(len(a1)):
        a = int(a1[i])
        e = lambda j: torch.exp(sim[a, j] / temperature)  # noqa: E731
        negs = [(int(n[j]), nw[j]) for j in range(len(a2)) if int(a2[j]) == a]
        poss = [(int(p[j]), pw[j]) for j in range(len(a1)) if int(a1[j]) == a]
        big_n = sum(w for _, w in negs)
        big_m = sum(w for _, w in poss)
        if big_n == 0:
            terms.append(sim.sum() * 0)
            continue
        mean_neg = sum(w * e(j) for j, w in negs) / big_n
        mean_pos = sum(w * e(j) for j, w in poss) / big_m
        g = torch.clamp((mean_neg - tau_plus * mean_pos) / (1 - tau_plus), min=math.exp(-1 / temperature))
        pos = e(int(p[i]))
        terms.append(-pw[i] * torch.log(pos / (pos + big_n * g)))
    return torch.stack(terms).mean()


def batch(seed: int, n: int = 10, dim: int = 4, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def check(loss, ref_fn, emb, **kwargs) -> None:
    x = emb.clone().requires_grad_(True)
    y = emb.clone().requires_grad_(True)
    got = loss(x, **kwargs)
    want = ref_fn(y)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    (gx,) = torch.autograd.grad(got, x)
    (gy,) = torch.autograd.grad(want, y)
    torch.testing.assert_close(gx, gy, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tau_plus", [0.0, 0.1, 0.3, 0.6])
@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_matches_closed_form(tau_plus: float, temperature: float) -> None:
    loss = DebiasedContrastiveLoss(temperature=temperature, tau_plus=tau_plus)
    for seed in range(3):
        emb, labels = batch(seed)
        check(loss, lambda e: brute_force(e, labels, temperature, tau_plus), emb, labels=labels)


def test_clamp_is_exercised() -> None:
    """With a large class prior the debiased estimate falls below exp(-1/t) for some anchors."""
    emb, labels = batch(0)
    loss = DebiasedContrastiveLoss(temperature=0.5, tau_plus=0.6)
    sim = CosineSimilarity()(emb) / 0.5
    a1, p, a2, n, _, _ = all_pairs(labels, labels, True).as_pairs()
    clamped = 0
    for a in range(len(labels)):
        negs, poss = sim[a, n[a2 == a]].exp(), sim[a, p[a1 == a]].exp()
        if len(negs) and len(poss):
            clamped += int((negs.mean() - 0.6 * poss.mean()) / 0.4 < math.exp(-2))
    assert clamped > 0
    check(loss, lambda e: brute_force(e, labels, 0.5, 0.6), emb, labels=labels)


def test_mined_weights_and_ref_set() -> None:
    emb, labels = batch(4)
    g = torch.Generator().manual_seed(9)
    ref_emb, ref_labels = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g)
    base = all_pairs(labels, ref_labels, False)
    a1, p, a2, n, _, _ = base.as_pairs()
    keep_p, keep_n = torch.arange(len(a1)) % 2 == 0, torch.arange(len(a2)) % 3 != 0
    mined = Mined.from_pairs(
        a1[keep_p], p[keep_p], a2[keep_n], n[keep_n],
        pos_weights=torch.rand(int(keep_p.sum()), generator=g, dtype=torch.float64) + 0.1,
        neg_weights=torch.rand(int(keep_n.sum()), generator=g, dtype=torch.float64) * 2,
    )
    loss = DebiasedContrastiveLoss(temperature=0.2, tau_plus=0.2)
    ref = lambda e: brute_force(e, labels, 0.2, 0.2, mined, ref_emb, ref_labels)  # noqa: E731
    check(loss, ref, emb, labels=labels, mined=mined, ref_emb=ref_emb, ref_labels=ref_labels)


def test_triplets_and_lp_distance() -> None:
    emb, labels = batch(6)
    pos, neg = labels[:, None] == labels[None], labels[:, None] != labels[None]
    pos.fill_diagonal_(False)
    a, p, n = torch.where(pos[:, :, None] & neg[:, None, :])
    keep = torch.arange(len(a)) % 5 == 0
    mined = Mined.from_triplets(a[keep], p[keep], n[keep])
    loss = DebiasedContrastiveLoss(temperature=0.5, tau_plus=0.1, distance=LpDistance())
    check(loss, lambda e: brute_force(e, labels, 0.5, 0.1, mined, distance=LpDistance()), emb, labels=labels, mined=mined)


def test_zero_prior_equals_ntxent() -> None:
    """For a cosine similarity every exp(s/t) >= exp(-1/t), so with tau+ = 0 the clamp never acts."""
    for seed in range(3):
        emb, labels = batch(seed)
        torch.testing.assert_close(
            DebiasedContrastiveLoss(temperature=0.3, tau_plus=0.0)(emb, labels),
            NTXentLoss(temperature=0.3)(emb, labels),
            rtol=1e-12,
            atol=0,
        )


def test_nothing_qualifies_gives_zero_and_finite_gradients() -> None:
    loss = DebiasedContrastiveLoss()
    emb = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    for labels in (torch.zeros(5, dtype=torch.long), torch.arange(5)):
        value = loss(emb, labels)
        (g,) = torch.autograd.grad(value, emb)
        assert value.item() == 0.0 and torch.equal(g, torch.zeros_like(g))
    # anchors without negatives give zero terms, and the others stay finite
    mined = Mined.from_pairs(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0]), torch.tensor([3]))
    value = loss(emb, torch.tensor([0, 0, 1, 1, 2]), mined)
    (g,) = torch.autograd.grad(value, emb)
    assert torch.isfinite(value) and torch.isfinite(g).all()


def test_rejects_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="tau_plus"):
        DebiasedContrastiveLoss(tau_plus=1.0)
    with pytest.raises(ValueError, match="temperature"):
        DebiasedContrastiveLoss(temperature=0.0)
