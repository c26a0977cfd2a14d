"""GradCache against the uncached step: same loss, same ``.grad`` on encoders and objective parameters (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from losses import GradCache, NTXentLoss, ProxyAnchorLoss, TripletMarginLoss
from miners import BatchHardMiner

DIM_IN, DIM = 10, 6


class MLP(nn.Module):
    def __init__(self, dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        norm = nn.BatchNorm1d(16) if batch_norm else nn.Identity()
        self.net = nn.Sequential(nn.Linear(DIM_IN, 16), norm, nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, DIM))

    def forward(self, x):
        return self.net(x)


class BagOfTokens(nn.Module):
    """A text tower over tokenizer output: masked mean of token embeddings, then a projection."""

    def __init__(self, vocab: int = 30) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, 12)
        self.proj = nn.Linear(12, DIM)

    def forward(self, batch):
        mask = batch["attention_mask"].unsqueeze(-1).to(self.tokens.weight.dtype)
        pooled = (self.tokens(batch["input_ids"]) * mask).sum(1) / mask.sum(1).clamp_min(1)
        return self.proj(pooled)


class InBatchSoftmax(nn.Module):
    """Query -> document softmax over the in-batch documents with a learnable log-temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, q, d):
        logits = F.normalize(q, dim=1) @ F.normalize(d, dim=1).T * self.log_scale.exp()
        return F.cross_entropy(logits, torch.arange(len(q)))


def uncached(pairs, objective, chunk_size: int | None = None):
    """The reference step: every chunk (or the whole batch) embedded with graph, in order; one backward."""
    embeddings = []
    for encoder, inputs in pairs:
        n = len(inputs) if torch.is_tensor(inputs) else len(next(iter(inputs.values())))
        size = chunk_size or n
        if torch.is_tensor(inputs):
            chunks = inputs.split(size)
        else:
            parts = {k: v.split(size) for k, v in inputs.items()}
            chunks = [dict(zip(parts, vs)) for vs in zip(*parts.values())]
        embeddings.append(torch.cat([encoder(c) for c in chunks]))
    loss = objective(*embeddings)
    loss.backward()
    return loss.detach()


def twins(*modules):
    return [m.double() for m in modules], [copy.deepcopy(m).double() for m in modules]


def assert_same_grads(got: list[nn.Module], want: list[nn.Module]) -> None:
    for a, b in zip(got, want):
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        assert pa.keys() == pb.keys()
        for name in pa:
            assert pb[name].grad is not None and pb[name].grad.abs().sum() > 0, name
            torch.testing.assert_close(pa[name].grad, pb[name].grad, rtol=1e-5, atol=1e-12, msg=lambda m: f"{name}: {m}")


def labelled_batch(n: int = 24, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM_IN, generator=g, dtype=torch.float64), torch.arange(n) % classes


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 24, 100])
def test_single_encoder_triplet_batch_hard(chunk_size):
    (enc,), (ref,) = twins(MLP())
    x, labels = labelled_batch()
    loss_fn, miner = TripletMarginLoss(margin=0.5), BatchHardMiner()

    def objective(e):
        return loss_fn(e, labels, miner(e, labels))

    got = GradCache(chunk_size)([(enc, x)], objective)
    want = uncached([(ref, x)], objective)
    torch.testing.assert_close(got, want)
    assert not got.requires_grad
    assert_same_grads([enc], [ref])


def test_single_encoder_ntxent_two_views():
    """SimCLR-style: two views through one shared encoder, one loss over both."""
    (enc,), (ref,) = twins(MLP())
    x, labels = labelled_batch(16, classes=16)
    view2 = x + 0.1 * torch.randn_like(x)
    loss_fn = NTXentLoss(temperature=0.2)

    def objective(a, b):
        return loss_fn(torch.cat([a, b]), torch.cat([labels, labels]))

    got = GradCache(3)([(enc, x), (enc, view2)], objective)
    want = uncached([(ref, x), (ref, view2)], objective)
    torch.testing.assert_close(got, want)
    assert_same_grads([enc], [ref])


