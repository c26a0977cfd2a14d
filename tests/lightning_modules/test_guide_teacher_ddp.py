"""``DualEncoderModule`` with a guide or a teacher under DDP equals one process on the global batch.

The guide (``miners.GuidedFilter``, GISTEmbed: Solatorio, "GISTEmbed: Guided In-sample Selection of
Training Negatives for Text Embedding Fine-tuning", 2024, Sec. 3) must score every rank's queries
against every rank's candidates, in the order the step lays out its reference set; the teacher's
distillation term (``losses.distillation``: Hinton et al. 2015 KL on soft targets; Hofstätter et al.
2020 Margin-MSE, Eq. 1) must be the global batch's term, not a per-rank average of per-rank means.

Each test runs the first optimizer step (lr 0) on 2 gloo processes (``ddp_spawn`` through
``tests.helpers.cpu_trainer(devices=2)``, batch 2 per rank) and on one process (batch 4: the two
ranks' shards in rank order, as ``TinyQueryDoc``'s sampler cuts them), and compares every rank's
recorded loss and parameter gradients (``StepRecorder``) with the single process's. The guide and
the teacher are frozen ``CharBagEncoder`` towers, so no MiniLM is needed.
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.dual_encoder_module import DualEncoderModule
from losses import CLIPLoss, NTXentLoss
from losses.distillation import KLDistillationLoss, MarginMSELoss
from miners.guided_filter import GuidedFilter
from models.scorers import BiEncoderScorer
from tests.helpers import StepRecorder, sgd0
from tests.lightning_modules.test_dual_encoder_guide_teacher import CharGuide
from tests.lightning_modules.test_dual_encoder_module import CharBagEncoder, datamodule, fit_one_step

pytestmark = pytest.mark.slow


class GuideRecorder(StepRecorder):
    """``StepRecorder`` plus the step's ignored pairs, the guide's masked fraction and the batch's query ids (``<out>.guide<r>``)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        record = {"ignore": outputs["ignore_mask"].cpu(), "masked": float(outputs["guide_masked"]), "query_idx": batch["query_idx"].cpu()}
        torch.save(record, f"{self.out}.guide{trainer.global_rank}")


def guided(loss: str, gather: str) -> DualEncoderModule:
    criterion = CLIPLoss(symmetric=True) if loss == "infonce" else NTXentLoss(temperature=0.05)
    return DualEncoderModule(CharBagEncoder(), criterion, doc_encoder=CharBagEncoder(1), optimizer=sgd0, gather=gather,
                             guide=GuidedFilter(CharGuide(seed=5), margin=0.05))


def taught(distill: str, gather: str) -> DualEncoderModule:
    dloss = KLDistillationLoss(symmetric=True) if distill == "kl" else MarginMSELoss(similarity="cosine")
    return DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), doc_encoder=CharBagEncoder(1), optimizer=sgd0, gather=gather,
                             teacher=BiEncoderScorer(CharGuide(seed=7)), distillation_loss=dloss, distillation_weight=0.5)


def run(tmp_path, devices: int, name: str, build, *args, recorder: type = StepRecorder) -> str:
    torch.manual_seed(0)
    module = build(*args)
    out = str(tmp_path / f"{name}{devices}")
    fit_one_step(module, datamodule(batch_size=4 // devices), devices=devices, callbacks=[recorder(out)])
    return out


def assert_ddp_equals_one_process(tmp_path, name: str, build, *args, recorder: type = StepRecorder) -> tuple[str, str]:
    single, ddp = run(tmp_path, 1, name, build, *args, recorder=recorder), run(tmp_path, 2, name, build, *args, recorder=recorder)
    ref, ref_loss = torch.load(f"{single}.rank0"), torch.load(f"{single}.loss0")
    assert ref and all(g.abs().sum() > 0 for g in ref.values()), "the single-process step has zero gradients: the comparison would prove nothing"
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(f"{ddp}.loss{rank}"), ref_loss, rtol=1e-5, atol=1e-7, msg=lambda m, rank=rank: f"rank {rank} loss: {m}")
        grads = torch.load(f"{ddp}.rank{rank}")
        assert grads.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(grads[key], ref[key], rtol=1e-4, atol=1e-6, msg=lambda m, rank=rank, key=key: f"rank {rank} {key}: {m}")
    return single, ddp


@pytest.mark.parametrize("loss,gather", [("infonce", "local"), ("ntxent", "global")])
def test_guide_under_ddp_equals_one_process(tmp_path, loss, gather):
    single, ddp = assert_ddp_equals_one_process(tmp_path, f"guide-{loss}-{gather}", guided, loss, gather, recorder=GuideRecorder)
    ref = torch.load(f"{single}.guide0")
    assert 0 < ref["masked"] < 1, f"the guide masks {ref['masked']:.0%} of the candidates: the comparison needs some, not all"
    ranks = [torch.load(f"{ddp}.guide{rank}") for rank in (0, 1)]
    assert torch.equal(torch.cat([r["query_idx"] for r in ranks]), ref["query_idx"]), "the ranks' shards are not the global batch in rank order"
    for rank, got in enumerate(ranks):
        # "global": every rank scores the whole batch; "local": its own queries against every rank's candidates
        expected = ref["ignore"] if gather == "global" else ref["ignore"][2 * rank : 2 * rank + 2]
        assert torch.equal(got["ignore"], expected), f"rank {rank}: the guide's ignored pairs differ from one process's"
        if gather == "global":
            assert got["masked"] == pytest.approx(ref["masked"])


@pytest.mark.parametrize("distill", ["kl", "margin_mse"])
def test_teacher_under_ddp_equals_one_process(tmp_path, distill):
    assert_ddp_equals_one_process(tmp_path, f"teacher-{distill}", taught, distill, "global")
