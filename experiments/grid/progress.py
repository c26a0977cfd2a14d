"""``GridProgress``: the progress lines ``hardneg grid`` prints (cells done / total, running cells, ETA).

A Ray Tune ``Callback`` in the driver. Each running cell reports the fraction of its training
steps done (read from its ``progress.json``); finished cells give the time a cell takes.
"""

from __future__ import annotations

import signal
import statistics
import time
from collections.abc import Callable
from typing import Any

from ray import tune

from experiments.grid.cell import Cell


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def estimate_eta(pending: int, running: list[tuple[float, float | None]], durations: list[float], slots: int) -> float | None:
    """Seconds until the grid ends, ``None`` while nothing is known yet.

    Args:
        pending: cells not started yet.
        running: ``(elapsed seconds, fraction of training done or None)`` per running cell.
        durations: wall seconds of the cells finished in this session.
        slots: how many cells run at once.

    One cell's duration is the median of the finished ones; before any finishes, the running cells'
    ``elapsed / fraction`` (which leaves out the start-up and final evaluation, so it is low).
    """
    if durations:
        per_cell = statistics.median(durations)
    else:
        guesses = [elapsed / fraction for elapsed, fraction in running if fraction and fraction >= 0.05]
        if not guesses:
            return None
        per_cell = statistics.median(guesses)
    left_running = [max(per_cell - elapsed, 0.0) for elapsed, _ in running]
    work = sum(left_running) + pending * per_cell
    return max(work / max(slots, 1), max(left_running, default=0.0))


class GridProgress(tune.Callback):
    """Prints a line when a cell starts, finishes or fails, and a status line every ``every_s`` seconds.

    Args:
        total: cells in the grid.
        already_done: cells finished before this session.
        slots: cells that run at once.
        metric: the final metric shown for a finished cell.
        every_s: seconds between status lines.
        echo: where lines go (``print``).
    """

    def __init__(self, total: int, already_done: int, slots: int, metric: str = "recall@1", every_s: float = 30.0, echo: Callable[[str], None] | None = None) -> None:
        self.total = total
        self.done = already_done
        self.failed: list[str] = []
        self.slots = slots
        self.metric = metric
        self.every_s = every_s
        self.echo = echo or (lambda line: print(line, flush=True))
        self.start = time.monotonic()
        self.running: dict[str, dict[str, Any]] = {}
        self.durations: list[float] = []
        self.pending = total - already_done
        self._last_status = time.monotonic()

    def _eta(self) -> float | None:
        now = time.monotonic()
        running = [(now - r["start"], r["progress"]) for r in self.running.values()]
        return estimate_eta(self.pending, running, self.durations, self.slots)

    def _head(self) -> str:
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return f"[grid {self.done}/{self.total} done{failed}]"

    def _tail(self) -> str:
        return f"elapsed {format_seconds(time.monotonic() - self.start)}, ETA {format_seconds(self._eta())}"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        cell = Cell.from_record(trial.config["cell"])
        self.pending = max(self.pending - 1, 0)
        self.running[trial.trial_id] = {"id": cell.id, "start": time.monotonic(), "progress": None}
        how = " (resuming from its last.ckpt)" if cell.can_resume() else ""
        self.echo(f"{self._head()} start {cell.id}{how}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if trial.trial_id in self.running and result.get("progress") is not None:
            self.running[trial.trial_id]["progress"] = float(result["progress"])
            self.running[trial.trial_id]["stage"] = result.get("stage")
        if time.monotonic() - self._last_status >= self.every_s and self.running:
            self._last_status = time.monotonic()
            cells = ", ".join(f"{r['id']} {format_progress(r['progress'], r.get('stage'))}" for r in self.running.values())
            self.echo(f"{self._head()} running: {cells} | {self._tail()}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run = self.running.pop(trial.trial_id, None)
        seconds = time.monotonic() - run["start"] if run else None
        if seconds is not None and trial.config["cell"].get("kind") != "baseline":  # a test run says little of a cell's time
            self.durations.append(seconds)
        self.done += 1
        value = (trial.last_result or {}).get(self.metric)
        shown = f": {self.metric}={value:.4f}" if isinstance(value, (int, float)) else ""
        self.echo(f"{self._head()} finished {trial.config['cell']['id']} in {format_seconds(seconds)}{shown} | {self._tail()}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.pop(trial.trial_id, None)
        cell = Cell.from_record(trial.config["cell"])
        self.failed.append(cell.id)
        attempts = cell.attempts()
        code = attempts[-1].get("exit_code") if attempts else None
        if code is None:
            why = "its Ray worker died or the cell could not start"
        else:
            why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        error = cell.last_error() if code is not None and code > 0 else None
        quoted = f": {error}" if error else ""
        self.echo(f"{self._head()} FAILED {cell.id} ({why}){quoted}; see {cell.folder / 'stdout.log'} | {self._tail()}")


def format_progress(fraction: float | None, stage: str | None = None) -> str:
    if stage == "final evaluation":
        return "final evaluation"
    return "starting" if fraction is None else f"{100 * fraction:.0f}%"
