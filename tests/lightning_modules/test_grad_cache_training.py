"""``grad_cache_chunk_size``: the cached training step (manual optimisation, encoder chunked through
``losses.GradCache``) equals the uncached one: gradients, loss, and what automatic optimisation does
around them (clipping, HeadWarmup, schedulers, callbacks' outputs, the NaN stop), on one process and
under DDP (2 gloo processes)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from experiments.callbacks import DivergenceError, DivergenceMonitor, HardnessMonitor, HeadWarmup
from lightning_modules.metric_learning_module import MetricLearningModule
from lightning_modules.moco_module import MoCoModule
from losses import Metrix, ProxyAnchorLoss, TripletMarginLoss
from miners import BatchHardMiner
from tests.helpers import TinyEncoder

CLASSES = 4


class Blobs(Dataset):
    """``n`` 3x8x8 images around one centre per class, with a second view (MoCo)."""

    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(3)
        self.labels = torch.arange(n) % CLASSES
        centres = torch.randn(CLASSES, 3, 8, 8, generator=g)
        self.images = centres[self.labels] + 0.5 * torch.randn(n, 3, 8, 8, generator=g)
        self.images2 = self.images + 0.1 * torch.randn(n, 3, 8, 8, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "image2": self.images2[i], "label": self.labels[i]}


class HeadedEncoder(nn.Module):
    """TinyEncoder with a ``head`` submodule (HeadWarmup)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_dim = 16
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.Tanh())
        self.head = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class Recorder(L.Callback):
    """Every step's parameter gradients (as the optimizer gets them), loss and outputs' keys; saved to
    ``out.rank{r}`` at the end when ``out`` is given (DDP spawn)."""

    def __init__(self, out: str | None = None) -> None:
        self.out = out
        self.grads: list[dict[str, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []
        self.keys: list[list[str]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())
        self.keys.append(sorted(outputs))

    def on_train_end(self, trainer, pl_module):
        if self.out:
            torch.save({"grads": self.grads, "losses": self.losses}, f"{self.out}.rank{trainer.global_rank}")


def sgd0(params):
    return torch.optim.SGD(params, lr=0.0)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def halve_every_epoch(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


def make_module(case: str, chunk: int | None, **kwargs) -> MetricLearningModule:
    torch.manual_seed(0)
    if case == "moco":
        return MoCoModule(TinyEncoder(), queue_size=32, momentum=0.9, optimizer=sgd0, grad_cache_chunk_size=chunk)
    if case == "proxy_anchor":  # a loss with parameters: the proxies get their gradient in the objective's backward
        loss, miner = ProxyAnchorLoss(num_classes=CLASSES, embedding_size=16), None
    else:
        loss, miner = TripletMarginLoss(margin=0.2), BatchHardMiner()
    kwargs.setdefault("optimizer", sgd0)
    encoder = kwargs.pop("encoder", TinyEncoder)()  # a class: built after the seed
    return MetricLearningModule(encoder, loss, miner, grad_cache_chunk_size=chunk, **kwargs)


def fit(module, tmp_path, callbacks=(), batch_size=16, n=32, **trainer_kwargs) -> L.Trainer:
    trainer_kwargs.setdefault("max_steps", 2)
    trainer = L.Trainer(
        accelerator="cpu", devices=trainer_kwargs.pop("devices", 1), precision=trainer_kwargs.pop("precision", "64-true"),
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks), **trainer_kwargs,
    )
    trainer.fit(module, train_dataloaders=DataLoader(Blobs(n), batch_size=batch_size))
    return trainer


def assert_same_steps(cached: Recorder, plain: Recorder) -> None:
    assert len(cached.grads) == len(plain.grads) > 0
    for step, (got, want) in enumerate(zip(cached.grads, plain.grads)):
        assert got.keys() == want.keys(), step
        for name, g in got.items():
            assert step < len(plain.grads) - 1 or want[name].abs().sum() > 0, (step, name)  # MoCo's first step: empty queue, loss 0
            torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-10, msg=lambda m: f"step {step} {name}: {m}")
    torch.testing.assert_close(torch.stack(cached.losses), torch.stack(plain.losses), rtol=1e-5, atol=1e-10)
    assert cached.keys == plain.keys  # the same outputs dict for callbacks


@pytest.mark.parametrize("case", ["triplet_batch_hard", "proxy_anchor", "moco"])
def test_cached_step_equals_uncached(case, tmp_path):
    """Batches of 16 in chunks of 3 (the last one shorter), two steps (MoCo: the queue is filled
    by the first); the miner, the proxies and the queue inside the objective."""
    records = {}
    for chunk in (None, 3):
        records[chunk] = Recorder()
        fit(make_module(case, chunk), tmp_path, [records[chunk]])
    assert_same_steps(records[3], records[None])
    if case == "proxy_anchor":
        assert "step.loss.proxies" in records[3].grads[0]


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_cached_training_keeps_clipping_warmup_schedule_and_callbacks(algorithm, tmp_path):
    """Two epochs of two steps with SGD: gradient clipping (always active at this value) with the
    Trainer's settings, HeadWarmup (trunk frozen in epoch 0), a per-epoch StepLR, and the
    monitors reading ``outputs``: parameters and learning rate equal the uncached run's."""
    runs = {}
    for chunk in (None, 5):
        module = make_module("triplet_batch_hard", chunk, encoder=HeadedEncoder, optimizer=sgd, scheduler=halve_every_epoch)
        hardness, recorder = HardnessMonitor(), Recorder()
        callbacks = [HeadWarmup(epochs=1), DivergenceMonitor(min_spread=1e-4), hardness, recorder]
        trainer = fit(module, tmp_path, callbacks, max_steps=-1, max_epochs=2, gradient_clip_val=1e-3, gradient_clip_algorithm=algorithm)
        assert trainer.global_step == 4
        assert len(hardness.steps) == 4
        runs[chunk] = (module, trainer, recorder)
    (cached, cached_trainer, _), (plain, plain_trainer, _) = runs[5], runs[None]
    assert cached_trainer.optimizers[0].param_groups[0]["lr"] == plain_trainer.optimizers[0].param_groups[0]["lr"] == 0.1 * 0.5**2
    for (name, p), q in zip(cached.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-10, msg=lambda m: f"{name}: {m}")
    torch.manual_seed(0)
    initial = HeadedEncoder()
    assert not torch.allclose(cached.encoder.trunk[1].weight, initial.trunk[1].weight.double())  # trained in epoch 1


class NaNLoss(TripletMarginLoss):
    def forward(self, emb, labels, mined=None):
        return super().forward(emb, labels, mined) * float("nan")


def test_non_finite_loss_stops_before_the_step(tmp_path):
    """DivergenceMonitor's on_before_backward sees the loss in manual_backward and stops the run
    before the optimizer step."""
    torch.manual_seed(0)
    module = MetricLearningModule(TinyEncoder(), NaNLoss(), optimizer=sgd, grad_cache_chunk_size=3)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.raises(DivergenceError):
        fit(module, tmp_path, [DivergenceMonitor()])
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.detach().to(before[name].dtype), before[name], equal_nan=True, msg=lambda m: f"{name}: {m}")


