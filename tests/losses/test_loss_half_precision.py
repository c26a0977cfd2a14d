"""Every exported loss runs on float16 / bfloat16 inputs and stays close to its float32 value."""

from __future__ import annotations

import inspect

import pytest
import torch

import losses
from contracts.mined import Mined
from losses import BaseLoss

DIM, CLASSES = 8, 4
REQUIRED = {"num_classes": CLASSES, "embedding_size": DIM}

LOSS_CLASSES = [
    c for c in (getattr(losses, n) for n in losses.__all__) if inspect.isclass(c) and issubclass(c, BaseLoss) and c is not BaseLoss
]


def build(cls: type) -> BaseLoss:
    params = inspect.signature(cls).parameters.values()
    return cls(**{p.name: REQUIRED[p.name] for p in params if p.default is inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", LOSS_CLASSES, ids=lambda c: c.__name__)
def test_half_precision_close_to_float32(cls: type, dtype: torch.dtype) -> None:
    loss = build(cls)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        emb = torch.randn(16, DIM, generator=g)
        labels = torch.randint(0, CLASSES, (16,), generator=g)
        a, p, n = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]), torch.tensor([8, 9, 10, 11])
        labels[p] = labels[a]
        labels[n] = (labels[a] + 1) % CLASSES
        for mined in (None, Mined.from_triplets(a, p, n)):
            # the float32 reference sees the same rounded inputs, so the gap is the loss's own rounding
            rounded = emb.to(dtype)
            full = loss(rounded.float(), labels, mined)
            x = rounded.clone().requires_grad_(True)
            half = loss(x, labels, mined)
            half.backward()
            assert half.dtype == dtype
            assert torch.isfinite(x.grad).all()
            assert abs(half.float().item() - full.item()) <= 0.02 * abs(full.item()) + 0.02, (half.item(), full.item())
