"""MoCHi (Kalantidis et al., NeurIPS 2020): synthetic hard negatives per query, and their use in InfoNCE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from losses import NTXentLoss
from miners import CrossBatchMemory, Mined, MoCHi, MoCHiMiner


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def clustered(b: int = 4, per: int = 16, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query ``i`` sits in cluster ``i`` of the queue; clusters are nearly orthogonal."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0][:b]
    queue = F.normalize(centres.repeat_interleave(per, 0) + 0.1 * torch.randn(b * per, d, generator=g, dtype=torch.float64), dim=1)
    q = F.normalize(centres + 0.05 * torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    return q, queue, torch.arange(b).repeat_interleave(per)


def buggy_type1(q: torch.Tensor, queue: torch.Tensor, n: int, s: int) -> torch.Tensor:
    """The known bug of an unofficial implementation: indices drawn in [0, N) index the flattened
    ``[B * N, D]`` top-N tensor, so every query mixes query 0's hard negatives."""
    top = (q @ queue.T).topk(n, dim=1).indices
    flat = queue[top].reshape(len(q) * n, -1)
    pairs = torch.stack([torch.randperm(n)[:2] for _ in range(len(q) * s)]).view(len(q), s, 2)
    alpha = torch.rand(len(q), s, 1, dtype=q.dtype)
    return F.normalize(alpha * flat[pairs[..., 0]] + (1 - alpha) * flat[pairs[..., 1]], dim=-1)


def test_shape_order_unit_norm_and_detached():
    q = unit(5, 8, seed=1).requires_grad_(True)
    queue = unit(40, 8, seed=2).requires_grad_(True)
    torch.manual_seed(0)
    out = MoCHi(n_hard=10, s=6, s_prime=3)(q, queue)
    assert out.shape == (5, 9, 8)
    assert not out.requires_grad
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5, 9, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(3))
def test_each_query_mixes_only_its_own_top_n(seed):
    q, queue = unit(6, 16, seed=seed), unit(64, 16, seed=seed + 10)
    mochi = MoCHi(n_hard=8, s=20, s_prime=10)
    torch.manual_seed(seed)
    spec = mochi.mix_spec(q, queue)
    top = (q @ queue.T).topk(8, dim=1).indices
    b = len(q)
    n1 = b * 20
    anchors, first, second = spec.anchors, spec.first, spec.second
    for k in range(len(spec)):
        own = set(top[anchors[k]].tolist())
        assert int(second[k]) in own
        if k < n1:  # type 1: two distinct hard negatives of the same query ("both" source: queue row r is b + r)
            assert int(first[k]) - b in own and int(first[k]) - b != int(second[k])
        else:  # type 2: the query itself
            assert int(first[k]) == int(anchors[k])
    assert anchors[:n1].tolist() == torch.arange(b).repeat_interleave(20).tolist()
    assert bool((spec.coeff[:n1] > 0).all() and (spec.coeff[:n1] < 1).all())
    assert bool((spec.coeff[n1:] >= 0).all() and (spec.coeff[n1:] < 0.5).all())


def test_per_query_mixing_against_the_query_zero_bug():
    q, queue, cluster = clustered()
    torch.manual_seed(0)
    ours = MoCHi(n_hard=16, s=32, s_prime=0)(q, queue)
    buggy = buggy_type1(q, queue, 16, 32)
    for b in range(len(q)):
        # each synthetic point of query b lies in query b's cluster: closest to its own centre
        assert bool(((ours[b] @ q.T).argmax(dim=1) == b).all())
    # the buggy version puts query 0's negatives in front of every other query
    assert bool(((buggy[1:] @ q.T).argmax(dim=-1) == 0).all())


