"""Loggers that keep a run's whole history across ``--ckpt_path`` resumes.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it starts in a folder that has one, so a
resumed run (or grid cell) lost every row logged before the kill, and a finished run resumed with
``--ckpt_path last`` lost the file outright. Here:

- ``ResumableCSVLogger`` keeps the rows of the earlier attempt up to the restored checkpoint's
  logging step and drops the later ones, which the resumed run logs again; a row the resumed run
  logs again at the checkpoint's own step replaces the earlier one. Every step is in the file once.
  A fit that starts without a checkpoint starts the file afresh, as Lightning does.
- The file is rewritten atomically (``experiments.atomic``) whenever rows are dropped or the header
  gains a column, and appended to otherwise; a row torn by a kill mid-append is discarded.
- ``ResumableTensorBoardLogger`` opens its event writer with ``purge_step``, so TensorBoard hides
  the earlier attempt's events past the checkpoint (the event files themselves are append-only).
- ``ResumeLogs`` is the callback that tells both which step the checkpoint was saved at; the CLI
  adds it with the loggers.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from experiments.atomic import atomic_write

# Columns every Lightning row may carry; two rows of one step are the same logging event only if
# they share a metric column.
_BOOKKEEPING = ("step", "epoch")


def _metric_keys(row: dict[str, Any]) -> set[str]:
    return {k for k in row if k not in _BOOKKEEPING}


def _step(row: dict[str, Any]) -> int | None:
    try:
        return int(float(row["step"]))
    except (KeyError, TypeError, ValueError):
        return None


def read_csv_rows(path: str) -> list[dict[str, str]]:
    """Non-empty cells of every complete row of a CSV file (a last line without newline was torn by a kill)."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = csv.DictReader(io.StringIO(text, newline=""))
    return [{k: v for k, v in row.items() if k is not None and v not in (None, "")} for row in rows]


class ResumableCSVWriter(ExperimentWriter):
    """``metrics.csv`` writer that continues the file of an earlier attempt (see the module docstring).

    Args:
        log_dir: the run folder.
        resume_step: the logging step of the restored checkpoint; ``None``: a fresh run.
    """

    def __init__(self, log_dir: str, resume_step: int | None = None) -> None:
        super().__init__(log_dir=log_dir)
        self.resume_step = resume_step
        self._rows: list[dict[str, Any]] | None = None  # the file's rows, once loaded at the first save
        self._earlier: set[int] = set()  # ids of rows of the earlier attempt at the checkpoint's step

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes ``metrics.csv`` here; the earlier rows are sorted out at the first save."""

    def _load(self) -> list[dict[str, Any]]:
        if self.resume_step is None:
            return []
        kept = [row for row in read_csv_rows(self.metrics_file_path) if (_step(row) or 0) <= self.resume_step]
        self._earlier = {id(row) for row in kept if _step(row) == self.resume_step}
        return kept

    def save(self) -> None:
        if not self.metrics:
            return
        rewrite = self._rows is None
        if self._rows is None:
            self._rows = self._load()
            self.metrics_keys = sorted(set().union(*self._rows)) if self._rows else []
        if self._earlier:
            rewrite |= self._drop_relogged(self.metrics)
        rewrite |= bool(self._record_new_keys())
        self._rows.extend(self.metrics)
        if rewrite:
            atomic_write(self.metrics_file_path, lambda f: self._write(f, self._rows, header=True), mode="w")
        else:
            with open(self.metrics_file_path, "a", newline="") as f:
                self._write(f, self.metrics, header=False)
        self.metrics = []

    def _drop_relogged(self, new_rows: list[dict[str, Any]]) -> bool:
        """Drop the earlier attempt's rows at the checkpoint's step that a new row logs again."""
        relogged = [(_step(row), _metric_keys(row)) for row in new_rows if _step(row) == self.resume_step]
        if not relogged:
            return False
        drop = {
            id(row)
            for row in self._rows
            if id(row) in self._earlier and any(step == _step(row) and keys & _metric_keys(row) for step, keys in relogged)
        }
        if drop:
            self._rows = [row for row in self._rows if id(row) not in drop]
            self._earlier -= drop
        return bool(drop)

    def _write(self, f: Any, rows: list[dict[str, Any]], header: bool) -> None:
        writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
        if header:
            writer.writeheader()
        writer.writerows(rows)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume (``ResumableCSVWriter``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step: int | None = None

    def resume_from_step(self, step: int) -> None:
        """Called (by ``ResumeLogs``) with the logging step of the checkpoint the fit restores."""
        self._resume_step = step
        if self._experiment is not None:
            self._experiment.resume_step = step

    @property
    @rank_zero_experiment
    def experiment(self) -> ResumableCSVWriter:
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = ResumableCSVWriter(log_dir=self.log_dir, resume_step=self._resume_step)
        return self._experiment


class ResumableTensorBoardLogger(TensorBoardLogger):
    """``TensorBoardLogger`` that hides an earlier attempt's events past the restored checkpoint.

    TensorBoard reads every event file of the folder; ``SummaryWriter(purge_step=s)`` writes a
    marker after which it discards the earlier events at steps ``>= s``.
    """

    def resume_from_step(self, step: int) -> None:
        if self._experiment is None:
            self._kwargs["purge_step"] = step


def checkpoint_logging_step(checkpoint: dict[str, Any]) -> int:
    """The step loggers were at when ``checkpoint`` was saved (``_batches_that_stepped``; else ``global_step``)."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(loop.get("_batches_that_stepped", checkpoint.get("global_step", 0)))


class ResumeLogs(L.Callback):
    """Tells the resumable loggers the logging step of the checkpoint a fit resumes from.

    ``on_load_checkpoint`` runs (on every rank) before anything of the resumed run is logged.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        step = checkpoint_logging_step(checkpoint)
        for logger in trainer.loggers:
            if callable(getattr(logger, "resume_from_step", None)):
                logger.resume_from_step(step)
