"""Metrix (Venkataramanan et al., ICLR 2022): pairs of the official code, the three mixing places, and
the soft-label losses against brute-force loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses import ContrastiveLoss, Metrix, MultiSimilarityLoss, ProxyAnchorLoss, TripletMarginLoss
from miners import Mined, MultiSimilarityMiner
from tests.helpers import TinyEncoder


def pk(seed: int, classes: int = 3, per_class: int = 3, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return torch.randn(len(labels), d, generator=g, dtype=torch.float64), labels


def l2(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((F.normalize(x, dim=0) - F.normalize(y, dim=0)).norm())


class Identity(nn.Module):
    """An "encoder" that returns its input, with the timm split, so mixes are exact to check."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ------------------------------------------------------------------------------------------ pairs
@pytest.mark.parametrize("seed", range(3))
def test_positive_negative_pairs_are_every_positive_times_every_negative(seed):
    emb, labels = pk(seed)
    a, p, n = Metrix(mode="embedding", pairs="pos_neg").select(emb, labels)
    ours = sorted(zip(a.tolist(), p.tolist(), n.tolist()))
    b = len(labels)
    expected = sorted((i, j, k) for i, j, k in itertools.product(range(b), repeat=3)
                      if i != j and labels[i] == labels[j] and labels[k] != labels[i])
    assert ours == expected


@pytest.mark.parametrize("seed", range(3))
def test_input_mode_keeps_the_single_hardest_negative(seed):
    emb, labels = pk(seed)
    a, p, n = Metrix(mode="input", pairs="pos_neg").select(emb, labels)
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        negs = [m for m in range(len(labels)) if labels[m] != labels[i]]
        assert k == min(negs, key=lambda m: l2(emb[i], emb[m]))
    assert len(a) == sum(int(labels[i] == labels[j]) for i in range(len(labels)) for j in range(len(labels)) if i != j)


def test_anchor_negative_pairs_are_for_anchors_without_positives():
    emb, _ = pk(0, classes=5, per_class=2)
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7])  # rows 2, 3, 6, 7, 8, 9 have no positive
    a, first, n = Metrix(mode="embedding", pairs="anchor_neg").select(emb, labels)
    assert torch.equal(a, first)
    lonely = {2, 3, 6, 7, 8, 9}
    expected = sorted((i, k) for i in lonely for k in range(10) if labels[k] != labels[i])
    assert sorted(zip(a.tolist(), n.tolist())) == expected


def test_alternate_draws_both_kinds_and_falls_back_when_one_is_empty():
    emb, _ = pk(0, classes=5, per_class=2)
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5, 6, 7])
    metrix = Metrix(mode="embedding")
    torch.manual_seed(0)
    kinds = {bool(torch.equal(a, f)) for a, f, _ in (metrix.select(emb, labels) for _ in range(20))}
    assert kinds == {True, False}
    emb, labels = pk(0)  # P x K: every anchor has a positive, so only positive-negative mixes exist
    for _ in range(5):
        a, f, _ = metrix.select(emb, labels)
        assert len(a) and not torch.equal(a, f)


def test_pairs_from_a_miner():
    emb, labels = pk(1)
    miner = MultiSimilarityMiner(epsilon=0.1)
    a, p, n = Metrix(mode="embedding", pairs="pos_neg", miner=miner).select(emb, labels)
    m = miner(emb, labels)
    expected = m.as_triplets()
    assert sorted(zip(a.tolist(), p.tolist(), n.tolist())) == sorted(zip(*(t.tolist() for t in expected[:3])))


