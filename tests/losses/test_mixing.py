"""Synthetic points of a ``Mined.mix`` (``losses.mixing``): each loss's soft-label form against a brute-force loop.

The Metrix forms (Venkataramanan et al., ICLR 2022, Eq. 6) and MoCHi's appended negatives (Kalantidis
et al., NeurIPS 2020) are written out term by term, in float64, on several seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from contracts.relevance import all_pairs
from losses import ContrastiveLoss, CosineSimilarity, MultiSimilarityLoss, NTXentLoss, ProxyAnchorLoss, TripletMarginLoss
from losses.mixing import soft_class_targets
from miners import Mined, MixSpec

D = 6


def batch(seed: int, classes: int = 3, per_class: int = 3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    emb = torch.randn(len(labels), D, generator=g, dtype=torch.float64)
    return emb, labels, g


def random_mix(emb: torch.Tensor, labels: torch.Tensor, g: torch.Generator, m: int = 7, with_points: bool = False) -> MixSpec:
    """Mixes of a row of the anchor's class with a row of another class, random soft labels in [0, 1]."""
    b = len(emb)
    anchors = torch.randint(0, b, (m,), generator=g)
    first = torch.stack([torch.nonzero(labels == labels[a]).flatten()[0] for a in anchors])
    second = torch.stack([torch.nonzero(labels != labels[a]).flatten()[-1] for a in anchors])
    coeff = torch.rand(m, generator=g, dtype=torch.float64)
    coeff[0], coeff[1] = 1.0, 0.0  # the pure cases: a positive-only and a negative-only point
    points = torch.randn(m, emb.shape[1], generator=g, dtype=torch.float64) if with_points else None
    return MixSpec(anchors, first, second, coeff, pos_weight=coeff.clone(), first_source="query", second_source="query",
                   normalize=False, detach=False, points=points)


def dist(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((F.normalize(x, dim=0) - F.normalize(y, dim=0)).norm())


def cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.normalize(x, dim=0) @ F.normalize(y, dim=0))


def mean_nonzero(values: list[float]) -> float:
    nz = [v for v in values if v > 0]
    return sum(nz) / len(nz) if nz else 0.0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_points", [False, True])
def test_contrastive_soft_labels_match_loop(seed, with_points):
    emb, labels, g = batch(seed)
    spec = random_mix(emb, labels, g, with_points=with_points)
    points = spec.materialize(emb)
    pm, nm = 0.1, 0.8
    # clean pairs too: the mix is added to the tuples, each part averaged over its non-zero terms
    clean = all_pairs(labels, labels, same_set=True)
    a1, p, a2, n = clean.as_pairs()[:4]
    pos = [max(dist(emb[i], emb[j]) - pm, 0) for i, j in zip(a1.tolist(), p.tolist())]
    neg = [max(nm - dist(emb[i], emb[j]), 0) for i, j in zip(a2.tolist(), n.tolist())]
    for k in range(len(spec)):
        lam, d = float(spec.pos_weight[k]), dist(emb[spec.anchors[k]], points[k])
        pos.append(lam * max(d - pm, 0))
        neg.append((1 - lam) * max(nm - d, 0))
    expected = mean_nonzero(pos) + mean_nonzero(neg)
    got = ContrastiveLoss(pos_margin=pm, neg_margin=nm)(emb, labels, Mined(clean.pos_pairs, clean.neg_pairs, mix=spec))
    assert math.isclose(float(got), expected, rel_tol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_multi_similarity_soft_labels_match_loop(seed):
    emb, labels, g = batch(seed)
    spec = random_mix(emb, labels, g)
    points = spec.materialize(emb)
    alpha, beta, base = 2.0, 10.0, 0.5
    loss = MultiSimilarityLoss(alpha, beta, base)(emb, labels, Mined(mix=spec))
    total = 0.0
    for i in range(len(emb)):
        ks = [k for k in range(len(spec)) if int(spec.anchors[k]) == i]
        sp = sum(float(spec.pos_weight[k]) * math.exp(-alpha * (cos(emb[i], points[k]) - base)) for k in ks)
        sn = sum((1 - float(spec.pos_weight[k])) * math.exp(beta * (cos(emb[i], points[k]) - base)) for k in ks)
        total += math.log1p(sp) / alpha + math.log1p(sn) / beta
    assert math.isclose(float(loss), total / len(emb), rel_tol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_proxy_anchor_soft_labels_match_loop(seed):
    emb, labels, g = batch(seed)
    spec = random_mix(emb, labels, g)
    points = spec.materialize(emb)
    classes, margin, alpha = 4, 0.1, 8.0
    loss_fn = ProxyAnchorLoss(classes, D, margin=margin, alpha=alpha).double()
    got = loss_fn(emb, labels, Mined(mix=spec))
    proxies = loss_fn.proxies.detach()
    y = torch.zeros(len(spec), classes, dtype=torch.float64)
    for k in range(len(spec)):
        lam = float(spec.coeff[k])
        y[k, labels[spec.first[k]]] += lam
        y[k, labels[spec.second[k]]] += 1 - lam
    pos_part, neg_part, present = 0.0, 0.0, 0
    for c in range(classes):
        sp = sum(float(y[k, c]) * math.exp(-alpha * (cos(points[k], proxies[c]) - margin)) for k in range(len(spec)))
        sn = sum(float(1 - y[k, c]) * math.exp(alpha * (cos(points[k], proxies[c]) + margin)) for k in range(len(spec)))
        if bool((y[:, c] > 0).any()):
            present += 1
            pos_part += math.log1p(sp)
        neg_part += math.log1p(sn)
    assert math.isclose(got.item(), pos_part / present + neg_part / classes, rel_tol=1e-10)


@pytest.mark.parametrize("seed", range(3))
def test_ntxent_synthetic_negatives_join_the_denominator(seed):
    emb, labels, g = batch(seed)
    ref = torch.randn(10, D, generator=g, dtype=torch.float64)
    ref_labels = torch.randint(0, 3, (10,), generator=g)
    m = 5
    spec = MixSpec(torch.randint(0, len(emb), (m,), generator=g), torch.randint(0, 10, (m,), generator=g),
                   torch.randint(0, 10, (m,), generator=g), torch.rand(m, generator=g, dtype=torch.float64),
                   pos_weight=torch.zeros(m, dtype=torch.float64))
    points = spec.materialize(emb, ref)
    t = 0.2
    mined = all_pairs(labels, ref_labels, same_set=False)
    got = NTXentLoss(temperature=t)(emb, labels, Mined(mined.pos_pairs, mined.neg_pairs, mix=spec), ref, ref_labels)
    terms = []
    for a, p in zip(*[x.tolist() for x in mined.pos_pairs]):
        negs = [cos(emb[a], ref[n]) for n in range(10) if ref_labels[n] != labels[a]]
        negs += [cos(emb[a], points[k]) for k in range(m) if int(spec.anchors[k]) == a]
        if not negs:
            terms.append(0.0)
            continue
        pos = cos(emb[a], ref[p]) / t
        terms.append(-pos + math.log(math.exp(pos) + sum(math.exp(s / t) for s in negs)))
    assert math.isclose(float(got), sum(terms) / len(terms), rel_tol=1e-12)


def test_detached_points_give_no_gradient_through_them():
    emb, labels, _ = batch(0)
    ref = torch.randn(8, D, dtype=torch.float64, requires_grad=True)
    ref_labels = torch.arange(8) % 3
    # the pairs use reference rows 0 and 1; the synthetic points mix rows 2-5
    spec = MixSpec(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5]), torch.tensor([0.3, 0.6], dtype=torch.float64),
                   pos_weight=torch.zeros(2, dtype=torch.float64))
    q = emb.clone().requires_grad_(True)
    mined = Mined(mix=spec, pos_pairs=(torch.tensor([0]), torch.tensor([0])), neg_pairs=(torch.tensor([1]), torch.tensor([1])))
    NTXentLoss()(q, labels, mined, ref, ref_labels).backward()
    assert q.grad.abs().sum() > 0 and ref.grad[:2].abs().sum() > 0
    assert torch.equal(ref.grad[2:], torch.zeros_like(ref.grad[2:]))


