"""``HeadWarmup``: train only the new embedding head (and the loss's own parameters) for the first epochs."""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch
from torch import nn


class HeadWarmup(L.Callback):
    """For the first ``epochs`` epochs, every encoder parameter outside the embedding head gets no update.

    The warm-up of the Proxy-Anchor and Metrix recipes (Kim et al., "Proxy Anchor Loss for Deep
    Metric Learning", CVPR 2020, and Venkataramanan et al., "It Takes Two to Tango: Mixup for Deep
    Metric Learning", ICLR 2022: the ``--warm`` option of both official codes, 5 epochs for
    ResNet-50): a randomly initialised head on a pretrained trunk first learns alone, so its early,
    large gradients do not disturb the trunk. Parameters outside the encoder (a proxy loss's
    proxies) train throughout, as in those codes.

    The head is ``encoder.head_parameters()`` when the encoder defines it, else the parameters of
    its ``head`` submodule (``models.TimmEncoder.head``: the linear layer and optional BatchNorm).

    How: during warm-up the gradients of the other encoder parameters are dropped (set to
    ``None``) just before each optimizer step, so the optimizer skips them exactly as if they were
    frozen: no update, no weight decay, no optimizer state. Unlike toggling ``requires_grad``,
    this leaves the parameter set seen by DDP and by the optimizer unchanged, so it works under
    DDP without ``find_unused_parameters`` and resumes correctly mid-warm-up (the epoch decides).
    Gradient clipping runs after this hook, on the head's gradients only. The price is that the
    trunk's backward pass still runs during warm-up.

    Args:
        epochs: number of warm-up epochs (0 disables the callback).
        encoder_attr: the LightningModule attribute holding the encoder.
    """

    def __init__(self, epochs: int = 5, encoder_attr: str = "encoder") -> None:
        if epochs < 0:
            raise ValueError(f"HeadWarmup epochs must be >= 0, got {epochs}")
        self.epochs = epochs
        self.encoder_attr = encoder_attr
        self._frozen: list[nn.Parameter] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        encoder = getattr(pl_module, self.encoder_attr, None)
        if not isinstance(encoder, nn.Module):
            raise ValueError(f"HeadWarmup: {type(pl_module).__name__} has no nn.Module attribute {self.encoder_attr!r}")
        head = {id(p) for p in head_parameters(encoder)}
        if not head:
            raise ValueError(
                f"HeadWarmup: the head of {type(encoder).__name__} has no parameters, so warm-up would train nothing "
                f"(e.g. TimmEncoder with embed_dim=None); remove the callback or give the encoder a head"
            )
        self._frozen = [p for p in encoder.parameters() if id(p) not in head]

    def in_warmup(self, trainer: L.Trainer) -> bool:
        return trainer.current_epoch < self.epochs

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self.in_warmup(trainer):
            for p in self._frozen:
                p.grad = None


def head_parameters(encoder: nn.Module) -> Iterable[nn.Parameter]:
    """The parameters of an encoder's embedding head: ``encoder.head_parameters()`` or ``encoder.head``."""
    method = getattr(encoder, "head_parameters", None)
    if callable(method):
        return list(method())
    head = getattr(encoder, "head", None)
    if isinstance(head, nn.Module):
        return list(head.parameters())
    raise ValueError(
        f"HeadWarmup: cannot find the embedding head of {type(encoder).__name__}; give the encoder a "
        f"head_parameters() method or a 'head' submodule"
    )
