"""Per-step learning-rate schedules: a linear warm-up, then a cosine, linear or constant decay.

The recipes of the text and image-text papers schedule the learning rate per optimizer step, not per
epoch: open_clip warms up for ``--warmup`` steps and then decays with a cosine to 0 at the last step
(``training/scheduler.py``, ``cosine_lr``; CLIP, NegCLIP, TripletCLIP); BERT-style retrievers (DPR,
ANCE, Tevatron, sentence-transformers) warm up and then decay linearly
(``transformers.get_linear_schedule_with_warmup``). ``WarmupDecayLR`` is both, as a
``torch.optim.lr_scheduler.LambdaLR`` that declares ``interval = "step"``, which
``EmbeddingModule.configure_optimizers`` hands to Lightning (and its gradient-caching loop), so the
schedule advances once per optimizer step.

The multiplier of the base learning rate at step ``t`` (0-based, ``W`` warm-up steps, ``T`` total):

- ``t < W``: ``t / W`` (the transformers convention: 0 at the first step; open_clip's ``(t + 1) / W``
  is one step ahead, a difference of ``1 / W`` during the warm-up only);
- then, with ``p = (t - W) / (T - W)`` clipped to ``[0, 1]`` and ``m = min_lr_ratio``:
  cosine ``m + (1 - m) * 0.5 * (1 + cos(pi * p))``, linear ``m + (1 - m) * (1 - p)``, constant ``1``.

``total_steps=None`` is filled in by ``EmbeddingModule.configure_optimizers`` from
``trainer.estimated_stepping_batches`` (the run's optimizer steps, accumulation and devices included).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from contracts.arguments import is_int_at_least

DECAYS = ("cosine", "linear", "constant")


class WarmupDecayLR(LambdaLR):
    """Linear warm-up over ``warmup_steps``, then ``decay`` to ``min_lr_ratio`` x the base rate at ``total_steps``.

    Args:
        optimizer: the optimizer whose groups' ``initial_lr`` are scaled.
        warmup_steps: optimizer steps of linear warm-up from 0 (0: none).
        total_steps: the run's optimizer steps; ``None``: set by ``EmbeddingModule`` from the trainer.
        decay: ``"cosine"``, ``"linear"`` or ``"constant"`` after the warm-up.
        min_lr_ratio: the multiplier reached at ``total_steps`` (cosine and linear).
    """

    interval = "step"  # read by EmbeddingModule.configure_optimizers

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        decay: Literal["cosine", "linear", "constant"] = "cosine",
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if not is_int_at_least(warmup_steps, 0):
            raise ValueError(f"WarmupDecayLR: warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if total_steps is not None and not is_int_at_least(total_steps, warmup_steps + 1):
            raise ValueError(f"WarmupDecayLR: total_steps must be an integer above warmup_steps={warmup_steps} (or None: the trainer's), "
                             f"got {total_steps!r}")
        if decay not in DECAYS:
            raise ValueError(f"WarmupDecayLR: decay must be one of {DECAYS}, got {decay!r}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"WarmupDecayLR: min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps, self.total_steps, self.decay, self.min_lr_ratio = warmup_steps, total_steps, decay, float(min_lr_ratio)
        super().__init__(optimizer, self.multiplier, last_epoch=last_epoch)

    def multiplier(self, step: int) -> float:
        """The factor of the base learning rate at optimizer step ``step`` (module docstring)."""
        if step < self.warmup_steps:
            return step / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        if self.total_steps is None:
            if step == self.warmup_steps:
                return 1.0  # the first step after the warm-up needs no length; later ones do
            raise ValueError("WarmupDecayLR: total_steps is None and no trainer filled it in; give total_steps (a module built on "
                             "EmbeddingModule sets it from trainer.estimated_stepping_batches)")
        progress = min(max((step - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0), 1.0)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape

    def state_dict(self) -> dict:
        # LambdaLR saves lambdas that are callable objects; ours is a bound method: keep only the plain state
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)
