"""The dense forms of ``Mined`` (pair masks, ``TripletMask``) equal their index lists everywhere they are read."""

from __future__ import annotations

import pytest
import torch

import losses
from miners import Mined, MultiSimilarityMiner, TripletMarginMiner, TripletMask
from miners.memory import _drop_self_pairs


def random_masks(seed: int, b: int = 6, m: int = 9, weighted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(b, m, generator=g) < 0.3
    neg = (torch.rand(b, m, generator=g) < 0.5) & ~pos
    if weighted:
        return pos * torch.rand(b, m, generator=g, dtype=torch.float64), neg * torch.rand(b, m, generator=g, dtype=torch.float64)
    return pos, neg


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_pair_masks_list_as_torch_where(seed: int, weighted: bool) -> None:
    pos, neg = random_masks(seed, weighted=weighted)
    mined = Mined.from_masks(pos, neg)
    a1, p, a2, n, pw, nw = mined.as_pairs()
    ea1, ep = torch.where(pos != 0)
    ea2, en = torch.where(neg != 0)
    assert torch.equal(a1, ea1) and torch.equal(p, ep) and torch.equal(a2, ea2) and torch.equal(n, en)
    assert len(mined) == len(a1) + len(a2)
    if weighted:
        torch.testing.assert_close(pw, pos[ea1, ep])
        torch.testing.assert_close(nw, neg[ea2, en])
    else:
        assert pw is None and nw is None
    listed = Mined.from_pairs(a1, p, a2, n, pw, nw)
    # the dense matrices and the PML tuple agree between the two forms
    for got, expected in zip(mined.pair_matrices(pos.shape, torch.float64), listed.pair_matrices(pos.shape, torch.float64)):
        torch.testing.assert_close(got.to(torch.float64), expected)
    assert all(torch.equal(x, y) for x, y in zip(mined.to_tuple(), listed.to_tuple()))
    ta, tp, tn, tw = mined.as_triplets()
    ea, ep_, en_, ew = listed.as_triplets()
    assert torch.equal(ta, ea) and torch.equal(tp, ep_) and torch.equal(tn, en_)
    if weighted:
        torch.testing.assert_close(tw, ew)


def test_mask_validation_names_the_problem() -> None:
    pos, neg = random_masks(0)
    with pytest.raises(ValueError, match=r"pos_mask has shape \(6, 9\); expected \[6, 8\]"):
        Mined.from_masks(pos, neg).validate(6, 8)
    with pytest.raises(ValueError, match="both pos_mask and its pair lists"):
        Mined(pos_mask=pos, pos_pairs=(torch.zeros(1, dtype=torch.long),) * 2).validate(6, 9)
    with pytest.raises(ValueError, match="bool or floating point"):
        Mined.from_masks(pos.long(), neg).validate(6, 9)
    with pytest.raises(ValueError, match="finite and >= 0"):
        Mined.from_masks(-pos.double(), neg).validate(6, 9)
    positives = torch.zeros(6, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="triplet_mask.mask has shape"):
        Mined.from_triplet_mask(positives, torch.zeros(6, 3, 9, dtype=torch.bool)).validate(6, 9)
    with pytest.raises(ValueError, match="positives indexes outside"):
        Mined.from_triplet_mask(positives + 9, torch.zeros(6, 2, 9, dtype=torch.bool)).validate(6, 9)


def random_triplet_mask(seed: int, b: int = 5, k: int = 3, m: int = 8, weighted: bool = False) -> TripletMask:
    g = torch.Generator().manual_seed(seed)
    positives = torch.randint(0, m, (b, k), generator=g)
    mask = torch.rand(b, k, m, generator=g) < 0.3
    return TripletMask(positives, mask * torch.rand(b, k, m, generator=g, dtype=torch.float64) if weighted else mask)


@pytest.mark.parametrize("weighted", [False, True])
def test_triplet_mask_lists_its_triplets(weighted: bool) -> None:
    tm = random_triplet_mask(1, weighted=weighted)
    mined = Mined.from_triplet_mask(*tm)
    a, p, n, w = mined.as_triplets()
    brute = [(i, int(tm.positives[i, k]), j) for i in range(5) for k in range(3) for j in range(8) if tm.mask[i, k, j] != 0]
    assert list(zip(a.tolist(), p.tolist(), n.tolist())) == brute
    assert len(mined) == len(brute)
    if weighted:
        torch.testing.assert_close(w, torch.stack([tm.mask[i, k, j] for i in range(5) for k in range(3) for j in range(8) if tm.mask[i, k, j] != 0]))
    pairs = mined.as_pairs()
    assert torch.equal(pairs.a1, a) and torch.equal(pairs.p, p) and torch.equal(pairs.n, n)
    assert all(torch.equal(x, y) for x, y in zip(mined.to_tuple(), (a, p, n)))


@pytest.mark.parametrize("type_of_triplets", ["all", "hard", "semihard", "easy"])
def test_triplet_miner_mask_and_list_forms_agree(type_of_triplets: str) -> None:
    g = torch.Generator().manual_seed(3)
    emb, labels = torch.randn(24, 6, generator=g), torch.randint(0, 4, (24,), generator=g)
    dense = TripletMarginMiner(margin=0.3, type_of_triplets=type_of_triplets)
    listed = TripletMarginMiner(margin=0.3, type_of_triplets=type_of_triplets)
    listed.mask_entries = 0  # forces the list form
    dense.block_entries = listed.block_entries = 100  # several blocks of anchors
    got, expected = dense(emb, labels), listed(emb, labels)
    assert got.triplet_mask is not None and expected.triplet_mask is None
    key = lambda t: sorted(zip(*(x.tolist() for x in t[:3])))  # noqa: E731
    assert key(got.as_triplets()) == key(expected.as_triplets()) and len(got) == len(expected) > 0


@pytest.mark.parametrize("smooth_loss", [False, True])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ref", [False, True])
def test_triplet_loss_on_a_mask_equals_the_list(smooth_loss: bool, swap: bool, weighted: bool, ref: bool) -> None:
    g = torch.Generator().manual_seed(4)
    b, m = 10, 12 if ref else 10
    emb = torch.randn(b, 5, generator=g, dtype=torch.float64)
    ref_emb = torch.randn(m, 5, generator=g, dtype=torch.float64) if ref else None
    labels = torch.randint(0, 3, (b,), generator=g)
    ref_labels = torch.randint(0, 3, (m,), generator=g) if ref else None
    tm = random_triplet_mask(5, b=b, k=4, m=m, weighted=weighted)
    loss = losses.TripletMarginLoss(margin=0.4, swap=swap, smooth_loss=smooth_loss)
    values, grads = [], []
    for mined in (Mined.from_triplet_mask(*tm), Mined.from_triplets(*Mined.from_triplet_mask(*tm).as_triplets())):
        x = emb.clone().requires_grad_(True)
        value = loss(x, labels, mined, ref_emb, ref_labels)
        value.backward()
        values.append(value.detach())
        grads.append(x.grad)
    torch.testing.assert_close(values[0], values[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


PAIR_LOSSES = [
    losses.ContrastiveLoss(pos_margin=0.3, neg_margin=0.9), losses.MultiSimilarityLoss(), losses.CircleLoss(),
    losses.SupConLoss(), losses.NTXentLoss(temperature=0.2), losses.DebiasedContrastiveLoss(temperature=0.5, tau_plus=0.1),
]


@pytest.mark.parametrize("loss", PAIR_LOSSES, ids=lambda loss: type(loss).__name__)
@pytest.mark.parametrize("weighted", [False, True])
def test_pair_losses_on_masks_equal_the_lists(loss, weighted: bool) -> None:
    g = torch.Generator().manual_seed(6)
    emb = torch.randn(6, 5, generator=g, dtype=torch.float64)
    ref_emb = torch.randn(9, 5, generator=g, dtype=torch.float64)
    labels, ref_labels = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (9,), generator=g)
    pos, neg = random_masks(7, weighted=weighted)
    mined = Mined.from_masks(pos, neg)
    values, grads = [], []
    for form in (mined, Mined.from_pairs(*mined.as_pairs())):
        x = emb.clone().requires_grad_(True)
        value = loss(x, labels, form, ref_emb, ref_labels)
        value.backward()
        values.append(value.detach())
        grads.append(x.grad)
    assert values[0] != 0
    torch.testing.assert_close(values[0], values[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


def test_contrastive_without_mined_equals_all_pairs_listed() -> None:
    from contracts.relevance import all_pairs

    g = torch.Generator().manual_seed(8)
    emb, labels = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    loss = losses.ContrastiveLoss(pos_margin=0.2, neg_margin=0.8)
    xs = [emb.clone().requires_grad_(True) for _ in range(2)]
    dense = loss(xs[0], labels)
    listed = loss(xs[1], labels, all_pairs(labels, labels, same_set=True))
    (dense + listed).backward()
    torch.testing.assert_close(dense, listed, rtol=1e-12, atol=0)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-10, atol=1e-12)


def test_memory_drops_self_pairs_from_masks_as_from_lists() -> None:
    own_slots = torch.tensor([3, 0, 7, 5, 1, 2])
    pos, neg = random_masks(9)
    pos[torch.arange(6), own_slots] = True
    dense = _drop_self_pairs(Mined.from_masks(pos, neg), own_slots)
    listed = _drop_self_pairs(Mined.from_pairs(*Mined.from_masks(pos, neg).as_pairs()), own_slots)
    assert all(torch.equal(x, y) for x, y in zip(dense.to_tuple(), listed.to_tuple()))
    tm = random_triplet_mask(10, b=6, k=3, m=9)
    tm.positives[:, 0] = own_slots
    tm.mask[:, 0, :4] = True
    dense = _drop_self_pairs(Mined.from_triplet_mask(*tm), own_slots)
    listed = _drop_self_pairs(Mined.from_triplets(*Mined.from_triplet_mask(*tm).as_triplets()), own_slots)
    assert all(torch.equal(x, y) for x, y in zip(dense.to_tuple(), listed.to_tuple()))
    assert not bool(dense.triplet_mask.mask[:, 0].any())


def test_multi_similarity_miner_returns_masks() -> None:
    g = torch.Generator().manual_seed(11)
    mined = MultiSimilarityMiner(0.1)(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))
    assert mined.has_masks and mined.pos_mask.dtype == torch.bool and len(mined) > 0