@pytest.mark.parametrize("seed", range(3))
def test_type2_points_are_at_least_as_hard_as_their_source(seed):
    q, queue = unit(8, 12, seed=seed), unit(50, 12, seed=seed + 5)
    torch.manual_seed(seed)
    spec = MoCHi(n_hard=10, s=0, s_prime=40).mix_spec(q, queue)
    h = spec.materialize(q, queue)
    qa, nj = q[spec.anchors], queue[spec.second]
    source, synth = (qa * nj).sum(1), (qa * h).sum(1)
    checked = source >= 0
    assert checked.sum() > 0
    assert bool((synth[checked] >= source[checked] - 1e-12).all())


def test_labels_exclude_same_label_entries():
    q, queue = unit(6, 10, seed=3), unit(60, 10, seed=4)
    labels, queue_labels = torch.arange(6) % 3, torch.arange(60) % 3
    torch.manual_seed(0)
    spec = MoCHi(n_hard=5, s=10, s_prime=10).mix_spec(q, queue, labels, queue_labels)
    rows = torch.cat([torch.full((6,), -1), queue_labels])  # "both" source labels for type 1 (query rows never used there)
    assert bool((queue_labels[spec.second] != labels[spec.anchors]).all())
    n1 = 60
    assert bool((rows[spec.first[:n1]] != labels[spec.anchors[:n1]]).all())
    # the top-5 among other-label entries, computed by brute force
    sim = q @ queue.T
    for b in range(6):
        allowed = [j for j in range(60) if queue_labels[j] != labels[b]]
        best = sorted(allowed, key=lambda j: -float(sim[b, j]))[:5]
        used = set(spec.second[spec.anchors == b].tolist())
        assert used <= set(best)


def test_no_gradient_reaches_the_queue_and_q_gets_gradient_only_through_logits():
    q = unit(4, 8, seed=5).requires_grad_(True)
    queue = unit(30, 8, seed=6).requires_grad_(True)
    k = unit(4, 8, seed=7)
    torch.manual_seed(1)
    h = MoCHi(n_hard=6, s=5, s_prime=5)(q, queue)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.detach().T, torch.einsum("bd,bsd->bs", q, h)], dim=1) / 0.2
    F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)).backward()
    assert queue.grad is None
    # same gradient as with the synthetic points given as constants
    q2 = q.detach().clone().requires_grad_(True)
    logits2 = torch.cat([(q2 * k).sum(1, keepdim=True), q2 @ queue.detach().T, torch.einsum("bd,bsd->bs", q2, h.clone())], dim=1) / 0.2
    F.cross_entropy(logits2, torch.zeros(4, dtype=torch.long)).backward()
    torch.testing.assert_close(q.grad, q2.grad)


@pytest.mark.parametrize("seed", range(3))
def test_ntxent_with_mochi_equals_moco_logits_with_synthetic_negatives(seed):
    """The InfoNCE of MoCo with MoCHi's logits appended (the paper's loss), through Mined.mix."""
    q, k, queue = unit(5, 8, seed=seed), unit(5, 8, seed=seed + 1), unit(30, 8, seed=seed + 2)
    t, b, m = 0.2, 5, 30
    mochi = MoCHi(n_hard=8, s=4, s_prime=3)
    torch.manual_seed(seed)
    spec = mochi.mix_spec(q, queue)
    torch.manual_seed(seed)
    h = mochi(q, queue)
    rows = torch.arange(b)
    a2, n = torch.meshgrid(rows, torch.arange(m), indexing="ij")
    mined = Mined(pos_pairs=(rows, m + rows), neg_pairs=(a2.flatten(), n.flatten()), mix=spec)
    ours = NTXentLoss(temperature=t)(q, rows, mined, torch.cat([queue, k]), torch.cat([torch.full((m,), -1), rows]))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T, torch.einsum("bd,bsd->bs", q, h)], dim=1) / t
    expected = F.cross_entropy(logits, torch.zeros(b, dtype=torch.long))
    assert math.isclose(float(ours), float(expected), rel_tol=1e-12)


