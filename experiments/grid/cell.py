"""``Cell``: one run of a grid (one value per axis and one seed) and its folder's state on disk.

A cell's folder is a normal ``hardneg fit`` run folder (``config.yaml``, ``metrics.csv``,
``checkpoints/last.ckpt``, ``results.json``) plus the grid's own files, all written atomically:

- ``cell.json``: the cell's labels, seed, the grid entries it was built from and its argv;
- ``attempts.json``: one record per time the grid started this cell (start, resumed or not, pid,
  exit status), so a crash and its resume are visible afterwards;
- ``done.json``: the finished-cell marker with the final metrics. A cell is finished if and only
  if this file exists; it is written after ``hardneg fit`` exited with status 0;
- ``stdout.log``: the output of every attempt, appended.

A grid's untrained-encoder baseline is a ``Cell`` of kind ``baseline``: ``hardneg test`` without a
checkpoint in its own folder under ``<grid>/baseline/``, run, locked, marked done and resumed
exactly like a training cell (see ``GridSpec.baseline_cells``).
"""

from __future__ import annotations

import json
import re
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
        kind: ``cell`` (a ``hardneg fit`` run) or ``baseline`` (``hardneg test`` of the untrained
            encoder; ``labels`` then holds only the axes the baseline depends on).
    """

    labels: dict[str, str]
    seed: int
    entries: tuple[str, ...]
    argv: tuple[str, ...]
    folder: Path
    kind: str = "cell"

    @property
    def id(self) -> str:
        """``axis=label,...,seed=N`` (``baseline,...`` for a baseline): the name shown in progress lines and reports."""
        parts = [*(f"{k}={v}" for k, v in self.labels.items()), f"seed={self.seed}"]
        return ",".join(["baseline", *parts] if self.is_baseline else parts)

    @property
    def is_baseline(self) -> bool:
        return self.kind == "baseline"

    @property
    def done_file(self) -> Path:
        return self.folder / "done.json"

    @property
    def checkpoint_folder(self) -> Path:
        return self.folder / "checkpoints"

    def is_finished(self) -> bool:
        return self.done_file.is_file()

    def can_resume(self) -> bool:
        """An earlier attempt left a checkpoint: the next one runs with ``--ckpt_path last``.
        A baseline never resumes: it has nothing to checkpoint and is simply run again."""
        if self.is_baseline:
            return False
        folder = self.checkpoint_folder
        return folder.is_dir() and any(folder.glob("*.ckpt"))

    def state(self) -> str:
        """``finished``, ``resumable`` (killed after a checkpoint) or ``new``."""
        if self.is_finished():
            return "finished"
        return "resumable" if self.can_resume() else "new"

    def fit_argv(self, resume: bool) -> list[str]:
        """The full ``hardneg`` argv of the next attempt: the run folder last, so it always wins.
        A baseline evaluates the untrained model: it never takes a checkpoint."""
        argv = [*self.argv, f"--trainer.default_root_dir={self.folder}"]
        return argv + ["--ckpt_path", "last"] if resume and not self.is_baseline else argv

    def record(self) -> dict[str, Any]:
        """What ``cell.json`` stores; also the cell's row in ``grid.json``."""
        return {
            "id": self.id,
            "kind": self.kind,
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

    def last_error(self) -> str | None:
        """The error line of the last attempt's output in ``stdout.log`` (see ``last_error``)."""
        path = self.folder / "stdout.log"
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return None
        return last_error(text.rsplit(ATTEMPT_MARK, 1)[-1])

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Cell":
        labels = record["labels"]
        return cls(
            labels=dict(labels.items() if isinstance(labels, dict) else labels),
            seed=int(record["seed"]),
            entries=tuple(record["entries"]),
            argv=tuple(record["argv"]),
            folder=Path(record["folder"]),
            kind=record.get("kind", "cell"),
        )


ATTEMPT_MARK = "\n===== grid attempt "  # how ``run_cell`` starts each attempt's part of ``stdout.log``
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning|Failure|Fault)\b(:.*)?$")
_ERROR_WORD = re.compile(r"\berror\b", re.IGNORECASE)
_HARDNEG_MESSAGE = re.compile(r"^hardneg [a-z]+: ")  # how hardneg's own errors exit, without a traceback


def last_error(output: str, max_chars: int = 300) -> str | None:
    """The line that says why a run failed, from its output: whichever comes last of hardneg's own
    error message (``hardneg fit: ...``, printed without a traceback) and the exception line of the
    last Python traceback (``ValueError: margin must be positive``); else the last line that names
    an error (argument errors); else ``None``."""
    lines = output.splitlines()
    start = max((i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")), default=-1)
    message = max((i for i, line in enumerate(lines) if _HARDNEG_MESSAGE.match(line)), default=-1)
    if message > start:
        return _shorten(lines[message].strip(), max_chars)
    if start >= 0:
        # The first unindented line after the frames; chained tracebacks end with the last one.
        for line in lines[start + 1 :]:
            if line.strip() and not line[0].isspace():
                return _shorten(line.strip(), max_chars)
    for line in reversed(lines):
        stripped = line.strip()
        if _EXCEPTION.match(stripped) or _ERROR_WORD.search(stripped):
            return _shorten(stripped, max_chars)
    return None


def _shorten(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."
