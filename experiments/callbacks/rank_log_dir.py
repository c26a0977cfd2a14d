"""``rank_log_dir``: the run's log folder, read on one rank without a collective.

Under DDP every hook runs on every rank, and a collective (``trainer.log_dir``, ``barrier``,
``broadcast``, a torchmetrics ``compute``) must run on all of them or the run hangs or dies: files are
written on rank 0 only, into ``rank_log_dir(trainer)``, which is ``trainer.log_dir`` without its
broadcast.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def rank_log_dir(trainer: L.Trainer) -> str | None:
    """``trainer.log_dir`` computed on this rank alone, without the broadcast ``Trainer.log_dir`` does.

    ``trainer.log_dir`` is a collective: read on rank 0 only (inside ``if trainer.is_global_zero``)
    it waits for the other ranks forever or fails when they exit. On rank 0 this is the same folder.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        return logger.log_dir if isinstance(logger, (TensorBoardLogger, CSVLogger)) else logger.save_dir
    return trainer.default_root_dir
