"""Relevance as masks: ``pos_mask`` / ``ignore_mask`` in place of labels, for every miner and loss.

- ``pos_mask`` built from labels (self-pairs left in: they are ignored automatically) gives the
  same ``Mined``, loss and gradients as the labels, with and without a separate ``ref_emb``; so
  do labels + ``ignore_mask`` and the equivalent masks.
- Genuinely multi-positive masks (a document relevant to two queries of different "classes"),
  with ignored pairs, against brute-force loops over explicit tuples: batch-hard + triplet margin,
  contrastive, multi-similarity, NT-Xent/InfoNCE.
- Ignored pairs are never mined and never contribute (zero gradient on a reference row ignored
  by every query; the same loss as without that row).
- Clear errors.

Miners and losses are discovered from ``miners.__all__`` / ``losses.__all__`` (as the composition
matrix does), so a new component is tested as soon as it is exported.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from losses import ContrastiveLoss, MarginLoss, MultiSimilarityLoss, NTXentLoss, ProxyAnchorLoss, TripletMarginLoss
from miners import BatchHardMiner, CrossBatchMemory, MoCHiMiner
from tests.test_composition import DIM, LOSSES, MINERS, build

# Losses that need class ids and refuse pos_mask without labels (BaseLoss.needs_class_labels).
CLASS_LOSSES = {"ProxyAnchorLoss"}


def batch(seed: int = 0, classes: int = 4, per_class: int = 4, ref: int = 0):
    """``emb [B, D]``, ``labels [B]``, and ``ref_emb [ref, D]`` / ``ref_labels [ref]`` when ``ref``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    emb = torch.randn(len(labels), DIM, generator=g, dtype=torch.float64)
    if not ref:
        return emb, labels, None, None
    ref_labels = torch.randint(0, classes + 1, (ref,), generator=g)
    return emb, labels, torch.randn(ref, DIM, generator=g, dtype=torch.float64), ref_labels


def mask_of(labels, ref_labels=None):
    ref_labels = labels if ref_labels is None else ref_labels
    return labels[:, None] == ref_labels[None, :]


def random_ignore(b: int, m: int, seed: int = 5, share: float = 0.15) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, m, generator=g) < share


def assert_same(x, y, where: str = "Mined") -> None:
    """Field by field equality of ``Mined`` (and what it holds), matrices aside."""
    if dataclasses.is_dataclass(x):
        assert type(x) is type(y), where
        for f in dataclasses.fields(x):
            if f.name != "matrices":
                assert_same(getattr(x, f.name), getattr(y, f.name), f"{where}.{f.name}")
    elif isinstance(x, tuple):
        assert isinstance(y, tuple) and len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            assert_same(u, v, f"{where}[{i}]")
    elif isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    else:
        assert x == y, where


def loss_and_grads(loss, emb, ref_emb, mined=None, **relevance):
    x = emb.clone().requires_grad_(True)
    r = None if ref_emb is None else ref_emb.clone().requires_grad_(True)
    value = loss(x, mined=mined, ref_emb=r, **relevance)
    value.backward()
    return value.detach(), x.grad, (None if r is None else r.grad)


def assert_close_grads(a, b) -> None:
    for u, v in zip(a, b):
        if u is None:
            assert v is None
        else:
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-12)


def relevance_forms(labels, ref_labels, ignore):
    """Pairs of equivalent relevance (labels form, mask form) as keyword dicts."""
    pm = mask_of(labels, ref_labels)
    lab = {"labels": labels} if ref_labels is None else {"labels": labels, "ref_labels": ref_labels}
    return [
        ("labels", lab, {"pos_mask": pm}),
        ("labels+ignore", {**lab, "ignore_mask": ignore}, {"pos_mask": pm, "ignore_mask": ignore}),
    ]


# ---------------------------------------------------------------------------------------- miners
@pytest.mark.parametrize("ref", [0, 11], ids=["batch", "ref_emb"])
@pytest.mark.parametrize("miner_cls", MINERS, ids=lambda c: c.__name__)
def test_miner_pos_mask_from_labels_equals_labels(miner_cls, ref):
    miner = build(miner_cls)
    emb, labels, ref_emb, ref_labels = batch(1, ref=ref)
    ignore = random_ignore(len(emb), ref or len(emb))
    for name, by_labels, by_mask in relevance_forms(labels, ref_labels, ignore):
        torch.manual_seed(3)
        expected = miner(emb, ref_emb=ref_emb, **by_labels)
        torch.manual_seed(3)
        got = miner(emb, ref_emb=ref_emb, **by_mask)
        assert_same(expected, got, f"{miner_cls.__name__} ({name})")
        if name == "labels":
            assert len(expected) > 0  # the comparison is not vacuous


