"""The miner -> loss contract: Mined conversions equal PML's, and bad input fails clearly."""

import pytest
import torch
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from contracts.relevance import all_pairs, all_triplets
from losses import TripletMarginLoss
from miners import BatchHardMiner, Mined, MixSpec


@pytest.mark.parametrize("seed", range(4))
def test_conversions_equal_pml(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (12,), generator=g)
    a1, p, a2, n = lmu.get_all_pairs_indices(labels)
    mined = all_pairs(labels, labels, same_set=True)
    for ours, ref in zip(mined.as_pairs()[:4], (a1, p, a2, n)):
        assert torch.equal(ours, ref)
    for ours, ref in zip(mined.as_triplets()[:3], lmu.convert_to_triplets((a1, p, a2, n), labels, t_per_anchor="all")):
        assert torch.equal(ours, ref)
    for ours, ref in zip(all_triplets(labels, labels, True).as_triplets()[:3], lmu.get_all_triplets_indices(labels)):
        assert torch.equal(ours, ref)
    trip = Mined.from_tuple(lmu.get_all_triplets_indices(labels))
    for ours, ref in zip(trip.as_pairs()[:4], lmu.convert_to_pairs(trip.to_tuple(), labels)):
        assert torch.equal(ours, ref)


def test_joined_triplet_weights_are_products():
    m = Mined.from_pairs(torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([0]), torch.tensor([3]),
                         pos_weights=torch.tensor([0.5, 2.0]), neg_weights=torch.tensor([3.0]))
    a, p, n, w = m.as_triplets()
    assert a.tolist() == [0, 0] and p.tolist() == [1, 2] and n.tolist() == [3, 3]
    assert w.tolist() == [1.5, 6.0]


def test_mixspec_materialize_is_unit_norm_convex_combination():
    emb = torch.randn(6, 5, dtype=torch.float64)
    spec = MixSpec(anchors=torch.tensor([0, 1]), first=torch.tensor([2, 3]), second=torch.tensor([4, 5]),
                   coeff=torch.tensor([1.0, 0.25]), pos_weight=torch.zeros(2))
    out = spec.materialize(emb)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(out[0], torch.nn.functional.normalize(emb[2], dim=0))
    mixed = 0.25 * emb[3] + 0.75 * emb[5]
    torch.testing.assert_close(out[1], mixed / mixed.norm())
    with pytest.raises(ValueError, match="first_source"):
        MixSpec(anchors=torch.tensor([0]), first=torch.tensor([0]), second=torch.tensor([0]),
                coeff=torch.ones(1), pos_weight=torch.zeros(1), first_source="gallery")


def test_nan_embeddings_are_named():
    emb = torch.randn(8, 4)
    emb[3, 1] = float("nan")
    labels = torch.arange(8) % 2
    with pytest.raises(ValueError, match=r"BatchHardMiner: embeddings contain NaN or Inf in rows \[3\]"):
        BatchHardMiner()(emb, labels)
    with pytest.raises(ValueError, match="TripletMarginLoss: embeddings contain NaN"):
        TripletMarginLoss()(emb, labels)


@pytest.mark.parametrize(
    "emb, labels, kwargs, message",
    [
        (torch.randn(8), torch.zeros(8, dtype=torch.long), {}, r"floating-point tensor \[batch, dim\]"),
        (torch.randn(8, 4), torch.zeros(7, dtype=torch.long), {}, "8 embeddings but 7 labels"),
        (torch.randn(8, 4), torch.zeros(8), {}, "integer tensor"),
        (torch.randn(8, 4), torch.zeros(8, dtype=torch.long), {"ref_emb": torch.randn(3, 4)}, "given together"),
        (torch.randn(8, 4), torch.zeros(8, dtype=torch.long), {"ref_emb": torch.randn(3, 5), "ref_labels": torch.zeros(3, dtype=torch.long)}, r"expected \[M, 4\]"),
    ],
)
def test_bad_shapes_are_named(emb, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchHardMiner()(emb, labels, **kwargs)


def test_out_of_range_indices_are_rejected():
    emb, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="outside the reference set of size 4"):
        TripletMarginLoss()(emb, labels, Mined.from_triplets(torch.tensor([0]), torch.tensor([1]), torch.tensor([9])))


def test_nothing_mined_gives_zero_loss_and_zero_gradient():
    emb = torch.randn(4, 3, requires_grad=True)
    labels = torch.arange(4)  # no positives: nothing to mine
    mined = BatchHardMiner()(emb, labels)
    assert len(mined) == 0
    loss = TripletMarginLoss()(emb, labels, mined)
    loss.backward()
    assert loss.item() == 0 and torch.equal(emb.grad, torch.zeros_like(emb))
