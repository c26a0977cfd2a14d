"""``CrossBatchMemory`` under DDP: 2 CPU processes (gloo) hold identical memories equal to the gathered batches.

Each rank enqueues the batch gathered from all ranks, in rank order, so after every step both
ranks' queues are the same and equal the concatenation ``[rank 0 rows, rank 1 rows]`` written at the
write position (with wrap-around). Each rank's loss equals the loss of its own rows against that
memory with only its own self-comparisons removed, computed here in one process. A memory with
``gather=False`` fed the global batch on every rank (the caller gathered) holds the same memory.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from contracts.relevance import all_pairs
from losses import TripletMarginLoss
from miners import CrossBatchMemory
from miners.memory import _drop_self_pairs
from tests.helpers import gloo_group

D, MEMORY, STEPS = 4, 20, 4
SIZES = (5, 7)  # uneven batches per rank


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(SIZES[rank], D, generator=g, dtype=torch.float64), torch.randint(0, 3, (SIZES[rank],), generator=g)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world, init_file):
        memory = CrossBatchMemory(TripletMarginLoss(margin=0.1), D, memory_size=MEMORY)
        # the caller gathers (as MetricLearningModule does): the memory must not gather again
        pre_gathered = CrossBatchMemory(TripletMarginLoss(margin=0.1), D, memory_size=MEMORY, gather=False).double()
        record = []
        for step in range(STEPS):
            emb, labels = _batch(rank, step)
            x = emb.clone().requires_grad_(True)
            loss = memory(x, labels)
            loss.backward()
            everyone = [_batch(r, step) for r in range(world)]
            pre_gathered(torch.cat([b[0] for b in everyone]), torch.cat([b[1] for b in everyone]))
            record.append({
                "pre_gathered_memory": pre_gathered.embedding_memory.clone(),
                "loss": loss.detach(),
                "grad": x.grad.clone(),
                "embedding_memory": memory.embedding_memory.clone(),
                "label_memory": memory.label_memory.clone(),
                "queue_idx": memory.queue_idx,
            })
        torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ranks_hold_identical_memory_equal_to_the_gathered_batches(tmp_path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    records = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    reference = CrossBatchMemory(TripletMarginLoss(margin=0.1), D, memory_size=MEMORY).double()
    for step in range(STEPS):
        batches = [_batch(r, step) for r in range(2)]
        slots = reference.enqueue(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
        ref_emb, ref_labels = reference.filled()
        start = 0
        for rank in range(2):
            got = records[rank][step]
            other = records[1 - rank][step]
            assert torch.equal(got["embedding_memory"], other["embedding_memory"]), "ranks hold different memories"
            assert torch.equal(got["label_memory"], other["label_memory"])
            assert torch.equal(got["embedding_memory"], reference.embedding_memory)
            assert torch.equal(got["label_memory"], reference.label_memory)
            assert got["queue_idx"] == reference.queue_idx
            assert torch.equal(got["pre_gathered_memory"], reference.embedding_memory), "gather=False enqueued twice"

            emb, labels = batches[rank]
            own = slots[start : start + len(emb)]
            start += len(emb)
            x = emb.clone().requires_grad_(True)
            mined = _drop_self_pairs(all_pairs(labels, ref_labels, same_set=False), own)
            expected = TripletMarginLoss(margin=0.1)(x, labels, mined, ref_emb, ref_labels)
            expected.backward()
            torch.testing.assert_close(got["loss"], expected.detach())
            torch.testing.assert_close(got["grad"], x.grad)
    assert reference.has_been_filled  # 4 steps x 12 rows wrapped the 20-row queue