@pytest.mark.parametrize("ref", [0, 11], ids=["batch", "ref_emb"])
@pytest.mark.parametrize("miner_cls", MINERS, ids=lambda c: c.__name__)
def test_ignored_pairs_are_never_mined(miner_cls, ref):
    miner = build(miner_cls)
    emb, labels, ref_emb, ref_labels = batch(2, ref=ref)
    m = ref or len(emb)
    pos = mask_of(labels, ref_labels) | random_ignore(len(emb), m, seed=9, share=0.1)  # multi-positive
    ignore = random_ignore(len(emb), m, seed=4, share=0.3)
    torch.manual_seed(0)
    mined = miner(emb, ref_emb=ref_emb, pos_mask=pos, ignore_mask=ignore)
    a1, p, a2, n = mined.as_pairs()[:4]
    assert len(a1) + len(a2) > 0
    assert not ignore[a1, p].any() and not ignore[a2, n].any()
    assert pos[a1, p].all() and not pos[a2, n].any()
    if ref == 0:
        assert not (a1 == p).any() and not (a2 == n).any()
    if mined.mix is not None and len(mined.mix):  # MoCHi mixes only negatives of the anchor
        spec = mined.mix
        neg = ~pos & ~ignore
        if ref == 0:
            neg.fill_diagonal_(False)
        assert neg[spec.anchors, spec.second].all()


# ---------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("ref", [0, 11], ids=["batch", "ref_emb"])
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_loss_pos_mask_from_labels_equals_labels(loss_cls, ref):
    loss = build(loss_cls).double()
    if ref and not loss.supports_ref_emb:
        pytest.skip(f"{loss_cls.__name__} takes no ref_emb")
    emb, labels, ref_emb, ref_labels = batch(1, ref=ref)
    if loss_cls.__name__ in CLASS_LOSSES:
        with pytest.raises(ValueError, match="needs class labels"):
            loss(emb, pos_mask=mask_of(labels))
        return
    ignore = random_ignore(len(emb), ref or len(emb))
    miner = BatchHardMiner()
    for name, by_labels, by_mask in relevance_forms(labels, ref_labels, ignore):
        for mined in (None, miner(emb, ref_emb=ref_emb, **by_labels)):
            torch.manual_seed(3)
            expected = loss_and_grads(loss, emb, ref_emb, mined, **by_labels)
            torch.manual_seed(3)
            got = loss_and_grads(loss, emb, ref_emb, mined, **by_mask)
            assert_close_grads(expected, got)
            if mined is None and name == "labels":
                assert expected[0] != 0  # the comparison is not vacuous


