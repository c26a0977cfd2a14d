"""``DualEncoderModule`` with ``losses.SigLIPLoss`` (Zhai et al., "Sigmoid Loss for Language Image
Pre-Training", ICCV 2023, Eq. 1): the module's logit bias reaches the loss.

One training step (a real ``Trainer`` fit, lr 0) is compared in value and in every parameter's
gradient (both towers, the logit scale, the bias) with open_clip 3.3's ``SigLipLoss`` on the same
embeddings, scale and bias (a batch without hard negatives, one positive per query), and with a
brute-force loop over ``(query, reference)`` pairs that reads relevance from the ids (a batch with
hard negatives, empty slots, a document relevant to two queries and a known positive drawn as
another query's hard negative). Then: the bias is learned with ``learn_temperature`` (it moves, the
scale is clamped as before) and fixed otherwise, and the errors name what is wrong. Under DDP (2 gloo
processes, ``gather="local"``) a step equals one process on the global batch.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.dual_encoder_module import DualEncoderModule, tokens
from losses import CLIPLoss, NTXentLoss, SigLIPLoss
from tests.datamodules.test_query_doc import TRAIN_QRELS, TinyQueryDoc
from tests.helpers import oracle, sgd, sgd0
from tests.lightning_modules.test_dual_encoder_module import CharBagEncoder, datamodule, fit_one_step
from tests.lightning_modules.test_guide_teacher_ddp import assert_ddp_equals_one_process

open_clip_loss = oracle("open_clip.loss")

# the first batch (seed 3) holds train queries 6, 7, 2, 1: query 1 also finds document 9 (query 6's
# positive) relevant, and query 2's document 13 is one of query 7's hard negatives
SHARED_QRELS = [list(r) for r in TRAIN_QRELS]
SHARED_QRELS[1], SHARED_QRELS[2] = [1, 2, 9], [3, 13]


class Keep(L.Callback):
    """The first step's batch, outputs, logged values and parameter gradients."""

    def __init__(self) -> None:
        self.batch, self.outputs, self.grads, self.logged = None, None, {}, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch, self.outputs = batch, outputs
        self.logged = {k: float(v) for k, v in trainer.callback_metrics.items()}


def siglip_module(**kwargs) -> DualEncoderModule:
    torch.manual_seed(0)
    kwargs = {"temperature": 0.2, "logit_bias": -3.0, "learn_temperature": True, "optimizer": sgd0, **kwargs}
    return DualEncoderModule(CharBagEncoder(0), SigLIPLoss(), doc_encoder=CharBagEncoder(1), **kwargs)


