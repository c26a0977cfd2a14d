"""Under DDP (gloo, 2 CPU processes) a training step equals one process on the concatenated batch,
in both gather modes of the shared step ("global": every rank computes the global loss; "local":
this rank's rows against the global batch)."""

import os

import lightning as L
import pytest
import torch

from datamodules import DigitsDataModule
from lightning_modules.metric_learning_module import MetricLearningModule
from losses import NTXentLoss, TripletMarginLoss
from miners import BatchHardMiner
from tests.helpers import TinyEncoder


class GradientRecorder(L.Callback):
    """Saves the loss and the (DDP-averaged) parameter gradients of the first step to ``out``."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.loss = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss = outputs["loss"].detach().clone()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "batch_sizes": None}, f"{self.out}.rank{trainer.global_rank}.grads")

    def on_train_end(self, trainer, pl_module):
        torch.save(self.loss, f"{self.out}.rank{trainer.global_rank}.loss")


def sgd0(params):
    return torch.optim.SGD(params, lr=0.0)


def make_module(gather: str) -> MetricLearningModule:
    if gather == "local":  # a mean over rows with the same number of terms per row: exact in local mode
        return MetricLearningModule(TinyEncoder(), NTXentLoss(temperature=0.1), optimizer=sgd0, gather="local")
    return MetricLearningModule(TinyEncoder(), TripletMarginLoss(margin=0.2), BatchHardMiner(), optimizer=sgd0, gather="global")


def run(tmp_path, devices: int, classes_per_batch: int, gather: str = "global") -> str:
    torch.manual_seed(0)
    module = make_module(gather)
    data = DigitsDataModule(classes_per_batch=classes_per_batch, samples_per_class=4, num_batches=1, num_workers=0, augment=False, seed=7)
    out = str(tmp_path / f"{gather}{devices}")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[GradientRecorder(out)],
    )
    trainer.fit(module, datamodule=data)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("gather", ["global", "local"])
def test_ddp_gradients_equal_single_process_on_global_batch(tmp_path, gather):
    single = run(tmp_path, devices=1, classes_per_batch=4, gather=gather)
    ddp = run(tmp_path, devices=2, classes_per_batch=2, gather=gather)
    ref_grads = torch.load(f"{single}.rank0.grads")["grads"]
    ref_loss = torch.load(f"{single}.rank0.loss")
    assert ref_loss > 0
    for rank in (0, 1):
        loss = torch.load(f"{ddp}.rank{rank}.loss")
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
        grads = torch.load(f"{ddp}.rank{rank}.grads")["grads"]
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            assert g.abs().sum() > 0, name
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
