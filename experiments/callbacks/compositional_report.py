"""``CompositionalReport``: per-category compositional accuracy of a CLIP run on the offline scenes, before and after training.

The set is the scenes' compositional test set (``datamodules.compositional_test_set.generate_compositional_test``:
one negative caption and its rendered image per held-out test scene and category), written beside
the scenes the first time a run asks for it. The scores are those of ``hardneg compositional
--scenes`` (``experiments.compositional.score_scenes``): per category the SugarCrepe accuracy
(image -> caption vs negative caption, a tie wrong; Hsieh et al., NeurIPS 2023) as
``comp_<category>`` and the negative-image accuracy (caption -> image vs negative image) as
``comp_<category>_t2i``, with the means ``comp_mean`` and ``comp_mean_t2i``.

They land in ``results.json`` under ``before_training`` / ``after_training``, the keys
``RetrievalReport`` and ``UntrainedBaseline`` write, so ``hardneg report`` shows them as columns
(``--metric comp_mean``). The file is read, merged and rewritten atomically in ``teardown``, which
Lightning calls after every callback's ``on_fit_end`` / ``on_test_end``: whatever order the
callbacks are listed in, the other reports' keys are kept and they cannot overwrite these.

- ``hardneg fit``: before training (``baseline=True``) and after; ``<log_dir>/results.json``
  (``RetrievalReport``'s file). The "before" numbers are kept in the checkpoint for a resumed run.
- ``hardneg test`` (a grid's baseline job, no checkpoint: ``before_training``; with ``--ckpt_path``:
  ``after_training``): ``<default_root_dir>/results.json`` (``UntrainedBaseline``'s file).

DDP: rank 0 alone writes the set and scores it (about a minute for 5,000 rows on one GPU, a few on
CPU); the model is the unwrapped module, so no collective runs and the other ranks wait in their
first gradient all-reduce (or go on to teardown) meanwhile.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from experiments.atomic import atomic_write_json
from experiments.callbacks.rank_log_dir import rank_log_dir


class CompositionalReport(L.Callback):
    """Scores the module's image-text model on the scenes' compositional test set; printed and merged into ``results.json``.

    Args:
        root: the scenes folder (default: the DataModule's ``root``, a ``FashionScenesDataModule``).
        categories: the negative rules to score (default: all five of ``NEGATIVE_RULES``).
        baseline: also score the untrained model at the start of ``fit``.
        batch_size: images or texts per encoder batch.
        prefix: the prefix of the result keys.
    """

    def __init__(self, root: str | None = None, categories: Sequence[str] | None = None, baseline: bool = True, batch_size: int = 128,
                 prefix: str = "comp_") -> None:
        self.root = root
        self.categories = list(categories) if categories is not None else None
        self.baseline = baseline
        self.batch_size = batch_size
        self.prefix = prefix
        self.before: dict[str, float] | None = None
        self.after: dict[str, float] | None = None
        self._pending: tuple[str, dict[str, dict[str, float]]] | None = None
        self._order: list[str] = []

    # ------------------------------------------------------------------------------ scoring
    def _root(self, trainer: L.Trainer) -> Path:
        root = self.root or getattr(trainer.datamodule, "root", None)
        if root is None:
            raise ValueError(f"CompositionalReport: no scenes folder; give root= or use datamodules.FashionScenesDataModule "
                             f"(the DataModule is {type(trainer.datamodule).__name__})")
        return Path(root)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """The scores of ``pl_module.model`` (rank 0 only: reads and writes files)."""
        from datamodules.compositional_test_set import generate_compositional_test, read_compositional_test
        from experiments.compositional import check_image_text, image_transform, model_tokenizer, score_scenes

        model = getattr(pl_module, "model", None)
        check_image_text(model, f"CompositionalReport: {type(pl_module).__name__}.model")
        datamodule = trainer.datamodule
        kwargs = {"fashion_mnist_root": datamodule.fashion_mnist_root} if getattr(datamodule, "fashion_mnist_root", None) else {}
        samples = read_compositional_test(generate_compositional_test(self._root(trainer), self.categories, **kwargs))
        self._order = list(samples)
        resolve = getattr(datamodule, "resolved_data_config", None)
        data_config = resolve() if callable(resolve) else model.data_config
        return score_scenes(model, samples, image_transform(data_config), model_tokenizer(model), self.batch_size, pl_module.device, self.prefix)

    # -------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.baseline and self.before is None and not trainer.fast_dev_run and trainer.is_global_zero:
            self.before = self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return
        self.after = self.evaluate(trainer, pl_module)
        scores = {"after_training": self.after, **({"before_training": self.before} if self.before else {})}
        self._pending = (rank_log_dir(trainer) or trainer.default_root_dir, scores)
        print(self.table(), flush=True)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return
        scores = self.evaluate(trainer, pl_module)
        trained = trainer.ckpt_path is not None
        self.before, self.after = (None, scores) if trained else (scores, None)
        self._pending = (trainer.default_root_dir, {"after_training" if trained else "before_training": scores})
        print(self.table(), flush=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._pending is None:
            return
        folder, scores = self._pending
        self._pending = None
        merge_results(Path(folder) / "results.json", scores)

    # ------------------------------------------------------------------------------- output
    def table(self) -> str:
        from experiments.compositional import metrics_table

        columns = {"untrained": self.before, "trained": self.after}
        return "compositional test set (scenes)\n" + metrics_table({k: v for k, v in columns.items() if v is not None}, self._order, self.prefix,
                                                                    {"": "i2t", "_t2i": "t2i"})

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = state_dict.get("before")


def merge_results(path: Path, scores: dict[str, dict[str, float]]) -> None:
    """Merge ``{section: {key: value}}`` into the JSON object at ``path`` (section by section, key by
    key; other sections and keys kept) and write it atomically."""
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"CompositionalReport: {path} is not valid JSON ({err}); expected the results.json of a run") from None
        if not isinstance(data, dict):
            raise ValueError(f"CompositionalReport: {path} holds a JSON {type(data).__name__}; expected an object")
    for section, values in scores.items():
        merged = dict(data.get(section) or {})
        merged.update(values)
        data[section] = merged
    atomic_write_json(path, data)
