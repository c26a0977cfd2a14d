"""Running one grid cell: ``hardneg fit`` in a child process, resumable, finished exactly once.

Why a child process rather than ``run_lightning_cli`` inside the Ray worker: a cell is then
literally ``hardneg fit`` (its argv is in ``cell.json``; copy it to rerun one cell by hand); each
cell starts from a clean interpreter (no seeds, thread settings, logging handlers or memory left by
the previous cell in a reused worker); its output goes to its own ``stdout.log``; and killing a
cell kills one process, not the Ray worker. The price is one interpreter start per cell (imports:
about 10 s of CPU here).

Exactly once, across crashes:

- the cell holds an exclusive ``flock`` on ``<cell>/.lock`` for as long as its ``hardneg fit``
  child lives (the child inherits the descriptor), so a rerun cannot start a cell that an orphan
  still runs; the child dies with the worker (``experiments.grid.fate_share``);
- a cell with ``done.json`` is finished and never started again; ``done.json`` is written
  atomically after the child exited with status 0;
- a cell killed after its first checkpoint resumes from ``checkpoints/last.ckpt``
  (``--ckpt_path last``); one killed before it starts over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from experiments.atomic import atomic_write_json
from experiments.grid.cell import Cell
from experiments.grid.run_folder import final_metrics, last_logged, read_metrics_csv

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class CellFailed(RuntimeError):
    """``hardneg fit`` of a cell exited with a non-zero status or was killed."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _acquire(lock_path: Path, timeout_s: float) -> int:
    """An fd holding an exclusive ``flock`` on ``lock_path``; waits up to ``timeout_s`` for it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                os.close(fd)
                raise CellFailed(
                    f"{lock_path} is locked by another process running this cell (an earlier grid still "
                    f"running, or its orphaned child); stop it or wait for it to end"
                ) from e
            time.sleep(0.5)


def cell_env(cwd: Path, threads: int | None) -> dict[str, str]:
    """The child's environment: the project and the launch folder importable; ``threads`` CPU threads."""
    env = dict(os.environ)
    paths = [str(PROJECT_ROOT), str(cwd)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    if threads:
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[key] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def wait_with_usage(proc: subprocess.Popen, poll_s: float, tick: Callable[[], None]) -> tuple[int, float]:
    """Wait for ``proc``, calling ``tick`` every ``poll_s`` seconds; its exit code (``-N``: killed by
    signal N) and the CPU seconds it and its waited-for children used (``os.wait4``)."""
    next_tick = time.monotonic()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() >= next_tick:
            tick()
            next_tick = time.monotonic() + poll_s
        time.sleep(0.2)


def read_progress(cell: Cell) -> dict[str, Any]:
    """``{"progress": fraction of the training steps done or None, "stage": "train" | "final evaluation" | None}``
    from the cell's ``ProgressFile`` callback."""
    try:
        data = json.loads((cell.folder / "progress.json").read_text())
    except (OSError, ValueError):
        return {"progress": None, "stage": None}
    total = data.get("total_steps")
    return {"progress": min(1.0, data["step"] / total) if total else None, "stage": data.get("stage")}


def baseline_metrics(folder: str | Path) -> dict[str, Any]:
    """The untrained model's metrics from a finished baseline job (``hardneg test``): its
    ``results.json`` (``UntrainedBaseline``: test and validation metrics), else the ``test/*``
    metrics of its newest ``test-*/metrics.csv``.
    Returns ``{"metrics": {...}, "metrics_val": {...} | None, "source": str}``."""
    folder = Path(folder)
    results = folder / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        if data.get("before_training"):
            return {"metrics": data["before_training"], "metrics_val": data.get("val_before_training"), "source": "results.json (test, untrained)"}
    logs = sorted(folder.glob("test-*/metrics.csv"))
    logged = last_logged(read_metrics_csv(logs[-1]), "test") if logs else {}
    if not logged:
        raise FileNotFoundError(f"baseline {folder} has neither results.json nor test/* metrics in test-*/metrics.csv")
    return {"metrics": logged, "metrics_val": None, "source": "metrics.csv (test, untrained)"}


def run_cell(
    cell: Cell,
    cwd: str | Path,
    threads: int | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    poll_s: float = 2.0,
    lock_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Run ``cell`` to completion (or return its result if it is already finished).

    Args:
        cell: the cell.
        cwd: the child's working folder (where ``hardneg grid`` was started, so that relative paths
            in configs mean what they mean for ``hardneg fit`` there).
        threads: CPU threads of the child (``OMP_NUM_THREADS``); ``None`` leaves the environment.
        on_progress: called every ``poll_s`` seconds with ``read_progress(cell)``.

    Returns the content of ``done.json``. Raises ``CellFailed`` if the child fails, quoting the
    error line of its output.
    """
    cwd = Path(cwd)
    cell.folder.mkdir(parents=True, exist_ok=True)
    lock = _acquire(cell.folder / ".lock", lock_timeout_s)
    try:
        if cell.is_finished():
            return cell.done()
        recorded = cell.recorded_entries()
        if recorded is not None and recorded != list(cell.entries):
            raise CellFailed(f"cell {cell.id}: {cell.folder} was run with entries {recorded}, the grid now gives {list(cell.entries)}")
        atomic_write_json(cell.folder / "cell.json", cell.record())
        resume = cell.can_resume()
        argv = cell.fit_argv(resume)
        attempts = cell.attempts()
        attempt = {"attempt": len(attempts) + 1, "started": _now(), "resumed": resume, "host": socket.gethostname(), "argv": argv}
        attempts.append(attempt)
        atomic_write_json(cell.folder / "attempts.json", attempts)

        start = time.monotonic()
        with open(cell.folder / "stdout.log", "a") as log:
            log.write(f"\n===== grid attempt {attempt['attempt']} at {attempt['started']}{' (resuming from last.ckpt)' if resume else ''}\n")
            log.write("hardneg " + " ".join(argv) + "\n")
            log.flush()
            proc = subprocess.Popen(
                [sys.executable, "-m", "experiments.grid.fate_share", str(os.getpid()), *argv],
                cwd=cwd,
                env=cell_env(cwd, threads),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(lock,),
            )
            attempt["pid"] = proc.pid
            atomic_write_json(cell.folder / "attempts.json", attempts)
            code, cpu = wait_with_usage(proc, poll_s, lambda: on_progress(read_progress(cell)) if on_progress else None)
        attempt.update({"ended": _now(), "seconds": round(time.monotonic() - start, 1), "cpu_seconds": round(cpu, 1), "exit_code": code})
        atomic_write_json(cell.folder / "attempts.json", attempts)
        if code != 0:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            error = cell.last_error() if code > 0 else None
            raise CellFailed(f"cell {cell.id}: hardneg {argv[0]} {how}{f' ({error})' if error else ''}; its output is in {cell.folder / 'stdout.log'}")
        result = {
            "id": cell.id,
            "kind": cell.kind,
            "labels": [[axis, label] for axis, label in cell.labels.items()],
            "seed": cell.seed,
            **(baseline_metrics(cell.folder) if cell.is_baseline else final_metrics(cell.folder)),
            "attempts": len(attempts),
            "seconds": attempt["seconds"],
            "cpu_seconds": attempt["cpu_seconds"],
            "seconds_all_attempts": round(sum(a.get("seconds", 0.0) for a in attempts), 1),
            "finished": attempt["ended"],
        }
        atomic_write_json(cell.done_file, result)
        return result
    finally:
        os.close(lock)


def ray_trainable(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: ``config = {"cell": Cell.record(), "cwd": ..., "threads": ...}``.

    Reports ``progress`` (fraction of training done) and ``stage`` while the cell runs, and its final
    metrics at the end.
    """
    from ray import tune

    cell = Cell.from_record(config["cell"])
    last = [0.0]

    def report(progress: dict[str, Any]) -> None:
        # Tune counts every report as one iteration; a few per minute are enough for the ETA.
        if progress["progress"] is not None and time.monotonic() - last[0] > 10:
            last[0] = time.monotonic()
            tune.report({**progress, "finished": False})

    result = run_cell(cell, config["cwd"], config.get("threads"), on_progress=report)
    metrics = {k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    tune.report({"progress": 1.0, "finished": True, "seconds": result["seconds"], **metrics})
