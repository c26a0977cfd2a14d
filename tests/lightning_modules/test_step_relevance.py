"""The shared step's relevance by ids (query/document retrieval) and its two-view losses (CLIP, SigLIP):
equal to the masks written out by hand, to the loss called on the whole batch, and under DDP (2 gloo
processes, both gather modes) to one process on the global batch."""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from contracts.relevance import id_masks
from lightning_modules.step import EmbeddingStep
from losses import CLIPLoss, NTXentLoss, SigLIPLoss
from tests.helpers import gloo_group

D = 8


def text_batch(seed: int = 0, b: int = 6, k: int = 2):
    """Queries, their positive documents and k hard negatives each, with ids that make relevance
    non-trivial: queries 0 and 1 share a positive document (id 100), query 2's positive (id 102) is
    query 3's hard negative, and one negative slot is empty (-1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, D, generator=g, dtype=torch.float64)
    d = torch.randn(b, D, generator=g, dtype=torch.float64)
    n = torch.randn(b * k, D, generator=g, dtype=torch.float64)
    doc_ids = torch.tensor([100, 100] + [100 + i for i in range(2, b)])
    neg_ids = torch.arange(500, 500 + b * k)
    neg_ids[3 * k] = 102  # a known positive of query 2 drawn as query 3's negative
    neg_ids[1] = -1  # query 0 had one negative too few
    pos_ids = torch.full((b, 2), -1)
    pos_ids[:, 0] = doc_ids
    pos_ids[4, 1] = 105  # query 4 has two positives: its own and query 5's document
    return q, d, n, doc_ids, neg_ids, pos_ids


def brute_masks(doc_ids, neg_ids, pos_ids):
    refs = torch.cat([doc_ids, neg_ids]).tolist()
    pos = torch.tensor([[r >= 0 and r in set(row.tolist()) for r in refs] for row in pos_ids])
    ign = torch.tensor([[r < 0 for r in refs] for _ in pos_ids])
    return pos, ign


def test_id_masks_equal_brute_force():
    _, _, _, doc_ids, neg_ids, pos_ids = text_batch()
    pos, ign = id_masks(pos_ids, torch.cat([doc_ids, neg_ids]))
    ref_pos, ref_ign = brute_masks(doc_ids, neg_ids, pos_ids)
    assert torch.equal(pos, ref_pos) and torch.equal(ign, ref_ign)
    assert pos[0, 1] and pos[1, 0]  # the shared document is a positive of both queries
    assert pos[2, len(doc_ids) + 3 * 2]  # query 2's positive drawn as query 3's negative stays a positive for query 2
    assert pos[4, 5] and ign[:, len(doc_ids) + 1].all()


def test_step_by_ids_equals_the_loss_on_written_out_masks():
    q, d, n, doc_ids, neg_ids, pos_ids = text_batch()
    loss = NTXentLoss(temperature=0.1)
    out = EmbeddingStep(loss, gather="none")(q, d, neg_emb=n, pos_ids=pos_ids, ref_ids=doc_ids, neg_ids=neg_ids)
    pos, ign = brute_masks(doc_ids, neg_ids, pos_ids)
    ref = loss(q, None, None, torch.cat([d, n]), None, pos_mask=pos, ignore_mask=ign)
    torch.testing.assert_close(out["loss"], ref)
    assert torch.equal(out["pos_mask"], pos) and torch.equal(out["ignore_mask"], ign)
    # without the ids' relevance the shared document would be pushed away from query 1: a different loss
    naive = loss(q, None, None, torch.cat([d, n]), None, pos_mask=torch.eye(len(q), len(q) + len(n), dtype=torch.bool))
    assert not torch.allclose(naive, ref)


def test_step_by_ids_against_a_memory_of_documents():
    from miners.memory import CrossBatchMemory

    q, d, n, doc_ids, neg_ids, pos_ids = text_batch()
    step = EmbeddingStep(NTXentLoss(temperature=0.1), memory=CrossBatchMemory(NTXentLoss(), D, memory_size=32), gather="none")
    step(q, d, neg_emb=n, pos_ids=pos_ids, ref_ids=doc_ids, neg_ids=neg_ids)  # fills the memory with the documents and their ids
    out = step(q, d, neg_emb=n, pos_ids=pos_ids, ref_ids=doc_ids, neg_ids=neg_ids)
    mem_pos = out["pos_mask"][:, : len(d)]
    assert torch.equal(mem_pos, brute_masks(doc_ids, neg_ids[:0], pos_ids)[0])  # the queue's documents are positives by id


def test_relevance_forms_are_exclusive_and_ids_are_checked():
    q, d, n, doc_ids, neg_ids, pos_ids = text_batch()
    step = EmbeddingStep(NTXentLoss())
    with pytest.raises(ValueError, match="one form"):
        step(q, d, labels=torch.zeros(len(q)), pos_ids=pos_ids, ref_ids=doc_ids)
    with pytest.raises(ValueError, match="neg_ids of shape"):
        step(q, d, neg_emb=n, pos_ids=pos_ids, ref_ids=doc_ids)
    with pytest.raises(ValueError, match="ref_ids has shape"):
        step(q, d, pos_ids=pos_ids, ref_ids=doc_ids[:2])
    with pytest.raises(ValueError, match="two-view"):
        from miners import BatchHardMiner

        EmbeddingStep(CLIPLoss(), BatchHardMiner())(q, d, pos_mask=torch.eye(len(q), dtype=torch.bool))


@pytest.mark.parametrize("loss", [CLIPLoss(), SigLIPLoss()], ids=["clip", "siglip"])
def test_two_view_step_equals_the_loss_on_the_batch(loss):
    img, txt = torch.randn(7, D, dtype=torch.float64), torch.randn(7, D, dtype=torch.float64)
    img, txt = img / img.norm(dim=1, keepdim=True), txt / txt.norm(dim=1, keepdim=True)
    kwargs = {"logit_scale": torch.tensor(14.0, dtype=torch.float64), "logit_bias": torch.tensor(-3.0, dtype=torch.float64)}
    out = EmbeddingStep(loss)(img, txt, pos_mask=torch.eye(7, dtype=torch.bool), loss_kwargs=kwargs)
    torch.testing.assert_close(out["loss"], loss(img, txt, **kwargs))


# ----------------------------------------------------------------------------------------- DDP
CASES = {
    # name: (loss factory, uses ids and negatives)
    "ids-ntxent": (lambda: NTXentLoss(temperature=0.1), True),
    "clip": (CLIPLoss, False),
    "siglip": (SigLIPLoss, False),
}


def _case_inputs(case: str):
    q, d, n, doc_ids, neg_ids, pos_ids = text_batch(seed=3, b=6, k=2)
    if not CASES[case][1]:
        q, d = q / q.norm(dim=1, keepdim=True), d / d.norm(dim=1, keepdim=True)
    return q, d, n, doc_ids, neg_ids, pos_ids


def _run_step(case, gather, q, d, n, doc_ids, neg_ids, pos_ids, scale):
    loss_factory, by_ids = CASES[case]
    step = EmbeddingStep(loss_factory(), gather=gather)
    if by_ids:
        return step(q, d, neg_emb=n, pos_ids=pos_ids, ref_ids=doc_ids, neg_ids=neg_ids)["loss"]
    return step(q, d, pos_mask=torch.eye(len(q), dtype=torch.bool), loss_kwargs={"logit_scale": scale.exp(), "logit_bias": scale - 5})["loss"]


def _single(case, gather):
    q, d, n, doc_ids, neg_ids, pos_ids = (x.clone() for x in _case_inputs(case))
    q, d, n = (x.requires_grad_() for x in (q, d, n))
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = _run_step(case, gather, q, d, n, doc_ids, neg_ids, pos_ids, scale)
    loss.backward()
    return loss.detach(), q.grad, d.grad, n.grad, scale.grad


def _worker(rank, world, init_file, case, gather, out):
    with gloo_group(rank, world, init_file):
        q, d, n, doc_ids, neg_ids, pos_ids = _case_inputs(case)
        rows = slice(0, 4) if rank == 0 else slice(4, 6)  # uneven shards: 4 and 2 queries
        k = len(n) // len(q)
        nrows = slice(rows.start * k, rows.stop * k)
        q, d, n = (x[r].clone().requires_grad_() for x, r in ((q, rows), (d, rows), (n, nrows)))
        scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
        loss = _run_step(case, gather, q, d, n, doc_ids[rows], neg_ids[nrows], pos_ids[rows], scale)
        loss.backward()
        # DDP averages parameter gradients over ranks; the embeddings' gradients are what reach the encoders
        grads = [None if g is None else g / world for g in (q.grad, d.grad, n.grad)]
        sgrad = torch.zeros((), dtype=torch.float64) if scale.grad is None else scale.grad.clone()
        dist.all_reduce(sgrad)
        torch.save({"loss": loss.detach(), "grads": grads, "scale": sgrad / world}, f"{out}.{rank}")


@pytest.mark.slow
@pytest.mark.parametrize("gather", ["global", "local"])
@pytest.mark.parametrize("case", list(CASES))
def test_ddp_step_equals_one_process_on_the_global_batch(tmp_path, case, gather):
    if case == "ids-ntxent" and gather == "local":
        # NT-Xent averages over positive pairs, whose number differs per rank: exact in "global" mode only
        # (the step's docstring); the two-view losses average over rows and are exact in both modes.
        pytest.skip("NT-Xent's mean over a data-dependent number of positive pairs is exact in global mode only")
    loss, gq, gd, gn, gs = _single(case, gather)
    out = str(tmp_path / "r")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), case, gather, out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    for r in (r0, r1):
        torch.testing.assert_close(r["loss"], loss)
        torch.testing.assert_close(r["scale"], gs if gs is not None else torch.zeros((), dtype=torch.float64), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.cat([r0["grads"][0], r1["grads"][0]]), gq)
    torch.testing.assert_close(torch.cat([r0["grads"][1], r1["grads"][1]]), gd)
    if CASES[case][1]:
        torch.testing.assert_close(torch.cat([r0["grads"][2], r1["grads"][2]]), gn)
