"""Lightning callbacks every run uses: atomic checkpoints and the before/after retrieval report.

Under DDP every hook runs on every rank, and a collective (``trainer.log_dir``, ``barrier``,
``broadcast``, a torchmetrics ``compute``) must run on all of them or the run hangs or dies: files are
written on rank 0 only, into ``rank_log_dir(trainer)``, which is ``trainer.log_dir`` without its
broadcast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from experiments.atomic import atomic_write_json


def rank_log_dir(trainer: L.Trainer) -> str | None:
    """``trainer.log_dir`` computed on this rank alone, without the broadcast ``Trainer.log_dir`` does.

    ``trainer.log_dir`` is a collective: read on rank 0 only (inside ``if trainer.is_global_zero``)
    it waits for the other ranks forever or fails when they exit. On rank 0 this is the same folder.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        return logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
    return trainer.default_root_dir


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


class RetrievalReport(L.Callback):
    """Test-set retrieval metrics before training (the untrained encoder) and after; printed and saved.

    At the start of ``fit`` it evaluates the DataModule's test loader with the encoder as built
    (e.g. ImageNet weights with a random head); at the end, with the trained weights. Both are
    printed side by side and written atomically to ``<log_dir>/results.json``. The "before" numbers
    are kept in the checkpoint so a resumed run still reports the true untrained baseline.

    Args:
        keys: metrics shown in the printed table.
        baseline: evaluate the untrained encoder too.
    """

    def __init__(self, keys: tuple[str, ...] = ("recall@1", "map@r"), baseline: bool = True) -> None:
        self.keys = tuple(keys)
        self.baseline = baseline
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        datamodule = trainer.datamodule
        datamodule.setup("test")
        return pl_module.evaluate(datamodule.test_dataloader())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.baseline and self.before is None and not trainer.fast_dev_run:
            self.before = self._evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        self.after = self._evaluate(trainer, pl_module)  # on every rank: the metrics sync across ranks
        if trainer.is_global_zero:
            print(self.table(), flush=True)
            log_dir = rank_log_dir(trainer)
            if log_dir:
                atomic_write_json(Path(log_dir) / "results.json", {"before_training": self.before, "after_training": self.after})

    def table(self) -> str:
        rows = [f"{'test metric':<14}{'untrained':>12}{'trained':>12}"]
        for key in self.keys:
            before = f"{self.before[key]:.4f}" if self.before else "-"
            after = f"{self.after[key]:.4f}" if self.after else "-"
            rows.append(f"{key:<14}{before:>12}{after:>12}")
        return "\n".join(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = state_dict.get("before")