def test_query_doc_towers_with_learnable_temperature():
    (q_enc, d_enc, obj), (q_ref, d_ref, obj_ref) = twins(MLP(), MLP(), InBatchSoftmax())
    q, d = labelled_batch(20, seed=1)[0], labelled_batch(20, seed=2)[0]
    got = GradCache(6)([(q_enc, q), (d_enc, d)], obj)
    want = uncached([(q_ref, q), (d_ref, d)], obj_ref)
    torch.testing.assert_close(got, want)
    assert_same_grads([q_enc, d_enc, obj], [q_ref, d_ref, obj_ref])


def test_dict_inputs_shared_tower_uneven_chunks():
    (tower, obj), (tower_ref, obj_ref) = twins(BagOfTokens(), InBatchSoftmax())
    g = torch.Generator().manual_seed(3)

    def tokens(n, length):
        ids = torch.randint(1, 30, (n, length), generator=g)
        mask = (torch.arange(length) < torch.randint(1, length + 1, (n, 1), generator=g)).long()
        return {"input_ids": ids * mask, "attention_mask": mask}

    queries, docs = tokens(11, 5), tokens(11, 9)
    got = GradCache(4)([(tower, queries), (tower, docs)], obj)
    want = uncached([(tower_ref, queries), (tower_ref, docs)], obj_ref)
    torch.testing.assert_close(got, want)
    assert_same_grads([tower, obj], [tower_ref, obj_ref])


@pytest.mark.parametrize("chunk_size", [4, 7])
def test_dropout_replays_the_chunked_step(chunk_size):
    (enc, obj), (ref, obj_ref) = twins(MLP(dropout=0.5), InBatchSoftmax())
    q, d = labelled_batch(18, seed=4)[0], labelled_batch(18, seed=5)[0]
    with torch.no_grad():  # dropout is live: one input embedded twice differs
        assert not torch.equal(enc(q), enc(q))
    torch.manual_seed(123)
    got = GradCache(chunk_size)([(enc, q), (enc, d)], obj)
    after_cached = torch.get_rng_state()
    torch.manual_seed(123)
    want = uncached([(ref, q), (ref, d)], obj_ref, chunk_size=chunk_size)
    torch.testing.assert_close(got, want)
    assert_same_grads([enc, obj], [ref, obj_ref])
    assert torch.equal(after_cached, torch.get_rng_state()), "the step must consume the RNG as the uncached step does"


def test_batch_norm_running_stats_updated_once_per_chunk():
    (enc,), (ref,) = twins(MLP(batch_norm=True))
    x, labels = labelled_batch(20)
    loss_fn = NTXentLoss(temperature=0.5)

    def objective(e):
        return loss_fn(e, labels)

    got = GradCache(8)([(enc, x)], objective)
    want = uncached([(ref, x)], objective, chunk_size=8)
    torch.testing.assert_close(got, want)
    assert_same_grads([enc], [ref])
    for (name, a), (_, b) in zip(enc.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=lambda m: f"{name}: {m}")
    assert int(enc.net[1].num_batches_tracked) == 3


def test_objective_parameters_proxy_anchor():
    (enc, loss_fn), (ref, loss_ref) = twins(MLP(), ProxyAnchorLoss(5, DIM, margin=0.1, alpha=8.0))
    x, labels = labelled_batch(22, classes=4)
    got = GradCache(6)([(enc, x)], lambda e: loss_fn(e, labels))
    want = uncached([(ref, x)], lambda e: loss_ref(e, labels))
    torch.testing.assert_close(got, want)
    assert_same_grads([enc, loss_fn], [ref, loss_ref])


def test_grad_scaler_scales_every_gradient_once():
    (enc, obj), (ref, obj_ref) = twins(MLP(), InBatchSoftmax())
    q, d = labelled_batch(12, seed=6)[0], labelled_batch(12, seed=7)[0]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    got = GradCache(5, scaler=scaler)([(enc, q), (enc, d)], obj)
    want = uncached([(ref, q), (ref, d)], obj_ref)
    torch.testing.assert_close(got, want)  # the returned loss is unscaled
    for p in list(ref.parameters()) + list(obj_ref.parameters()):
        p.grad *= 1024.0
    assert_same_grads([enc, obj], [ref, obj_ref])


