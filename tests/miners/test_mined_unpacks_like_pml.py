"""A ``Mined`` unpacks like pytorch-metric-learning's indices tuple, and PML's tuples feed our losses."""

import pytest
import torch

pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

import losses  # noqa: E402
import miners  # noqa: E402

#: (ours, PML's, tuple length PML returns)
PAIRS = [
    (lambda: miners.BatchHardMiner(), lambda: pml_miners.BatchHardMiner(), 3),
    (lambda: miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
     lambda: pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"), 3),
    (lambda: miners.MultiSimilarityMiner(), lambda: pml_miners.MultiSimilarityMiner(), 4),
    (lambda: miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8),
     lambda: pml_miners.PairMarginMiner(pos_margin=0.2, neg_margin=0.8), 4),
    (lambda: miners.BatchEasyHardMiner(), lambda: pml_miners.BatchEasyHardMiner(), 4),
]


def as_set(t):
    return sorted(zip(*[x.tolist() for x in t]))


@pytest.mark.parametrize("ours, theirs, n", PAIRS)
def test_unpacks_like_pml(ours, theirs, n):
    g = torch.Generator().manual_seed(0)
    emb, labels = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.arange(32) % 4
    mined, expected = ours()(emb, labels), theirs()(emb, labels)
    unpacked = tuple(iter(mined))
    assert len(expected) == n and len(unpacked) == n
    if n == 3:
        a, p, neg = mined
    else:
        a1, p, a2, neg = mined
    assert as_set(unpacked) == as_set(expected) if n == 3 else (
        as_set(unpacked[:2]) == as_set(expected[:2]) and as_set(unpacked[2:]) == as_set(expected[2:])
    )


@pytest.mark.parametrize("ours, theirs, n", PAIRS)
def test_our_losses_take_pml_tuples(ours, theirs, n):
    """Code written for PML: its miner's tuple goes to our loss, with the value of PML's loss."""
    g = torch.Generator().manual_seed(1)
    emb, labels = torch.randn(32, 8, generator=g, dtype=torch.float64), torch.arange(32) % 4
    indices = theirs()(emb, labels)
    for name in ("TripletMarginLoss", "ContrastiveLoss", "MultiSimilarityLoss"):
        got = getattr(losses, name)()(emb, labels, indices)
        want = getattr(pml_losses, name)()(emb, labels, indices)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