def test_warmup_and_zero_points():
    q, queue = unit(3, 4, seed=0), unit(10, 4, seed=1)
    mochi = MoCHi(n_hard=4, s=2, s_prime=2, warmup_epochs=2)
    assert mochi(q, queue).shape == (3, 0, 4)
    mochi.set_epoch(2)
    assert mochi(q, queue).shape == (3, 4, 4)
    assert len(MoCHi(n_hard=4, s=0, s_prime=0).mix_spec(q, queue)) == 0


def test_small_queue_uses_what_it_has_and_bad_arguments_are_named():
    q, queue = unit(3, 4, seed=0), unit(3, 4, seed=1)
    assert MoCHi(n_hard=1024, s=4, s_prime=2)(q, queue).shape == (3, 6, 4)
    # one candidate per query: no type-1 point can be made, type 2 still can
    spec = MoCHi(n_hard=8, s=4, s_prime=2).mix_spec(q, queue[:1])
    assert len(spec) == 6 and bool((spec.first == spec.anchors).all())
    with pytest.raises(ValueError, match="fewer than 2 candidate negatives"):
        MoCHi(n_hard=8, s=4, s_prime=2)(q, queue[:1])
    with pytest.raises(ValueError, match="n_hard must be >= 2"):
        MoCHi(n_hard=1, s=4)
    with pytest.raises(ValueError, match="labels and queue_labels must be given together"):
        MoCHi()(q, queue, labels=torch.zeros(3, dtype=torch.long))


def test_miner_with_memory_matches_manual_infonce():
    """MoCHiMiner in CrossBatchMemory + NTXentLoss: a supervised memory whose denominators gain MoCHi's points."""
    torch.manual_seed(0)
    d, t = 8, 0.1
    loss = NTXentLoss(temperature=t)
    mochi = MoCHi(n_hard=6, s=3, s_prime=2)
    memory = CrossBatchMemory(loss, embedding_size=d, memory_size=32, miner=MoCHiMiner(mochi))
    for step in range(3):
        emb, labels = unit(8, d, seed=step).float(), torch.arange(8) % 4
        x = emb.clone().requires_grad_(True)
        torch.manual_seed(100 + step)
        value = memory(x, labels)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    assert len(memory) == 24  # only the batches' embeddings are enqueued, never the synthetic points
    # recompute the last step by hand, with the same random draws
    ref, ref_labels = memory.filled()
    torch.manual_seed(100 + 2)
    spec = mochi.mix_spec(emb, ref, labels, ref_labels)
    h = spec.materialize(emb, ref)
    own = torch.arange(16, 24)  # the batch's own slots in the 32-row memory after 3 x 8 rows
    terms = []
    for a in range(8):
        negs = [float(emb[a] @ ref[j]) / t for j in range(len(ref)) if ref_labels[j] != labels[a]]
        negs += [float(emb[a] @ h[i]) / t for i in range(len(spec)) if int(spec.anchors[i]) == a]
        for p in range(len(ref)):
            if ref_labels[p] == labels[a] and p != int(own[a]):
                pos = float(emb[a] @ ref[p]) / t
                terms.append(-pos + math.log(math.exp(pos) + sum(math.exp(v) for v in negs)))
    assert math.isclose(value.item(), sum(terms) / len(terms), rel_tol=1e-5)


def test_set_epoch_callback_reaches_a_nested_mochi():
    from types import SimpleNamespace

    from experiments.callbacks.set_epoch import SetEpoch

    mochi = MoCHi(n_hard=4, s=2, s_prime=2, warmup_epochs=3)
    holder = torch.nn.ModuleDict({"loss": CrossBatchMemory(NTXentLoss(), 4, 16, miner=MoCHiMiner(mochi))})
    q, queue = unit(2, 4, seed=0), unit(8, 4, seed=1)
    for epoch, expected in ((0, 0), (2, 0), (3, 4)):
        SetEpoch().on_train_epoch_start(SimpleNamespace(current_epoch=epoch), holder)
        assert mochi(q, queue).shape == (2, expected, 4)
