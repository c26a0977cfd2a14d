"""``UntrainedBaseline``: the grid's baseline job records what the untrained encoder scores.

The grid runs its baseline as ``hardneg test`` without a checkpoint (the encoder as built: e.g.
ImageNet weights with a random head, seeded like the cells) and appends this callback. After the
test loop it also scores the validation split, because the training curves of ``hardneg report``
show validation metrics, and writes both atomically to ``<default_root_dir>/results.json``::

    {"before_training": {"recall@1": ...}, "val_before_training": {"recall@1": ...}}
"""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L

from experiments.atomic import atomic_write_json


class UntrainedBaseline(L.Callback):
    """Writes the test metrics of ``hardneg test`` and the validation metrics of the same model."""

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        test = {key.split("/", 1)[1]: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("test/")}
        val = self._validate(trainer, pl_module)
        if trainer.is_global_zero:
            atomic_write_json(Path(trainer.default_root_dir) / "results.json", {"before_training": test, "val_before_training": val})

    @staticmethod
    def _validate(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        """``pl_module.evaluate`` on the validation loader, as many batches as ``limit_val_batches``
        lets the fit loop use; ``None`` for a module or DataModule without them."""
        datamodule = trainer.datamodule
        if not hasattr(pl_module, "evaluate") or datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return None
        if trainer.limit_val_batches == 0:  # the run never validates (a grid scored on its test split only)
            return None
        datamodule.setup("validate")
        loader = datamodule.val_dataloader()
        if isinstance(loader, (list, tuple)):  # [queries, corpus] / [images, captions]: a cut corpus would change the task
            return pl_module.evaluate(loader, stage="validate")
        limit = trainer.limit_val_batches
        if isinstance(limit, float) and limit < 1.0:
            limit = int(len(loader) * limit)
        batches = itertools.islice(loader, limit) if isinstance(limit, int) else loader
        return pl_module.evaluate(batches)