def test_soft_class_targets_keep_the_anchor_class_at_pos_weight():
    labels = torch.tensor([0, 0, 1, 2])
    spec = MixSpec(torch.tensor([0, 0]), torch.tensor([0, 2]), torch.tensor([2, 3]), torch.tensor([0.3, 0.6]),
                   pos_weight=torch.tensor([0.0, 0.0]), first_source="query", second_source="query")
    y = soft_class_targets(spec, labels, None, 3)
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.7, 0.0], [0.0, 0.6, 0.4]], dtype=torch.float64))


def test_losses_without_mix_support_reject_it():
    emb, labels, g = batch(0)
    spec = random_mix(emb, labels, g)
    with pytest.raises(ValueError, match="TripletMarginLoss does not use synthetic points"):
        TripletMarginLoss()(emb, labels, Mined(mix=spec))


def test_mix_indices_and_soft_labels_are_validated():
    emb, labels, _ = batch(0)
    bad = MixSpec(torch.tensor([0]), torch.tensor([99]), torch.tensor([1]), torch.tensor([0.5]), pos_weight=torch.tensor([0.5]),
                  first_source="query", second_source="query")
    with pytest.raises(ValueError, match="MixSpec.first indexes outside its query set of size 9"):
        ContrastiveLoss()(emb, labels, Mined(mix=bad))
    bad = MixSpec(torch.tensor([0]), torch.tensor([1]), torch.tensor([1]), torch.tensor([0.5]), pos_weight=torch.tensor([1.5]))
    with pytest.raises(ValueError, match=r"pos_weight must be in \[0, 1\]"):
        ContrastiveLoss()(emb, labels, Mined(mix=bad))


def test_shared_cosine_distance_and_gradient_reach_mixed_rows():
    emb, labels, g = batch(1)
    x = emb.clone().requires_grad_(True)
    spec = random_mix(x, labels, g)
    loss = ContrastiveLoss(distance=CosineSimilarity(), pos_margin=0.9, neg_margin=0.1)(x, labels, Mined(mix=spec))
    loss.backward()
    used = torch.unique(torch.cat([spec.anchors, spec.first, spec.second]))
    assert x.grad[used].abs().sum() > 0
