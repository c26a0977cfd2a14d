"""``hardneg grid`` on Ray Tune survives SIGKILL of one cell and of the whole grid; the rerun finishes
every cell exactly once, resumes the interrupted ones from their checkpoints and keeps the finished ones.

One real grid (digits, 2 miners x 1 loss x 2 seeds = 4 cells, 2 at a time) in a subprocess with its
own session, then ``hardneg report`` on its results.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, BATCHES = 6, 5


def write_grid(tmp_path: Path) -> Path:
    grid = {
        "base": [
            "tests/configs/digits_tiny.yaml",
            f"trainer.max_epochs={EPOCHS}",
            f"data.init_args.num_batches={BATCHES}",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
        ],
        "axes": {"miner": ["experiments/miner/batch_hard.yaml", "experiments/miner/multi_similarity.yaml"], "loss": ["experiments/loss/triplet_margin.yaml"]},
        "seeds": 2,
        "overrides": ["trainer.callbacks+=experiments.callbacks.RetrievalReport"],
    }
    path = tmp_path / "digits_grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def start_grid(path: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.cli", "grid", str(path), "--output", str(out), "--num-cpus", "2", "--cpus-per-run", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def cells(out: Path) -> list[Path]:
    return sorted((out / "cells").glob("*")) if (out / "cells").is_dir() else []


def attempts(cell: Path) -> list[dict]:
    try:
        return json.loads((cell / "attempts.json").read_text())
    except (OSError, ValueError):
        return []


def interrupted(cell: Path, exclude: set = frozenset()) -> bool:
    """Running, past its first checkpoint, not finished."""
    return cell not in exclude and (cell / "checkpoints" / "last.ckpt").exists() and not (cell / "done.json").exists()


def wait_for(proc: subprocess.Popen, condition, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the grid ended before {what}:\n{proc.stdout.read()}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"timed out waiting for {what}")


def metric_rows(cell: Path) -> list[dict[str, str]]:
    with open(cell / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


def rows_before_checkpoint(cell: Path) -> list[dict[str, str]]:
    """The rows of ``metrics.csv`` logged before the cell's ``last.ckpt`` was saved."""
    ckpt = torch.load(cell / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    step = ckpt["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]
    return [row for row in metric_rows(cell) if int(row["step"]) < step]


def cell_processes(out: Path) -> list[int]:
    """pids of live ``hardneg fit`` children of this grid (orphans, if fate sharing failed)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            if "experiments.grid.fate_share" in cmdline and str(out) in cmdline and (proc / "stat").read_text().split()[2] != "Z":
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_one_cell_then_the_whole_grid_then_resume(tmp_path):
    path, out = write_grid(tmp_path), tmp_path / "grid"
    proc = start_grid(path, out)

    # 1. SIGKILL one cell's `hardneg fit` after its first checkpoint: the grid goes on without it.
    def running_cell():
        for cell in cells(out):
            pid = (attempts(cell) or [{}])[-1].get("pid")
            if pid and interrupted(cell):
                return cell, pid

    killed_cell, pid = wait_for(proc, running_cell, "a cell had a checkpoint")
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)  # the kill lands
    logged_before_kill = {killed_cell: rows_before_checkpoint(killed_cell)}

    # 2. SIGKILL the whole grid (driver, Ray, workers, cells) once another cell finished and one is mid-way.
    def finished_and_interrupted():
        done = [c for c in cells(out) if (c / "done.json").exists()]
        mid = [c for c in cells(out) if interrupted(c, exclude={killed_cell})]
        return (done, mid) if done and mid else None

    done_before, mid_way = wait_for(proc, finished_and_interrupted, "one cell finished and another was mid-way")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first_log = proc.stdout.read()
    done_before = [c for c in cells(out) if (c / "done.json").exists()]  # those that made it before the kill landed
    for cell in mid_way:
        if cell not in done_before:
            logged_before_kill[cell] = rows_before_checkpoint(cell)
    stamps = {c: (c / "done.json").stat().st_mtime_ns for c in done_before}
    assert len(done_before) < 4, first_log
    assert f"FAILED {json.loads((killed_cell / 'cell.json').read_text())['id']} (killed by SIGKILL)" in first_log, first_log

    # No orphan keeps training: the cells die with their Ray worker.
    deadline = time.time() + 60
    while cell_processes(out) and time.time() < deadline:
        time.sleep(0.5)
    assert not cell_processes(out), "orphaned hardneg fit processes survived the SIGKILL of the grid"

    # 3. Rerun the same command: only the unfinished cells run, the interrupted ones from their checkpoints.
    rerun = start_grid(path, out)
    log, _ = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, log
    assert f"{len(done_before)} finished" in log, log

    all_cells = cells(out)
    assert len(all_cells) == 4
    for cell in all_cells:
        tries = attempts(cell)
        completed = [a for a in tries if a.get("exit_code") == 0]
        assert len(completed) == 1, (cell.name, tries)  # exactly one run to completion
        assert tries[-1] is completed[0]
        final = torch.load(cell / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert final["global_step"] == EPOCHS * BATCHES, cell.name
        done = json.loads((cell / "done.json").read_text())
        assert done["attempts"] == len(tries) and 0 <= done["metrics"]["recall@1"] <= 1
        assert json.loads((cell / "results.json").read_text())["after_training"]["recall@1"] == done["metrics"]["recall@1"]
        history = json.loads((cell / "hardness.json").read_text())
        assert [s["step"] for s in history["steps"]] == list(range(1, EPOCHS * BATCHES + 1)), cell.name
        rows = metric_rows(cell)  # every step of the whole run exactly once, resumed or not
        assert [int(r["step"]) for r in rows if "train/loss" in r] == list(range(EPOCHS * BATCHES)), cell.name
        assert [int(r["step"]) for r in rows if "val/recall@1" in r] == [(e + 1) * BATCHES - 1 for e in range(EPOCHS)], cell.name
        if cell in logged_before_kill:  # the rows logged before the kill survived the resume unchanged
            assert logged_before_kill[cell] and rows[: len(logged_before_kill[cell])] == logged_before_kill[cell], cell.name
    for cell, stamp in stamps.items():  # finished cells were not run again
        assert len(attempts(cell)) == 1 and (cell / "done.json").stat().st_mtime_ns == stamp
    for cell in [killed_cell, *mid_way]:  # interrupted after a checkpoint: resumed from it
        if cell not in stamps:
            assert attempts(cell)[-1]["resumed"], (cell.name, attempts(cell))
            assert "Restoring states from the checkpoint" in (cell / "stdout.log").read_text()
    assert attempts(killed_cell)[0]["exit_code"] == -signal.SIGKILL

    # 4. Nothing left: a third run starts nothing; the report reads the finished grid.
    again = start_grid(path, out)
    log, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "nothing to run" in log, log
    from experiments.grid.report import write_report

    report = write_report(out)
    text = (report / "report.md").read_text()
    assert "| miner | recall@1 |" in text  # the one-value loss axis is not a column
    assert "(n=" not in text and "| batch_hard |" in text and "| multi_similarity |" in text
    assert (report / "hardness.png").exists() and (report / "curves.png").exists()
