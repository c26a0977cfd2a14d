"""``DualEncoderModule`` with a GISTEmbed guide and a distillation teacher: the guide's mask reaches
the step (equal to a brute-force mask over the batch's raw texts), the distillation term is added and
logged, and the raw texts arrive in the batch (``TextInputs(keep_text=True)``)."""

import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from contracts.relevance import id_masks
from lightning_modules.dual_encoder_module import DualEncoderModule
from losses import CLIPLoss, NTXentLoss
from losses.distillation import KLDistillationLoss, MarginMSELoss, candidate_scores
from miners.guided_filter import GuidedFilter
from models.scorers import BiEncoderScorer
from tests.datamodules.test_query_doc import char_tokenizer
from tests.lightning_modules.test_dual_encoder_module import CharBagEncoder, datamodule, fit_one_step, sgd, sgd0


class CharGuide(CharBagEncoder):
    """The tiny tower with ``encode(texts)`` (a guide/teacher with its own "tokenizer")."""

    def encode(self, texts, batch_size=64):
        with torch.no_grad():
            return self(char_tokenizer(list(texts), 48))


class Keep(L.Callback):
    def __init__(self):
        self.outputs, self.batch, self.logged = None, None, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs, self.batch = outputs, batch
        self.logged = {k: float(v) for k, v in trainer.callback_metrics.items()}


def brute_guide_mask(guide, batch, margin):
    q = F.normalize(guide.encode(batch["query_text"]), dim=-1)
    c = F.normalize(torch.cat([guide.encode(batch["doc_text"]), guide.encode(batch["neg_text"])]), dim=-1)
    ref_ids = torch.cat([batch["doc_idx"], batch["neg_idx"].reshape(-1)])
    pos, ign = id_masks(batch["pos_idx"], ref_ids)
    out = torch.zeros_like(pos)
    for i in range(len(q)):
        sp = float(q[i] @ c[i])
        for j in range(len(c)):
            out[i, j] = float(q[i] @ c[j]) > sp - margin and j != i and not pos[i, j] and not ign[i, j]
    return pos, ign, out


@pytest.mark.parametrize("gather,loss", [("none", CLIPLoss(symmetric=False)), ("global", NTXentLoss(temperature=0.05))], ids=["none-infonce", "global-ntxent"])
def test_guide_mask_reaches_the_step(gather, loss):
    guide = CharGuide(seed=5)
    module = DualEncoderModule(CharBagEncoder(), loss, optimizer=sgd, gather=gather, guide=GuidedFilter(guide, margin=0.05))
    keep = Keep()
    fit_one_step(module, datamodule(batch_size=4), callbacks=[keep])
    batch = keep.batch
    assert {"query_text", "doc_text", "neg_text"} <= set(batch) and len(batch["neg_text"]) == 8
    pos, ign, expected = brute_guide_mask(guide, batch, 0.05)
    assert torch.equal(keep.outputs["ignore_mask"], ign | expected)
    fraction = expected.sum().item() / (~pos & ~ign).sum().item()
    assert keep.logged["train/guide_masked"] == pytest.approx(fraction)
    assert 0 < fraction < 1  # the test can fail: some, not all, candidates are masked


def test_a_guide_that_masks_everything_but_the_positive_changes_the_loss():
    def loss_with(guide):
        torch.manual_seed(0)
        module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd0, guide=guide)
        keep = Keep()
        fit_one_step(module, datamodule(), callbacks=[keep])
        return keep.outputs["loss"].item(), keep
    plain, _ = loss_with(None)
    masked, _ = loss_with(GuidedFilter(CharGuide(), margin=10.0))  # every candidate is within 10 of the positive
    assert masked == pytest.approx(0.0, abs=1e-6) and plain > 0.1  # only the positive is left in every softmax


@pytest.mark.parametrize("dloss", [KLDistillationLoss(symmetric=True), MarginMSELoss(similarity="cosine")], ids=["kl", "margin_mse"])
def test_distillation_with_a_bi_encoder_teacher(dloss):
    teacher_enc = CharGuide(seed=7)
    module = DualEncoderModule(
        CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd0, teacher=BiEncoderScorer(teacher_enc), distillation_loss=dloss, distillation_weight=0.5
    )
    keep = Keep()
    before = [p.detach().clone() for p in module.query_encoder.parameters()]
    fit_one_step(module, datamodule(), callbacks=[keep])
    batch, out = keep.batch, keep.outputs
    # the expected term, recomputed from the encoder (lr 0: unchanged) and the teacher
    enc = module.query_encoder
    with torch.no_grad():
        q, d, n = (enc(char_tokenizer(batch[f"{f}_text"], 48)) for f in ("query", "doc", "neg"))
        student = candidate_scores(q, d, n, similarity=dloss.similarity)
        k = batch["neg_idx"].shape[1]
        teacher = BiEncoderScorer(teacher_enc).score(batch["query_text"], [[t, *batch["neg_text"][i * k:(i + 1) * k]] for i, t in enumerate(batch["doc_text"])])
        expected = dloss(student, teacher, torch.cat([batch["doc_idx"].view(-1, 1), batch["neg_idx"]], 1) >= 0)
    assert out["distill_loss"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert keep.logged["train/distill_loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert torch.isfinite(out["loss"]) and all(torch.equal(a, b) for a, b in zip(before, module.query_encoder.parameters()))
    assert not any(p.requires_grad for p in teacher_enc.parameters())


def test_distillation_step_trains_and_errors_are_clear():
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd, teacher=BiEncoderScorer(CharGuide(3)), distillation_loss=MarginMSELoss())
    before = [p.detach().clone() for p in module.query_encoder.parameters()]
    fit_one_step(module, datamodule())
    assert any(not torch.equal(a, b) for a, b in zip(before, module.query_encoder.parameters()))
    with pytest.raises(ValueError, match="go together"):
        DualEncoderModule(CharBagEncoder(), CLIPLoss(), teacher=BiEncoderScorer(CharGuide()))
    with pytest.raises(TypeError, match="GuidedFilter"):
        DualEncoderModule(CharBagEncoder(), CLIPLoss(), guide=torch.nn.Linear(2, 2))
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(), guide=GuidedFilter(CharGuide()))
    module.step.gather = "none"
    with pytest.raises(KeyError, match="keep_text"):
        module.batch_extras({"query_idx": torch.zeros(2, dtype=torch.long)})
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(), teacher=BiEncoderScorer(CharGuide()), distillation_loss=MarginMSELoss())
    with pytest.raises(ValueError, match="num_negatives > 0"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0).fit(module, datamodule=datamodule_without_negatives())


def datamodule_without_negatives():
    from tests.datamodules.test_query_doc import TinyQueryDoc

    return TinyQueryDoc(batch_size=4, num_negatives=0, num_workers=0, num_batches=1, seed=3)
