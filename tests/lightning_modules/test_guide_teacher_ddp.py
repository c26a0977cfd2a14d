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
the bi-encoder teacher are frozen ``CharBagEncoder`` towers, so no MiniLM is needed.

The other two teachers of ``models.scorers`` go through the same comparison:

- ``FileScorer`` (precomputed ``{qid: {pid: score}}``, scored by ids): every rank must look its own
  shard's ids up in the file, mapped from batch rows to the file's ids by ``bind_ids`` at each rank's
  ``setup`` (the file's keys are ``q<row>``/``d<row>``, so a rank that scored raw rows would raise);
  each rank's scores are checked against a brute-force lookup and, in rank order, against the one
  process's.
- ``CrossEncoderScorer``: a tiny random ``BertForSequenceClassification`` saved to ``tmp_path`` with
  the packaged MiniLM WordPiece tokenizer (nothing downloaded), loaded back by folder, scoring each
  rank's raw texts.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from lightning_modules.dual_encoder_module import DualEncoderModule
from losses import CLIPLoss, NTXentLoss
from losses.distillation import KLDistillationLoss, MarginMSELoss
from miners.guided_filter import GuidedFilter
from models.scorers import BiEncoderScorer, CrossEncoderScorer, FileScorer
from tests.datamodules.test_query_doc import CORPUS, TRAIN_Q
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


class RecordingFileScorer(FileScorer):
    """A ``FileScorer`` that keeps its last answer: the teacher scores this rank's step used."""

    def score(self, queries, candidates):
        out = super().score(queries, candidates)
        self.last = {"queries": torch.as_tensor(queries).clone(), "candidates": torch.as_tensor(candidates).clone(), "scores": out.clone()}
        return out


class TeacherRecorder(StepRecorder):
    """``StepRecorder`` plus the distillation term and, for a ``RecordingFileScorer``, the scores looked up (``<out>.teacher<r>``)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        record = {"distill": outputs["distill_loss"].cpu(), **getattr(pl_module.teacher, "last", {})}
        torch.save(record, f"{self.out}.teacher{trainer.global_rank}")


def score_table() -> dict[str, dict[str, float]]:
    """Distinct scores for every (train query, document) pair, keyed by the DataModule's ids (``q<row>``, ``d<row>``)."""
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(len(TRAIN_Q), len(CORPUS), generator=g) * 3
    return {f"q{i}": {f"d{j}": float(scores[i, j]) for j in range(len(CORPUS))} for i in range(len(TRAIN_Q))}


def file_taught(path: Path) -> DualEncoderModule:
    return DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), doc_encoder=CharBagEncoder(1), optimizer=sgd0, gather="local",
                             teacher=RecordingFileScorer(path), distillation_loss=KLDistillationLoss(), distillation_weight=0.5)


def tiny_cross_encoder_folder(folder: Path) -> Path:
    """A random one-layer BERT cross-encoder (one logit) and the packaged MiniLM tokenizer, saved as a model folder."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from models.text_presets import minilm_l6_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_l6_path(check=False))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        num_labels=1, initializer_range=0.5)  # a wide init: scores that differ between candidates
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cross_taught(folder: Path) -> DualEncoderModule:
    return DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), doc_encoder=CharBagEncoder(1), optimizer=sgd0, gather="global",
                             teacher=CrossEncoderScorer(str(folder), max_length=32), distillation_loss=MarginMSELoss(), distillation_weight=0.5)


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


def assert_same_distillation_term(single: str, ddp: str) -> tuple[dict, list[dict]]:
    ref = torch.load(f"{single}.teacher0")
    ranks = [torch.load(f"{ddp}.teacher{rank}") for rank in (0, 1)]
    assert ref["distill"] > 0, "a zero distillation term: the comparison would prove nothing"
    for rank, got in enumerate(ranks):
        torch.testing.assert_close(got["distill"], ref["distill"], rtol=1e-5, atol=1e-7, msg=lambda m, rank=rank: f"rank {rank} distillation term: {m}")
    return ref, ranks


def test_file_teacher_under_ddp_equals_one_process(tmp_path):
    table = score_table()
    path = tmp_path / "scores.pkl"
    path.write_bytes(pickle.dumps(table))
    single, ddp = assert_ddp_equals_one_process(tmp_path, "file-teacher", file_taught, path, recorder=TeacherRecorder)
    ref, ranks = assert_same_distillation_term(single, ddp)
    for name, got in [("one process", ref), *((f"rank {r}", rec) for r, rec in enumerate(ranks))]:
        expected = torch.tensor([[table[f"q{q}"][f"d{c}"] if c >= 0 else float("nan") for c in row]
                                 for q, row in zip(got["queries"].tolist(), got["candidates"].tolist())])
        torch.testing.assert_close(got["scores"], expected, equal_nan=True, msg=lambda m, name=name: f"{name}: the teacher's scores are not the file's by ids: {m}")
    assert torch.equal(torch.cat([r["queries"] for r in ranks]), ref["queries"]), "the ranks' shards are not the global batch in rank order"
    torch.testing.assert_close(torch.cat([r["scores"] for r in ranks]), ref["scores"], equal_nan=True)
    assert ref["scores"].isnan().any() and not ref["scores"].isnan().all(), "the batch needs scored candidates and empty slots"


def test_cross_encoder_teacher_under_ddp_equals_one_process(tmp_path):
    folder = tiny_cross_encoder_folder(tmp_path / "cross-encoder")
    single, ddp = assert_ddp_equals_one_process(tmp_path, "cross-teacher", cross_taught, folder, recorder=TeacherRecorder)
    assert_same_distillation_term(single, ddp)
