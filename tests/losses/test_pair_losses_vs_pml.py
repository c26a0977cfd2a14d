"""Pair and triplet losses against pytorch-metric-learning 2.9 (value and gradient, float64).

Every loss is run on several random batches, with every tuple from ``mined=None`` and with the
tuples of PML miners (pairs and triplets), with and without a separate reference set.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import oracle, random_batch

P = oracle("pytorch_metric_learning.losses")
PM = oracle("pytorch_metric_learning.miners")
PD = oracle("pytorch_metric_learning.distances")

from losses import (  # noqa: E402
    CircleLoss,
    ContrastiveLoss,
    CosineSimilarity,
    LpDistance,
    MultiSimilarityLoss,
    NTXentLoss,
    SupConLoss,
    TripletMarginLoss,
)
from contracts.mined import Mined  # noqa: E402

RTOL, ATOL = 1e-6, 1e-10

# name -> (ours, PML), both with the same hyper-parameters and distance.
LOSSES = {
    "contrastive": (lambda: ContrastiveLoss(), lambda: P.ContrastiveLoss()),
    "contrastive_cos": (
        lambda: ContrastiveLoss(pos_margin=0.8, neg_margin=0.2, distance=CosineSimilarity()),
        lambda: P.ContrastiveLoss(pos_margin=0.8, neg_margin=0.2, distance=PD.CosineSimilarity()),
    ),
    "contrastive_unnormalized": (
        lambda: ContrastiveLoss(pos_margin=0.5, neg_margin=2.0, distance=LpDistance(normalize_embeddings=False)),
        lambda: P.ContrastiveLoss(pos_margin=0.5, neg_margin=2.0, distance=PD.LpDistance(normalize_embeddings=False)),
    ),
    "triplet": (lambda: TripletMarginLoss(margin=0.2), lambda: P.TripletMarginLoss(margin=0.2)),
    "triplet_smooth_cos": (
        lambda: TripletMarginLoss(margin=0.1, smooth_loss=True, distance=CosineSimilarity()),
        lambda: P.TripletMarginLoss(margin=0.1, smooth_loss=True, distance=PD.CosineSimilarity()),
    ),
    "triplet_swap": (lambda: TripletMarginLoss(margin=0.2, swap=True), lambda: P.TripletMarginLoss(margin=0.2, swap=True)),
    "multi_similarity": (lambda: MultiSimilarityLoss(), lambda: P.MultiSimilarityLoss()),
    "multi_similarity_lp": (
        lambda: MultiSimilarityLoss(alpha=1.0, beta=10.0, base=0.8, distance=LpDistance()),
        lambda: P.MultiSimilarityLoss(alpha=1.0, beta=10.0, base=0.8, distance=PD.LpDistance()),
    ),
    "ntxent": (lambda: NTXentLoss(), lambda: P.NTXentLoss()),
    "ntxent_lp": (
        lambda: NTXentLoss(temperature=0.5, distance=LpDistance()),
        lambda: P.NTXentLoss(temperature=0.5, distance=PD.LpDistance()),
    ),
    "supcon": (lambda: SupConLoss(), lambda: P.SupConLoss()),
    "supcon_lp": (
        lambda: SupConLoss(temperature=0.3, distance=LpDistance()),
        lambda: P.SupConLoss(temperature=0.3, distance=PD.LpDistance()),
    ),
    "circle": (lambda: CircleLoss(), lambda: P.CircleLoss()),
    "circle_small_gamma": (lambda: CircleLoss(m=0.25, gamma=16), lambda: P.CircleLoss(m=0.25, gamma=16)),
}

MINERS = {
    "all": lambda: None,
    "multi_similarity": lambda: PM.MultiSimilarityMiner(epsilon=0.1),
    "pair_margin": lambda: PM.PairMarginMiner(pos_margin=0.3, neg_margin=0.9),
    "triplet_semihard": lambda: PM.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"),
    "triplet_all": lambda: PM.TripletMarginMiner(margin=0.3, type_of_triplets="all"),
    "batch_hard": lambda: PM.BatchHardMiner(),
}


make_batch = random_batch


def pml_drops_it(indices) -> bool:
    """PML's GenericPairLoss returns 0 when every index tensor has at most one entry (we do not)."""
    return indices is not None and len(indices) == 4 and all(len(x) <= 1 for x in indices)


def loss_and_grads(loss_fn, emb, labels, ref_emb, ref_labels, mined):
    leaves = [emb.clone().requires_grad_(True)]
    if ref_emb is not None:
        leaves.append(ref_emb.clone().requires_grad_(True))
    kwargs = {} if ref_emb is None else {"ref_emb": leaves[1], "ref_labels": ref_labels}
    loss = loss_fn(leaves[0], labels, mined, **kwargs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


def assert_matches_pml(ours, pml, emb, labels, ref_emb=None, ref_labels=None, indices=None) -> None:
    mined = None if indices is None else Mined.from_tuple(indices)
    value, grads = loss_and_grads(ours, emb, labels, ref_emb, ref_labels, mined)
    ref_value, ref_grads = loss_and_grads(pml, emb, labels, ref_emb, ref_labels, indices)
    torch.testing.assert_close(value, ref_value.to(value.dtype), rtol=RTOL, atol=ATOL)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=RTOL, atol=ATOL)


