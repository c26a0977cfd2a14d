"""``HardnegCLI``: LightningCLI with the run-folder conventions every hardneg run follows.

- A run lives in ``trainer.default_root_dir``: ``config.yaml`` (the resolved config), CSV and
  TensorBoard logs, ``checkpoints/`` (written atomically, ``last.ckpt`` always kept) and
  ``results.json``. Logger versions are fixed to that folder, so ``--ckpt_path last`` finds the
  checkpoint of a killed run and resumes it; the logs continue where the checkpoint was saved
  (``experiments.run_logs``: nothing logged before the kill is lost, nothing is logged twice).
- ``validate`` / ``test`` log into ``<run>/<subcommand>-<date>/`` and never touch the fit's files.
- Starting ``fit`` in a folder that already holds a checkpoint without ``--ckpt_path`` is refused
  rather than overwriting a finished or interrupted run.
- ``use_distributed_sampler=False`` by default: the DataModules shard their own P x K batches.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from experiments.callbacks import AtomicModelCheckpoint
from experiments.callbacks.divergence_monitor import DivergenceMonitor
from experiments.run_logs import ResumableCSVLogger, ResumableTensorBoardLogger, ResumeLogs


class HardnegCLI(LightningCLI):
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> L.Trainer:
        root = config.get("default_root_dir") or os.getcwd()
        config["default_root_dir"] = root
        if config.get("logger") in (None, True):
            # fit logs into the run folder itself; validate/test get their own dated sub-folder so
            # they never overwrite the training logs or the training config.yaml.
            version = "" if self.subcommand in (None, "fit") else f"{self.subcommand}-{time.strftime('%Y%m%d-%H%M%S')}"
            # Resumable: a run resumed with --ckpt_path keeps the rows it logged before the kill.
            config["logger"] = [
                ResumableCSVLogger(save_dir=root, name="", version=version),
                ResumableTensorBoardLogger(save_dir=root, name="", version=version, default_hp_metric=False),
            ]
            callbacks = [*callbacks, ResumeLogs()]
        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        # fast_dev_run is a smoke test: it writes no checkpoint (Lightning would still save last.ckpt).
        wants_checkpoints = config.get("enable_checkpointing", True) is not False and not config.get("fast_dev_run")
        if wants_checkpoints and not any(isinstance(c, ModelCheckpoint) for c in configured + callbacks):
            callbacks = [*callbacks, AtomicModelCheckpoint(dirpath=str(Path(root) / "checkpoints"), save_last=True)]
        # Collapse warnings and a stop before a NaN step is applied, unless the user configured their own.
        if not any(isinstance(c, DivergenceMonitor) for c in configured + callbacks):
            callbacks = [*callbacks, DivergenceMonitor()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_classes(self) -> None:
        from models.timm_encoder import PretrainedWeightsUnavailable

        try:
            super().instantiate_classes()
        except Exception as err:
            # Offline hub weights: the message says what to do (jsonargparse wraps it in a ValueError).
            cause, seen = err, set()
            while cause is not None and id(cause) not in seen and not isinstance(cause, PretrainedWeightsUnavailable):
                seen.add(id(cause))
                cause = cause.__cause__ or cause.__context__
            if isinstance(cause, PretrainedWeightsUnavailable):
                raise SystemExit(f"hardneg {self.subcommand}: {cause}") from None
            raise

    def before_fit(self) -> None:
        # Everything the configuration decides (miner/loss/memory, sizes, num_classes, P x K against
        # the class sizes), before the Trainer loads an image or a callback evaluates the baseline.
        from experiments.preflight import exit_if_cannot_train

        exit_if_cannot_train(self.model, self.datamodule, world_size=self.trainer.world_size)
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt_path is None and not self.trainer.fast_dev_run:
            for cb in self.trainer.checkpoint_callbacks:
                folder = Path(cb.dirpath) if cb.dirpath else None
                if folder is not None and folder.is_dir() and any(folder.glob("*.ckpt")):
                    raise SystemExit(
                        f"hardneg fit: {folder} already holds checkpoints of an earlier run. Resume it with "
                        f"--ckpt_path last, or start a new run in another folder with --trainer.default_root_dir"
                    )


PARTS_KEY = "parts"


def expand_config_parts(argv: list[str]) -> list[str]:
    """Expand a config that lists its parts into repeated ``--config`` arguments.

    A paper recipe (``experiments/recipes/*.yaml``) is a short file whose top-level ``parts:`` lists the
    fragments it is made of, relative to its own folder; its other keys are its own settings::

        parts: [metrix/base.yaml, metrix/cub.yaml, ../loss/multi_similarity.yaml]
        trainer: {default_root_dir: runs/metrix_multi_similarity_cub}

    ``--config RECIPE`` becomes ``--config PART ... --config <RECIPE's own keys>``: LightningCLI's own
    composition, in order, the last one winning. (jsonargparse's native include, a ``config: PATH`` key
    inside a file, takes one path only, and a group set after it, ``trainer:``, drops the included
    file's other ``trainer`` keys.) A part may list parts of its own.
    """
    import yaml

    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        path = Path(value)
        try:  # a --config value may also be YAML text
            config = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") and path.is_file() else None
        except OSError:
            config = None
        if not (isinstance(config, dict) and PARTS_KEY in config):
            out += ["--config", value]
            continue
        parts = config.pop(PARTS_KEY)
        for part in [parts] if isinstance(parts, str) else parts:
            part_path = Path(os.path.normpath(path.parent / part))
            if not part_path.is_file():
                raise SystemExit(f"{path}: part {part!r} not found (looked for {part_path}; parts are relative to the recipe's folder)")
            out += expand_config_parts(["--config", str(part_path)])
        if config:
            out += ["--config", yaml.safe_dump(config, sort_keys=False)]
    return out


def load_config(path: str | Path) -> dict[str, Any]:
    """A config file as a dict; a recipe that lists ``parts:`` resolved as ``hardneg fit --config PATH`` resolves it."""
    import contextlib
    import io

    import yaml

    config = yaml.safe_load(Path(path).read_text()) or {}
    if not (isinstance(config, dict) and PARTS_KEY in config):
        return config
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            run_lightning_cli(["fit", "--config", str(path), "--print_config"])
        except SystemExit as stop:
            if stop.code:
                raise
    return yaml.safe_load(out.getvalue())


def run_lightning_cli(argv: list[str] | None) -> HardnegCLI:
    """``argv=None`` reads ``sys.argv`` (the console script); a list runs in-process (tests, grids).
    A ``--config`` whose file lists ``parts:`` is expanded first (:func:`expand_config_parts`)."""
    import sys

    from experiments.cli_help import HardnegArgumentParser, import_components, print_component_help

    if argv is None:
        sys.argv[1:] = expand_config_parts(sys.argv[1:])  # DDP launches its workers with sys.argv
    else:
        argv = expand_config_parts(list(argv))
    import_components()  # short class names (--model.help MetricLearningModule) resolve among imported classes
    if print_component_help(list(sys.argv[1:] if argv is None else argv)):
        raise SystemExit(0)
    return HardnegCLI(
        parser_class=HardnegArgumentParser,
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"use_distributed_sampler": False},
        auto_configure_optimizers=False,
        args=argv,
    )