def test_pair_the_objective_ignores_gets_no_gradient():
    (a, b), _ = twins(MLP(), MLP())
    x = labelled_batch(8)[0]
    GradCache(3)([(a, x), (b, x)], lambda ea, eb: ea.pow(2).sum())
    assert all(p.grad is not None for p in a.parameters())
    assert all(p.grad is None for p in b.parameters())


def test_frozen_tower_is_not_re_embedded():
    (q_enc, d_enc, obj), (q_ref, d_ref, obj_ref) = twins(MLP(), MLP(), InBatchSoftmax())
    for m in (d_enc, d_ref):
        m.requires_grad_(False)
    q, d = labelled_batch(10, seed=8)[0], labelled_batch(10, seed=9)[0]
    got = GradCache(4)([(q_enc, q), (d_enc, d)], obj)
    want = uncached([(q_ref, q), (d_ref, d)], obj_ref)
    torch.testing.assert_close(got, want)
    assert_same_grads([q_enc, obj], [q_ref, obj_ref])


def test_frozen_batch_norm_tower_still_updates_running_stats_once():
    (q_enc, d_enc, obj), (q_ref, d_ref, obj_ref) = twins(MLP(), MLP(batch_norm=True), InBatchSoftmax())
    for m in (d_enc, d_ref):
        m.requires_grad_(False)
    q, d = labelled_batch(10, seed=8)[0], labelled_batch(10, seed=9)[0]
    GradCache(4)([(q_enc, q), (d_enc, d)], obj)
    uncached([(q_ref, q), (d_ref, d)], obj_ref, chunk_size=4)
    for (name, a), (_, b) in zip(d_enc.named_buffers(), d_ref.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, msg=lambda m: f"{name}: {m}")
    assert int(d_enc.net[1].num_batches_tracked) == 3


def test_errors_name_what_is_wrong():
    enc = MLP().double()
    x = labelled_batch(8)[0]
    with pytest.raises(ValueError, match="chunk_size"):
        GradCache(0)
    with pytest.raises(ValueError, match="common"):
        GradCache(3)([(enc, {"a": x, "b": x[:5]})], lambda e: e.sum())
    with pytest.raises(ValueError, match="scalar"):
        GradCache(3)([(enc, x)], lambda e: e.sum(0))
    with pytest.raises(ValueError, match="empty"):
        GradCache(3)([], lambda: None)


# DDP: two gloo processes, DDP-wrapped encoder, the objective gathers the global batch with gradient.

def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from contracts.gather import all_gather_with_grad
    from tests.helpers import gloo_group

    torch.set_num_threads(1)
    with gloo_group(rank, world, init_file):
        torch.manual_seed(0)
        model = DistributedDataParallel(MLP().double())
        calls = []

        def counting_hook(state, bucket):
            calls.append(1)
            return allreduce_hook(state, bucket)

        model.register_comm_hook(None, counting_hook)
        x, labels = labelled_batch(24, classes=6)
        local = x.chunk(world)[rank]
        loss_fn = NTXentLoss(temperature=0.3)
        loss = GradCache(5)([(model, local)], lambda e: loss_fn(all_gather_with_grad(e), labels))
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        torch.save({"loss": loss, "grads": grads, "calls": len(calls)}, f"{out}.{rank}")
        del model  # DDP's reducer holds the group: free it before the group is torn down


@pytest.mark.slow
def test_ddp_syncs_once_and_equals_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    torch.manual_seed(0)
    ref = MLP().double()
    x, labels = labelled_batch(24, classes=6)
    loss_fn = NTXentLoss(temperature=0.3)
    want = uncached([(ref, x)], lambda e: loss_fn(e, labels))
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got["calls"] == 1, "one all-reduce per bucket per step: every chunk but the last under no_sync()"
        torch.testing.assert_close(got["loss"], want)
        for name, p in ref.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-12, msg=lambda m: f"{name}: {m}")
