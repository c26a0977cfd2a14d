"""``AtomicModelCheckpoint``: checkpoints that appear whole or not at all."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class AtomicModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose files are written to a temporary name and renamed into place.

    Lightning writes checkpoints in place; a SIGKILL during the write leaves a truncated
    ``last.ckpt`` and the run cannot resume. Here the rename makes each checkpoint appear whole or not
    at all.
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        folder, name = os.path.split(filepath)
        tmp = os.path.join(folder, f".{name}.partial")
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero and os.path.exists(tmp):
            os.replace(tmp, filepath)
        trainer.strategy.barrier("AtomicModelCheckpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)
