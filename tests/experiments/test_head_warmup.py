"""``HeadWarmup`` trains only the embedding head (and the loss's proxies) for its first epochs."""

import lightning as L
import pytest
import torch
from torch import nn

from datamodules import DigitsDataModule
from experiments.callbacks.head_warmup import HeadWarmup, head_parameters
from lightning_modules.metric_learning_module import MetricLearningModule
from losses import ProxyAnchorLoss


class HeadedEncoder(nn.Module):
    """A trunk and an embedding ``head``, like ``models.TimmEncoder``."""

    def __init__(self) -> None:
        super().__init__()
        self.data_config = {"input_size": (3, 8, 8), "crop_pct": 1.0, "interpolation": "bilinear"}
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.Tanh())
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.states = []

    def _take(self, module):
        self.states.append({k: v.detach().clone() for k, v in module.named_parameters()})

    def on_train_start(self, trainer, module):
        self._take(module)

    def on_train_epoch_end(self, trainer, module):
        self._take(module)


def adam(params):
    return torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2)


@pytest.mark.parametrize("epochs", [1, 2])
def test_trunk_frozen_during_warmup_only(epochs):
    torch.manual_seed(0)
    module = MetricLearningModule(HeadedEncoder(), ProxyAnchorLoss(num_classes=5, embedding_size=8), optimizer=adam)
    data = DigitsDataModule(classes_per_batch=5, samples_per_class=4, num_batches=3, num_workers=0)
    snaps = Snapshots()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=10.0, gradient_clip_algorithm="value",
        callbacks=[HeadWarmup(epochs=epochs), snaps],
    )
    trainer.fit(module, datamodule=data)
    states = snaps.states  # before training, then after each epoch
    for epoch in range(3):
        before, after = states[epoch], states[epoch + 1]
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert {"encoder.head.weight", "encoder.head.bias", "step.loss.proxies"} <= changed, epoch
        trunk_changed = {k for k in changed if k.startswith("encoder.trunk")}
        if epoch < epochs:
            assert not trunk_changed, f"epoch {epoch}: trunk moved during warm-up: {trunk_changed}"
        else:
            assert trunk_changed == {"encoder.trunk.1.weight", "encoder.trunk.1.bias"}, epoch


def test_head_is_found_by_method_or_submodule():
    class WithMethod(HeadedEncoder):
        def head_parameters(self):
            return [self.head.weight]

    enc = WithMethod()
    assert [id(p) for p in head_parameters(enc)] == [id(enc.head.weight)]
    plain = HeadedEncoder()
    assert [id(p) for p in head_parameters(plain)] == [id(plain.head.weight), id(plain.head.bias)]
    with pytest.raises(ValueError, match="cannot find the embedding head of Sequential"):
        head_parameters(nn.Sequential(nn.Linear(2, 2)))


def test_timm_encoder_head():
    from models import TimmEncoder

    enc = TimmEncoder("test_resnet", embed_dim=8)
    assert [id(p) for p in head_parameters(enc)] == [id(p) for p in enc.head.parameters()] and len(enc.head) == 1
    headless = TimmEncoder("test_resnet", embed_dim=None)
    module = MetricLearningModule(headless, ProxyAnchorLoss(num_classes=5, embedding_size=headless.embed_dim))
    with pytest.raises(ValueError, match="has no parameters, so warm-up would train nothing"):
        HeadWarmup(epochs=1).setup(None, module, "fit")


def test_negative_epochs_rejected():
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        HeadWarmup(epochs=-1)