def mine(miner, emb, labels, ref_emb, ref_labels):
    if miner is None:
        return None
    if ref_emb is None:
        return miner(emb, labels)
    return miner(emb, labels, ref_emb, ref_labels)


@pytest.mark.parametrize("with_ref", [False, True], ids=["same_set", "ref_set"])
@pytest.mark.parametrize("miner_name", list(MINERS))
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_matches_pml_on_random_batches(loss_name: str, miner_name: str, with_ref: bool) -> None:
    if loss_name == "triplet_swap" and with_ref:
        pytest.skip("PML's swap reads mat[p, n] with reference indices as query rows; ours compares ref_emb[p] with ref_emb[n]")
    make_ours, make_pml = LOSSES[loss_name]
    ours, pml = make_ours(), make_pml()
    compared = 0
    for seed in range(4):
        emb, labels, ref_emb, ref_labels = make_batch(seed, ref=9 if with_ref else None)
        indices = mine(MINERS[miner_name](), emb, labels, ref_emb, ref_labels)
        if pml_drops_it(indices):
            continue
        assert_matches_pml(ours, pml, emb, labels, ref_emb, ref_labels, indices)
        compared += 1
    assert compared >= 2


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_ties_in_distance(loss_name: str) -> None:
    """Embeddings on a coarse grid, with duplicated rows: many exactly tied distances."""
    make_ours, make_pml = LOSSES[loss_name]
    g = torch.Generator().manual_seed(7)
    grid = torch.randint(-1, 2, (6, 4), generator=g).to(torch.float64)
    grid[grid.abs().sum(dim=1) == 0, 0] = 1.0
    emb = grid[torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 2, 3])]
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 1, 2, 2, 0, 0, 1])
    for miner in (None, PM.TripletMarginMiner(margin=0.3, type_of_triplets="all")):
        assert_matches_pml(make_ours(), make_pml(), emb, labels, indices=mine(miner, emb, labels, None, None))


@pytest.mark.parametrize(
    "labels",
    [
        [0, 0, 0, 1, 1, 2, 2, 2, 3],  # class 3 has a single sample
        [5, 5, 5, 5, 5, 5],  # no negatives
        [0, 1, 2, 3, 4, 5],  # no positives
        [0, 0, 1, 2, 3],  # one positive pair
    ],
    ids=["singleton_class", "one_class", "all_distinct", "one_positive_pair"],
)
@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_label_edge_cases(loss_name: str, labels: list[int]) -> None:
    make_ours, make_pml = LOSSES[loss_name]
    labels_t = torch.tensor(labels)
    emb = torch.randn(len(labels), 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_matches_pml(make_ours(), make_pml(), emb, labels_t)


@pytest.mark.parametrize("loss_name", list(LOSSES))
def test_nothing_mined_gives_zero_loss_and_zero_gradients(loss_name: str) -> None:
    ours = LOSSES[loss_name][0]()
    emb, labels, ref_emb, ref_labels = make_batch(1, ref=5)
    empty = torch.empty(0, dtype=torch.long)
    for mined in (Mined.from_pairs(empty, empty, empty, empty), Mined.from_triplets(empty, empty, empty)):
        for ref in (None, ref_emb):
            value, grads = loss_and_grads(ours, emb, labels, ref, None if ref is None else ref_labels, mined)
            assert value.item() == 0.0
            for g in grads:
                assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("loss_name", [n for n in LOSSES if not n.startswith("triplet")])
def test_single_positive_and_negative_pair_is_kept(loss_name: str) -> None:
    """PML returns 0 when each index tensor has <= 1 entry; we give the pair its loss (a documented deviation)."""
    ours = LOSSES[loss_name][0]()
    emb, labels, _, _ = make_batch(2)
    a = int(labels.eq(labels[0]).nonzero()[1])
    n = int(labels.ne(labels[0]).nonzero()[0])
    mined = Mined.from_pairs(torch.tensor([0]), torch.tensor([a]), torch.tensor([0]), torch.tensor([n]))
    ours_value = ours(emb, labels, mined)
    # PML's value for the same pair listed twice: mask-based losses and means over equal terms do not
    # change. NTXent counts a repeated negative twice, so its second negative pair gets another anchor.
    pml = LOSSES[loss_name][1]()
    second_anchor = 1 if loss_name.startswith("ntxent") else 0
    twice = (torch.tensor([0, 0]), torch.tensor([a, a]), torch.tensor([0, second_anchor]), torch.tensor([n, n]))
    assert torch.isclose(ours_value, pml(emb, labels, twice), rtol=RTOL, atol=ATOL)
    assert ours_value.item() != 0.0 or loss_name.startswith("contrastive")


def test_conflicting_pair_is_rejected() -> None:
    emb, labels, _, _ = make_batch(0)
    pair = torch.tensor([0]), torch.tensor([1])
    mined = Mined.from_pairs(*pair, *pair)
    for loss in (MultiSimilarityLoss(), SupConLoss(), CircleLoss()):
        with pytest.raises(ValueError, match="both as a positive and as a negative"):
            loss(emb, labels, mined)


def test_circle_loss_needs_cosine_similarity() -> None:
    with pytest.raises(ValueError, match="CosineSimilarity"):
        CircleLoss(distance=LpDistance())