def reference_grads(module: DualEncoderModule, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    """``loss_fn(module)`` and the gradient of every parameter, computed outside the step."""
    module.zero_grad(set_to_none=True)
    loss = loss_fn(module)
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_step_equals(keep: Keep, loss: float, grads: dict[str, torch.Tensor]) -> None:
    assert keep.outputs["loss"].item() == pytest.approx(loss, rel=1e-5)
    assert keep.grads.keys() == grads.keys() and {"logit_scale", "logit_bias"} <= grads.keys()
    for name, expected in grads.items():
        assert expected.abs().sum() > 0, f"{name} has a zero reference gradient: the comparison would prove nothing"
        torch.testing.assert_close(keep.grads[name], expected, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_one_step_equals_open_clip_siglip():
    module, keep = siglip_module(), Keep()
    fit_one_step(module, TinyQueryDoc(batch_size=4, num_negatives=0, num_workers=0, num_batches=1, seed=3), callbacks=[keep])
    batch = keep.batch
    assert "neg_input_ids" not in batch and len(set(batch["doc_idx"].tolist())) == 4  # one positive per query: the diagonal

    def open_clip_siglip(m):
        q, d = m.query_encoder(tokens(batch, "query_")), m.doc_encoder(tokens(batch, "doc_"))
        return open_clip_loss.SigLipLoss()(q, d, m.logit_scale.exp(), m.logit_bias)

    assert_step_equals(keep, *reference_grads(module, open_clip_siglip))
    assert keep.logged["train/logit_bias"] == pytest.approx(-3.0)


def brute_siglip(q, refs, ref_ids, positives, scale, bias):
    """Eq. 1 one pair at a time: ``z = +1`` when the reference's id is a positive of the query, an empty slot (-1) skipped."""
    total = q.new_zeros(())
    for i in range(len(q)):
        for j in range(len(refs)):
            if ref_ids[j] < 0:
                continue
            z = 1.0 if ref_ids[j] in positives[i] else -1.0
            total = total - F.logsigmoid(z * (scale * (q[i] @ refs[j]) + bias))
    return total / len(q)


def test_hard_negatives_and_shared_positives_equal_a_brute_force_loop():
    module, keep = siglip_module(), Keep()
    fit_one_step(module, datamodule(train_qrels=SHARED_QRELS), callbacks=[keep])
    batch = keep.batch
    ref_ids = batch["doc_idx"].tolist() + batch["neg_idx"].reshape(-1).tolist()
    positives = [{p for p in row if p >= 0} for row in batch["pos_idx"].tolist()]
    # what the comparison must cover: empty slots, a query with two positives among the documents, a positive among the hard negatives
    k = batch["neg_idx"].shape[1]
    assert -1 in ref_ids
    assert any(sum(r in positives[i] for r in batch["doc_idx"].tolist()) > 1 for i in range(len(positives)))
    assert any(r in positives[i] for i in range(len(positives)) for j, r in enumerate(batch["neg_idx"].reshape(-1).tolist()) if j // k != i)

    def brute(m):
        q, d, n = (enc(tokens(batch, f"{f}_")) for enc, f in ((m.query_encoder, "query"), (m.doc_encoder, "doc"), (m.doc_encoder, "neg")))
        return brute_siglip(q, torch.cat([d, n]), ref_ids, positives, m.logit_scale.exp(), m.logit_bias)

    assert_step_equals(keep, *reference_grads(module, brute))


def test_learned_bias_moves_and_the_scale_is_clamped():
    module = siglip_module(temperature=0.001, logit_bias=-10.0, optimizer=sgd)
    assert isinstance(module.logit_bias, nn.Parameter) and module.logit_scale.item() > math.log(100)
    fit_one_step(module, datamodule())
    assert module.logit_bias.item() != pytest.approx(-10.0, abs=1e-6), "the learned bias did not move"
    assert module.logit_scale.item() <= math.log(100) + 1e-6

    fixed = siglip_module(logit_bias=-10.0, learn_temperature=False, optimizer=sgd)
    assert not isinstance(fixed.logit_bias, nn.Parameter) and "logit_bias" in dict(fixed.named_buffers())
    assert all("logit" not in n for n, _ in fixed.named_parameters())
    fit_one_step(fixed, datamodule())
    assert fixed.logit_bias.item() == -10.0 and "logit_bias" in fixed.state_dict()

    plain = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False))
    assert plain.logit_bias is None and "logit_bias" not in plain.state_dict()


def test_a_bias_leaves_a_softmax_loss_unchanged():
    """``CLIPLoss`` takes a bias (open_clip's ``ClipLoss`` does), but a softmax is shift-invariant."""
    dm = datamodule(data_config=CharBagEncoder().data_config)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    losses = []
    for bias in (None, 5.0):
        torch.manual_seed(0)
        module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=True), logit_bias=bias)
        losses.append(module.run_step(module.embed(batch))["loss"].item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


class NoBiasLoss(nn.Module):
    two_view = True

    def directional(self, query_emb, ref_emb, logit_scale, *, pos_mask=None, ignore_mask=None):
        return (query_emb @ ref_emb.T).mean() * logit_scale


def test_errors_name_the_bias():
    with pytest.raises(ValueError, match="SigLIPLoss needs a logit bias"):
        DualEncoderModule(CharBagEncoder(), SigLIPLoss())
    with pytest.raises(ValueError, match="NTXentLoss scores pairs with its own settings and takes no bias"):
        DualEncoderModule(CharBagEncoder(), NTXentLoss(), logit_bias=-10.0)
    with pytest.raises(ValueError, match="NoBiasLoss.directional takes no logit_bias"):
        DualEncoderModule(CharBagEncoder(), NoBiasLoss(), logit_bias=-10.0)
    DualEncoderModule(CharBagEncoder(), SigLIPLoss(), logit_bias=0.0)  # an explicit zero bias is a bias


def siglip_local() -> DualEncoderModule:
    return siglip_module(gather="local")


@pytest.mark.slow
def test_ddp_local_gather_equals_one_process(tmp_path):
    """2 gloo processes, each scoring its queries against every rank's documents and hard negatives
    (``gather="local"``), equal one process on the global batch: SigLIP is a mean of per-query sums."""
    single, _ = assert_ddp_equals_one_process(tmp_path, "siglip-local", siglip_local)
    assert {"logit_scale", "logit_bias"} <= torch.load(f"{single}.rank0").keys()
