"""MoCoModule: MoCo's InfoNCE against the queue (equal to the paper's logits form), MoCHi on top, a
short real training run on digits, and the ImageNet-100 MoCHi recipe on a miniature image folder."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules import DigitsDataModule
from datamodules.two_view_datamodule import TwoViewDataModule
from lightning_modules.moco_module import MoCoModule
from miners import MoCHi
from tests.datamodules.miniature import write_jpeg
from tests.helpers import TinyEncoder, run_cli

ROOT = Path(__file__).resolve().parents[2]


def moco_loss(module: MoCoModule, q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss of MoCo's shared step for queries ``q`` and keys ``k`` against the current queue."""
    return module.step(**module.step_inputs(q, k, labels))["loss"]


def unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def module_with_queue(mixer=None, supervised=False, seed=0):
    module = MoCoModule(TinyEncoder(embed_dim=8), queue_size=40, mixer=mixer, supervised=supervised).double()
    queue, queue_labels = unit(24, 8, seed=seed), torch.arange(24) % 4
    module.queue.enqueue(queue, queue_labels)
    return module, queue, queue_labels


@pytest.mark.parametrize("seed", range(3))
def test_loss_equals_plain_infonce_against_the_queue_without_synthetic_points(seed):
    q, k, labels = unit(6, 8, seed=seed + 1), unit(6, 8, seed=seed + 2), torch.arange(6) % 4
    expected = None
    for mixer in (None, MoCHi(n_hard=8, s=0, s_prime=0)):
        module, queue, _ = module_with_queue(mixer, seed=seed)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.2
        expected = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
        torch.testing.assert_close(moco_loss(module, q, k, labels), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("supervised", [False, True])
def test_mochi_logits_join_the_denominator(supervised):
    q, k, labels = unit(6, 8, seed=1), unit(6, 8, seed=2), torch.arange(6) % 4
    mochi = MoCHi(n_hard=8, s=5, s_prime=3)
    module, queue, queue_labels = module_with_queue(mochi, supervised=supervised)
    torch.manual_seed(7)
    got = moco_loss(module, q, k, labels)
    torch.manual_seed(7)
    spec = mochi.mix_spec(q, queue, labels if supervised else None, queue_labels if supervised else None)
    h = spec.materialize(q, queue)
    neg = q @ queue.T
    if supervised:  # same-label queue entries are not negatives
        neg = neg.masked_fill(labels.unsqueeze(1) == queue_labels.unsqueeze(0), float("-inf"))
    synth = torch.full((6, len(spec)), float("-inf"), dtype=torch.float64)
    synth[spec.anchors, torch.arange(len(spec))] = (q[spec.anchors] * h).sum(1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), neg, synth], dim=1) / 0.2
    torch.testing.assert_close(got, F.cross_entropy(logits, torch.zeros(6, dtype=torch.long)), rtol=1e-12, atol=1e-12)


def test_training_on_digits_fills_the_queue_and_moves_the_key_encoder(tmp_path):
    L.seed_everything(0)
    module = MoCoModule(TinyEncoder(embed_dim=8), queue_size=64, momentum=0.9, mixer=MoCHi(n_hard=16, s=8, s_prime=4, warmup_epochs=1))
    data = TwoViewDataModule(DigitsDataModule(num_workers=0, eval_batch_size=256), batch_size=16)
    trainer = L.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    start = [p.detach().clone() for p in module.key_encoder.parameters()]
    trainer.fit(module, datamodule=data)
    assert len(module.queue) == 64 and module.mixer.epoch == 1
    moved = [not torch.equal(a, b) for a, b in zip(start, module.key_encoder.parameters())]
    assert all(moved)
    assert all(not p.requires_grad for p in module.key_encoder.parameters())
    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    assert 0 < metrics["test/recall@1"] <= 1


def test_single_view_batches_are_rejected():
    module = MoCoModule(TinyEncoder(embed_dim=8), queue_size=16)
    with pytest.raises(ValueError, match="expected two views per image"):
        module.training_step({"image": torch.randn(4, 3, 8, 8), "label": torch.arange(4)}, 0)


def test_mochi_recipe_on_a_miniature_image_folder(tmp_path, monkeypatch):
    for split, per_class in (("train", 6), ("val", 3)):
        for c in range(3):
            for i in range(per_class):
                write_jpeg(tmp_path / "data" / split / f"n0{c}" / f"{i}.JPEG", seed=100 * c + i)
    monkeypatch.chdir(tmp_path)
    argv = [
        "fit", "--config", str(ROOT / "experiments" / "recipes" / "moco" / "mochi_imagenet100.yaml"),
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.fast_dev_run=2", "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.enable_checkpointing=false",
        "--model.init_args.encoder.init_args.model_name=test_resnet", "--model.init_args.encoder.init_args.img_size=32",
        "--model.init_args.queue_size=64", "--model.init_args.mixer.init_args.warmup_epochs=0",
        "--model.init_args.mixer.init_args.n_hard=4", "--data.init_args.batch_size=4",
        f"--data.init_args.datamodule.init_args.root={tmp_path / 'data'}", "--data.init_args.datamodule.init_args.num_workers=0",
        "--data.init_args.datamodule.init_args.eval_batch_size=16",
    ]
    trainer = run_cli(argv)
    assert trainer.global_step == 2  # fast_dev_run=2: both steps ran
