"""``Cell``: one run of a grid (one value per axis and one seed) and its folder's state on disk.

A cell's folder is a normal ``hardneg fit`` run folder (``config.yaml``, ``metrics.csv``,
``checkpoints/last.ckpt``, ``results.json``) plus the grid's own files, all written atomically:

- ``cell.json``: the cell's labels, seed, the grid entries it was built from and its argv;
- ``attempts.json``: one record per time the grid started this cell (start, resumed or not, pid,
  exit status), so a crash and its resume are visible afterwards;
- ``done.json``: the finished-cell marker with the final metrics. A cell is finished if and only
  if this file exists; it is written after ``hardneg fit`` exited with status 0;
- ``stdout.log``: the output of every attempt, appended.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Cell:
    """One grid cell.

    Args:
        labels: axis name -> value label, in the grid's axis order.
        seed: the cell's seed.
        entries: the grid entries (fragment paths as written, ``key=value`` overrides) in order.
        argv: the ``hardneg`` arguments (``fit`` ...) without the run folder and resume flags.
        folder: the cell's run folder.
    """

    labels: dict[str, str]
    seed: int
    entries: tuple[str, ...]
    argv: tuple[str, ...]
    folder: Path

    @property
    def id(self) -> str:
        """``axis=label,...,seed=N``: the name shown in progress lines and reports."""
        return ",".join([*(f"{k}={v}" for k, v in self.labels.items()), f"seed={self.seed}"])

    @property
    def done_file(self) -> Path:
        return self.folder / "done.json"

    @property
    def checkpoint_folder(self) -> Path:
        return self.folder / "checkpoints"

    def is_finished(self) -> bool:
        return self.done_file.is_file()

    def can_resume(self) -> bool:
        """An earlier attempt left a checkpoint: the next one runs with ``--ckpt_path last``."""
        folder = self.checkpoint_folder
        return folder.is_dir() and any(folder.glob("*.ckpt"))

    def state(self) -> str:
        """``finished``, ``resumable`` (killed after a checkpoint) or ``new``."""
        if self.is_finished():
            return "finished"
        return "resumable" if self.can_resume() else "new"

    def fit_argv(self, resume: bool) -> list[str]:
        """The full ``hardneg`` argv of the next attempt: the run folder last, so it always wins."""
        argv = [*self.argv, f"--trainer.default_root_dir={self.folder}"]
        return argv + ["--ckpt_path", "last"] if resume else argv

    def record(self) -> dict[str, Any]:
        """What ``cell.json`` stores; also the cell's row in ``grid.json``."""
        return {
            "id": self.id,
            "name": self.folder.name,
            "labels": [[axis, label] for axis, label in self.labels.items()],  # a list: JSON files sort keys
            "seed": self.seed,
            "entries": list(self.entries),
            "argv": list(self.argv),
            "folder": str(self.folder),
        }

    def recorded_entries(self) -> list[str] | None:
        """The entries of the grid that first ran this folder (``None``: never run)."""
        path = self.folder / "cell.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text()).get("entries")

    def done(self) -> dict[str, Any]:
        return json.loads(self.done_file.read_text())

    def attempts(self) -> list[dict[str, Any]]:
        path = self.folder / "attempts.json"
        return json.loads(path.read_text()) if path.is_file() else []

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Cell":
        labels = record["labels"]
        return cls(
            labels=dict(labels.items() if isinstance(labels, dict) else labels),
            seed=int(record["seed"]),
            entries=tuple(record["entries"]),
            argv=tuple(record["argv"]),
            folder=Path(record["folder"]),
        )
