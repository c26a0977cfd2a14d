"""``SetEpoch``: tell epoch-scheduled components (MoCHi's warm-up) the current epoch."""

from __future__ import annotations

import lightning as L


class SetEpoch(L.Callback):
    """At the start of every training epoch, call ``set_epoch(trainer.current_epoch)`` on each
    submodule of the LightningModule that has one (e.g. ``miners.MoCHi``, whose mixing starts after
    ``warmup_epochs``, nested in a ``MoCHiMiner`` inside a ``CrossBatchMemory``). A resumed run
    calls it again for the epoch it resumes in.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for module in pl_module.modules():
            if module is not pl_module and callable(getattr(module, "set_epoch", None)):
                module.set_epoch(trainer.current_epoch)
