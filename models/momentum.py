"""``MomentumEncoder``: a slowly moving copy of an encoder (MoCo's key encoder)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class MomentumEncoder(nn.Module):
    """An exponential moving average of another encoder's parameters, used without gradient.

    He, Fan, Wu, Xie, Girshick, "Momentum Contrast for Unsupervised Visual Representation Learning"
    (CVPR 2020), Eq. 2: ``theta_k <- m * theta_k + (1 - m) * theta_q`` after every step, with the
    key encoder initialised as a copy of the query encoder. The copy's parameters never require
    gradient; its buffers (BatchNorm running statistics) are its own and are updated by its own
    forward passes in train mode, as in MoCo. ``forward`` runs under ``torch.no_grad``.

    Args:
        encoder: the online (query) encoder; it is deep-copied at construction.
        momentum: ``m`` (MoCo: 0.999).
    """

    def __init__(self, encoder: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"MomentumEncoder: momentum={momentum}; expected a value in [0, 1]")
        self.momentum = float(momentum)
        self.encoder = copy.deepcopy(encoder)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """One EMA step towards ``online`` (same architecture as the copy)."""
        mine, theirs = list(self.encoder.parameters()), list(online.parameters())
        if len(mine) != len(theirs):
            raise ValueError(f"MomentumEncoder.update: the online encoder has {len(theirs)} parameter tensors; expected {len(mine)}")
        torch._foreach_mul_(mine, self.momentum)
        torch._foreach_add_(mine, [t.detach() for t in theirs], alpha=1.0 - self.momentum)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def __getattr__(self, name: str):
        # embed_dim, data_config ... of the wrapped encoder
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("encoder"), name)
