"""``ProgressFile``: the training progress of a run in ``<log_dir>/progress.json``, for watchers.

The grid adds it to every cell; its driver reads the file to show how far each running cell is and
to estimate the time left.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L

from experiments.atomic import atomic_write_json
from experiments.callbacks.rank_log_dir import rank_log_dir


class ProgressFile(L.Callback):
    """Writes ``{"step", "total_steps", "epoch", "max_epochs", "stage"}`` atomically, at most every
    ``interval_s`` seconds during training and once at the start and end of ``fit``.

    Args:
        interval_s: minimum seconds between two writes during training.
    """

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self._last_write = 0.0
        self._total: float = float("inf")

    def _write(self, trainer: L.Trainer, stage: str) -> None:
        # rank_log_dir, not trainer.log_dir: a collective, and this runs on rank 0 only, on a timer.
        log_dir = rank_log_dir(trainer) if trainer.is_global_zero else None
        if not log_dir:
            return
        total = self._total
        atomic_write_json(
            Path(log_dir) / "progress.json",
            {
                "step": int(trainer.global_step),
                "total_steps": int(total) if total != float("inf") else None,
                "epoch": int(trainer.current_epoch),
                "max_epochs": trainer.max_epochs,
                "stage": stage,
                "time": time.time(),
            },
        )
        self._last_write = time.monotonic()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # On every rank: estimating may load the train loader, which waits for all ranks at a barrier.
        self._total = trainer.estimated_stepping_batches
        self._write(trainer, "train")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if time.monotonic() - self._last_write >= self.interval_s:
            self._write(trainer, "train")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, "final evaluation")
