"""``RetrievalReport``: test-set retrieval metrics of the untrained and the trained encoder, printed and saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from experiments.atomic import atomic_write_json
from experiments.callbacks.rank_log_dir import rank_log_dir


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
        present = set(self.after or {}) | set(self.before or {})
        for key in [k for k in self.keys if k in present] or sorted(present):
            before = f"{self.before[key]:.4f}" if self.before and key in self.before else "-"
            after = f"{self.after[key]:.4f}" if self.after and key in self.after else "-"
            rows.append(f"{key:<14}{before:>12}{after:>12}")
        return "\n".join(rows)

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = state_dict.get("before")
