"""Per-tuple weights from ``Mined``: each loss against a loop over anchors written from its docstring formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from contracts.mined import Mined
from contracts.relevance import all_pairs
from losses import CircleLoss, ContrastiveLoss, CosineSimilarity, LpDistance, MultiSimilarityLoss, NTXentLoss, SupConLoss, TripletMarginLoss


def batch(seed: int, n: int = 9, dim: int = 4, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    return emb, labels, g


def weighted_pairs(labels: torch.Tensor, g: torch.Generator, zeros: bool = True) -> Mined:
    """A random subset of all pairs with random weights (some exactly 0) and a repeated pair."""
    a1, p, a2, n, _, _ = all_pairs(labels, labels, True).as_pairs()
    kp, kn = torch.rand(len(a1), generator=g) < 0.7, torch.rand(len(a2), generator=g) < 0.6
    a1, p, a2, n = a1[kp], p[kp], a2[kn], n[kn]
    a1, p, a2, n = torch.cat([a1, a1[:1]]), torch.cat([p, p[:1]]), torch.cat([a2, a2[:1]]), torch.cat([n, n[:1]])
    pw = torch.rand(len(a1), generator=g, dtype=torch.float64) * 2
    nw = torch.rand(len(a2), generator=g, dtype=torch.float64) * 2
    if zeros:
        pw[1], nw[1] = 0.0, 0.0
    return Mined.from_pairs(a1, p, a2, n, pw, nw)


def pair_dicts(mined: Mined, combine):
    """``{(a, j): weight}`` for positives and negatives, duplicates merged with ``combine``."""
    a1, p, a2, n, pw, nw = mined.as_pairs()
    out = []
    for rows, cols, w in ((a1, p, pw), (a2, n, nw)):
        d: dict[tuple[int, int], float] = {}
        for i in range(len(rows)):
            key = (int(rows[i]), int(cols[i]))
            d[key] = combine(d[key], float(w[i])) if key in d else float(w[i])
        out.append(d)
    return out


def lse(terms):
    return torch.logsumexp(torch.stack(terms), dim=0)


# ------------------------------------------------------------------ brute-force references
def ref_contrastive(mat, mined, pos_margin=0.0, neg_margin=1.0):
    a1, p, a2, n, pw, nw = mined.as_pairs()
    pos = [pw[i] * F.relu(mat[a1[i], p[i]] - pos_margin) for i in range(len(a1))]
    neg = [nw[i] * F.relu(neg_margin - mat[a2[i], n[i]]) for i in range(len(a2))]
    total = mat.sum() * 0
    for part in (pos, neg):
        nz = [x for x in part if x > 0]
        if nz:
            total = total + sum(nz) / len(nz)
    return total


def ref_multi_similarity(mat, mined, alpha=2.0, beta=50.0, base=0.5):
    pos, neg = pair_dicts(mined, max)
    rows = []
    for a in range(mat.shape[0]):
        ps = [w * torch.exp(-alpha * (mat[a, j] - base)) for (i, j), w in pos.items() if i == a]
        ns = [w * torch.exp(beta * (mat[a, j] - base)) for (i, j), w in neg.items() if i == a]
        rows.append(torch.log(1 + sum(ps, mat.sum() * 0)) / alpha + torch.log(1 + sum(ns, mat.sum() * 0)) / beta)
    return torch.stack(rows).mean()


def ref_ntxent(mat, mined, t=0.07):
    a1, p, a2, n, pw, nw = mined.as_pairs()
    terms = []
    for i in range(len(a1)):
        a = int(a1[i])
        pos = torch.exp(mat[a, p[i]] / t)
        negs = sum((nw[j] * torch.exp(mat[a, n[j]] / t) for j in range(len(a2)) if int(a2[j]) == a), mat.sum() * 0)
        terms.append(-pw[i] * torch.log(pos / (pos + negs)))
    return torch.stack(terms).mean()


def ref_supcon(mat, mined, t=0.1):
    pos, neg = pair_dicts(mined, max)
    pos = {k: w for k, w in pos.items() if w > 0}
    rows = []
    for a in range(mat.shape[0]):
        ps = [(j, w) for (i, j), w in pos.items() if i == a]
        if not ps:
            continue
        z = sum(torch.exp(mat[a, j] / t) for j, _ in ps) + sum(
            (w * torch.exp(mat[a, j] / t) for (i, j), w in neg.items() if i == a), mat.sum() * 0
        )
        rows.append(-sum(w * torch.log(torch.exp(mat[a, j] / t) / z) for j, w in ps) / len(ps))
    nz = [r for r in rows if r > 0]
    return sum(nz) / len(nz)


def ref_circle(mat, mined, m=0.4, gamma=80.0):
    pos, neg = pair_dicts(mined, max)
    rows = []
    for a in range(mat.shape[0]):
        ps = [(j, w) for (i, j), w in pos.items() if i == a and w > 0]
        ns = [(j, w) for (i, j), w in neg.items() if i == a and w > 0]
        if not ps or not ns:
            continue
        sp = [torch.log(torch.tensor(w, dtype=mat.dtype)) - gamma * F.relu(1 + m - mat[a, j].detach()) * (mat[a, j] - 1 + m) for j, w in ps]
        sn = [torch.log(torch.tensor(w, dtype=mat.dtype)) + gamma * F.relu(mat[a, j].detach() + m) * (mat[a, j] - m) for j, w in ns]
        rows.append(F.softplus(lse(sp) + lse(sn)))
    nz = [r for r in rows if r > 0]
    return sum(nz) / len(nz)


def ref_triplet(mat, mined, margin=0.05):
    a, p, n, w = mined.as_triplets()
    terms = [w[i] * F.relu(mat[a[i], p[i]] - mat[a[i], n[i]] + margin) for i in range(len(a))]
    nz = [x for x in terms if x > 0]
    return sum(nz) / len(nz)


CASES = {
    "contrastive": (ContrastiveLoss, LpDistance(), ref_contrastive),
    "multi_similarity": (MultiSimilarityLoss, CosineSimilarity(), ref_multi_similarity),
    "ntxent": (NTXentLoss, CosineSimilarity(), ref_ntxent),
    "supcon": (SupConLoss, CosineSimilarity(), ref_supcon),
    "circle": (CircleLoss, CosineSimilarity(), ref_circle),
    "triplet": (TripletMarginLoss, LpDistance(), ref_triplet),
}


@pytest.mark.parametrize("name", list(CASES))
def test_weighted_loss_matches_docstring_formula(name: str) -> None:
    cls, distance, ref = CASES[name]
    for seed in range(3):
        emb, labels, g = batch(seed)
        mined = weighted_pairs(labels, g)
        if name == "triplet":
            mined = Mined.from_triplets(*mined.as_triplets())  # pair weights multiply into triplet weights
        x, y = emb.clone().requires_grad_(True), emb.clone().requires_grad_(True)
        got = cls()(x, labels, mined)
        want = ref(distance(y), mined)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        gx, gy = torch.autograd.grad(got, x)[0], torch.autograd.grad(want, y)[0]
        torch.testing.assert_close(gx, gy, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_unit_weights_equal_no_weights(name: str) -> None:
    cls = CASES[name][0]
    emb, labels, g = batch(11)
    plain = weighted_pairs(labels, g)
    a1, p, a2, n, _, _ = plain.as_pairs()
    ones = Mined.from_pairs(a1, p, a2, n, torch.ones(len(a1), dtype=torch.float64), torch.ones(len(a2), dtype=torch.float64))
    bare = Mined.from_pairs(a1, p, a2, n)
    assert torch.equal(cls()(emb, labels, ones), cls()(emb, labels, bare))
    ta, tp, tn, _ = bare.as_triplets()
    triplets_ones = Mined.from_triplets(ta, tp, tn, torch.ones(len(ta), dtype=torch.float64))
    assert torch.equal(cls()(emb, labels, triplets_ones), cls()(emb, labels, Mined.from_triplets(ta, tp, tn)))


@pytest.mark.parametrize("name", list(CASES))
def test_negative_weights_are_rejected(name: str) -> None:
    cls = CASES[name][0]
    emb, labels, g = batch(0)
    a, p, n, _ = all_pairs(labels, labels, True).as_triplets()
    mined = Mined.from_triplets(a, p, n, -torch.ones(len(a)))
    with pytest.raises(ValueError, match=">= 0"):
        cls()(emb, labels, mined)
