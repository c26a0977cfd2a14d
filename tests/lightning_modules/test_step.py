"""``EmbeddingStep``: the shared training step.

- Under DDP (2 gloo processes, ``torch.multiprocessing.spawn``, DDP's gradient averaging done by
  hand) both gather modes equal one process on the global batch in loss and parameter gradients,
  for one view with labels and for two views (image/text-like) with a ``pos_mask``.
- Relevance: labels and the equivalent masks give the same loss; local mode on one process equals global.
- Mixed precision: the loss under bf16 autocast (CPU) matches float32; ``precision="bf16-mixed"`` trains on digits.
- Callbacks read the step's outputs.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_modules.step import EmbeddingStep
from losses import NTXentLoss, TripletMarginLoss
from miners import BatchHardMiner
from tests.helpers import gloo_group

B, D_IN, D = 8, 12, 6  # rows per rank, input and embedding width


def towers(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    return nn.Linear(D_IN, D), nn.Linear(D_IN, D)


def data(world: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * B, D_IN, generator=g)
    y = torch.randn(world * B, D_IN, generator=g)
    labels = torch.arange(world * B) // 2  # pairs of rows share a label, within a rank
    return x, y, labels


def step_for(case: str, gather: str) -> EmbeddingStep:
    if case == "triplet":
        return EmbeddingStep(TripletMarginLoss(margin=0.2), BatchHardMiner(), gather=gather)
    return EmbeddingStep(NTXentLoss(temperature=0.1), gather=gather)


def compute(case: str, gather: str, x, y, labels, rank: int = 0, world: int = 1):
    """Loss and gradients of both towers for this rank's rows (all rows on one process)."""
    f, g = towers()
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    step = step_for(case, gather)
    if case == "two_view":  # image/text: each row's positive is the other view of the same row
        n = len(x[rows])
        out = step(f(x[rows]), g(y[rows]), pos_mask=torch.eye(n, dtype=torch.bool))
    else:
        out = step(f(x[rows]), labels=labels[rows])
    out["loss"].backward()
    grads = [p.grad.clone() for p in (*f.parameters(), *g.parameters()) if p.grad is not None]
    if world > 1:  # what DDP does: average the parameter gradients over ranks
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world
    return out["loss"].detach(), grads


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    with gloo_group(rank, world, init_file):
        x, y, labels = data(world)
        results = {}
        for case, gather in CASES:
            results[(case, gather)] = compute(case, gather, x, y, labels, rank, world)
        torch.save(results, f"{out}.rank{rank}")  # a file: tensors in a queue die with the process


CASES = [("ntxent", "global"), ("ntxent", "local"), ("two_view", "global"), ("two_view", "local"), ("triplet", "global")]


@pytest.mark.slow
def test_both_gather_modes_equal_one_process_on_the_global_batch(tmp_path):
    out = str(tmp_path / "step")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    got = {rank: torch.load(f"{out}.rank{rank}") for rank in (0, 1)}
    x, y, labels = data(2)
    for case, gather in CASES:
        ref_loss, ref_grads = compute(case, "global", x, y, labels)
        assert ref_loss > 0
        for rank in (0, 1):
            loss, grads = got[rank][(case, gather)]
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7, msg=lambda m: f"{case}/{gather} loss: {m}")
            assert len(grads) == len(ref_grads)
            for a, b in zip(grads, ref_grads):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{case}/{gather} grad: {m}")


# ---------------------------------------------------------------------------------- one process
def test_local_mode_on_one_process_equals_global():
    x, y, labels = data(1)
    for case in ("ntxent", "two_view", "triplet"):
        a, ga = compute(case, "global", x, y, labels)
        b, gb = compute(case, "local", x, y, labels)
        torch.testing.assert_close(a, b)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v)


@pytest.mark.parametrize("miner", [None, BatchHardMiner()])
def test_labels_equal_the_masks_they_mean(miner):
    """One view with labels (the plain path) equals the same rows as query and reference with the
    label mask and the row itself ignored (the general path)."""
    x, _, labels = data(1)
    emb = torch.nn.functional.normalize(x[:, :D], dim=1)
    loss = TripletMarginLoss(margin=0.2)
    plain = EmbeddingStep(loss, miner)(emb, labels=labels)
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    eye = torch.eye(len(emb), dtype=torch.bool)
    masked = EmbeddingStep(loss, miner)(emb, emb.clone(), pos_mask=same, ignore_mask=eye)
    torch.testing.assert_close(plain["loss"], masked["loss"])
    assert masked["pos_mask"].shape == (len(emb), len(emb)) and masked["mined"] is not None


def test_outputs_are_detached_float32_and_name_what_the_loss_saw():
    x, y, labels = data(1)
    f, g = towers()
    out = EmbeddingStep(NTXentLoss())(f(x), g(y), pos_mask=torch.eye(len(x), dtype=torch.bool))
    assert out["loss"].requires_grad and not out["emb"].requires_grad and not out["ref_emb"].requires_grad
    assert out["emb"].dtype == torch.float32 and out["ref_emb"].shape == (len(y), D)
    assert set(out) >= {"loss", "emb", "labels", "ref_emb", "ref_labels", "pos_mask", "ignore_mask", "mined", "mix_loss"}


def test_relevance_is_required_and_shapes_are_checked():
    step = EmbeddingStep(NTXentLoss())
    with pytest.raises(ValueError, match="give labels or a pos_mask"):
        step(torch.randn(4, D))
    with pytest.raises(ValueError, match="pos_mask has shape"):
        step(torch.randn(4, D), torch.randn(5, D), pos_mask=torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="gather="):
        EmbeddingStep(NTXentLoss(), gather="everywhere")


# ------------------------------------------------------------------------------ mixed precision
#: bf16 keeps 8 bits of mantissa: embeddings round at ~4e-3 relative; the fp32 loss on them moves
#: by about that much. Measured here: relative differences 1.4e-3 (NT-Xent), 1.6e-4 (two views),
#: 6.6e-4 (batch-hard triplets).
BF16_RTOL = 1e-2


@pytest.mark.parametrize("case", ["ntxent", "two_view", "triplet"])
def test_loss_under_bf16_autocast_matches_float32(case):
    x, y, labels = data(1)
    ref, _ = compute(case, "global", x, y, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f, g = towers()
        emb, ref_emb = f(x), g(y)
        assert emb.dtype == torch.bfloat16  # the encoders ran in bf16
        step = step_for(case, "global")
        out = step(emb, ref_emb, pos_mask=torch.eye(len(x), dtype=torch.bool)) if case == "two_view" else step(emb, labels=labels)
    assert out["loss"].dtype == torch.float32 and out["emb"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], ref, rtol=BF16_RTOL, atol=1e-3)


@pytest.mark.slow
def test_bf16_mixed_trains_on_digits_end_to_end(tmp_path):
    from datamodules import DigitsDataModule
    from experiments.callbacks import DivergenceMonitor, HardnessMonitor
    from lightning_modules.metric_learning_module import MetricLearningModule
    from tests.helpers import TinyEncoder

    L.seed_everything(0)
    module = MetricLearningModule(TinyEncoder(), TripletMarginLoss(margin=0.2), BatchHardMiner())
    data = DigitsDataModule(classes_per_batch=4, samples_per_class=4, num_batches=3, num_workers=0, eval_batch_size=128)
    hardness = HardnessMonitor()
    trainer = L.Trainer(max_epochs=1, precision="bf16-mixed", accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[hardness, DivergenceMonitor()])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert len(hardness.steps) == 3 and hardness.steps[0]["an"]["n"] > 0
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    assert 0 < metrics["test/recall@1"] <= 1