# ---------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("seed", range(4))
def test_contrastive_mixed_loss_matches_the_official_formula(seed):
    """w * (AvgNonZero(lambda [d(a, m)]_+) + AvgNonZero((1 - lambda) [0.5 - d(a, m)]_+)), m = lambda x_p + (1 - lambda) x_n."""
    emb, labels = pk(seed)
    lam, w = 0.35, 0.4
    metrix = Metrix(mode="embedding", pairs="pos_neg", w=w)
    got = metrix.mixed_loss(None, None, emb, labels, ContrastiveLoss(pos_margin=0.0, neg_margin=0.5), lam)
    a, p, n = metrix.select(emb, labels)
    pos, neg = [], []
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        d = l2(emb[i], lam * emb[j] + (1 - lam) * emb[k])
        pos.append(lam * max(d, 0.0))
        neg.append((1 - lam) * max(0.5 - d, 0.0))
    avg = lambda v: sum(x for x in v if x > 0) / max(1, sum(1 for x in v if x > 0))  # noqa: E731
    assert math.isclose(float(got), w * (avg(pos) + avg(neg)), rel_tol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_multi_similarity_mixed_loss_matches_loop(seed):
    emb, labels = pk(seed)
    lam, alpha, beta, base = 0.7, 2.0, 10.0, 0.5
    metrix = Metrix(mode="embedding", pairs="pos_neg", w=1.0)
    got = metrix.mixed_loss(None, None, emb, labels, MultiSimilarityLoss(alpha, beta, base), lam)
    a, p, n = metrix.select(emb, labels)
    total = 0.0
    for i in range(len(labels)):
        ms = [lam * emb[j] + (1 - lam) * emb[k] for aa, j, k in zip(a.tolist(), p.tolist(), n.tolist()) if aa == i]
        s = [float(F.normalize(emb[i], dim=0) @ F.normalize(m, dim=0)) for m in ms]
        total += math.log1p(sum(lam * math.exp(-alpha * (v - base)) for v in s)) / alpha
        total += math.log1p(sum((1 - lam) * math.exp(beta * (v - base)) for v in s)) / beta
    assert math.isclose(float(got), total / len(labels), rel_tol=1e-12)


@pytest.mark.parametrize("mode", ["embedding", "feature", "input"])
@pytest.mark.parametrize("seed", range(2))
def test_lambda_one_gives_the_clean_loss_on_positives(mode, seed):
    """With lambda = 1 a mix is its positive: the mixed loss is the clean loss of the (anchor, positive) pairs."""
    emb, labels = pk(seed)
    encoder = Identity()
    metrix = Metrix(mode=mode, pairs="pos_neg", w=1.0, negatives=1)
    clean_emb, state = metrix.embed(encoder, emb)
    a, p, _ = metrix.select(emb, labels)
    on_positives = Mined(pos_pairs=(a, p), neg_pairs=(a[:0], p[:0]))
    for loss in (ContrastiveLoss(neg_margin=0.5), MultiSimilarityLoss()):
        got = metrix.mixed_loss(encoder, state, clean_emb, labels, loss, 1.0)
        torch.testing.assert_close(got, loss(emb, labels, on_positives), rtol=1e-12, atol=1e-12)
    proxy = ProxyAnchorLoss(3, emb.shape[1]).double()
    got = metrix.mixed_loss(encoder, state, clean_emb, labels, proxy, 1.0)
    torch.testing.assert_close(got, proxy(emb[p], labels[p]), rtol=1e-12, atol=1e-12)


def test_feature_mode_runs_the_backbone_once_and_leaves_clean_embeddings_unchanged():
    torch.manual_seed(0)
    encoder = TinyEncoder(embed_dim=8).double().eval()
    x = torch.randn(12, 3, 8, 8, dtype=torch.float64)
    labels = torch.arange(4).repeat_interleave(3)
    metrix = Metrix(mode="feature", pairs="pos_neg")
    emb, features = metrix.embed(encoder, x)
    assert torch.equal(emb, encoder(x))  # the clean forward is the encoder's own, bit for bit
    lam = 0.3
    a, p, n = metrix.select(emb.detach(), labels)
    got = metrix.mixed_loss(encoder, features, emb, labels, ContrastiveLoss(), lam)
    mixed = encoder.forward_head(lam * encoder.forward_features(x[p]) + (1 - lam) * encoder.forward_features(x[n]))
    d = (F.normalize(emb[a], dim=1) - F.normalize(mixed, dim=1)).norm(dim=1)
    pos, neg = lam * d, (1 - lam) * F.relu(1.0 - d)
    expected = 0.4 * (pos[pos > 0].mean() + neg[neg > 0].mean())
    torch.testing.assert_close(got, expected)
    counting = Identity()
    metrix.embed(counting, x.flatten(1))
    assert counting.calls == 1


def test_input_mode_embeds_mixed_images_with_gradient():
    torch.manual_seed(0)
    encoder = TinyEncoder(embed_dim=8).double()
    x = torch.randn(9, 3, 8, 8, dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(3)
    metrix = Metrix(mode="input")
    emb, state = metrix.embed(encoder, x)
    loss = metrix.mixed_loss(encoder, state, emb, labels, ContrastiveLoss(pos_margin=0.0, neg_margin=2.0), 0.6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="mode='pixels'"):
        Metrix(mode="pixels")
    emb, labels = pk(0)
    with pytest.raises(TypeError, match="Metrix needs a loss that takes a Mined.mix"):
        Metrix(mode="embedding").mixed_loss(None, None, emb, labels, TripletMarginLoss(), 0.5)
    with pytest.raises(TypeError, match="needs encoder.forward_features"):
        Metrix(mode="feature").embed(nn.Linear(6, 6), emb.float())


def test_nothing_to_mix_gives_zero_with_graph():
    emb = torch.randn(4, 6, requires_grad=True)
    one_class = torch.zeros(4, dtype=torch.long)  # no negative: neither kind of mix exists
    loss = Metrix(mode="embedding")(None, None, emb, one_class, ContrastiveLoss())
    loss.backward()
    assert loss.item() == 0 and torch.equal(emb.grad, torch.zeros_like(emb))
