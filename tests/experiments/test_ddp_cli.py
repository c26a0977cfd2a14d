"""``hardneg fit`` and a ``hardneg grid`` cell with 2 CPU processes (DDP, gloo), end to end.

Subprocesses running the console module, not ``strategy="ddp"`` inside pytest (which would re-run
the pytest session in the child rank). Every callback that writes into the run folder is in the
run: a collective called on one rank only (``trainer.log_dir`` inside ``if trainer.is_global_zero``,
a barrier behind a timer) hangs or kills such a run, which the ``timeout`` turns into a failure.
"""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, BATCHES = 2, 3
DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "data.init_args.classes_per_batch=2"]
BUDGET = [f"trainer.max_epochs={EPOCHS}", f"data.init_args.num_batches={BATCHES}", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]
CALLBACKS = ["experiments.callbacks.RetrievalReport", "experiments.callbacks.HardnessMonitor", "experiments.callbacks.ProgressFile"]


def run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``python -m experiments.cli ARGS`` in its own session, killed with all its ranks on timeout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.cli", *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"hardneg {args[0]} under DDP did not finish in {timeout} s (a collective on one rank only?):\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def metrics_steps(path: Path, column: str) -> list[int]:
    with open(path, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get(column)]


def check_run_folder(folder: Path, epochs: int) -> None:
    results = json.loads((folder / "results.json").read_text())
    for when in ("before_training", "after_training"):
        assert 0 <= results[when]["recall@1"] <= 1, results
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["trainer"]["strategy"] == "ddp" and str(config["trainer"]["devices"]) == "2"
    assert metrics_steps(folder / "metrics.csv", "train/loss") == list(range(epochs * BATCHES))
    assert metrics_steps(folder / "metrics.csv", "val/recall@1") == [(e + 1) * BATCHES - 1 for e in range(epochs)]
    hardness = json.loads((folder / "hardness.json").read_text())
    assert [s["step"] for s in hardness["steps"]] == list(range(1, epochs * BATCHES + 1))
    assert json.loads((folder / "progress.json").read_text())["total_steps"] == epochs * BATCHES
    assert torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == epochs * BATCHES


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fit_with_two_processes_then_resume(tmp_path):
    folder = tmp_path / "run"
    args = ["fit", "--config", "tests/configs/digits_tiny.yaml", f"--trainer.default_root_dir={folder}"]
    args += [f"--{a}" for a in DDP + BUDGET] + [f"--trainer.callbacks+={c}" for c in CALLBACKS]
    done = run(args, timeout=80)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "untrained" in done.stdout and "trained" in done.stdout  # the table, printed by rank 0
    check_run_folder(folder, EPOCHS)

    # One more epoch from last.ckpt, still on 2 processes: the first epochs' rows are kept, once.
    before = (folder / "metrics.csv").read_text().splitlines()
    resumed = run([*args, f"--trainer.max_epochs={EPOCHS + 1}", "--ckpt_path", "last"], timeout=80)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    after = (folder / "metrics.csv").read_text().splitlines()
    assert after[: len(before)] == before
    check_run_folder(folder, EPOCHS + 1)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_grid_cell_with_two_processes(tmp_path):
    grid = {
        "base": ["tests/configs/digits_tiny.yaml", *DDP, *BUDGET],
        "axes": {"miner": ["experiments/miner/batch_hard.yaml"]},
        "seeds": 1,
        "overrides": ["trainer.callbacks+=experiments.callbacks.RetrievalReport"],
    }
    path, out = tmp_path / "ddp_grid.yaml", tmp_path / "grid"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    done = run(["grid", str(path), "--output", str(out), "--num-cpus", "2", "--cpus-per-run", "2"], timeout=150)
    assert done.returncode == 0, done.stdout[-4000:]
    (cell,) = sorted((out / "cells").iterdir())
    assert json.loads((cell / "done.json").read_text())["metrics"]["recall@1"] >= 0, (cell / "stdout.log").read_text()[-4000:]
    assert [a["exit_code"] for a in json.loads((cell / "attempts.json").read_text())] == [0]
    check_run_folder(cell, EPOCHS)
