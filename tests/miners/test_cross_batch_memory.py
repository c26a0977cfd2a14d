"""``CrossBatchMemory`` against pytorch-metric-learning 2.9 over a sequence of batches (float64).

Loss values, gradients with respect to the batch, and the memory contents are compared after every
step, through the wrap-around of the queue, with and without a miner, with ``enqueue_mask`` and with
an extra ``indices_tuple``.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import oracle

PL = oracle("pytorch_metric_learning.losses")
PM = oracle("pytorch_metric_learning.miners")
PD = oracle("pytorch_metric_learning.distances")

from losses import ContrastiveLoss, CosineSimilarity, TripletMarginLoss  # noqa: E402
from miners import BatchHardMiner, CrossBatchMemory, MultiSimilarityMiner, PairMarginMiner, TripletMarginMiner  # noqa: E402

D, MEMORY = 6, 40

SETUPS = {
    "triplet_all_pairs": (lambda: (TripletMarginLoss(margin=0.1), None), lambda: (PL.TripletMarginLoss(margin=0.1), None)),
    "triplet_batch_hard": (
        lambda: (TripletMarginLoss(margin=0.1), BatchHardMiner()),
        lambda: (PL.TripletMarginLoss(margin=0.1), PM.BatchHardMiner()),
    ),
    "triplet_semihard": (
        lambda: (TripletMarginLoss(margin=0.2), TripletMarginMiner(margin=0.2, type_of_triplets="semihard")),
        lambda: (PL.TripletMarginLoss(margin=0.2), PM.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")),
    ),
    "contrastive_pair_margin": (
        lambda: (ContrastiveLoss(), PairMarginMiner()),
        lambda: (PL.ContrastiveLoss(), PM.PairMarginMiner()),
    ),
    "contrastive_all_pairs_cos": (
        lambda: (ContrastiveLoss(pos_margin=0.9, neg_margin=0.3, distance=CosineSimilarity()), None),
        lambda: (PL.ContrastiveLoss(pos_margin=0.9, neg_margin=0.3, distance=PD.CosineSimilarity()), None),
    ),
    "contrastive_multi_similarity": (
        lambda: (ContrastiveLoss(pos_margin=0.9, neg_margin=0.3, distance=CosineSimilarity()), MultiSimilarityMiner()),
        lambda: (PL.ContrastiveLoss(pos_margin=0.9, neg_margin=0.3, distance=PD.CosineSimilarity()), PM.MultiSimilarityMiner()),
    ),
}


def _stream(seed: int, steps: int = 7):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        b = int(torch.randint(6, 16, (1,), generator=g))
        emb = torch.randn(b, D, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 4, (b,), generator=g)
        if step == 2:
            emb[1] = emb[0]  # a tie inside the batch
        yield emb, labels, g


def _step(memory, emb, labels, **kwargs):
    x = emb.clone().requires_grad_(True)
    loss = memory(x, labels, **kwargs)
    loss.backward()
    return loss.detach(), x.grad


def _compare(ours, theirs, seed, mode):
    for emb, labels, g in _stream(seed, steps=12 if mode == "enqueue_mask" else 7):
        kwargs = {}
        if mode == "enqueue_mask":
            kwargs["enqueue_mask"] = torch.rand(len(emb), generator=g) < 0.5
        elif mode == "indices_tuple":
            a = torch.arange(len(emb))
            kwargs["indices_tuple"] = (a, torch.randint(0, len(emb), (len(emb),), generator=g), a, (a + 1) % len(emb))
        l1, g1 = _step(ours, emb, labels, **kwargs)
        l2, g2 = _step(theirs, emb, labels, **kwargs)
        # atol: PML's cdist puts sqrt(eps) ~ 1e-8 on coincident points (the tie at step 2); the
        # triplet loss computes few-triplet distances row by row and gets exactly 0 there
        torch.testing.assert_close(l1, l2.to(l1.dtype), rtol=1e-9, atol=1e-7)
        torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)
        assert ours.queue_idx == theirs.queue_idx and ours.has_been_filled == theirs.has_been_filled
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory.to(torch.float64))
        assert torch.equal(ours.label_memory, theirs.label_memory)
    assert ours.has_been_filled  # the sequence wrapped around the queue


@pytest.mark.parametrize("mode", ["plain", "enqueue_mask", "indices_tuple"])
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_equals_pml_over_a_sequence(setup: str, mode: str) -> None:
    ours_loss, ours_miner = SETUPS[setup][0]()
    pml_loss, pml_miner = SETUPS[setup][1]()
    for seed in (0, 1):
        ours = CrossBatchMemory(ours_loss, D, memory_size=MEMORY, miner=ours_miner)
        theirs = PL.CrossBatchMemory(pml_loss, D, memory_size=MEMORY, miner=pml_miner)
        _compare(ours, theirs, seed, mode)


def test_memory_never_carries_gradient_and_exposes_the_queue() -> None:
    memory = CrossBatchMemory(TripletMarginLoss(), D, memory_size=10)
    assert len(memory) == 0 and memory.filled()[0].shape == (0, D)
    emb = torch.randn(6, D, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    memory(emb, labels).backward()
    ref_emb, ref_labels = memory.filled()
    assert ref_emb.shape == (6, D) and torch.equal(ref_labels, labels)
    assert not memory.embedding_memory.requires_grad and memory.embedding_memory.grad_fn is None
    assert "embedding_memory" in dict(memory.named_buffers()) and "label_memory" in dict(memory.named_buffers())
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    memory(torch.randn(6, D), labels)
    assert len(memory) == 10 and memory.filled()[0].shape == (10, D) and memory.queue_idx == 2


def test_state_dict_round_trip_keeps_the_write_position() -> None:
    a = CrossBatchMemory(TripletMarginLoss(), D, memory_size=10)
    a(torch.randn(7, D), torch.randint(0, 3, (7,)))
    b = CrossBatchMemory(TripletMarginLoss(), D, memory_size=10)
    b.load_state_dict(a.state_dict())
    assert b.queue_idx == 7 and not b.has_been_filled
    assert torch.equal(a.embedding_memory, b.embedding_memory)


def test_bad_inputs_are_named() -> None:
    memory = CrossBatchMemory(TripletMarginLoss(), D, memory_size=4)
    with pytest.raises(ValueError, match="memory_size"):
        memory(torch.randn(5, D), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \[B, 6\]"):
        memory(torch.randn(3, D + 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="mutually exclusive"):
        memory(torch.randn(3, D), torch.zeros(3, dtype=torch.long), indices_tuple=(), enqueue_mask=torch.ones(3, dtype=torch.bool))