def test_unsupported_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="Metrix"):
        MetricLearningModule(TinyEncoder(), TripletMarginLoss(), mixer=Metrix(), grad_cache_chunk_size=4)
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        fit(make_module("triplet_batch_hard", 3), tmp_path, accumulate_grad_batches=2)


# ------------------------------------------------------------------------------------------- DDP
def ddp_run(tmp_path, case: str, chunk: int | None) -> str:
    out = str(tmp_path / f"{case}-{chunk}")
    module = make_module(case, chunk)
    # 32 rows, DistributedSampler: 8 per rank and step, two steps
    fit(module, tmp_path, [Recorder(out)], batch_size=8, devices=2, strategy="ddp_spawn")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["triplet_batch_hard", "proxy_anchor"])
def test_cached_ddp_step_equals_uncached_ddp_step(case, tmp_path):
    """Global gather: the loss on the 16-row global batch; the cached step syncs the gradients once
    (all backward passes under no_sync, then one average), equal to DDP's reducer on the uncached step."""
    plain, cached = ddp_run(tmp_path, case, None), ddp_run(tmp_path, case, 3)
    for rank in (0, 1):
        want, got = torch.load(f"{plain}.rank{rank}"), torch.load(f"{cached}.rank{rank}")
        a, b = Recorder(), Recorder()
        a.grads, a.losses, b.grads, b.losses = got["grads"], got["losses"], want["grads"], want["losses"]
        assert_same_steps(a, b)