@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
def test_ignored_reference_row_contributes_nothing(loss_cls):
    """A reference row ignored by every query: zero gradient on it, and the loss of the set without it."""
    loss = build(loss_cls).double()
    if loss_cls.__name__ in CLASS_LOSSES or not loss.supports_ref_emb:
        pytest.skip(f"{loss_cls.__name__} compares rows with class proxies")
    emb, labels, ref_emb, ref_labels = batch(6, ref=12)
    pos = mask_of(labels, ref_labels)
    pos[0, 3] = pos[5, 3] = pos[9, 3] = True  # row 3 is positive for queries of three classes
    ignore = torch.zeros_like(pos)
    ignore[:, 3] = True
    ignore[2, 7] = ignore[4, 1] = True
    torch.manual_seed(0)
    value, _, ref_grad = loss_and_grads(loss, emb, ref_emb, pos_mask=pos, ignore_mask=ignore)
    assert torch.count_nonzero(ref_grad[3]) == 0
    keep = torch.arange(len(ref_emb)) != 3
    torch.manual_seed(0)
    without, _, _ = loss_and_grads(loss, emb, ref_emb[keep], pos_mask=pos[:, keep], ignore_mask=ignore[:, keep])
    torch.testing.assert_close(value, without, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------- brute force
def multi_positive_case(same_set: bool):
    """Queries of 3 "classes" and a relevance no labels can express: documents relevant to queries
    of different classes, some pairs ignored (known false negatives)."""
    g = torch.Generator().manual_seed(11)
    b, m = 9, (9 if same_set else 13)
    emb = torch.randn(b, DIM, generator=g, dtype=torch.float64)
    ref_emb = None if same_set else torch.randn(m, DIM, generator=g, dtype=torch.float64)
    cls = torch.arange(b) % 3
    pos = cls[:, None] == (torch.arange(m) % 3)[None, :]
    pos[0, 4] = pos[1, 4] = True  # row 4 (class 1) relevant to queries 0 (class 0) and 1 (class 1) ...
    pos[2, 4] = True  # ... and 2 (class 2)
    pos[5, 6] = True
    ignore = torch.zeros(b, m, dtype=torch.bool)
    ignore[0, 1] = ignore[3, 0] = ignore[7, 8] = ignore[6, 2] = True  # known false negatives
    ignore[8, 5] = True  # an ignored positive
    return emb, ref_emb, pos, ignore


def valid_sets(pos, ignore, same_set):
    b, m = pos.shape
    P = [[j for j in range(m) if pos[i, j] and not ignore[i, j] and not (same_set and i == j)] for i in range(b)]
    N = [[j for j in range(m) if not pos[i, j] and not ignore[i, j] and not (same_set and i == j)] for i in range(b)]
    return P, N


def l2(x, y):
    return (F.normalize(x, dim=0) - F.normalize(y, dim=0)).norm()


def cos(x, y):
    return F.normalize(x, dim=0) @ F.normalize(y, dim=0)


def mean_nonzero(terms):
    live = [t for t in terms if t > 0]
    return sum(live) / len(live) if live else torch.zeros((), dtype=torch.float64)


def brute_triplet(x, r, P, N, margin):
    terms = [F.relu(l2(x[a], r[p]) - l2(x[a], r[n]) + margin) for a in range(len(x)) for p in P[a] for n in N[a]]
    return mean_nonzero(terms)


def brute_batch_hard(x, r, P, N):
    out = []
    for a in range(len(x)):
        if P[a] and N[a]:
            p = max(P[a], key=lambda j: (float(l2(x[a], r[j])), -j))
            n = min(N[a], key=lambda j: (float(l2(x[a], r[j])), j))
            out.append((a, p, n))
    return out


def brute_contrastive(x, r, P, N, pos_margin, neg_margin):
    pos = [F.relu(l2(x[a], r[p]) - pos_margin) for a in range(len(x)) for p in P[a]]
    neg = [F.relu(neg_margin - l2(x[a], r[n])) for a in range(len(x)) for n in N[a]]
    return mean_nonzero(pos) + mean_nonzero(neg)


def brute_multi_similarity(x, r, P, N, alpha, beta, base):
    rows = []
    for a in range(len(x)):
        sp = sum((torch.exp(-alpha * (cos(x[a], r[p]) - base)) for p in P[a]), torch.zeros((), dtype=torch.float64))
        sn = sum((torch.exp(beta * (cos(x[a], r[n]) - base)) for n in N[a]), torch.zeros((), dtype=torch.float64))
        rows.append(torch.log1p(sp) / alpha + torch.log1p(sn) / beta)
    return sum(rows) / len(rows)


def brute_ntxent(x, r, P, N, t):
    terms = []
    for a in range(len(x)):
        for p in P[a]:
            num = torch.exp(cos(x[a], r[p]) / t)
            den = num + sum((torch.exp(cos(x[a], r[n]) / t) for n in N[a]), torch.zeros((), dtype=torch.float64))
            terms.append(-torch.log(num / den))
    return sum(terms) / len(terms)


BRUTE = {
    "triplet": (lambda: TripletMarginLoss(margin=0.3), lambda x, r, P, N: brute_triplet(x, r, P, N, 0.3)),
    "contrastive": (lambda: ContrastiveLoss(pos_margin=0.1, neg_margin=1.2), lambda x, r, P, N: brute_contrastive(x, r, P, N, 0.1, 1.2)),
    "multi_similarity": (lambda: MultiSimilarityLoss(alpha=2.0, beta=10.0, base=0.3), lambda x, r, P, N: brute_multi_similarity(x, r, P, N, 2.0, 10.0, 0.3)),
    "ntxent": (lambda: NTXentLoss(temperature=0.5), lambda x, r, P, N: brute_ntxent(x, r, P, N, 0.5)),
}


@pytest.mark.parametrize("same_set", [True, False], ids=["batch", "ref_emb"])
@pytest.mark.parametrize("name", list(BRUTE))
def test_multi_positive_mask_against_brute_force(name, same_set):
    emb, ref_emb, pos, ignore = multi_positive_case(same_set)
    make_loss, brute = BRUTE[name]
    P, N = valid_sets(pos, ignore, same_set)
    assert sum(len(p) >= 2 for p in P) >= 3  # several positives per query
    x = emb.clone().requires_grad_(True)
    r = None if same_set else ref_emb.clone().requires_grad_(True)
    value = make_loss()(x, ref_emb=r, pos_mask=pos, ignore_mask=ignore)
    value.backward()
    xb = emb.clone().requires_grad_(True)
    rb = xb if same_set else ref_emb.clone().requires_grad_(True)
    expected = brute(xb, rb, P, N)
    expected.backward()
    torch.testing.assert_close(value, expected.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x.grad, xb.grad, rtol=1e-7, atol=1e-10)
    if not same_set:
        torch.testing.assert_close(r.grad, rb.grad, rtol=1e-7, atol=1e-10)
        assert torch.count_nonzero(r.grad[torch.tensor([not any(j in P[a] + N[a] for a in range(len(P))) for j in range(len(r))])]) == 0


@pytest.mark.parametrize("same_set", [True, False], ids=["batch", "ref_emb"])
def test_batch_hard_with_triplet_margin_on_multi_positive_mask(same_set):
    emb, ref_emb, pos, ignore = multi_positive_case(same_set)
    P, N = valid_sets(pos, ignore, same_set)
    mined = BatchHardMiner()(emb, ref_emb=ref_emb, pos_mask=pos, ignore_mask=ignore)
    expected = brute_batch_hard(emb, emb if same_set else ref_emb, P, N)
    assert sorted(zip(*(t.tolist() for t in mined.as_triplets()[:3]))) == sorted(expected)
    x = emb.clone().requires_grad_(True)
    r = None if same_set else ref_emb.clone().requires_grad_(True)
    value = TripletMarginLoss(margin=0.3)(x, mined=mined, ref_emb=r, pos_mask=pos, ignore_mask=ignore)
    value.backward()
    xb = emb.clone().requires_grad_(True)
    rb = xb if same_set else ref_emb.clone().requires_grad_(True)
    brute = mean_nonzero([F.relu(l2(xb[a], rb[p]) - l2(xb[a], rb[n]) + 0.3) for a, p, n in expected])
    brute.backward()
    assert brute > 0
    torch.testing.assert_close(value, brute.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x.grad, xb.grad, rtol=1e-7, atol=1e-10)


def test_every_positive_pair_is_one_term_against_the_negatives():
    """pytorch-metric-learning's convention: with two positives a query gives two InfoNCE terms."""
    emb, ref_emb, pos, ignore = multi_positive_case(False)
    one = torch.zeros_like(pos)
    one[0, 4] = True
    two = one.clone()
    two[0, 0] = True  # row 0: two positives now (ref rows 0 and 4)
    loss = NTXentLoss(temperature=0.5)
    P, N = valid_sets(two, torch.zeros_like(two), False)
    assert len(P[0]) == 2
    value = loss(emb[:1], ref_emb=ref_emb, pos_mask=two[:1])
    by_hand = [-(cos(emb[0], ref_emb[p]) / 0.5 - torch.logsumexp(torch.stack([cos(emb[0], ref_emb[j]) / 0.5 for j in [p] + N[0]]), 0)) for p in P[0]]
    torch.testing.assert_close(value, sum(by_hand) / 2, rtol=1e-9, atol=0)


# ------------------------------------------------------------------------------------- errors
def test_errors_name_what_is_wrong():
    emb, labels, ref_emb, ref_labels = batch(0, ref=5)
    pm = mask_of(labels)
    loss, miner = ContrastiveLoss(), BatchHardMiner()
    with pytest.raises(ValueError, match="both labels and pos_mask"):
        loss(emb, labels, pos_mask=pm)
    with pytest.raises(ValueError, match="no relevance"):
        miner(emb)
    with pytest.raises(ValueError, match="pos_mask must be a bool tensor"):
        miner(emb, pos_mask=pm.float())
    with pytest.raises(ValueError, match=r"pos_mask has shape \(16, 16\); expected \(16, 5\)"):
        loss(emb, ref_emb=ref_emb, pos_mask=pm)
    with pytest.raises(ValueError, match=r"ignore_mask has shape \(16, 5\); expected \(16, 16\)"):
        loss(emb, labels, ignore_mask=mask_of(labels, ref_labels))
    with pytest.raises(ValueError, match="ref_labels given with pos_mask"):
        miner(emb, ref_emb=ref_emb, ref_labels=ref_labels, pos_mask=mask_of(labels, ref_labels))
    with pytest.raises(ValueError, match="goes in pos_mask="):
        loss(emb, pm)
    bad = emb.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf in rows \[2\]"):
        miner(bad, pos_mask=pm)
    with pytest.raises(ValueError, match="ProxyAnchorLoss needs class labels, not pos_mask: its proxies are one per class"):
        ProxyAnchorLoss(num_classes=4, embedding_size=DIM)(emb.float(), pos_mask=pm)
    proxy = ProxyAnchorLoss(num_classes=4, embedding_size=DIM)
    with pytest.raises(ValueError, match="ProxyAnchorLoss does not take an ignore_mask that ignores pairs"):
        proxy(emb.float(), labels, ignore_mask=pm)
    torch.testing.assert_close(proxy(emb.float(), labels, ignore_mask=torch.zeros_like(pm)), proxy(emb.float(), labels))
    with pytest.raises(ValueError, match="MarginLoss needs class labels, not pos_mask: num_classes gives one beta per class"):
        MarginLoss(num_classes=4)(emb, pos_mask=pm)
    MarginLoss()(emb, pos_mask=pm)  # one shared beta: masks are fine
    memory = CrossBatchMemory(ContrastiveLoss(), embedding_size=DIM, memory_size=32)
    with pytest.raises(ValueError, match="CrossBatchMemory: relevance is by labels only"):
        memory(emb, labels, pos_mask=pm)


def test_mochi_miner_and_mixing_losses_read_masks():
    """MoCHi's synthetic negatives come from the mask's negatives, and a loss takes them with masks."""
    emb, ref_emb, pos, ignore = multi_positive_case(False)
    torch.manual_seed(0)
    mined = MoCHiMiner()(emb.float(), ref_emb=ref_emb.float(), pos_mask=pos, ignore_mask=ignore)
    assert mined.mix is not None and len(mined.mix)
    x = emb.float().requires_grad_(True)
    value = NTXentLoss()(x, mined=mined, ref_emb=ref_emb.float(), pos_mask=pos, ignore_mask=ignore)
    value.backward()
    assert torch.isfinite(value) and value > 0 and torch.isfinite(x.grad).all()


def test_default_label_path_builds_no_masks():
    """Labels alone stay labels (the miners' fast paths derive the masks from them)."""
    from contracts.inputs import resolve_inputs

    emb, labels, _, _ = batch(0)
    inputs = resolve_inputs(emb, labels)
    assert inputs.pos_mask is None and inputs.neg_mask is None
    with_ignore = resolve_inputs(emb, labels, ignore_mask=torch.zeros(len(emb), len(emb), dtype=torch.bool))
    assert torch.equal(with_ignore.pos_mask, mask_of(labels) & ~torch.eye(len(emb), dtype=torch.bool))


def test_metrix_with_pos_mask_equals_labels():
    """Metrix's soft labels are per-pair weights, so it mixes from masks as from labels."""
    from losses import Metrix

    emb, labels, _, _ = batch(3)
    metrix = Metrix(mode="embedding", pairs="pos_neg", negatives=2)
    out = []
    for relevance in ({"labels": labels}, {"labels": None, "pos_mask": mask_of(labels)}):
        x = emb.clone().requires_grad_(True)
        torch.manual_seed(0)
        labels_arg = relevance.pop("labels")
        value = metrix.mixed_loss(None, None, x, labels_arg, MultiSimilarityLoss().double(), 0.3, **relevance)
        value.backward()
        out.append((value.detach(), x.grad))
    assert out[0][0] > 0
    assert_close_grads(out[0], out[1])
